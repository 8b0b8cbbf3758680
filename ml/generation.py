"""Batched sampling from a causal LM: many contexts x K completions in one left-padded batch.

Why a decode loop of our own rather than `model.generate`:
- the K rows of a context share their prompt, so each unique context is prefilled once, at its own length,
  and its KV cache is repeated K times (prefill dominated the run when every row paid for its own prompt, and
  for the padding up to the longest prompt);
- the KV cache is preallocated (a static cache), so a decode step never copies the cache to grow it;
- top-p is computed inside the 256 most likely tokens, not by sorting the whole vocabulary every step
  (the sort of a 64 x 49k matrix cost as much as a third of a decode step on the CPU). The probability mass
  outside the top 256 is recorded in the sampling parameters as `top_k_cap`.
Positions come from the attention mask, so left padding does not shift them.

Pure torch: plain values in and out, no Django. Only worker processes import it (models_service/sampling.py
adapts database rows to it).
"""

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

TOP_K_CAP = 256


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 128
    seed: int = 0

    def as_dict(self) -> dict:
        return {**asdict(self), "top_k_cap": TOP_K_CAP}


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finished: bool  # ended with EOS rather than at max_new_tokens
    row: int  # position in the batch, recorded with the seed so a sample can be traced


@dataclass
class BatchStats:
    contexts: int = 0
    rows: int = 0
    prompt_tokens: int = 0  # unique context tokens prefilled
    generated_tokens: int = 0  # up to and including EOS, over all rows
    steps: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    truncated_contexts: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def wall_s(self) -> float:
        return self.prefill_s + self.decode_s


def chat_prompt_ids(tokenizer, chat: list[dict], *, max_prompt_tokens: int) -> tuple[list[int], bool]:
    """Token ids of a conversation rendered with the tokenizer's chat template, ready for the assistant's turn.

    A conversation longer than `max_prompt_tokens` loses its oldest turns (the system message, if any, stays).
    Returns (ids, truncated).
    """
    turns = list(chat)
    truncated = False
    while True:
        ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = list(ids)
        if len(ids) <= max_prompt_tokens:
            return ids, truncated
        start = 1 if turns and turns[0]["role"] == "system" else 0
        if len(turns) - start <= 1:
            return ids[-max_prompt_tokens:], True  # one turn longer than the window: keep its end
        truncated = True
        del turns[start : start + 2 if len(turns) - start > 2 else start + 1]


def eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def _sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    if params.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / params.temperature
    values, indices = torch.topk(logits, min(TOP_K_CAP, logits.shape[-1]), dim=-1)
    probs = values.softmax(dim=-1)
    if params.top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays).
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs > params.top_p, 0.0)
    choice = torch.multinomial(probs, 1, generator=generator)
    return indices.gather(-1, choice)


def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of sequences padded on the left to the same width."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            ids[row, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
            mask[row, width - len(sequence) :] = 1
    return ids.to(device), mask.to(device)


def _prefill(model, prompts: list[list[int]], *, k: int, pad_id: int, extra: int, device):
    """Prefill each unique context once, at its own length (no padding computed), and lay the results out as
    a left-padded static KV cache with K rows per context. Returns (cache, next-token logits per row, mask)."""
    from transformers import DynamicCache, StaticCache

    width = max(len(p) for p in prompts)
    layer_keys: list[list[torch.Tensor]] = []
    layer_values: list[list[torch.Tensor]] = []
    logits = []
    for prompt in prompts:
        out = model(
            input_ids=torch.tensor([prompt], device=device),
            position_ids=torch.arange(len(prompt), device=device)[None],
            past_key_values=DynamicCache(config=model.config),
            use_cache=True,
            logits_to_keep=1,
        )
        logits.append(out.logits[:, -1, :].float())
        for index, layer in enumerate(out.past_key_values.layers):
            if index == len(layer_keys):
                layer_keys.append([])
                layer_values.append([])
            layer_keys[index].append(layer.keys)
            layer_values[index].append(layer.values)
    cache = StaticCache(config=model.config, max_cache_len=width + extra)
    for layer, keys, values in zip(cache.layers, layer_keys, layer_values, strict=True):
        layer.update(_pad_left_and_repeat(keys, width, k), _pad_left_and_repeat(values, width, k))
    _, mask = left_pad(prompts, pad_id, device)
    return cache, torch.cat(logits).repeat_interleave(k, dim=0), mask


