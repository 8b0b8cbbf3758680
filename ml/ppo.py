"""PPO against a reward model, with a per-token KL penalty to the SFT policy (InstructGPT §3.5, Appendix C).

One iteration (Ouyang et al. 2022; "The N+ Implementation Details of RLHF with PPO", Huang et al. 2024):
1. Roll out one response per prompt from the policy: left-padded prompts, positions from the attention mask,
   sampling from the full distribution at `temperature` (no top-k or top-p), until EOS or `max_new_tokens`.
2. Score the response with the reward model as the product scores any reply: its text, tokenised again after the
   conversation (`pair_input_ids`), as in the reward model's training data and the gate's evaluation. Scoring
   the raw sampled ids instead lets PPO win on token sequences that no text ever tokenises to (seen with the
   tiny test models: training reward up, the gate's score of the same policy down). A response that never
   reached EOS gets the fixed `missing_eos_penalty` instead of a score.
3. Per-token reward `-beta * (logp - logp_ref)`, computed from the sampled tokens' log-probs under the policy and
   the frozen SFT policy at the rollout's temperature; the score is added at the last response token.
4. GAE (gamma = 1, lambda = 0.95) with values from a value model initialised from the reward model; advantages
   are whitened per batch.
5. `ppo_epochs` passes over shuffled minibatches: clipped policy loss (plus the PPO-ptx LM loss on demonstrations
   when `ptx_coef` > 0) and clipped value loss, each with its own optimizer and gradient clipping.

With `lora=True` the policy and the value model train LoRA adapters (and the value model its score head); the
reference policy is the policy with its adapters disabled, and the reward model is the value model with its
adapters disabled, so no second copy of either set of weights is loaded (the default 135M model then runs PPO
in about 3 GB on the CPU).
"""

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ml.device import autocast, limit_allocator_caching, release_freed_memory, seed_everything, training_device
from ml.generation import chat_prompt_ids, eos_ids, left_pad
from ml.modeling import apply_lora, save_model
from ml.rl import (
    RewardFn,
    Rollout,
    cycle,
    disable_dropout,
    episode_scores,
    frozen,
    frozen_reward_model,
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
from ml.scoring import REWARD_OFFSET, reply_token_logprobs, score_head, sequence_scores


@dataclass
class PPOConfig:
    iterations: int = 20
    rollout_batch_size: int = 8  # prompts per iteration, one response each
    minibatch_size: int = 4
    ppo_epochs: int = 2  # minibatch epochs per rollout
    learning_rate: float = 1e-5  # policy
    value_learning_rate: float = 1e-5
    kl_coef: float = 0.02  # beta, per-token KL penalty to the reference (SFT) policy
    adaptive_kl: bool = False  # Ziegler et al. adaptive controller toward target_kl
    target_kl: float = 6.0
    kl_horizon: int = 10000
    max_kl: float = 25.0  # collapse guard: mean per-sequence KL above this fails the run
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    max_new_tokens: int = 48
    max_prompt_tokens: int = 256
    temperature: float = 1.0
    missing_eos_penalty: float | None = -1.0  # fixed score for responses without EOS; None scores them as they are
    whiten_rewards: bool = False
    ptx_coef: float = 0.0  # PPO-ptx: gamma_ptx times the LM loss on SFT examples (0 = off)
    ptx_batch_size: int = 4
    lora: bool = True  # policy and value model get LoRA adapters; reference = policy with adapters disabled
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_top_layers: int = 0  # adapters on the top blocks only (0: every block); the backward pass stops there
    seed: int = 0
    max_grad_norm: float = 1.0


# --- rollouts and per-token figures ---


def reward_scores(reward_model, value_model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scores of left-padded reward-model inputs."""
    with torch.no_grad(), frozen_reward_model(reward_model, value_model) as model:
        return sequence_scores(model, ids, mask)


def token_values(value_model, batch: Rollout) -> torch.Tensor:
    """V(s_t) for every response step: the reward model's scalar head applied to the hidden state at each
    position (InstructGPT initialises the value function from the reward model)."""
    inner = value_model.get_base_model() if hasattr(value_model, "get_base_model") else value_model
    backbone = getattr(inner, inner.base_model_prefix)
    width = batch.responses.shape[1]
    with autocast():
        hidden = backbone(**batch.model_inputs()).last_hidden_state[:, -width - 1 : -1, :]
        values = score_head(inner)(hidden).squeeze(-1).float()
    offset = float(getattr(inner.config, REWARD_OFFSET, 0.0) or 0.0)
    return values + offset


# --- advantages and losses ---


def whiten(values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the unmasked entries (unbiased variance); with shift_mean=False the mean stays."""
    mask = mask.float()
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask) * mask.sum() / (mask.sum() - 1).clamp(min=1)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float):
    """Generalised advantage estimation over the response tokens. Steps past a response's end have value and
    reward 0, so the last token's advantage is `r_T - V(s_T)`. Returns (advantages, returns)."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages * mask, (advantages + values) * mask


def token_rewards(logprobs, ref_logprobs, mask, scores, beta: float):
    """Per-token reward `-beta * (logp - logp_ref)`, plus each episode's score at its last response token
    (InstructGPT's KL-penalised reward, per token). Returns (rewards, per-token KL)."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -beta * kl
    last = mask.sum(-1).long() - 1
    rewards[torch.arange(len(rewards), device=rewards.device), last] += scores
    return rewards, kl


def value_loss(values, old_values, returns, mask, clip_range: float) -> torch.Tensor:
    """Clipped value loss (N+ details): the value may move at most `clip_range` from its rollout estimate."""
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def _optimizer_step(model, optimizer, max_grad_norm: float) -> None:
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def policy_step(policy, optimizer, batch: Rollout, config: PPOConfig, *, ptx: tuple | None = None) -> dict:
    """One optimizer step of the policy on a minibatch (plus `ptx_coef` x the LM loss of a `ptx` batch; the two
    losses are backpropagated one after the other, so only one graph is held at a time)."""
    policy.train()
    optimizer.zero_grad(set_to_none=True)
    logprobs, entropy = response_logprobs(policy, batch, config.temperature, with_entropy=True)
    mask = batch.response_mask.float()
    loss, clip_fraction, approx_kl = policy_loss(logprobs, batch.logprobs, batch.advantages, mask, config.clip_range)
    stats = {"policy_loss": loss.item(), "clip_fraction": clip_fraction.item(), "approx_kl": approx_kl.item()}
    stats["entropy"] = masked_mean(entropy, mask).item()
    loss.backward()
    del logprobs, entropy, loss
    if ptx is not None and config.ptx_coef > 0:
        lm_loss = demonstration_loss(policy, *ptx)
        (config.ptx_coef * lm_loss).backward()
        stats["ptx_loss"] = lm_loss.item()
    _optimizer_step(policy, optimizer, config.max_grad_norm)
    return stats


def value_step(value_model, optimizer, batch: Rollout, config: PPOConfig) -> dict:
    value_model.train()
    optimizer.zero_grad(set_to_none=True)
    mask = batch.response_mask.float()
    loss = value_loss(token_values(value_model, batch), batch.values, batch.returns, mask, config.value_clip_range)
    loss.backward()
    _optimizer_step(value_model, optimizer, config.max_grad_norm)
    return {"value_loss": loss.item()}


def demonstration_loss(policy, ids: torch.Tensor, mask: torch.Tensor, reply_lengths: torch.Tensor) -> torch.Tensor:
    """Mean LM loss on the reply tokens of left-padded (prompt + reply + EOS) rows: the PPO-ptx term."""
    with autocast():
        logprobs, reply_mask = reply_token_logprobs(policy, ids, mask, reply_lengths)
    return -masked_mean(logprobs, reply_mask.float())


class AdaptiveKLController:
    """Ziegler et al. (2019): beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)."""

    def __init__(self, beta: float, target: float, horizon: int):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, episodes: int) -> None:
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.beta *= 1 + error * episodes / self.horizon


