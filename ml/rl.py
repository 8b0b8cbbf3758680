"""What PPO and RLOO share: rollouts sampled from the policy, their log-probs under the policy and the reference,
the episodes' scores, the clipped surrogate, and loading the policy, its reference and the reward model.

Pure torch and transformers, no Django.
"""

import random
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ml.device import autocast
from ml.generation import left_pad
from ml.modeling import apply_lora
from ml.runs import TrainingFailed
from ml.scoring import score_pairs

RewardFn = Callable[[list[list[dict]], list[str], list[list[int]]], list[float]]


@dataclass
class Rollout:
    """Rollout tensors, one row per episode: left-padded queries, right-padded responses, per-token figures."""

    queries: torch.Tensor  # [B, P]
    query_mask: torch.Tensor  # [B, P]
    responses: torch.Tensor  # [B, R]
    response_mask: torch.Tensor  # [B, R], 1 up to and including EOS
    logprobs: torch.Tensor | None = None  # [B, R] policy at rollout time ("old")
    ref_logprobs: torch.Tensor | None = None  # [B, R]
    values: torch.Tensor | None = None  # [B, R]
    advantages: torch.Tensor | None = None  # [B, R]
    returns: torch.Tensor | None = None  # [B, R]

    def rows(self, index) -> "Rollout":
        """The rows `index`, with the query padding no row of them needs cut off."""
        picked = {f.name: getattr(self, f.name) for f in fields(self)}
        picked = {name: None if value is None else value[index] for name, value in picked.items()}
        keep = int(picked["query_mask"].sum(-1).max())
        picked["queries"], picked["query_mask"] = picked["queries"][:, -keep:], picked["query_mask"][:, -keep:]
        return Rollout(**picked)

    def model_inputs(self) -> dict:
        mask = torch.cat([self.query_mask, self.response_mask.long()], dim=1)
        return {
            "input_ids": torch.cat([self.queries, self.responses], dim=1),
            "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
        }


# --- rollouts and per-token figures ---


@torch.no_grad()
def sample_responses(policy, queries: list[list[int]], *, pad_id: int, stop_ids: list[int], config, generator):
    """One response per query, sampled from the full distribution at `config.temperature` for at most
    `config.max_new_tokens` (N+ details: the
    log-prob pass must see the distribution the tokens were drawn from, so no top-k/top-p truncation).

    Left padding, positions from the attention mask, a KV cache. Returns (Rollout, lengths, finished).
    """
    device = next(policy.parameters()).device
    ids, query_mask = left_pad(queries, pad_id, device)
    mask = query_mask
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    with autocast():
        out = policy(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True, logits_to_keep=1)
    position = position[:, -1:]
    stop = torch.tensor(stop_ids, device=device)
    finished = torch.zeros(len(queries), dtype=torch.bool, device=device)
    lengths = torch.zeros(len(queries), dtype=torch.long, device=device)
    tokens = []
    for step in range(config.max_new_tokens):
        probs = (out.logits[:, -1, :].float() / config.temperature).softmax(-1)
        token = torch.multinomial(probs, 1, generator=generator).masked_fill(finished[:, None], pad_id)
        tokens.append(token)
        lengths += (~finished).long()
        finished |= torch.isin(token[:, 0], stop)
        if bool(finished.all()) or step == config.max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        position = position + 1
        with autocast():
            out = policy(
                input_ids=token, attention_mask=mask, position_ids=position, past_key_values=out.past_key_values
            )
    responses = torch.cat(tokens, dim=1)
    response_mask = (torch.arange(responses.shape[1], device=device)[None, :] < lengths[:, None]).long()
    return Rollout(ids, query_mask, responses, response_mask), lengths.tolist(), finished.tolist()


def response_logprobs(model, batch: Rollout, temperature: float, *, with_entropy: bool = False):
    """Log-probs of the response tokens (and the entropy of each step's distribution), at `temperature`.

    Only the logits that predict response tokens are computed (`logits_to_keep`), which keeps memory modest.
    """
    width = batch.responses.shape[1]
    with autocast():
        logits = model(**batch.model_inputs(), logits_to_keep=width + 1).logits
    logits = logits[:, :-1, :].float() / temperature
    all_logprobs = logits.log_softmax(-1)
    logprobs = all_logprobs.gather(-1, batch.responses[..., None]).squeeze(-1)
    if not with_entropy:
        return logprobs, None
    with torch.no_grad():
        entropy = -(all_logprobs.exp() * all_logprobs).sum(-1)
    return logprobs, entropy


