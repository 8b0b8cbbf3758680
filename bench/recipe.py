"""The loop's learning step alone, for choosing its defaults before bench/oracle.py confirms them through the product:
the oracle's SFT policy (bench/ties.py trains and keeps it), its replies to the oracle's training prompts sampled
once and kept, scripted rankings by a rule, then the reward model and DPO exactly as the product's trainers run
them (ml.reward, ml.dpo, with the stage defaults and --rm / --dpo on top), measured as the oracle measures.

    .venv/bin/python bench/recipe.py [--rule NAME ...] [--k 8] [--rankings 80] [--dpo '{"beta": 0.1}']

For each rule: contexts are taken in order, their first K samples ranked by the rule (equal scores tie), until
`--rankings` rankings give a pair (a tenth of the contexts validate, as the product's validation split does). The
reward model trains on them; its held-out accuracy is on the rule's order of the SFT policy's replies to the oracle's
48 held-out instructions. DPO trains from the SFT policy on the same rankings; its replies to the held-out
instructions are compared with the SFT policy's: rule rates, the win rate on prompts where the mean rule scores
differ, mean length in words, and the loss on the held-out instructions' expert answers (the alignment tax).
No database, no workers: minutes per rule instead of the oracle's half hour. Ends with one line of JSON.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import django  # noqa: E402

from bench.rules import RULES, words  # noqa: E402
from bench.ties import CACHE, log, sample, sft_policy  # noqa: E402

HELDOUT = 48  # as bench/oracle.py keeps them
DEMONSTRATIONS = 64


def rankings_for(rule, prompts: list[str], replies: list[list[str]], *, k: int, wanted: int):
    """(train, validation, counts): Ranked examples of the first contexts whose K samples the rule does not tie,
    until `wanted` give a pair; every tenth context validates."""
    from ml.reward import Ranked

    train, validation, submitted, tied = [], [], 0, 0
    for i, (prompt, group) in enumerate(zip(prompts, replies)):
        if len(train) + len(validation) >= wanted:
            break
        candidates = group[:k]
        scores = [rule.score(prompt, c) for c in candidates]
        order = sorted(set(scores), reverse=True)
        ranks = [order.index(s) + 1 for s in scores]
        submitted += 1
        if len(order) < 2:
            tied += 1
            continue
        (validation if i % 10 == 9 else train).append(Ranked([{"role": "user", "content": prompt}], candidates, ranks))
    return train, validation, {"rankings_submitted": submitted, "all_tied": tied, "contexts": len(prompts)}


def rm_accuracy(rm_dir: Path, rule, prompts: list[str], replies: list[list[str]]) -> tuple[float | None, int]:
    """The reward model's pairwise accuracy on the rule's order of these replies (ties give no pair)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from ml.scoring import score_pairs
    from models_service.loading import load_tokenizer

    model = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(rm_dir)
    correct = total = 0
    for prompt, group in zip(prompts, replies):
        scores = score_pairs(model, tokenizer, [([{"role": "user", "content": prompt}], t) for t in group])
        rule_scores = [rule.score(prompt, t) for t in group]
        for i in range(len(group)):
            for j in range(len(group)):
                if rule_scores[i] > rule_scores[j]:
                    total += 1
                    correct += scores[i] > scores[j]
    return (round(correct / total, 3) if total else None), total


def demonstration_loss(policy: Path, heldout: list[dict]) -> float:
    """Mean token loss of the policy on the held-out instructions' expert answers."""
    import torch
    from transformers import AutoModelForCausalLM

    from ml.sft import encode, validation_loss
    from models_service.loading import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    tokenizer = load_tokenizer(policy)
    examples = [
        e
        for e in (
            encode(
                tokenizer,
                [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}],
                512,
            )
            for r in heldout
        )
        if e
    ]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return round(validation_loss(model, examples, 8, pad_id, torch.device("cpu")), 4)


def compare(rule, prompts: list[str], sft: list[list[str]], final: list[list[str]]) -> dict:
    """The oracle's figures: rule rates, the win rate on prompts whose mean rule scores differ, lengths."""
    figures = {}
    for name, groups in (("sft", sft), ("final", final)):
        flat = [(p, t) for p, group in zip(prompts, groups) for t in group]
        figures[f"rule_rate_{name}"] = round(sum(rule.satisfied(p, t) for p, t in flat) / len(flat), 3)
        figures[f"length_{name}"] = round(sum(len(words(t)) for _, t in flat) / len(flat), 1)
    wins = losses = 0
    for prompt, a, b in zip(prompts, sft, final):
        before = sum(rule.score(prompt, t) for t in a) / len(a)
        after = sum(rule.score(prompt, t) for t in b) / len(b)
        wins, losses = wins + (after > before), losses + (after < before)
    figures.update(
        wins=wins, losses=losses, win_rate_vs_sft=round(wins / (wins + losses), 3) if wins + losses else None
    )
    return figures


