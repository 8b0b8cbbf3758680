"""Training speed and memory with the default model (SmolLM2-135M-Instruct) on this machine.

    .venv/bin/python bench/training.py [--skip-trl] [--ppo-iterations 3] [--hh-only] [--hh-config JSON ...]

Measured in this run:
- the reward model on the shipped HH-RLHF sample, trained as the product trains it: its pairwise accuracy on its
  validation pairs and on held-out pairs it never saw (the last 150 of the file); `--hh-config` tries other
  reward-model configs beside the defaults, `--hh-only` stops there;
- SFT tokens/s of our loop (ml/sft.py) and of TRL's SFTTrainer on the same demonstrations and
  settings;
- reward-model training time per ranking with K = 9: grouped (the K candidates through the model once, all
  C(K,2) pairs in one loss) against flattened pairs (C(K,2) chosen/rejected rows, as a pairwise trainer does);
- the policy step of each path, each in a fresh process (so the peak RSS is its own): PPO seconds per iteration
  (LoRA on the policy and the value model), RLOO seconds per iteration (LoRA, K samples per prompt, no value
  model), each with LoRA on every block and on the top 8 only (the speed-up of the latter is reported), DPO
  seconds per optimizer step (top blocks on kept frozen states) and the peak RSS of each.
The last line is JSON with every figure.
"""

import argparse
import gzip
import json
import multiprocessing
import os
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import django  # noqa: E402

django.setup()

import torch  # noqa: E402
from django.conf import settings  # noqa: E402

K = 9


def log(message: str) -> None:
    print(message, flush=True)


def default_model_dir() -> Path:
    from bench.sampling import default_model_dir as convert

    return convert()


def demonstrations(n: int) -> list[list[dict]]:
    chats = []
    with gzip.open(Path(settings.SHARED_DATA_DIR) / "self_instruct_seed_tasks.jsonl.gz", "rt") as lines:
        for line in lines:
            row = json.loads(line)
            instance = row["instances"][0]
            prompt = row["instruction"] + (f"\n\n{instance['input']}" if instance["input"] else "")
            chats.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": instance["output"]}])
            if len(chats) == n:
                break
    return chats


def sft_ours(model_dir: Path, chats, epochs: int, batch: int, max_length: int) -> dict:
    from ml.sft import SFTConfig, train_sft

    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        result = train_sft(
            SFTConfig(epochs=epochs, batch_size=batch, max_length=max_length, learning_rate=1e-5),
            chats,
            chats[:4],
            base_dir=model_dir,
            output_dir=Path(out) / "sft",
        )
        wall = time.perf_counter() - started
    return {"tokens_per_s": result.metrics["tokens_per_s"], "wall_s": wall, "tokens": result.metrics["train_tokens"]}


def sft_trl(model_dir: Path, chats, epochs: int, batch: int, max_length: int) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = Dataset.from_list([{"messages": chat} for chat in chats])
    with tempfile.TemporaryDirectory() as out:
        trainer = SFTTrainer(
            model=str(model_dir),
            args=SFTConfig(
                output_dir=out,
                num_train_epochs=epochs,
                per_device_train_batch_size=batch,
                max_length=max_length,
                learning_rate=1e-5,
                report_to=[],
                save_strategy="no",
                logging_strategy="no",
                use_cpu=True,
                # fp32 like ours: bf16 matmuls run at under 1 GFLOP/s on this CPU (TRL otherwise loads the
                # model in the dtype its config names).
                bf16=False,
                model_init_kwargs={"dtype": torch.float32},
                gradient_checkpointing=False,
                assistant_only_loss=False,
            ),
            train_dataset=data,
            processing_class=tokenizer,
        )
        tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"]) * epochs
        output = trainer.train()
    runtime = output.metrics["train_runtime"]
    return {"tokens_per_s": tokens / runtime, "wall_s": runtime, "tokens": tokens}


