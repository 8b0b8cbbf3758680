"""Starting, waiting for and stopping the product's processes (bin/web, bin/worker QUEUE, bin/beat), for the tests
and the benchmarks alike.

Each process starts in a session of its own (a process group), so stopping it stops what it started too (gunicorn's
workers, Celery's pool): SIGTERM to the group, then SIGKILL to what is left after the timeout.
"""

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "bin"


def start(
    name: str, command: list[str], *, env: dict | None = None, log_dir: Path | None = None, keep_stdout: bool = False
) -> subprocess.Popen:
    """Start `command` from the project root with os.environ plus `env`. Its stderr goes to `log_dir`/NAME.log,
    or to a pipe (read it when it exits early) without a log_dir; its stdout is dropped, or with `keep_stdout`
    kept in `log_dir`/NAME.out.log (gunicorn's access log)."""
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        stderr = open(log_dir / f"{name}.log", "a")  # noqa: SIM115 (the process owns it; closed when it exits)
    else:
        stderr = subprocess.PIPE
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=dict(os.environ) | (env or {}),
        stdout=open(log_dir / f"{name}.out.log", "a") if keep_stdout and log_dir else subprocess.DEVNULL,  # noqa: SIM115
        stderr=stderr,
        start_new_session=True,
    )
    process.name = name
    return process


def start_workers(
    *queues: str, env: dict | None = None, log_dir: Path | None = None, host: str = ""
) -> list[subprocess.Popen]:
    """One bin/worker per queue (interactive, sampling, training, control), named QUEUE@`host` when given (a host
    simulated on this machine: bin/worker's WORKER_HOST), else QUEUE@this-host."""
    env = {**(env or {}), **({"WORKER_HOST": host} if host else {})}
    return [
        start(f"worker-{queue}" + (f"-{host}" if host else ""), [str(BIN / "worker"), queue], env=env, log_dir=log_dir)
        for queue in queues
    ]


def start_web(*, env: dict | None = None, log_dir: Path | None = None, keep_stdout: bool = False) -> subprocess.Popen:
    return start("web", [str(BIN / "web")], env=env, log_dir=log_dir, keep_stdout=keep_stdout)


def start_beat(*, env: dict | None = None, log_dir: Path | None = None) -> subprocess.Popen:
    return start("beat", [str(BIN / "beat")], env=env, log_dir=log_dir)


def _exited(processes: list[subprocess.Popen]) -> str:
    for process in processes:
        if process.poll() is not None:
            tail = process.stderr.read().decode(errors="replace")[-3000:] if process.stderr else "(see its log)"
            return f"{getattr(process, 'name', process.args)} exited with {process.returncode}: {tail}"
    return ""


def wait_for_workers(app, queues, processes: list[subprocess.Popen], timeout_s: float = 90.0, *, names=()) -> None:
    """Until a worker named QUEUE@this-host answers a Celery ping for each queue (and one for each of `names`,
    QUEUE@HOST); fails if a process exits."""
    expected = {f"{queue}@{socket.gethostname()}" for queue in queues} | set(names)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        problem = _exited(processes)
        if problem:
            raise RuntimeError(f"a worker did not start: {problem}")
        replies = app.control.ping(timeout=1.0) or []
        if expected <= {name for reply in replies for name in reply}:
            return
    raise TimeoutError(f"workers {sorted(expected)} did not answer within {timeout_s} s")


def wait_for_http(url: str, processes: list[subprocess.Popen], timeout_s: float = 60.0) -> None:
    """Until `url` answers 200; fails if a process exits first."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        problem = _exited(processes)
        if problem:
            raise RuntimeError(f"a process did not start: {problem}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


def stop(processes: list[subprocess.Popen], timeout_s: float = 20.0) -> None:
    """SIGTERM each process's group, then SIGKILL what is left after `timeout_s`."""
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if process.stderr:
            process.stderr.close()


def kill(process: subprocess.Popen) -> None:
    """SIGKILL the process's group at once, as a crash would (for the chaos tests and benchmarks)."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


@contextlib.contextmanager
def running_workers(app, *queues: str, env: dict | None = None, log_dir: Path | None = None, ready_timeout=90.0):
    """Workers for `queues`, ready (answering pings) inside the block, stopped after it."""
    app.control.purge()
    processes = start_workers(*queues, env=env, log_dir=log_dir)
    try:
        wait_for_workers(app, queues, processes, ready_timeout)
        yield processes
    finally:
        stop(processes)


@contextlib.contextmanager
def running_hosts(app, hosts: dict[str, tuple[list[str], dict]], *, log_dir: Path | None = None, ready_timeout=90.0):
    """Workers as on separate hosts: {host: (queues, env)}, each worker named QUEUE@HOST with its host's env (its
    own ARTIFACTS_DIR, say); ready inside the block, stopped after it."""
    app.control.purge()
    processes, names = [], []
    try:
        for host, (queues, env) in hosts.items():
            processes += start_workers(*queues, env=env, log_dir=log_dir, host=host)
            names += [f"{queue}@{host}" for queue in queues]
        wait_for_workers(app, (), processes, ready_timeout, names=names)
        yield processes
    finally:
        stop(processes)
