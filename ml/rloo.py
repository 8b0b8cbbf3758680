"""REINFORCE Leave-One-Out against a reward model: `train_rloo(config, prompts=..., ...) -> TrainResult`.

RLOO (Ahmadian et al. 2024, "Back to Basics"; as in TRL's RLOOTrainer and OpenRLHF) drops PPO's value model:
1. Each iteration samples K responses for each of `prompts_per_iteration` prompts from the policy, as PPO does
   (`rl.sample_responses`: full distribution at `temperature`, until EOS or `max_new_tokens`).
2. Each response is scored as PPO scores it (`rl.episode_scores`: the reward model on the response's text after the
   conversation, the fixed `missing_eos_penalty` for responses that never reached EOS).
3. The sequence-level KL to the reference (SFT) policy, `sum_t (logp_t - logp_ref_t)` over the response tokens
   at rollout time, is subtracted from the score: `R_i = score_i - beta * KL_i`.
4. The baseline of response i is the mean R of the other K - 1 responses to its prompt, so its advantage is
   `A_i = R_i - mean_{j != i} R_j` (an unbiased baseline that needs no learned value).
5. `update_epochs` passes over shuffled minibatches of the per-token clipped surrogate, with each response's
   advantage on every one of its tokens and the loss averaged over tokens (OpenRLHF's token-level loss). With
   one epoch and one minibatch the ratio is 1 and this is plain REINFORCE with the leave-one-out baseline.

With `lora=True` the policy trains LoRA adapters and the reference is the policy with its adapters disabled (as
in PPO); without LoRA the reference is a frozen copy. The reward model is a frozen sequence classifier, not
loaded when a `reward_fn` is given.
"""

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ml.device import limit_allocator_caching, release_freed_memory, seed_everything, training_device
from ml.generation import chat_prompt_ids, eos_ids
from ml.modeling import save_model
from ml.rl import (
    RewardFn,
    Rollout,
    cycle,
    episode_scores,
    frozen,
    masked_mean,
    policy_and_reference,
    policy_loss,
    policy_tokenizer,
    reference_logprobs,
    response_logprobs,
    reward_classifier,
    sample_responses,
)
from ml.runs import Progress, TrainingFailed, TrainResult, rollout_summary


@dataclass
class RLOOConfig:
    iterations: int = 20
    prompts_per_iteration: int = 4
    k: int = 4  # samples per prompt
    minibatch_size: int = 8  # episodes per optimizer step
    update_epochs: int = 1
    learning_rate: float = 1e-5
    kl_coef: float = 0.05  # beta: sequence-level KL penalty to the reference (SFT) policy, subtracted from the score
    max_kl: float = 25.0  # collapse guard: mean per-sequence KL above this fails the run
    clip_range: float = 0.2  # PPO-style ratio clipping when update_epochs > 1
    max_new_tokens: int = 48
    max_prompt_tokens: int = 256
    temperature: float = 1.0
    missing_eos_penalty: float | None = -1.0  # fixed score for responses without EOS; None scores them as they are
    normalize_advantages: bool = False
    lora: bool = True  # the policy gets LoRA adapters; reference = the policy with adapters disabled
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_top_layers: int = 0  # adapters on the top blocks only (0: every block); the backward pass stops there
    seed: int = 0
    max_grad_norm: float = 1.0


# --- advantages and the loss ---


def leave_one_out_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """[P, K] rewards (K responses per prompt) -> [P, K] advantages `R_i - mean_{j != i} R_j`. Each row sums to 0."""
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError("leave-one-out needs at least 2 samples per prompt")
    baseline = (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)
    return rewards - baseline


def rloo_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float
):
    """The clipped surrogate per token with each sequence's advantage ([B]) on all of its response tokens, averaged
    over the response tokens of the batch. Returns (loss, clip fraction, approx KL), as `ppo.policy_loss`."""
    return policy_loss(logprobs, old_logprobs, advantages[:, None].expand_as(logprobs), mask, clip_range)


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B]: the sum over each response's tokens of logp - logp_ref (the k1 estimate of KL(pi || pi_ref))."""
    return ((logprobs - ref_logprobs) * mask).sum(-1)


def _policy_step(policy, optimizer, batch: Rollout, advantages: torch.Tensor, config: RLOOConfig) -> dict:
    policy.train()
    optimizer.zero_grad(set_to_none=True)
    logprobs, entropy = response_logprobs(policy, batch, config.temperature, with_entropy=True)
    mask = batch.response_mask.float()
    loss, clip_fraction, approx_kl = rloo_policy_loss(logprobs, batch.logprobs, advantages, mask, config.clip_range)
    stats = {"policy_loss": loss.item(), "clip_fraction": clip_fraction.item(), "approx_kl": approx_kl.item()}
    stats["entropy"] = masked_mean(entropy, mask).item()
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stats


# --- the run ---


def _load(config: RLOOConfig, policy_dir: Path, reward_dir: Path, *, need_reward_model: bool, device, dtype):
    """Tokenizer, policy, reference (None with LoRA: the policy with its adapters disabled), frozen reward model
    (None when a reward_fn scores instead)."""
    tokenizer = policy_tokenizer(policy_dir, reward_dir if need_reward_model else None)
    policy, reference = policy_and_reference(policy_dir, config, device=device, dtype=dtype)
    reward_model = frozen(reward_classifier(reward_dir, device=device, dtype=dtype)) if need_reward_model else None
    return tokenizer, policy, reference, reward_model