# --- the run ---


def _load(config: PPOConfig, policy_dir: Path, reward_dir: Path, *, need_reward_model: bool, device, dtype):
    """Tokenizer, policy, reference, reward model, value model.

    With LoRA, `reference` and `reward_model` are None: they are the policy and the value model with their adapters
    disabled (the value model's score head is a trainable copy, and disabling the adapters restores the
    original), which keeps one copy of each set of weights in memory. Without LoRA they are frozen copies."""
    tokenizer = policy_tokenizer(policy_dir, reward_dir)
    policy, reference = policy_and_reference(policy_dir, config, device=device, dtype=dtype)
    value_model, reward_model = reward_classifier(reward_dir, device=device, dtype=dtype), None
    if config.lora:
        value_model = apply_lora(
            value_model,
            rank=config.lora_rank,
            alpha=config.lora_alpha,
            task_type="SEQ_CLS",
            top_layers=config.lora_top_layers,
        )
    elif need_reward_model:
        reward_model = frozen(reward_classifier(reward_dir, device=device, dtype=dtype))
    disable_dropout(value_model)
    return tokenizer, policy, reference, reward_model, value_model


def _demonstrations(tokenizer, chats: list[list[dict]], config: PPOConfig) -> list[tuple[list[int], list[int]]]:
    examples = []
    for chat in chats:
        if not chat or chat[-1]["role"] != "assistant":
            raise ValueError("a PPO-ptx example must end with an assistant turn")
        prompt, _ = chat_prompt_ids(tokenizer, chat[:-1], max_prompt_tokens=config.max_prompt_tokens)
        reply = tokenizer.encode(chat[-1]["content"], add_special_tokens=False)[: config.max_prompt_tokens]
        examples.append((prompt, [*reply, tokenizer.eos_token_id]))
    return examples


