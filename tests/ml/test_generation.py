"""Batched generation with a tiny model: batching does not change greedy text, EOS stops a row, the chat
template is used, and the packed CPU layers give the same outputs."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ml.cpu_inference import pack_linear_layers
from ml.generation import SamplingParams, chat_prompt_ids, sample_completions

CHATS = [
    [{"role": "user", "content": "Hello there, how are you today?"}],
    [{"role": "user", "content": "Write a very long poem about the sea, the sky, the wind and everything between."}],
    [
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "An apple."},
        {"role": "user", "content": "Another one?"},
    ],
]
GREEDY = SamplingParams(temperature=0, top_p=1.0, max_new_tokens=24, seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_model_dirs):
    path = tiny_model_dirs[0]
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    return AutoModelForCausalLM.from_pretrained(path).eval(), tokenizer


def test_batched_greedy_text_equals_unbatched(tiny):
    model, tokenizer = tiny
    batched, stats = sample_completions(model, tokenizer, CHATS, k=2, params=GREEDY)
    assert stats.rows == 6 and stats.contexts == 3
    for chat, group in zip(CHATS, batched, strict=True):
        alone, _ = sample_completions(model, tokenizer, [chat], k=1, params=GREEDY)
        assert [c.token_ids for c in group] == [alone[0][0].token_ids] * 2
        assert group[0].text == alone[0][0].text


def test_greedy_matches_transformers_generate(tiny):
    model, tokenizer = tiny
    ours, _ = sample_completions(model, tokenizer, CHATS[:1], k=1, params=GREEDY)
    ids, _ = chat_prompt_ids(tokenizer, CHATS[0], max_prompt_tokens=512)
    reference = model.generate(
        torch.tensor([ids]),
        do_sample=False,
        max_new_tokens=GREEDY.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )[0, len(ids) :].tolist()
    assert ours[0][0].token_ids == reference[: len(ours[0][0].token_ids)]


def test_the_chat_template_builds_the_prompt(tiny):
    _, tokenizer = tiny
    ids, truncated = chat_prompt_ids(tokenizer, CHATS[2], max_prompt_tokens=512)
    text = tokenizer.decode(ids)
    assert not truncated
    assert text.startswith("<|im_start|>user\nName a fruit.<|im_end|>")
    assert text.endswith("<|im_start|>user\nAnother one?<|im_end|>\n<|im_start|>assistant\n")


def test_a_long_conversation_loses_its_oldest_turns(tiny):
    _, tokenizer = tiny
    chat = [{"role": "system", "content": "Be brief."}]
    for i in range(20):
        chat += [{"role": "user", "content": f"question {i} " * 10}, {"role": "assistant", "content": "ok " * 10}]
    chat.append({"role": "user", "content": "the last question"})
    ids, truncated = chat_prompt_ids(tokenizer, chat, max_prompt_tokens=120)
    text = tokenizer.decode(ids)
    assert truncated and len(ids) <= 120
    assert text.startswith("<|im_start|>system\nBe brief.") and "the last question" in text
    assert "question 0 " not in text


def test_sampling_is_reproducible_from_the_seed(tiny):
    model, tokenizer = tiny
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=42)
    first, _ = sample_completions(model, tokenizer, CHATS, k=3, params=params)
    second, _ = sample_completions(model, tokenizer, CHATS, k=3, params=params)
    other, _ = sample_completions(model, tokenizer, CHATS, k=3, params=SamplingParams(**{**params.__dict__, "seed": 7}))
    tokens = lambda groups: [[c.token_ids for c in g] for g in groups]  # noqa: E731
    assert tokens(first) == tokens(second)
    assert tokens(first) != tokens(other)
    assert len({tuple(c.token_ids) for c in first[1]}) > 1, "the K samples of a context differ"


class EosAfter(torch.nn.Module):
    """Wraps a model so that, after the prefill, row r of the batch emits EOS as its token number (r % 3) + 2."""

    def __init__(self, model, eos_id):
        super().__init__()
        self.inner, self.eos_id, self.calls = model, eos_id, 0

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        logits = out.logits.clone()
        logits[..., self.eos_id] = -1e9
        if kwargs["input_ids"].shape[1] == 1:  # a decode step (prefill calls read whole prompts)
            rows = torch.arange(logits.shape[0])
            logits[rows % 3 == self.calls, -1, self.eos_id] = 1e9
            self.calls += 1
        out.logits = logits
        return out


def test_eos_stops_each_row_and_is_stripped(tiny):
    model, tokenizer = tiny
    groups, stats = sample_completions(EosAfter(model, tokenizer.eos_token_id), tokenizer, CHATS, k=2, params=GREEDY)
    rows = [c for group in groups for c in group]
    assert [len(c.token_ids) for c in rows] == [r % 3 + 2 for r in range(6)]
    assert all(c.finished and c.token_ids[-1] == tokenizer.eos_token_id for c in rows)
    assert all(tokenizer.eos_token_id not in c.token_ids[:-1] for c in rows)
    assert all("<|im_end|>" not in c.text for c in rows)
    assert stats.steps == 4, "the batch stops once every row has ended"
    assert stats.generated_tokens == sum(r % 3 + 2 for r in range(6))


def test_packed_linear_layers_give_the_same_output(tiny_model_dirs):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs[0])
    tokenizer.padding_side = "left"
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[0]).eval()
    packed = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[0]).eval()
    replaced = pack_linear_layers(packed)
    assert replaced == sum(1 for m in plain.modules() if type(m) is torch.nn.Linear)
    a, _ = sample_completions(plain, tokenizer, CHATS, k=1, params=GREEDY)
    b, _ = sample_completions(packed, tokenizer, CHATS, k=1, params=GREEDY)
    assert [g[0].token_ids for g in a] == [g[0].token_ids for g in b]
