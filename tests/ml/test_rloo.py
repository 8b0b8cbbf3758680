"""RLOO on tiny real models on the CPU: leave-one-out advantages and the loss by hand, the synthetic reward rises
within the KL bound, the KL guard, the saved folder, cancellation and the missing-EOS penalty."""

import pytest
import torch

from ml.rloo import (
    RLOOConfig,
    leave_one_out_advantages,
    rloo_policy_loss,
    sequence_kl,
    train_rloo,
)
from ml.runs import Cancelled, Progress, TrainingFailed
from tests.support.ppo import PROMPTS, low_byte_fraction


def test_leave_one_out_advantages_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.5, 0.5, 0.5, 0.5], [-1.0, 0.0, 4.0, 1.0]])

    advantages = leave_one_out_advantages(rewards)

    # Row 1: 1 - (2 + 3 + 6) / 3, 2 - (1 + 3 + 6) / 3, 3 - (1 + 2 + 6) / 3, 6 - (1 + 2 + 3) / 3.
    expected_first = torch.tensor([1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3])
    assert torch.allclose(advantages[0], expected_first)
    assert torch.allclose(advantages[1], torch.zeros(4))  # equal rewards: no signal
    assert torch.allclose(advantages[2], torch.tensor([-1 - 5 / 3, 0 - 4 / 3, 4 - 0 / 3, 1 - 3 / 3]))
    assert torch.allclose(advantages.sum(-1), torch.zeros(3), atol=1e-6)
    # The same as K / (K - 1) times the reward minus the prompt's mean.
    assert torch.allclose(advantages, 4 / 3 * (rewards - rewards.mean(-1, keepdim=True)), atol=1e-6)
    assert torch.allclose(leave_one_out_advantages(torch.tensor([[3.0, 1.0]])), torch.tensor([[2.0, -2.0]]))
    with pytest.raises(ValueError):
        leave_one_out_advantages(torch.tensor([[1.0], [2.0]]))


def test_the_loss_spreads_each_sequence_advantage_over_its_tokens():
    old = torch.zeros(2, 3)
    logprobs = torch.log(torch.tensor([[1.5, 1.1, 9.0], [0.5, 1.0, 1.0]]))  # ratios; the 9.0 is past the end
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    advantages = torch.tensor([2.0, -1.0])

    loss, clip_fraction, _ = rloo_policy_loss(logprobs, old, advantages, mask, clip_range=0.2)

    # Per token max(-A r, -A clip(r)): row 1 -2.4 (clipped), -2.2; row 2 0.8 (clipped), 1, 1; mean over 5 tokens.
    assert loss.item() == pytest.approx((-2.4 - 2.2 + 0.8 + 1 + 1) / 5)
    assert clip_fraction.item() == pytest.approx(2 / 5)
    # At the rollout's own log-probs (ratio 1) the gradient is REINFORCE's: -A per token, over the token count.
    logprobs = old.clone().requires_grad_(True)
    rloo_policy_loss(logprobs, old, advantages, mask, clip_range=0.2)[0].backward()
    assert torch.allclose(logprobs.grad, -advantages[:, None] * mask / 5)

    kl = sequence_kl(torch.tensor([[-1.0, -2.0, -5.0]]), torch.tensor([[-1.5, -1.0, 0.0]]), mask[:1])
    assert torch.allclose(kl, torch.tensor([0.5 - 1.0]))