def train_ppo(
    config: PPOConfig,
    *,
    prompts: list[list[dict]],
    policy_dir: Path,
    reward_dir: Path,
    output_dir: Path,
    ptx_examples: list[list[dict]] | None = None,
    progress: Progress | None = None,
    reward_fn: RewardFn | None = None,
) -> TrainResult:
    """Run PPO for `config.iterations` rollouts and save the policy (LoRA merged, safetensors) to `output_dir`.

    Raises TrainingFailed when the mean per-sequence KL to the SFT policy exceeds `config.max_kl`, and Cancelled
    (from `progress.advance`) when the run is cancelled; in both cases nothing is written to `output_dir`.
    """
    if not prompts:
        raise ValueError("PPO needs at least one prompt")
    if config.temperature <= 0:
        raise ValueError("PPO samples from the policy: temperature must be positive")
    if min(config.iterations, config.rollout_batch_size, config.minibatch_size, config.ppo_epochs) < 1:
        raise ValueError("iterations, rollout_batch_size, minibatch_size and ppo_epochs must be at least 1")
    progress = progress or Progress()
    started = time.monotonic()
    seed_everything(config.seed)
    limit_allocator_caching()
    device, dtype = training_device()
    tokenizer, policy, reference, reward_model, value_model = _load(
        config, policy_dir, reward_dir, need_reward_model=reward_fn is None, device=device, dtype=dtype
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = eos_ids(policy, tokenizer)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    policy_optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, eps=1e-5)
    value_params = [p for p in value_model.parameters() if p.requires_grad]
    value_optimizer = torch.optim.AdamW(value_params, lr=config.value_learning_rate, eps=1e-5)
    kl_control = AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
    rng = random.Random(config.seed)
    prompt_stream = cycle(list(range(len(prompts))), rng)
    encoded = [chat_prompt_ids(tokenizer, chat, max_prompt_tokens=config.max_prompt_tokens)[0] for chat in prompts]
    ptx_stream = None
    if ptx_examples and config.ptx_coef > 0:
        ptx_stream = cycle(_demonstrations(tokenizer, ptx_examples, config), rng)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    progress.start(config.iterations)
    history: list[dict] = []

    for iteration in range(1, config.iterations + 1):
        # 1-2. Rollout and scores, with the policy in eval mode and no gradients.
        picked = [next(prompt_stream) for _ in range(config.rollout_batch_size)]
        policy.eval()
        value_model.eval()
        batch, lengths, finished = sample_responses(
            policy, [encoded[i] for i in picked], pad_id=pad_id, stop_ids=stop_ids, config=config, generator=generator
        )
        responses = [row[:n] for row, n in zip(batch.responses.tolist(), lengths, strict=True)]
        scores = episode_scores(
            reward_model,
            value_model,
            reward_fn,
            [prompts[i] for i in picked],
            responses,
            finished,
            tokenizer,
            batch_size=config.minibatch_size,
            missing_eos_penalty=config.missing_eos_penalty,
            device=device,
        )
        # 3. Old log-probs, reference log-probs and values, in minibatches.
        parts = {"logprobs": [], "ref_logprobs": [], "values": []}
        with torch.no_grad():
            for start in range(0, len(picked), config.minibatch_size):
                rows = batch.rows(slice(start, start + config.minibatch_size))
                parts["logprobs"].append(response_logprobs(policy, rows, config.temperature)[0])
                parts["ref_logprobs"].append(reference_logprobs(policy, reference, rows, config.temperature))
                parts["values"].append(token_values(value_model, rows))
        for name, chunks in parts.items():
            setattr(batch, name, torch.cat(chunks))
        mask = batch.response_mask.float()
        beta = kl_control.beta
        rewards, kl_tokens = token_rewards(batch.logprobs, batch.ref_logprobs, mask, scores, beta)
        kl = kl_tokens.sum(-1).mean().item()
        if kl > config.max_kl:
            raise TrainingFailed(f"KL {kl:.2f} exceeded the bound {config.max_kl}: stopped to avoid collapse")
        if config.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        # 4. GAE, whitened advantages.
        batch.values = batch.values * mask
        advantages, batch.returns = gae(rewards, batch.values, mask, gamma=config.gamma, lam=config.lam)
        batch.advantages = whiten(advantages, mask)
        residual = (batch.returns - batch.values)[mask.bool()]
        explained_variance = 1 - residual.var().item() / max(batch.returns[mask.bool()].var().item(), 1e-12)
        # 5. PPO epochs over shuffled minibatches.
        steps: list[dict] = []
        for _ in range(config.ppo_epochs):
            order = torch.randperm(len(picked))
            for start in range(0, len(picked), config.minibatch_size):
                rows = batch.rows(order[start : start + config.minibatch_size].to(device))
                ptx = _ptx_batch(ptx_stream, config, pad_id, device) if ptx_stream is not None else None
                stats = policy_step(policy, policy_optimizer, rows, config, ptx=ptx)
                stats |= value_step(value_model, value_optimizer, rows, config)
                steps.append(stats)
        if config.adaptive_kl:
            kl_control.update(kl, len(picked))

        figures = {name: sum(s[name] for s in steps) / len(steps) for name in steps[0]}
        figures |= {
            "mean_reward": scores.mean().item(),
            "kl": kl,
            "kl_coef": beta,
            "response_length": sum(lengths) / len(lengths),
            "finished_fraction": sum(finished) / len(finished),
            "explained_variance": explained_variance,
        }
        history.append(figures)
        for name, value in figures.items():
            progress.metric(f"ppo/{name}", value, step=iteration)
        progress.message(
            f"PPO iteration {iteration}/{config.iterations}: reward {figures['mean_reward']:.3f}, KL {kl:.3f} "
            f"(beta {beta:.4f}), policy loss {figures['policy_loss']:.4f}, value loss {figures['value_loss']:.4f}, "
            f"clip {figures['clip_fraction']:.2f}, length {figures['response_length']:.1f}"
        )
        del batch, rows, rewards, kl_tokens, advantages, scores
        release_freed_memory()  # this iteration's activations, before the next rollout's (see limit_allocator_caching)
        progress.advance()

    save_model(policy, tokenizer, Path(output_dir))
    progress.flush(force=True)
    metrics = rollout_summary(history, episodes_per_iteration=config.rollout_batch_size, started=started)
    metrics["kl_coef_last"] = kl_control.beta
    return TrainResult(Path(output_dir), metrics=metrics, series=progress.series)


def _ptx_batch(stream, config: PPOConfig, pad_id: int, device) -> tuple:
    examples = [next(stream) for _ in range(config.ptx_batch_size)]
    ids, mask = left_pad([prompt + reply for prompt, reply in examples], pad_id, device)
    return ids, mask, torch.tensor([len(reply) for _, reply in examples], device=device)
