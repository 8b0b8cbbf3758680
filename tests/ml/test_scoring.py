"""A policy's log-probs of replies, defined once (ml/scoring.py) for DPO, PPO-ptx and the gate's KL: batched and
padded, they equal the log-probs of each row computed alone with nothing cut."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ml.generation import chat_prompt_ids
from ml.scoring import reply_logprob_sums

CHATS = [
    [{"role": "user", "content": "Hello there, how are you today?"}],
    [{"role": "user", "content": "Write a very long poem about the sea, the sky and the wind."}],
    [{"role": "user", "content": "Name a fruit."}],
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dirs):
    path = tiny_model_dirs[0]
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def alone(model, tokenizer, chat, reply) -> float:
    prompt, _ = chat_prompt_ids(tokenizer, chat, max_prompt_tokens=1024)
    ids = torch.tensor([prompt + reply])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    return float(sum(logprobs[len(prompt) - 1 + i, token] for i, token in enumerate(reply)))


def test_batched_reply_logprob_sums_equal_each_row_alone(tiny):
    model, tokenizer = tiny
    replies = [
        tokenizer.encode("I am fine, thank you.", add_special_tokens=False) + [tokenizer.eos_token_id],
        tokenizer.encode("The sea is wide and the sky is high and the wind", add_special_tokens=False),
        [],  # a reply that ended at once: nothing to sum
    ]
    batched = reply_logprob_sums(model, tokenizer, CHATS, replies, batch_size=3)
    expected = [alone(model, tokenizer, chat, reply) for chat, reply in zip(CHATS, replies, strict=True)]
    assert batched[2] == 0.0
    assert batched == pytest.approx(expected, abs=1e-3)
    assert reply_logprob_sums(model, tokenizer, CHATS, replies, batch_size=1) == pytest.approx(expected, abs=1e-3)