def reference_logprobs(policy, reference, batch: Rollout, temperature: float) -> torch.Tensor:
    """Log-probs under the frozen SFT policy: the separate copy, or the LoRA policy with its adapters disabled."""
    with torch.no_grad():
        if reference is not None:
            return response_logprobs(reference, batch, temperature)[0]
        with policy.disable_adapter():
            return response_logprobs(policy, batch, temperature)[0]


@contextmanager
def frozen_reward_model(reward_model, value_model):
    """The reward model to score with: the frozen copy, or the LoRA value model with its adapters disabled."""
    if reward_model is not None:
        yield reward_model
    else:
        with value_model.disable_adapter():
            yield value_model.get_base_model()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range: float):
    """PPO's clipped surrogate, averaged over response tokens. Returns (loss, clip fraction, approx KL)."""
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)  # k3 estimator of KL(old || new)
    return loss, clip_fraction, approx_kl


def disable_dropout(model) -> None:
    """No dropout anywhere in `model`: it would make the ratio to the rollout's log-probs differ from 1 before
    any update (N+ details)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.0


def cycle(items: list, rng: random.Random):
    """`items` forever, reshuffled on every pass."""
    while True:
        order = list(items)
        rng.shuffle(order)
        yield from order


def episode_scores(
    reward_model,
    value_model,
    reward_fn,
    chats,
    responses,
    finished,
    tokenizer,
    *,
    batch_size: int,
    missing_eos_penalty: float | None,
    device,
) -> torch.Tensor:
    """The score of each episode: the reward model on the response's text after the conversation (or
    `reward_fn`), and the fixed `missing_eos_penalty` for responses that never reached EOS."""
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    if reward_fn is not None:
        scores = [float(s) for s in reward_fn(chats, texts, responses)]
    else:
        with frozen_reward_model(reward_model, value_model) as model:
            pairs = list(zip(chats, texts, strict=True))
            scores = score_pairs(model, tokenizer, pairs, batch_size=batch_size)
    if missing_eos_penalty is not None:
        scores = [s if done else missing_eos_penalty for s, done in zip(scores, finished, strict=True)]
    return torch.tensor(scores, dtype=torch.float32, device=device)


# --- loading ---


def policy_tokenizer(policy_dir: Path, reward_dir: Path | None) -> object:
    """The policy's tokenizer, after checking that the reward model (if it has a tokenizer of its own) reads the
    same tokens: a reward model that tokenises differently would score text the policy never wrote."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    if reward_dir is not None and (Path(reward_dir) / "tokenizer_config.json").is_file():
        reward_tokenizer = AutoTokenizer.from_pretrained(reward_dir)
        if reward_tokenizer.get_vocab() != tokenizer.get_vocab() or reward_tokenizer.eos_token != tokenizer.eos_token:
            raise TrainingFailed("the reward model's tokenizer differs from the policy's: it could not read the tokens")
    return tokenizer


def frozen(model):
    """`model` for inference only: no gradients, no dropout, eval mode."""
    model.requires_grad_(False)
    disable_dropout(model)
    return model.eval()


def policy_and_reference(policy_dir: Path, config, *, device, dtype):
    """The policy to train and its frozen reference (the SFT policy). With `config.lora` the policy trains LoRA
    adapters on its top `config.lora_top_layers` blocks and the reference is None: the policy with its adapters
    disabled, so one copy of the weights is loaded."""
    from transformers import AutoModelForCausalLM

    def causal_lm():
        return AutoModelForCausalLM.from_pretrained(policy_dir, dtype=dtype).to(device)

    policy, reference = causal_lm(), None
    if config.lora:
        policy = apply_lora(policy, rank=config.lora_rank, alpha=config.lora_alpha, top_layers=config.lora_top_layers)
    else:
        reference = frozen(causal_lm())
    disable_dropout(policy)
    return policy, reference


def reward_classifier(reward_dir: Path, *, device, dtype):
    """The reward model as a sequence classifier (one label), on `device`."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(reward_dir, num_labels=1, dtype=dtype).to(device)
