"""Reward-model scores for (conversation, reply) pairs, batched; and a policy's log-probs of replies.

One definition of what the reward model reads, shared by training (ml/reward.py), PPO and serving:
the conversation rendered with the chat template up to the assistant's turn, the reply's tokens, and the
end-of-turn token. Inputs are left-padded, so the score is read at the last column, which is every row's last
real token; positions come from the attention mask.

Pure torch: plain values in and out, no Django (models_service/scoring.py adapts database rows to it).
"""

from collections.abc import Sequence

import torch

from ml.generation import chat_prompt_ids, left_pad


def reply_token_ids(tokenizer, reply: str) -> list[int]:
    return tokenizer.encode(reply, add_special_tokens=False)


def reward_input_ids(prompt_ids: Sequence[int], reply_ids: Sequence[int], eos_id: int) -> list[int]:
    """What the reward model reads: the prompt, the reply, and one end-of-turn token."""
    reply_ids = list(reply_ids)
    if not reply_ids or reply_ids[-1] != eos_id:
        reply_ids.append(eos_id)
    return [*prompt_ids, *reply_ids]


def score_head(model):
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if head is None:
        raise TypeError(f"{type(model).__name__} has no scalar head (score/classifier)")
    return head


REWARD_OFFSET = "reward_offset"  # config attribute: added to every score (set so demonstrations average 0)


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One scalar per left-padded row, read at its last token. Differentiable (used in training too).

    The model's config may carry `reward_offset`, the shift that makes demonstrations score 0 on average
    (InstructGPT normalises its reward model this way before RL; the scalar head has no bias to hold it).
    """
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft (LoRA) wrapper
    base = getattr(inner, inner.base_model_prefix)
    hidden = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).last_hidden_state
    offset = float(getattr(inner.config, REWARD_OFFSET, 0.0) or 0.0)
    return score_head(model)(hidden[:, -1, :]).squeeze(-1).float() + offset


def pair_input_ids(tokenizer, chat: list[dict], reply: str, *, max_tokens: int = 1024) -> list[int]:
    prompt, _ = chat_prompt_ids(tokenizer, chat, max_prompt_tokens=max_tokens // 2)
    reply_ids = reply_token_ids(tokenizer, reply)[: max_tokens - len(prompt) - 1]
    return reward_input_ids(prompt, reply_ids, tokenizer.eos_token_id)


@torch.inference_mode()
def score_pairs(model, tokenizer, pairs: Sequence[tuple[list[dict], str]], *, batch_size: int = 16) -> list[float]:
    """Reward scores of (chat, reply) pairs, in the order given, batched by similar length."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [pair_input_ids(tokenizer, chat, reply) for chat, reply in pairs]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    scores = [0.0] * len(encoded)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        ids, mask = left_pad([encoded[i] for i in batch], pad_id, device)
        for i, value in zip(batch, sequence_scores(model, ids, mask).tolist(), strict=True):
            scores[i] = value
    return scores


# --- a policy's log-probs of replies ---


def target_logprobs(logits: torch.Tensor, ids: torch.Tensor, reply_lengths: torch.Tensor):
    """From the logits at each left-padded row's last W + 1 positions: the log-prob of each of the row's last W
    tokens, [B, W], and the mask of the row's own reply tokens (its last `reply_lengths` ones)."""
    width = logits.shape[1] - 1
    targets = ids[:, -width:]
    logprobs = logits[:, :-1, :].float().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    reply = torch.arange(width, device=ids.device)[None, :] >= (width - reply_lengths)[:, None]
    return logprobs, reply


def reply_token_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, reply_lengths: torch.Tensor):
    """Left-padded rows that end with their reply: (the log-prob of each reply token under `model` [B, W], the
    mask of each row's reply tokens), W the longest reply. Only the logits that predict reply tokens are computed.
    Differentiable unless the caller disables gradients; the caller picks the precision (autocast or not)."""
    width = max(int(reply_lengths.max()), 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=width + 1).logits
    return target_logprobs(logits, ids, reply_lengths)


@torch.inference_mode()
def reply_logprob_sums(model, tokenizer, chats, replies, *, batch_size: int = 8) -> list[float]:
    """Sum of log-probabilities of each reply's tokens (`replies`: token ids, with the end-of-turn token where it
    ended) after its conversation's prompt, as the sampler renders it."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sums = []
    for start in range(0, len(chats), batch_size):
        batch_replies = [list(r) for r in replies[start : start + batch_size]]
        prompts = [
            chat_prompt_ids(tokenizer, chat, max_prompt_tokens=1024)[0] for chat in chats[start : start + batch_size]
        ]
        ids, mask = left_pad([p + r for p, r in zip(prompts, batch_replies, strict=True)], pad_id, device)
        lengths = torch.tensor([len(r) for r in batch_replies], device=device)
        logprobs, reply = reply_token_logprobs(model, ids, mask, lengths)
        sums.extend(torch.where(reply, logprobs, torch.zeros_like(logprobs)).sum(-1).tolist())
    return sums
