"""What the benchmarks that start their own services share: a scratch database, a scratch Redis database, and the
training stages' configs (the product's defaults with --config on top). Starting and stopping the product's
processes is tests/support/processes.py, shared with the tests."""

import contextlib
import json
import os

import psycopg

from config import stages

MAINTENANCE_URL = "postgres://postgres@127.0.0.1:5432/postgres"


def recreate_database(name: str) -> None:
    with psycopg.connect(MAINTENANCE_URL, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")


def drop_database(name: str) -> None:
    with psycopg.connect(MAINTENANCE_URL, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def empty_redis_database(url: str) -> None:
    """Empty the benchmark's own Redis database (its sessions, cache and broker queues), which outlive the run
    otherwise: bench/queue_load.py left 16,000 sessions there at each run."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


def discard_scratch(database: str, redis_url: str, artifacts) -> None:
    """At a benchmark's end (or when it is stopped): close this process's database connections, drop the scratch
    database, empty the scratch Redis database and remove the scratch artifacts folder."""
    import shutil

    from django.db import connections

    connections.close_all()
    drop_database(database)
    empty_redis_database(redis_url)
    shutil.rmtree(artifacts, ignore_errors=True)


# Each stage runs the product's own defaults (config/settings/base.py, the CPU settings for the default model), with
# what --config overrides on top. A bench passes every stage's full config to the workers and reports it: an empty
# object would not mean "the defaults" to the workers but "the trainer's bare dataclass defaults".
STAGES = tuple(stages.STAGES)  # config/stages.py


def config_overrides(items: list[str], error) -> dict[str, dict]:
    """{stage: overrides} from --config STAGE=JSON items (repeatable; later keys win); `error(message)` refuses."""
    overrides: dict[str, dict] = {stage: {} for stage in STAGES}
    for item in items:
        stage, _, value = item.partition("=")
        if stage not in overrides:
            error(f"--config {item!r}: the stage must be one of {', '.join(STAGES)}")
        try:
            update = json.loads(value)
        except json.JSONDecodeError as exc:
            error(f"--config {item!r}: not JSON ({exc})")
        if not isinstance(update, dict):
            error(f"--config {item!r}: give a JSON object")
        overrides[stage].update(update)
    return overrides


def stage_configs(overrides: dict[str, dict]) -> dict[str, dict]:
    """{"TRAINING_<STAGE>_CONFIG": the product's default for the stage, updated with `overrides`} (after
    django.setup())."""
    from django.conf import settings

    return {
        stages.STAGES[name].config_variable: settings.TRAINING_STAGE_DEFAULTS[name] | overrides.get(name, {})
        for name in STAGES
    }


def machine_figures(model) -> dict:
    """How fast this machine is, for reading a run's wall times against another machine's: the processor, and
    the forward pass of `model` (a causal LM) over 16 x 128 tokens, in tokens per second, in fp32 and in the
    training's precision (bf16 autocast where ml.device.cpu_bf16 turns it on). Best of 3 runs each,
    after one warm-up; run it with nothing else busy."""
    import platform
    import time

    import torch

    from ml.device import autocast, cpu_bf16

    processor = platform.processor()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            processor = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    except OSError:
        pass
    ids = torch.randint(0, model.config.vocab_size, (16, 128), generator=torch.Generator().manual_seed(0))

    def tokens_per_s(context) -> float:
        best = float("inf")
        with torch.inference_mode():
            for attempt in range(4):
                started = time.perf_counter()
                with context():
                    model(input_ids=ids.to(model.device), logits_to_keep=1)
                if attempt:
                    best = min(best, time.perf_counter() - started)
        return round(ids.numel() / best, 1)

    return {
        "processor": processor,
        "cores": os.cpu_count(),
        "forward_tokens_s_fp32": tokens_per_s(contextlib.nullcontext),
        "forward_tokens_s_training": tokens_per_s(autocast),
        "training_bf16": cpu_bf16(),
    }


def self_instruct() -> list[dict]:
    """The shipped Self-Instruct instructions with their expert answers ({"prompt", "answer"}), in the benches'
    fixed shuffled order (after django.setup())."""
    import gzip
    import random
    from pathlib import Path

    from django.conf import settings

    rows = []
    for name in ("self_instruct_user_oriented_instructions.jsonl.gz", "self_instruct_seed_tasks.jsonl.gz"):
        with gzip.open(Path(settings.SHARED_DATA_DIR) / name, "rt", encoding="utf-8") as lines:
            for line in lines:
                row = json.loads(line)
                instance = row["instances"][0]
                prompt = row["instruction"].strip()
                if instance.get("input", "").strip():
                    prompt += "\n\n" + instance["input"].strip()
                rows.append({"prompt": prompt, "answer": instance["output"].strip()})
    random.Random(14).shuffle(rows)
    return rows
