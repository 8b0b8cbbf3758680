"""Reward-model scores for (conversation, reply) pairs, batched.

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