def _pad_left_and_repeat(states: list[torch.Tensor], width: int, k: int) -> torch.Tensor:
    """[1, heads, length, dim] per context -> [contexts * k, heads, width, dim], zeros on the left."""
    first = states[0]
    out = first.new_zeros((len(states), first.shape[1], width, first.shape[3]))
    for row, state in enumerate(states):
        out[row, :, width - state.shape[2] :, :] = state[0]
    return out.repeat_interleave(k, dim=0)


@torch.inference_mode()
def sample_completions(
    model,
    tokenizer,
    chats: list[list[dict]],
    *,
    k: int,
    params: SamplingParams,
    max_context_tokens: int | None = None,
    on_token: Callable[[list[int]], None] | None = None,
) -> tuple[list[list[Completion]], BatchStats]:
    """Sample `k` completions for each chat in one batch. Returns completions grouped per chat, and statistics.

    With temperature 0 the decoding is greedy, and then every row's text is the same as decoding it alone.
    `on_token`, for streaming: called after every decoding step with the first row's tokens so far (stop tokens
    left out); it decides itself how often to pass them on.
    """
    device = next(model.parameters()).device
    window = max_context_tokens or getattr(model.config, "max_position_embeddings", 2048)
    max_prompt = max(window - params.max_new_tokens, 8)
    prompts, truncated = zip(*(chat_prompt_ids(tokenizer, chat, max_prompt_tokens=max_prompt) for chat in chats))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = torch.tensor(eos_ids(model, tokenizer), device=device)
    stop_set = set(stop.tolist())
    stats = BatchStats(
        contexts=len(chats),
        rows=len(chats) * k,
        prompt_tokens=sum(len(p) for p in prompts),
        truncated_contexts=sum(truncated),
    )
    generator = torch.Generator(device=device).manual_seed(params.seed)

    started = time.perf_counter()
    cache, logits, mask = _prefill(model, list(prompts), k=k, pad_id=pad_id, extra=params.max_new_tokens, device=device)
    width = mask.shape[1]
    rows = len(chats) * k
    full_mask = torch.zeros((rows, width + params.max_new_tokens), dtype=torch.long, device=device)
    full_mask[:, :width] = mask.repeat_interleave(k, dim=0)
    position = torch.tensor([len(p) - 1 for p in prompts], device=device)[:, None].repeat_interleave(k, dim=0)
    stats.prefill_s = time.perf_counter() - started

    started = time.perf_counter()
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    generated = torch.full((rows, params.max_new_tokens), pad_id, dtype=torch.long, device=device)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)
    for step in range(params.max_new_tokens):
        token = _sample_next(logits, params, generator)
        token = token.masked_fill(finished[:, None], pad_id)
        generated[:, step] = token[:, 0]
        lengths += (~finished).long()
        finished |= torch.isin(token[:, 0], stop)
        stats.steps = step + 1
        if on_token is not None:
            on_token([t for t in generated[0, : int(lengths[0])].tolist() if t not in stop_set])
        if bool(finished.all()) or step == params.max_new_tokens - 1:
            break
        full_mask[:, width + step] = 1
        position = position + 1
        out = model(
            input_ids=token,
            attention_mask=full_mask,
            position_ids=position,
            past_key_values=cache,
            use_cache=True,
            cache_position=torch.tensor([width + step], device=device),
        )
        logits = out.logits[:, -1, :].float()
    stats.decode_s = time.perf_counter() - started

    lengths_list, generated_list, finished_list = lengths.tolist(), generated.tolist(), finished.tolist()
    stats.generated_tokens = sum(lengths_list)
    grouped: list[list[Completion]] = []
    for context in range(len(chats)):
        group = []
        for row in range(context * k, (context + 1) * k):
            tokens = generated_list[row][: lengths_list[row]]
            content = [t for t in tokens if t not in stop_set]
            # PostgreSQL text cannot hold NUL, which a byte-level tokenizer can decode to.
            text = tokenizer.decode(content, skip_special_tokens=True).replace("\x00", "\ufffd").strip()
            group.append(Completion(text=text, token_ids=tokens, finished=finished_list[row], row=row))
        grouped.append(group)
    return grouped, stats