def _discard(args, tag: str) -> None:
    """Remove the models a rule's run trained (unless --keep)."""
    import shutil

    if not args.keep:
        for folder in CACHE.glob(f"*-{tag}"):
            shutil.rmtree(folder, ignore_errors=True)


def run_rule(args, rule, policy: Path, data: dict) -> dict:
    from django.conf import settings

    from ml.dpo import DPOConfig, train_dpo
    from ml.reward import RewardConfig, train_reward
    from ml.runs import config_from

    figures: dict = {"rule": rule.description}
    train, validation, counts = rankings_for(
        rule, data["prompts"], data["train_replies"], k=args.k, wanted=args.rankings
    )
    figures.update(counts, pairs_at_threshold=len(train) + len(validation))
    figures["tied_share"] = round(counts["all_tied"] / max(counts["rankings_submitted"], 1), 3)
    tag = f"{rule.name}-k{args.k}-n{args.rankings}-{int(time.time())}"
    started = time.monotonic()
    if not args.no_rm:
        rm_config = config_from(RewardConfig, {**settings.TRAINING_STAGE_DEFAULTS["rm"], **args.rm})
        rm_dir = CACHE / f"rm-{tag}"
        result = train_reward(rm_config, train, validation, base_dir=policy, output_dir=rm_dir)
        figures["rm_val_accuracy"] = result.metrics.get("val_accuracy")
        figures["rm_heldout_accuracy"], figures["rm_heldout_pairs"] = rm_accuracy(
            rm_dir, rule, data["heldout_prompts"], data["sft_heldout"]
        )
        figures["rm_s"] = round(time.monotonic() - started, 1)
        log(f"{rule.name}: reward model {figures['rm_heldout_accuracy']} held out ({figures['rm_s']} s)")
    if args.no_dpo:
        _discard(args, tag)
        return figures
    started = time.monotonic()
    dpo_config = config_from(DPOConfig, {**settings.TRAINING_STAGE_DEFAULTS["dpo"], **args.dpo})
    dpo_dir = CACHE / f"dpo-{tag}"
    result = train_dpo(dpo_config, train, validation, policy_dir=policy, output_dir=dpo_dir)
    figures["dpo_s"] = round(time.monotonic() - started, 1)
    figures["dpo_metrics"] = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str))}
    final = sample(dpo_dir, data["heldout_prompts"], k=args.samples, temperature=1.0, max_new_tokens=96)
    figures.update(compare(rule, data["heldout_prompts"], data["sft_heldout"], final))
    figures["demo_loss_sft"] = data["demo_loss_sft"]
    figures["demo_loss_final"] = demonstration_loss(dpo_dir, data["heldout"])
    figures["demo_loss_ratio"] = round(figures["demo_loss_final"] / figures["demo_loss_sft"], 4)
    figures["examples"] = [{"prompt": p[:120], "final": g[0][:200]} for p, g in zip(data["heldout_prompts"][:2], final)]
    _discard(args, tag)
    log(f"{rule.name}: {json.dumps({k: v for k, v in figures.items() if k != 'examples'})}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rule", action="append", choices=sorted(RULES))
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--rankings", type=int, default=80, help="rankings that give a pair (the threshold)")
    parser.add_argument("--samples", type=int, default=8, help="replies per held-out instruction and policy")
    parser.add_argument("--rm", type=json.loads, default={}, help="reward-model config on top of the defaults")
    parser.add_argument("--dpo", type=json.loads, default={}, help="DPO config on top of the defaults")
    parser.add_argument("--no-rm", action="store_true", help="DPO only")
    parser.add_argument("--no-dpo", action="store_true", help="the reward model only")
    parser.add_argument("--keep", action="store_true", help="keep the trained models in var/bench-ties/")
    args = parser.parse_args()
    django.setup()
    from bench.support import self_instruct

    rows = self_instruct()
    heldout, rest = rows[:HELDOUT], rows[HELDOUT:]
    policy = sft_policy(rest[:DEMONSTRATIONS])
    prompts = [r["prompt"] for r in rest[DEMONSTRATIONS:]]
    heldout_prompts = [r["prompt"] for r in heldout]
    data = {
        "prompts": prompts,
        "heldout": heldout,
        "heldout_prompts": heldout_prompts,
        "train_replies": sample(policy, prompts, k=8, temperature=1.0, max_new_tokens=96),
        "sft_heldout": sample(policy, heldout_prompts, k=args.samples, temperature=1.0, max_new_tokens=96),
        "demo_loss_sft": demonstration_loss(policy, heldout),
    }
    results = {name: run_rule(args, RULES[name], policy, data) for name in args.rule or RULES}
    print(json.dumps({"k": args.k, "rankings": args.rankings, "rm": args.rm, "dpo": args.dpo, "rules": results}))


if __name__ == "__main__":
    main()
