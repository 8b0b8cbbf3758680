"""The training stages, declared once. Every place that names a stage reads this table: the run kinds and model
stages (their choices), the loop settings' policy paths, the loop and the runner, the ops pages, admin and the
benches. A new algorithm is its `ml/` module (a `train_x(config, ..., output_dir, progress) -> TrainResult` and a
config dataclass) plus one `register(Stage(...))` here.

Plain Python (no Django, no torch): the web process reads it too; the runner imports `trainer` and `config` by
name on the training worker only. The default configs fit the default model (SmolLM2-135M-Instruct) on a CPU:
the top blocks train, the frozen ones run once per reply (reward model, DPO), LoRA for the RL paths
(docs/training.md, "On a CPU"). On a GPU with a bigger model, set full fine-tuning through the environment
instead (e.g. TRAINING_RM_CONFIG='{"epochs": 1, "learning_rate": 1e-5}').
"""

from dataclasses import dataclass

# What a stage reads, i.e. which of the runner's readers (training_jobs/runner.py, READERS) feeds its trainer:
DEMONSTRATIONS = "demonstrations"  # accepted demonstrations (train and validation chats)
RANKINGS = "rankings"  # every ranking that gives a pair, with the imported HH-RLHF pairs as a held-out check
POLICY_RANKINGS = "policy rankings"  # the rankings of the starting policy's (or its ancestors') samples, not used yet
PROMPTS = "prompts"  # training prompts to sample rollouts for, scored by the reward model

POLICY, REWARD = "policy", "reward"  # what a stage produces (ModelVersion.Kind)


@dataclass(frozen=True)
class Stage:
    name: str  # a run's kind and the stage of the model it registers ("dpo")
    label: str  # what the pages call it ("DPO")
    produces: str  # POLICY or REWARD
    reads: str  # DEMONSTRATIONS, RANKINGS, POLICY_RANKINGS or PROMPTS
    trainer: str  # "module:function" of its ml/ trainer
    config: str  # "module:Class" of its config dataclass
    default_config: dict  # its config on the default model on a CPU; TRAINING_<NAME>_CONFIG replaces it
    policy_step: bool = False  # a path of the loop's third step: optimises the policy from the rankings
    needs_reward_model: bool = False  # optimises against the reward model (a policy step without it: gate only)
    continues_serving: bool = False  # starts from the serving policy when it descends from the newest SFT
    launchable: bool = False  # may run under `accelerate launch` (ml/launch.py knows it)
    description: str = ""  # one sentence for the loop settings' choice

    @property
    def config_variable(self) -> str:
        """The environment variable that replaces its default config (config/settings: TRAINING_STAGE_DEFAULTS)."""
        return f"TRAINING_{self.name.upper()}_CONFIG"


STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    if stage.name in STAGES or stage.name == BASE:
        raise ValueError(f"a stage named {stage.name!r} exists already")
    if len(stage.name) > 8:
        raise ValueError(f"{stage.name!r}: a stage's name is at most 8 characters (the run's kind column)")
    STAGES[stage.name] = stage
    return stage


def unregister(name: str) -> None:
    """For tests that add a stage of their own."""
    STAGES.pop(name)


BASE = "base"  # the stage of a starting model nothing trained here (not a run kind)
SFT, RM = "sft", "rm"  # the loop's first two steps, which the loop and the gate name

register(
    Stage(
        SFT,
        "Supervised fine-tuning",
        POLICY,
        DEMONSTRATIONS,
        "ml.sft:train_sft",
        "ml.sft:SFTConfig",
        {"epochs": 2, "learning_rate": 1e-4, "batch_size": 8, "max_length": 384, "train_top_layers": 8},
        launchable=True,
    )
)
register(
    Stage(
        RM,
        "Reward model",
        REWARD,
        RANKINGS,
        "ml.reward:train_reward",
        "ml.reward:RewardConfig",
        {
            "epochs": 3,
            "learning_rate": 1e-4,
            "head_learning_rate": 1e-3,
            "rankings_per_batch": 8,
            "max_length": 256,
            "train_top_layers": 4,
        },
        launchable=True,
    )
)
register(
    Stage(
        "ppo",
        "PPO",
        POLICY,
        PROMPTS,
        "ml.ppo:train_ppo",
        "ml.ppo:PPOConfig",
        {
            "iterations": 12,
            "rollout_batch_size": 16,
            "minibatch_size": 8,
            "learning_rate": 3e-4,
            "value_learning_rate": 3e-4,
            "lora_top_layers": 8,
            "kl_coef": 0.02,
        },
        policy_step=True,
        needs_reward_model=True,
        description="PPO: the reward model, then PPO with a value model and a KL penalty to SFT",
    )
)
register(
    Stage(
        "dpo",
        "DPO",
        POLICY,
        POLICY_RANKINGS,
        "ml.dpo:train_dpo",
        "ml.dpo:DPOConfig",
        {
            "epochs": 2,
            "learning_rate": 2e-5,
            "beta": 0.1,
            "rankings_per_batch": 4,
            "max_length": 256,
            "train_top_layers": 8,
            "length_balance": True,  # labelers' preferred replies run longer; without it DPO learns "longer" too
        },
        policy_step=True,
        continues_serving=True,
        description="DPO: directly from the ranked pairs of the current policy's samples, each round",
    )
)
register(
    Stage(
        "rloo",
        "RLOO",
        POLICY,
        PROMPTS,
        "ml.rloo:train_rloo",
        "ml.rloo:RLOOConfig",
        {"iterations": 12, "learning_rate": 3e-4, "lora_top_layers": 8},
        policy_step=True,
        needs_reward_model=True,
        description="RLOO: K samples per prompt scored by the reward model, a leave-one-out baseline",
    )
)

DEFAULT_POLICY_PATH = "dpo"


def policy_steps() -> list[str]:
    """The loop's third-step paths, in the order they were declared."""
    return [stage.name for stage in STAGES.values() if stage.policy_step]


def label(name: str) -> str:
    return "Base" if name == BASE else STAGES[name].label


# Choices for the model fields (callables: read each time, so a stage registered later shows everywhere).
def run_kind_choices() -> list[tuple[str, str]]:
    return [(stage.name, stage.label) for stage in STAGES.values()]


def model_stage_choices() -> list[tuple[str, str]]:
    return [(BASE, "Base"), *run_kind_choices()]


def policy_path_choices() -> list[tuple[str, str]]:
    return [(name, STAGES[name].label) for name in policy_steps()]
