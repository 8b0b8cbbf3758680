"""What the benchmarks that start their own services share: a scratch database, a scratch Redis database, and
stopping process groups."""

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