@pytest.fixture(scope="module")
def reward_dir(tiny_model_dirs, tmp_path_factory):
    """A reward model made from the tiny policy (its fresh score head), for the runs that score with one."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs[0])
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dirs[0], num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    directory = tmp_path_factory.mktemp("reward")
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def fast_config(**overrides) -> RLOOConfig:
    """Small and fast; as in test_ppo, responses are scored as they are (the tiny model rarely ends in 4 tokens)."""
    values = {
        "iterations": 2,
        "prompts_per_iteration": 4,
        "k": 4,
        "minibatch_size": 8,
        "learning_rate": 3e-3,
        "max_new_tokens": 4,
        "missing_eos_penalty": None,
        "lora_rank": 8,
        "lora_alpha": 16,
    }
    return RLOOConfig(**(values | overrides))


def test_rloo_raises_a_synthetic_reward_within_the_kl_bound(tiny_model_dirs, reward_dir, tmp_path):
    # 8 prompts x 4 samples, two minibatches of 16, two epochs (the reward rose by 0.25 to 0.3 with seeds 0 to 3).
    config = fast_config(iterations=20, prompts_per_iteration=8, minibatch_size=16, update_epochs=2)
    output_dir = tmp_path / "out"
    result = train_rloo(
        config,
        prompts=PROMPTS,
        policy_dir=tiny_model_dirs[0],
        reward_dir=reward_dir,
        output_dir=output_dir,
        reward_fn=low_byte_fraction,
    )

    rewards = [value for _, value in result.series["rloo/mean_reward"]]
    assert [step for step, _ in result.series["rloo/mean_reward"]] == list(range(1, 21))
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.1, rewards
    kls = [value for _, value in result.series["rloo/kl"]]
    assert kls[0] == pytest.approx(0.0, abs=1e-4)  # the first rollout comes from the SFT policy itself
    assert max(kls) < config.max_kl
    assert kls[-1] > 0.01  # the policy moved away from the reference
    metrics = result.metrics
    assert metrics["iterations"] == 20 and metrics["episodes"] == 20 * 32
    assert metrics["mean_reward_last"] > metrics["mean_reward_first"]
    assert metrics["kl_last"] == pytest.approx(kls[-1], abs=1e-5)
    assert 1 <= metrics["response_length_last"] <= 4
    for name in ("policy_loss", "entropy", "response_length", "finished_fraction", "clip_fraction", "approx_kl"):
        assert len(result.series[f"rloo/{name}"]) == 20, name
    # Merged LoRA: one safetensors file, no adapter, only the projections changed.
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    weights = sorted(p.name for p in output_dir.iterdir() if p.suffix in {".safetensors", ".bin", ".pt", ".pth"})
    assert weights == ["model.safetensors"]
    assert not (output_dir / "adapter_config.json").exists()
    assert not [key for key in load_file(output_dir / "model.safetensors") if "lora" in key or "base_layer" in key]
    reloaded = AutoModelForCausalLM.from_pretrained(output_dir)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[0])
    changed = [
        name
        for (name, tensor), reference in zip(reloaded.state_dict().items(), original.state_dict().values(), strict=True)
        if not torch.equal(tensor, reference)
    ]
    assert changed and all("proj" in name for name in changed)


def test_a_reward_that_only_depends_on_the_prompt_gives_no_signal(tiny_model_dirs, reward_dir, tmp_path):
    """The baseline is per prompt: K samples of one prompt all scoring the same give zero advantages, so the policy
    does not move (a batch-wide baseline would push prompts with high scores up and the others down)."""
    from safetensors.torch import load_file

    def prompt_length(chats, texts, token_ids):
        return [float(len(chat[-1]["content"].split())) for chat in chats]  # whole numbers: exact means

    output_dir = tmp_path / "out"
    result = train_rloo(
        fast_config(iterations=3, update_epochs=2, minibatch_size=4),
        prompts=PROMPTS,
        policy_dir=tiny_model_dirs[0],
        reward_dir=reward_dir,
        output_dir=output_dir,
        reward_fn=prompt_length,
    )

    assert {value for _, value in result.series["rloo/kl"]} == {0.0}
    assert {value for _, value in result.series["rloo/policy_loss"]} == {0.0}
    assert len({value for _, value in result.series["rloo/mean_reward"]}) > 1  # the prompts' scores differ
    saved, original = load_file(output_dir / "model.safetensors"), load_file(tiny_model_dirs[0] / "model.safetensors")
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[name], original[name]) for name in original)


def test_the_kl_guard_stops_a_run_that_drifts(tiny_model_dirs, reward_dir, tmp_path):
    # Without LoRA (a frozen reference copy) and with the reward model's own score (no reward_fn).
    seen = []
    progress = Progress(sink=lambda p: seen.append(dict(p.series)))
    output_dir = tmp_path / "out"

    with pytest.raises(TrainingFailed, match=r"KL \d+\.\d\d exceeded the bound 1e-06: stopped to avoid collapse"):
        train_rloo(
            fast_config(iterations=3, max_kl=1e-6, lora=False, learning_rate=1e-3),
            prompts=PROMPTS,
            policy_dir=tiny_model_dirs[0],
            reward_dir=reward_dir,
            output_dir=output_dir,
            progress=progress,
        )
    assert not output_dir.exists()
    # The first iteration, sampled from the reference itself, passed the guard (its KL is 0); the second did not.
    assert [step for step, _ in progress.series["rloo/kl"]] == [1]
    assert progress.series["rloo/kl"][0][1] == pytest.approx(0.0, abs=1e-6)


def test_cancellation_stops_the_run_and_writes_nothing(tiny_model_dirs, reward_dir, tmp_path):
    output_dir = tmp_path / "out"
    progress = Progress(should_stop=lambda: True)
    with pytest.raises(Cancelled):
        train_rloo(
            fast_config(iterations=5),
            prompts=PROMPTS,
            policy_dir=tiny_model_dirs[0],
            reward_dir=reward_dir,
            output_dir=output_dir,
            progress=progress,
            reward_fn=low_byte_fraction,
        )
    assert progress.step == 1
    assert not output_dir.exists()


def test_missing_eos_penalty_replaces_the_score(tiny_model_dirs, reward_dir, tmp_path):
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny_model_dirs[0]).eos_token_id
    calls = []

    def constant_reward(chats, texts, token_ids):
        calls.append((chats, token_ids))
        return [2.0] * len(token_ids)

    config = fast_config(iterations=2, max_new_tokens=3, missing_eos_penalty=-1.5, prompts_per_iteration=2, k=3)
    result = train_rloo(
        config,
        prompts=PROMPTS,
        policy_dir=tiny_model_dirs[0],
        reward_dir=reward_dir,
        output_dir=tmp_path / "out",
        reward_fn=constant_reward,
    )

    for (_, mean_reward), (chats, token_ids) in zip(result.series["rloo/mean_reward"], calls, strict=True):
        assert len(chats) == 6 and chats[0] == chats[1] == chats[2] and chats[3] == chats[4] == chats[5]
        expected = [2.0 if ids[-1] == eos else -1.5 for ids in token_ids]
        assert mean_reward == pytest.approx(sum(expected) / len(expected), abs=1e-5)
        assert all(len(ids) <= 3 and (eos not in ids[:-1]) for ids in token_ids)
    assert result.metrics["episodes"] == 12
