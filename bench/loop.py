"""The whole loop with the default model on this machine: from "thresholds reached" to "new policy serving".

    .venv/bin/python bench/loop.py [--demonstrations 200] [--rankings 300] [--path dpo] [--config ppo='{...}']

Starts its own database (and Redis database), converts the default model (SmolLM2-135M-Instruct) into its own
artifact store as base v0, imports `--demonstrations` Self-Instruct demonstrations (expert answers, accepted)
and `--rankings` HH-RLHF preference pairs (rankings of two replies) from ../shared/data, sets the thresholds
to those counts, and starts a real training worker and a real sampling worker (bin/worker). Then, as beat
would, it ticks the loop (every `--tick-s`) and asks for the ranking pool to be filled, and waits. The loop
does the rest on its own: SFT; the gate evaluates the SFT policy and promotes it (no reward model yet); the
reward model on the newest SFT; the loop's policy step (`--path`, PPO by default: chained); the gate evaluates
the new policy against the SFT policy with the new reward model; promotion; ranking tasks sampled from it.

The stage configs are the product's defaults for the default model on a CPU (config/settings/base.py), with
`--config STAGE=JSON` on top, given to the worker as TRAINING_*_CONFIG like any deployment would, and reported.
Per-stage seconds are wall time from the row's creation (queued) to its end, so they include loading models and
waiting for the worker.
Stops everything and drops its database and artifacts at the end (the workers' logs stay in
var/bench-loop-logs). The last line is JSON with every figure.
"""

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BENCH_DB = "feedback_loop_bench_loop"
DATABASE_URL = f"postgres://postgres@127.0.0.1:5432/{BENCH_DB}"
REDIS_URL = "redis://127.0.0.1:6379/12"
ARTIFACTS = ROOT / "var" / "bench-loop"
LOGS = ROOT / "var" / "bench-loop-logs"  # the workers' logs, kept after the run

os.environ.update(
    DJANGO_SETTINGS_MODULE="config.settings.local",
    DATABASE_URL=DATABASE_URL,
    REDIS_URL=REDIS_URL,
    ARTIFACTS_DIR=str(ARTIFACTS),
    DJANGO_DEBUG="false",
    LOG_LEVEL="WARNING",
    HF_HUB_OFFLINE="1",
)

import django  # noqa: E402

from bench.support import (  # noqa: E402
    config_overrides,
    discard_scratch,
    empty_redis_database,
    recreate_database,
    stage_configs,
)
from config import stages  # noqa: E402
from tests.support import processes as procs  # noqa: E402


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def read_records(name: str, parse, n: int, dataset: str) -> list:
    from django.conf import settings

    records = []
    with gzip.open(Path(settings.SHARED_DATA_DIR) / name, "rt", encoding="utf-8") as lines:
        for line in lines:
            records.append(parse(json.loads(line), dataset=dataset))
            if len(records) == n:
                return records
    raise SystemExit(f"{name} has only {len(records)} records; {n} were asked for")


def seed(demonstrations: int, rankings: int) -> dict:
    """Migrate, register base v0, import the data. Returns what the loop will see."""
    from django.core.management import call_command

    from labeling.importing import hh_pair_record, self_instruct_record
    from labeling.services.records import records_import
    from models_service import default_model
    from training_jobs import loop

    call_command("migrate", verbosity=0)
    started = time.monotonic()
    version, _ = default_model.prepare()
    log(f"base v0 ready: {version.name} ({time.monotonic() - started:.0f} s)")
    # Self-Instruct demonstrations come from both files (the seed tasks alone are 175).
    demos = read_records("self_instruct_user_oriented_instructions.jsonl.gz", self_instruct_record, 200, "si-user")
    demos += read_records("self_instruct_seed_tasks.jsonl.gz", self_instruct_record, 175, "si-seed")
    pairs = read_records("hh_rlhf_harmless_base_sample.jsonl.gz", hh_pair_record, 2 * rankings, "hh-rlhf")
    started = time.monotonic()
    # Imported rows are split train/validation/holdout by content hash; import until the loop sees the
    # asked-for counts of new (train + validation) demonstrations and rankings.
    while loop.new_demonstrations() < demonstrations and demos:
        records_import([demos.pop(0) for _ in range(min(len(demos), demonstrations - loop.new_demonstrations()))])
    while loop.new_rankings() < rankings and pairs:
        records_import([pairs.pop(0) for _ in range(min(len(pairs), rankings - loop.new_rankings()))])
    counts = {"demonstrations": loop.new_demonstrations(), "rankings": loop.new_rankings()}
    log(f"imported in {time.monotonic() - started:.1f} s: {counts}")
    return counts