def reward_timing(model_dir: Path, rankings: int = 3) -> dict:
    """Seconds per K=9 ranking for one training step, grouped against flattened pairs."""
    import torch.nn.functional as F

    from ml.generation import left_pad
    from ml.reward import load_reward_model, ranking_loss
    from ml.scoring import pair_input_ids, sequence_scores

    model, tokenizer = load_reward_model(model_dir, dtype=torch.float32, device=torch.device("cpu"))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    chats = demonstrations(rankings * K)
    pad = tokenizer.pad_token_id

    def grouped(index):
        context = chats[index * K][:1]
        replies = [chats[index * K + j][1]["content"] for j in range(K)]
        rows = [pair_input_ids(tokenizer, context, reply, max_tokens=256) for reply in replies]
        ids, mask = left_pad(rows, pad, "cpu")
        loss = ranking_loss(sequence_scores(model, ids, mask), list(range(1, K + 1)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def flattened(index):
        context = chats[index * K][:1]
        replies = [chats[index * K + j][1]["content"] for j in range(K)]
        pairs = list(combinations(range(K), 2))
        rows = [pair_input_ids(tokenizer, context, replies[i], max_tokens=256) for i, _ in pairs]
        rows += [pair_input_ids(tokenizer, context, replies[j], max_tokens=256) for _, j in pairs]
        for start in range(0, len(pairs), 12):  # 12 pairs (24 rows) per micro-batch, one optimizer step
            chunk = slice(start, start + 12)
            chosen, rejected = rows[: len(pairs)][chunk], rows[len(pairs) :][chunk]
            ids, mask = left_pad(chosen + rejected, pad, "cpu")
            scores = sequence_scores(model, ids, mask)
            half = len(chosen)
            loss = -F.logsigmoid(scores[:half] - scores[half:]).mean() * half / len(pairs)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    timings = {}
    for name, step in (("grouped", grouped), ("flattened", flattened)):
        step(0)  # warm-up
        started = time.perf_counter()
        for index in range(1, rankings):
            step(index)
        timings[name] = (time.perf_counter() - started) / (rankings - 1)
    return timings


def own_peak_rss_mb() -> float:
    """This process's peak resident memory since it started (VmHWM).

    Not getrusage's ru_maxrss: across fork and exec Linux carries the parent's high-water mark into it, so a
    child spawned after the SFT and reward-model timings would report the parent's peak (15.8 GB here, once).
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _timed(progress):
    """Wrap progress.advance to note the time of each step."""
    times = []
    original = progress.advance

    def timed_advance(steps=1):
        if steps:
            times.append(time.perf_counter())
        original(steps)

    progress.advance = timed_advance
    return times


def _rankings(n: int, k: int = 4):
    """K-way rankings over the seed tasks: the expert answer ranked above shortened and reordered versions."""
    from ml.reward import Ranked

    rankings = []
    for chat in demonstrations(n):
        answer = chat[1]["content"]
        words = answer.split()
        candidates = [answer, " ".join(words[: max(len(words) // 2, 1)]), " ".join(reversed(words)), answer.upper()]
        rankings.append(Ranked(chat[:1], candidates[:k], list(range(1, k + 1))))
    return rankings


def _policy_child(kind: str, model_dir: str, reward_dir: str, iterations: int, lora_top: int, queue) -> None:
    """One policy-step trainer in a fresh process: seconds per step (PPO and RLOO: per iteration; DPO: per
    optimizer step of 4 rankings of K = 4) and the process's peak RSS. `lora_top`: PPO's and RLOO's
    lora_top_layers (0: adapters on every block)."""
    from ml.runs import Progress

    progress = Progress()
    times = _timed(progress)
    prompts = [chat[:1] for chat in demonstrations(32)]
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        if kind == "ppo":
            from ml.ppo import PPOConfig, train_ppo

            config = PPOConfig(
                iterations=iterations,
                rollout_batch_size=8,
                minibatch_size=4,
                ppo_epochs=1,
                max_new_tokens=48,
                lora_top_layers=lora_top,
            )
            result = train_ppo(
                config, prompts=prompts, policy_dir=Path(model_dir), reward_dir=Path(reward_dir),
                output_dir=Path(out) / "ppo", progress=progress,
            )  # fmt: skip
        elif kind == "rloo":
            from ml.rloo import RLOOConfig, train_rloo

            config = RLOOConfig(
                iterations=iterations,
                prompts_per_iteration=2,
                k=4,
                minibatch_size=8,
                max_new_tokens=48,
                lora_top_layers=lora_top,
            )
            result = train_rloo(
                config, prompts=prompts, policy_dir=Path(model_dir), reward_dir=Path(reward_dir),
                output_dir=Path(out) / "rloo", progress=progress,
            )  # fmt: skip
        else:
            from ml.dpo import DPOConfig, train_dpo

            config = DPOConfig(epochs=1, rankings_per_batch=4, max_length=256, train_top_layers=8)
            result = train_dpo(
                config, _rankings(4 * iterations), _rankings(4)[:2], policy_dir=Path(model_dir),
                output_dir=Path(out) / "dpo", progress=progress,
            )  # fmt: skip
    marks = [started, *times]
    per_step = [b - a for a, b in zip(marks, marks[1:])]
    queue.put(
        {
            "per_step_s": per_step,
            "peak_rss_mb": own_peak_rss_mb(),
            "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
        }
    )


def policy_timing(kind: str, model_dir: Path, iterations: int, lora_top: int = 0) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with tempfile.TemporaryDirectory() as reward_dir:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        reward = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
        reward.config.pad_token_id = tokenizer.pad_token_id
        reward.save_pretrained(reward_dir, safe_serialization=True)
        tokenizer.save_pretrained(reward_dir)
        del reward
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        child = context.Process(
            target=_policy_child, args=(kind, str(model_dir), reward_dir, iterations, lora_top, queue)
        )
        child.start()
        result = queue.get(timeout=3600)
        child.join()
    return result


def hh_pairs() -> list:
    """The shipped HH-RLHF pairs as rankings of two (chosen first), in the file's order; lines that do not parse are
    left out as the import leaves them out."""
    from labeling.importing import RecordError, hh_pair_record
    from ml.reward import Ranked

    pairs = []
    with gzip.open(Path(settings.SHARED_DATA_DIR) / "hh_rlhf_harmless_base_sample.jsonl.gz", "rt") as lines:
        for line in lines:
            try:
                record = hh_pair_record(json.loads(line))
            except RecordError:
                continue
            context = [{"role": t.role, "content": t.content} for t in record.context]
            pairs.append(Ranked(context, [record.chosen, record.rejected], [1, 2]))
    return pairs


def hh_reward(base_dir: Path, overrides: dict, *, heldout: int = 150, validation: int = 90) -> dict:
    """The reward model on the shipped HH-RLHF sample, as the product trains it (the stage defaults with
    `overrides` on top): the last `heldout` pairs are never trained or validated on, `validation` before them
    validate, the rest train. Pairwise accuracy on both, and the time."""
    from ml.reward import RewardConfig, train_reward
    from ml.runs import config_from

    pairs = hh_pairs()
    train, val, held = pairs[: -heldout - validation], pairs[-heldout - validation : -heldout], pairs[-heldout:]
    config = config_from(RewardConfig, {**settings.TRAINING_STAGE_DEFAULTS["rm"], **overrides})
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as output:
        result = train_reward(config, train, val, base_dir=base_dir, output_dir=Path(output), holdout=held)
    return {
        "config": config.__dict__,
        "train_pairs": len(train),
        "val_accuracy": result.metrics["val_accuracy"],
        "heldout_accuracy": result.metrics.get("holdout_accuracy"),
        "heldout_pairs": result.metrics.get("holdout_pairs"),
        "seconds": round(time.monotonic() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--ppo-iterations", type=int, default=3)
    parser.add_argument("--sft-examples", type=int, default=32)
    parser.add_argument("--hh-only", action="store_true", help="only the reward model on the HH-RLHF sample")
    parser.add_argument(
        "--hh-config",
        type=json.loads,
        action="append",
        default=[],
        help="reward-model config to try on HH (repeatable)",
    )
    args = parser.parse_args()
    model_dir = default_model_dir()
    figures = {"model": "SmolLM2-135M-Instruct", "threads": torch.get_num_threads()}

    for overrides in [{}, *args.hh_config]:
        log(f"reward model on the HH-RLHF sample, the defaults with {json.dumps(overrides)}")
        hh = hh_reward(model_dir, overrides)
        log(f"  validation {hh['val_accuracy']}, held out {hh['heldout_accuracy']} ({hh['heldout_pairs']} pairs)")
        figures.setdefault("hh_reward", []).append(hh)
    figures.update(hh_heldout_accuracy=figures["hh_reward"][0]["heldout_accuracy"])
    if args.hh_only:
        print(json.dumps(figures))
        return

    chats = demonstrations(args.sft_examples)
    log(f"SFT: {len(chats)} demonstrations, 1 epoch, batch 4, max length 256")
    ours = sft_ours(model_dir, chats, epochs=1, batch=4, max_length=256)
    log(f"  ours: {ours['tokens_per_s']:.0f} tokens/s ({ours['tokens']} tokens)")
    figures.update(sft_tokens_per_s=round(ours["tokens_per_s"], 1))
    if not args.skip_trl:
        trl = sft_trl(model_dir, chats, epochs=1, batch=4, max_length=256)
        log(f"  TRL SFTTrainer: {trl['tokens_per_s']:.0f} tokens/s ({trl['tokens']} tokens)")
        figures.update(
            trl_sft_tokens_per_s=round(trl["tokens_per_s"], 1),
            sft_vs_trl=round(ours["tokens_per_s"] / trl["tokens_per_s"], 2),
        )

    log(f"reward model: one training step per ranking with K = {K} ({K * (K - 1) // 2} pairs)")
    rm = reward_timing(model_dir)
    log(f"  grouped (K rows): {rm['grouped']:.2f} s per ranking")
    log(f"  flattened pairs ({K * (K - 1)} rows): {rm['flattened']:.2f} s per ranking")
    figures.update(
        rm_grouped_s_per_ranking=round(rm["grouped"], 3),
        rm_flattened_s_per_ranking=round(rm["flattened"], 3),
        rm_grouped_speedup=round(rm["flattened"] / rm["grouped"], 2),
    )

    for kind, lora_top, what in (
        ("ppo", 0, "iterations of 8 rollouts x 48 tokens, LoRA on every block"),
        ("ppo", 8, "iterations of 8 rollouts x 48 tokens, LoRA on the top 8 blocks"),
        ("rloo", 0, "iterations of 2 prompts x K = 4 rollouts x 48 tokens, LoRA on every block"),
        ("rloo", 8, "iterations of 2 prompts x K = 4 rollouts x 48 tokens, LoRA on the top 8 blocks"),
        ("dpo", 0, "optimizer steps of 4 rankings of K = 4, top 8 blocks on kept frozen states (reference pass first)"),
    ):
        name = f"{kind}_lora_top{lora_top}" if lora_top else kind
        log(f"{name.upper()}: {args.ppo_iterations} {what}, in a fresh process")
        timing = policy_timing(kind, model_dir, args.ppo_iterations, lora_top)
        # The first step carries the model's load (and DPO's reference pass); later ones are the steady state.
        steady = timing["per_step_s"][1:] or timing["per_step_s"]
        steps = ", ".join(f"{t:.1f}" for t in timing["per_step_s"])
        log(f"  {steps} s per step; peak RSS {timing['peak_rss_mb']:.0f} MB")
        figures.update(
            {
                f"{name}_step_s": round(sum(steady) / len(steady), 2),
                f"{name}_first_step_s": round(timing["per_step_s"][0], 2),
                f"{name}_peak_rss_mb": round(timing["peak_rss_mb"], 1),
            }
        )
    for kind in ("ppo", "rloo"):
        figures[f"{kind}_lora_top8_speedup"] = round(figures[f"{kind}_step_s"] / figures[f"{kind}_lora_top8_step_s"], 2)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
