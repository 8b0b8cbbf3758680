"""How often does a ranking teach nothing? For each scripted rule (bench/rules.py): how often the SFT policy's replies
satisfy it, and the share of K-way rankings whose candidates all tie (no pair), by K and sampling temperature;
and for the contexts whose first ranking tied, how often a re-sample gives a pair (what the product's re-sampling
of tied contexts should use: a higher temperature, a larger K, or both).

    .venv/bin/python bench/ties.py [--prompts 96] [--temperatures 1.0 1.3] [--max-k 8]

The SFT policy is the one bench/oracle.py's loop trains first: the default model fine-tuned with the product's SFT
defaults on the oracle's 64 Self-Instruct demonstrations (kept in var/bench-ties/ and reused while the data and
config are the same). Replies are sampled at the serving parameters (top_p, 96 new tokens) for `--prompts` of the
oracle's training prompts, `--max-k` per prompt at each temperature. A K-way ranking's tie probability is the mean
over every K-subset of a prompt's samples (exact for exchangeable samples). Ends with one line of JSON.
"""

import argparse
import hashlib
import itertools
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CACHE = ROOT / "var" / "bench-ties"
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import django  # noqa: E402

from bench.rules import RULES, words  # noqa: E402


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def sft_policy(demonstrations: list[dict]) -> Path:
    """The oracle's first SFT policy: the default model fine-tuned with the product's SFT defaults on
    `demonstrations`; cached by the data and config."""
    from django.conf import settings

    from ml.runs import config_from
    from ml.sft import SFTConfig, train_sft
    from models_service import default_model

    base = CACHE / "base"
    if not (base / "config.json").is_file():
        default_model.convert_to(base)
    config = config_from(SFTConfig, settings.TRAINING_STAGE_DEFAULTS["sft"])
    key = hashlib.sha256(json.dumps([demonstrations, config.__dict__], sort_keys=True).encode()).hexdigest()[:12]
    folder = CACHE / f"sft-{key}"
    if not (folder / "config.json").is_file():
        chats = [
            [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}]
            for r in demonstrations
        ]
        started = time.monotonic()
        result = train_sft(config, chats[8:], chats[:8], base_dir=base, output_dir=folder)
        log(f"SFT trained in {time.monotonic() - started:.0f} s: {result.metrics}")
    return folder


def load_policy(folder: Path):
    """A policy folder loaded as the sampling worker loads it (fp32 on the CPU, linear layers packed)."""
    import torch
    from django.conf import settings
    from transformers import AutoModelForCausalLM

    from ml.cpu_inference import pack_linear_layers
    from models_service.loading import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True).eval()
    if settings.POLICY_CPU_PACKED_WEIGHTS:
        pack_linear_layers(model, batch_hint=64)
    return model, load_tokenizer(folder)


def sample(policy: Path, prompts: list[str], *, k: int, temperature: float, max_new_tokens: int) -> list[list[str]]:
    """`k` replies per prompt at the serving parameters and `temperature`; cached."""
    import torch

    from ml.generation import SamplingParams, sample_completions

    key = hashlib.sha256(json.dumps([str(policy), prompts, k, temperature, max_new_tokens]).encode()).hexdigest()[:12]
    cached = CACHE / f"samples-{key}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    model, tokenizer = load_policy(policy)
    params = SamplingParams(temperature=temperature, top_p=0.95, max_new_tokens=max_new_tokens, seed=2026)
    replies, started = [], time.monotonic()
    for start in range(0, len(prompts), 8):
        chats = [[{"role": "user", "content": p}] for p in prompts[start : start + 8]]
        with torch.inference_mode():
            grouped, _ = sample_completions(model, tokenizer, chats, k=k, params=params)
        replies.extend([[c.text for c in group] for group in grouped])
    log(f"sampled {len(prompts)} x {k} at T = {temperature} in {time.monotonic() - started:.0f} s")
    cached.write_text(json.dumps(replies))
    return replies


def tie_probability(scores: list[float], k: int) -> float:
    """The chance that k of these samples, drawn without replacement, all score the same."""
    subsets = list(itertools.combinations(scores, k))
    return sum(len(set(s)) == 1 for s in subsets) / len(subsets)


def figures_for(rule, prompts: list[str], replies: dict[float, list[list[str]]], max_k: int) -> dict:
    result = {}
    first = min(replies)  # the serving temperature: the first ranking of each context
    for temperature, groups in replies.items():
        scores = [[rule.score(p, r) for r in group] for p, group in zip(prompts, groups)]
        flat = [(p, r) for p, group in zip(prompts, groups) for r in group]
        result[f"T{temperature}"] = {
            "rule_rate": round(sum(rule.satisfied(p, r) for p, r in flat) / len(flat), 3),
            **{
                f"tied_k{k}": round(sum(tie_probability(s, k) for s in scores) / len(scores), 3)
                for k in (2, 4, 6, max_k)
                if k <= max_k
            },
            "words": round(sum(len(words(r)) for _, r in flat) / len(flat), 1),
        }
    # Re-sampling: contexts whose first ranking (samples 1-4 at the serving temperature) tied. What gives a pair
    # on the second try? The other samples at the same temperature, or new samples at a higher one, at K = 4 or 8.
    base = [[rule.score(p, r) for r in group] for p, group in zip(prompts, replies[first])]
    tied = [i for i, s in enumerate(base) if len(set(s[:4])) == 1]
    retry = {"tied_first": len(tied), "contexts": len(prompts)}
    if tied:
        same = [base[i][4:8] for i in tied]
        retry[f"T{first}_k4_gives_pair"] = round(sum(len(set(s)) > 1 for s in same) / len(tied), 3)
        for temperature, groups in replies.items():
            if temperature == first:
                continue
            hot = [[rule.score(prompts[i], r) for r in groups[i]] for i in tied]
            retry[f"T{temperature}_k4_gives_pair"] = round(sum(1 - tie_probability(s, 4) for s in hot) / len(tied), 3)
            retry[f"T{temperature}_k{max_k}_gives_pair"] = round(sum(len(set(s)) > 1 for s in hot) / len(tied), 3)
    result["retry_after_tie"] = retry
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 1.3])
    parser.add_argument("--max-k", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--rule", action="append", choices=sorted(RULES))
    args = parser.parse_args()
    django.setup()
    from bench.support import self_instruct

    CACHE.mkdir(parents=True, exist_ok=True)
    data = self_instruct()
    data = data[48:]  # the first 48 are bench/oracle.py's held-out instructions
    demonstrations, prompts = data[:64], [r["prompt"] for r in data[64 : 64 + args.prompts]]
    started = time.monotonic()
    policy = sft_policy(demonstrations)
    replies = {
        t: sample(policy, prompts, k=args.max_k, temperature=t, max_new_tokens=args.max_new_tokens)
        for t in sorted(args.temperatures)
    }
    rules = {}
    for name in args.rule or RULES:
        rules[name] = figures_for(RULES[name], prompts, replies, args.max_k)
        log(f"{name}: {json.dumps(rules[name])}")
    print(
        json.dumps(
            {
                "prompts": len(prompts),
                "max_k": args.max_k,
                "temperatures": sorted(args.temperatures),
                "rules": rules,
                "wall_s": round(time.monotonic() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