def start_workers(env: dict) -> list[subprocess.Popen]:
    from config.celery_app import app

    app.control.purge()
    queues = ("training", "sampling", "control")
    started = procs.start_workers(*queues, env=env, log_dir=LOGS)
    procs.wait_for_workers(app, queues, started, timeout_s=120)
    return started


def seconds(start, end) -> float | None:
    return round((end - start).total_seconds(), 1) if start and end else None


def run_loop(tick_s: float, timeout_s: float, path: str):
    """Tick the loop and ask for ranking tasks as beat would, until the path's policy serves (or the loop stops)."""
    from django.db import connection

    from labeling.models import Task, TaskKind
    from models_service.tasks import fill_ranking_pool
    from training_jobs import loop
    from training_jobs.models import Evaluation, TrainingRun

    started = time.monotonic()
    last_line = ""
    while time.monotonic() - started < timeout_s:
        decision = loop.loop_tick(force_check=True)
        fill_ranking_pool.delay()
        runs = list(TrainingRun.objects.order_by("created_at"))
        line = (
            "; ".join(f"{r.kind} {r.status} {r.progress_step}/{r.progress_total}" for r in runs)
            + " | "
            + "; ".join(f"eval {e.candidate.name} {e.status} {e.decision}" for e in Evaluation.objects.all())
        )
        if line != last_line or int(time.monotonic() - started) % 60 < tick_s:
            log(f"{decision.action}: {line}")
            last_line = line
        if decision.action == "paused":
            return f"paused: {decision.reason}"
        optimised = next((r for r in runs if r.kind == path and r.status == "succeeded"), None)
        evaluation = Evaluation.objects.filter(candidate__training_run=optimised).first() if optimised else None
        if evaluation and evaluation.decision in ("not_promoted", "waiting"):
            return f"the gate did not promote the {path} policy: {evaluation.decision_reason}"
        serving = evaluation and evaluation.decision == "promoted"
        if serving and Task.objects.filter(kind=TaskKind.RANK_REPLIES, model_version=evaluation.candidate).exists():
            return "serving"
        connection.close()
        time.sleep(tick_s)
    return f"timed out after {timeout_s:.0f} s"


