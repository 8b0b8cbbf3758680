"""What the benchmarks that start their own services share: a scratch database, a scratch Redis database,
stopping process groups, and the training stages' configs (the product's defaults with --config on top)."""

import json
import os
import signal
import subprocess

import psycopg

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
    otherwise: bench/queue.py left 16,000 sessions there at each run."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


def stop_process_groups(processes: list[subprocess.Popen], timeout_s: float) -> None:
    """SIGTERM each process's group (started with start_new_session), then SIGKILL what is left after timeout_s."""
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# Each stage runs the product's own defaults (config/settings/base.py, the CPU settings for the default model), with
# what --config overrides on top. A bench passes every stage's full config to the workers and reports it: an empty
# object would not mean "the defaults" to the workers but "the trainer's bare dataclass defaults".
STAGES = ("sft", "rm", "ppo", "dpo", "rloo")


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
        f"TRAINING_{stage.upper()}_CONFIG": getattr(settings, f"TRAINING_{stage.upper()}_DEFAULTS")
        | overrides.get(stage, {})
        for stage in STAGES
    }