def train_rloo(
    config: RLOOConfig,
    *,
    prompts: list[list[dict]],
    policy_dir: Path,
    reward_dir: Path,
    output_dir: Path,
    progress: Progress | None = None,
    reward_fn: RewardFn | None = None,
) -> TrainResult:
    """Run RLOO for `config.iterations` rollouts of `prompts_per_iteration` x `k` episodes and save the policy (LoRA
    merged, safetensors) to `output_dir`.

    Raises TrainingFailed when the mean per-sequence KL to the SFT policy exceeds `config.max_kl`, and Cancelled
    (from `progress.advance`) when the run is cancelled; in both cases nothing is written to `output_dir`.
    """
    if not prompts:
        raise ValueError("RLOO needs at least one prompt")
    if config.temperature <= 0:
        raise ValueError("RLOO samples from the policy: temperature must be positive")
    if config.k < 2:
        raise ValueError("RLOO needs k >= 2 samples per prompt (the baseline is the mean of the others)")
    if min(config.iterations, config.prompts_per_iteration, config.minibatch_size, config.update_epochs) < 1:
        raise ValueError("iterations, prompts_per_iteration, minibatch_size and update_epochs must be at least 1")
    progress = progress or Progress()
    started = time.monotonic()
    seed_everything(config.seed)
    limit_allocator_caching()
    device, dtype = training_device()
    tokenizer, policy, reference, reward_model = _load(
        config, policy_dir, reward_dir, need_reward_model=reward_fn is None, device=device, dtype=dtype
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = eos_ids(policy, tokenizer)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, eps=1e-5)
    rng = random.Random(config.seed)
    prompt_stream = cycle(list(range(len(prompts))), rng)
    encoded = [chat_prompt_ids(tokenizer, chat, max_prompt_tokens=config.max_prompt_tokens)[0] for chat in prompts]
    generator = torch.Generator(device=device).manual_seed(config.seed)
    episodes = config.prompts_per_iteration * config.k
    progress.start(config.iterations)
    progress.message(
        f"RLOO: {config.iterations} iterations of {config.prompts_per_iteration} prompts x {config.k} samples, "
        f"{len(prompts)} prompts in all"
    )
    history: list[dict] = []

    for iteration in range(1, config.iterations + 1):
        # 1-2. K responses per prompt (rows prompt by prompt) and their scores, without gradients.
        picked = [next(prompt_stream) for _ in range(config.prompts_per_iteration)]
        episode_prompts = [i for i in picked for _ in range(config.k)]
        policy.eval()
        batch, lengths, finished = sample_responses(
            policy,
            [encoded[i] for i in episode_prompts],
            pad_id=pad_id,
            stop_ids=stop_ids,
            config=config,
            generator=generator,
        )
        responses = [row[:n] for row, n in zip(batch.responses.tolist(), lengths, strict=True)]
        chats = [prompts[i] for i in episode_prompts]
        scores = episode_scores(
            reward_model,
            None,
            reward_fn,
            chats,
            responses,
            finished,
            tokenizer,
            batch_size=config.minibatch_size,
            missing_eos_penalty=config.missing_eos_penalty,
            device=device,
        )
        # 3. Rollout-time and reference log-probs, the sequence KL and its guard.
        parts = {"logprobs": [], "ref_logprobs": []}
        with torch.no_grad():
            for start in range(0, episodes, config.minibatch_size):
                rows = batch.rows(slice(start, start + config.minibatch_size))
                parts["logprobs"].append(response_logprobs(policy, rows, config.temperature)[0])
                parts["ref_logprobs"].append(reference_logprobs(policy, reference, rows, config.temperature))
        for name, chunks in parts.items():
            setattr(batch, name, torch.cat(chunks))
        mask = batch.response_mask.float()
        kl_per_sequence = sequence_kl(batch.logprobs, batch.ref_logprobs, mask)
        kl = kl_per_sequence.mean().item()
        if kl > config.max_kl:
            raise TrainingFailed(f"KL {kl:.2f} exceeded the bound {config.max_kl}: stopped to avoid collapse")
        # 4. KL-penalised rewards and leave-one-out advantages.
        rewards = scores - config.kl_coef * kl_per_sequence
        advantages = leave_one_out_advantages(rewards.view(config.prompts_per_iteration, config.k)).reshape(-1)
        if config.normalize_advantages:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        # 5. Policy-gradient epochs over shuffled minibatches.
        steps: list[dict] = []
        for _ in range(config.update_epochs):
            order = torch.randperm(episodes).to(device)
            for start in range(0, episodes, config.minibatch_size):
                index = order[start : start + config.minibatch_size]
                steps.append(_policy_step(policy, optimizer, batch.rows(index), advantages[index], config))

        figures = {name: sum(s[name] for s in steps) / len(steps) for name in steps[0]}
        figures |= {
            "mean_reward": scores.mean().item(),
            "mean_penalised_reward": rewards.mean().item(),
            "kl": kl,
            "response_length": sum(lengths) / len(lengths),
            "finished_fraction": sum(finished) / len(finished),
        }
        history.append(figures)
        for name, value in figures.items():
            progress.metric(f"rloo/{name}", value, step=iteration)
        progress.message(
            f"RLOO iteration {iteration}/{config.iterations}: reward {figures['mean_reward']:.3f}, KL {kl:.3f}, "
            f"policy loss {figures['policy_loss']:.4f}, clip {figures['clip_fraction']:.2f}, "
            f"length {figures['response_length']:.1f}"
        )
        del batch, rows, rewards, scores, advantages, kl_per_sequence, mask
        release_freed_memory()  # this iteration's activations, before the next rollout's (see limit_allocator_caching)
        progress.advance()

    save_model(policy, tokenizer, Path(output_dir))
    progress.flush(force=True)
    metrics = rollout_summary(history, episodes_per_iteration=episodes, started=started)
    return TrainResult(Path(output_dir), metrics=metrics, series=progress.series)