def figures(outcome: str, counts: dict, loop_started, path: str) -> dict:
    from labeling.models import Task, TaskKind
    from models_service.models import ModelActivation
    from training_jobs.models import Evaluation, TrainingRun

    result = {"outcome": outcome, **counts}
    stages = {}
    for run in TrainingRun.objects.order_by("created_at"):
        stages[f"{run.kind}_s"] = seconds(run.created_at, run.finished_at)
        stages[f"{run.kind}_train_s"] = seconds(run.started_at, run.finished_at)
        result[f"{run.kind}_status"] = run.status
        result[f"{run.kind}_summary"] = {k: v for k, v in run.summary.items() if not isinstance(v, (list, dict))}
        if run.error:
            result[f"{run.kind}_error"] = run.error[-500:]
    for evaluation in Evaluation.objects.select_related("candidate").order_by("created_at"):
        stage = evaluation.candidate.stage
        stages[f"{stage}_gate_s"] = seconds(evaluation.created_at, evaluation.finished_at)
        result[f"{stage}_gate_decision"] = evaluation.decision
        result[f"{stage}_gate_metrics"] = {
            k: v for k, v in evaluation.metrics.items() if isinstance(v, (int, float, str, bool))
        }
        activation = ModelActivation.objects.filter(model_version=evaluation.candidate).first()
        if activation:
            stages[f"{stage}_serving_at_s"] = seconds(loop_started, activation.created_at)
        first_task = (
            Task.objects.filter(kind=TaskKind.RANK_REPLIES, model_version=evaluation.candidate)
            .order_by("created_at")
            .first()
        )
        if first_task:
            stages[f"{stage}_first_ranking_task_at_s"] = seconds(loop_started, first_task.created_at)
    result.update(stages)
    activation = ModelActivation.objects.filter(model_version__stage=path).first()
    end = activation.created_at if activation else None
    result["loop_total_s"] = seconds(loop_started, end)  # to the path's policy serving; None if not promoted
    evaluation = Evaluation.objects.filter(candidate__stage=path).first()
    result["loop_to_policy_decision_s"] = seconds(loop_started, evaluation and evaluation.finished_at)
    result["path"] = path
    result["loop_total_min"] = round(result["loop_total_s"] / 60, 1) if result["loop_total_s"] else None
    result["target_min"] = 30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demonstrations", type=int, default=200)
    parser.add_argument("--rankings", type=int, default=300)
    parser.add_argument("--ppo-iterations", type=int, default=None, help="the product's default if absent")
    parser.add_argument("--path", choices=stages.policy_steps(), default=None, help="the loop's default if absent")
    parser.add_argument("--eval-prompts", type=int, default=16)
    parser.add_argument("--tick-s", type=float, default=5.0)
    parser.add_argument("--timeout-min", type=float, default=60.0)
    parser.add_argument("--config", action="append", default=[], help="STAGE=JSON, e.g. ppo='{\"kl_coef\": 0.05}'")
    args = parser.parse_args()
    overrides = config_overrides(args.config, parser.error)
    if args.ppo_iterations is not None:
        overrides["ppo"]["iterations"] = args.ppo_iterations

    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    recreate_database(BENCH_DB)
    empty_redis_database(REDIS_URL)
    django.setup()
    from django.utils import timezone

    from training_jobs.models import LoopSettings

    processes = []
    try:
        counts = seed(args.demonstrations, args.rankings)
        settings = LoopSettings.load()
        settings.sft_threshold, settings.rm_threshold = counts["demonstrations"], counts["rankings"]
        settings.eval_prompts, settings.eval_max_new_tokens, settings.human_comparisons = args.eval_prompts, 48, 0
        settings.auto_promote = True
        settings.policy_path = args.path or settings.policy_path
        settings.save()
        path = settings.policy_path
        configs = stage_configs(overrides)
        for name, config in configs.items():
            log(f"{name}={json.dumps(config)}")
        env = {name: json.dumps(value) for name, value in configs.items()} | {
            "SAMPLING_POOL_TARGET": "4",
            "SAMPLING_MAX_NEW_TOKENS": "64",
            "TRAINING_RM_HOLDOUT_PAIRS": "100",
            "TRAINING_PPO_PROMPTS": "256",
        }
        processes = start_workers(env)
        log("workers up; thresholds reached: ticking the loop")
        loop_started = timezone.now()
        outcome = run_loop(args.tick_s, args.timeout_min * 60, path)
        log(f"outcome: {outcome}")
        result = figures(outcome, counts, loop_started, path)
        result["configs"] = configs
        result["eval_prompts"] = args.eval_prompts
        result["threads"] = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
    finally:
        procs.stop(processes, timeout_s=30)
        discard_scratch(BENCH_DB, REDIS_URL, ARTIFACTS)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
