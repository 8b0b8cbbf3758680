"""The task queue under load: concurrent simulated labelers doing next-task and submit against gunicorn.

    .venv/bin/python bench/queue_load.py [--labelers 50] [--seconds 20] [--think-ms 500]

Starts its own database and a gunicorn (bin/web) on 127.0.0.1, seeds labelers and tasks, and runs, with a
bounded asyncio client:
0. warm-up: 400 next-task requests from fresh labelers, so that the phases below meet a server that has been
   running (each web thread's database connection has compiled the queue function and planned its statements);
1. latency: `--labelers` labelers, each looping next-task -> think -> submit (the time on the task page, drawn
   between 0.5x and 1.5x `--think-ms`; real labelers spend 10 s to minutes there, the default is 2 s; they
   start at random moments within one think time); p50/p99 of next-task and submit;
2. throughput, the same number of clients with no think time: next-task alone (each request from a labeler
   holding no lease, so each grants a new one), whole next-task + submit cycles, and the trivial endpoint
   (/healthz: one SELECT 1), in this run, on this server; for next-task alone and the trivial endpoint, the CPU
   time per request of the web server, of PostgreSQL and of this client (all on the same cores), and from it the
   ratio by the server's CPU alone (next_task_vs_trivial_server_cpu). Next-task alone and the trivial endpoint
   are asked by the same clients, in alternating turns, each request carrying a session cookie in its header.
Beat's queue upkeep runs as in the product: labeling.services.queue_tables_vacuum() every QUEUE_VACUUM_SCHEDULE_S
seconds, from a thread of this script (standing in for beat and a worker). Stops everything and drops its
database at the end. The last line is JSON with every figure.
"""

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BENCH_DB = "feedback_loop_bench_queue"
LOGS = ROOT / "var" / "bench-queue-logs"  # gunicorn's log, kept after the run
PORT = 8011
BASE_URL = f"http://127.0.0.1:{PORT}"
WARM_UP_REQUESTS = 400
THROUGHPUT_TURNS = 4
DATABASE_URL = f"postgres://postgres@127.0.0.1:5432/{BENCH_DB}"

os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings.local"
os.environ["DATABASE_URL"] = DATABASE_URL
os.environ["DJANGO_DEBUG"] = "false"
os.environ["REDIS_URL"] = "redis://127.0.0.1:6379/13"
os.environ["LOG_LEVEL"] = "WARNING"

import django  # noqa: E402
import httpx  # noqa: E402
import psycopg  # noqa: E402

from bench.support import (  # noqa: E402
    drop_database,
    empty_redis_database,
    recreate_database,
)
from tests.support import processes as procs  # noqa: E402


def log(message: str) -> None:
    print(message, flush=True)


def seed(labelers: int, tasks: int) -> list[str]:
    """Migrate, create labelers with logged-in sessions and `tasks` reply tasks. Returns session keys."""
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connection

    from labeling.models import Conversation, Message, Task, TaskKind

    call_command("migrate", verbosity=0)
    User = get_user_model()
    author = User.objects.create(username="prompt-author")
    conversations = Conversation.objects.bulk_create(
        Conversation(language="en", tags=["bench"], split="train") for _ in range(tasks)
    )
    prompts = Message.objects.bulk_create(
        Message(
            conversation=c, depth=0, role="user", text=f"Prompt {i}: explain something.", origin="human", author=author
        )
        for i, c in enumerate(conversations)
    )
    Task.objects.bulk_create(
        Task(kind=TaskKind.WRITE_ASSISTANT_REPLY, conversation=p.conversation, parent_message=p) for p in prompts
    )
    with connection.cursor() as cursor:
        # What autovacuum does after a bulk load (row counts for the planner, the visibility map), done now rather
        # than in the middle of the measurements.
        cursor.execute("VACUUM ANALYZE")
    return make_labelers("labeler", labelers)


def make_labelers(prefix: str, count: int) -> list[str]:
    """Labelers with profiles and logged-in sessions (as the login page would leave them). Returns session keys."""
    from django.conf import settings
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model
    from django.contrib.sessions.backends.cached_db import SessionStore
    from django.utils.module_loading import import_string

    from labeling.models import LabelerProfile

    users = get_user_model().objects.bulk_create(
        get_user_model()(username=f"{prefix}{i}", password="!") for i in range(count)
    )
    LabelerProfile.objects.bulk_create(LabelerProfile(user=user, languages=["en"]) for user in users)
    keys = []
    # The backend a password login records (axes' backend, first in the list, only guards logins).
    backend = next(path for path in settings.AUTHENTICATION_BACKENDS if hasattr(import_string(path), "get_user"))
    for user in users:
        session = SessionStore()
        session[SESSION_KEY] = str(user.pk)
        session[BACKEND_SESSION_KEY] = backend
        session[HASH_SESSION_KEY] = user.get_session_auth_hash()
        session.create()
        keys.append(session.session_key)
    return keys


class QueueUpkeep(threading.Thread):
    """What beat does for the queue while the product runs: vacuum its tables on schedule (they are vacuumed
    only once they hold dead rows, analysed only once a tenth of them changed). Counts the tables it vacuumed or
    analysed (queue_vacuums)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stopping = threading.Event()
        self.vacuums = 0

    def run(self):
        from django.conf import settings
        from django.db import connection

        from labeling.services import queue_tables_vacuum

        try:
            while not self.stopping.wait(settings.QUEUE_VACUUM_SCHEDULE_S):
                self.vacuums += len(queue_tables_vacuum())
        finally:
            connection.close()

    def stop(self):
        self.stopping.set()
        self.join(timeout=30)


def start_server() -> subprocess.Popen:
    server = procs.start_web(env={"WEB_BIND": f"127.0.0.1:{PORT}", "LOG_LEVEL": "WARNING"}, log_dir=LOGS)
    try:
        procs.wait_for_http(f"{BASE_URL}/healthz", [server], timeout_s=60)
    except (RuntimeError, TimeoutError) as error:
        procs.stop([server])
        raise SystemExit(f"gunicorn did not come up: {error}") from None
    return server


async def send(client: httpx.AsyncClient, method: str, url: str, **kwargs) -> httpx.Response:
    """One request; retried once on a connection the server had just closed (keep-alive race), as browsers do.
    Safe for the submit POST too: submissions are idempotent."""
    try:
        return await client.request(method, url, **kwargs)
    except (httpx.RemoteProtocolError, httpx.ConnectError, httpx.ReadError, httpx.WriteError):
        return await client.request(method, url, **kwargs)


class Labeler:
    def __init__(self, session_key: str):
        self.client = httpx.AsyncClient(
            base_url=BASE_URL, cookies={"sessionid": session_key}, timeout=30, follow_redirects=False
        )
        self.csrf = ""

    async def start(self):
        response = await self.client.get("/")
        response.raise_for_status()
        self.csrf = self.client.cookies.get("csrftoken", "")

    async def next_task(self, timings):
        started = time.perf_counter()
        response = await send(self.client, "GET", "/work/next/")
        timings.append(time.perf_counter() - started)
        if response.status_code == 302 and "/work/" in response.headers["location"]:
            return response.headers["location"]
        return None

    async def submit(self, url, timings):
        started = time.perf_counter()
        response = await send(
            self.client,
            "POST",
            url,
            data={"text": "A careful reply.", "csrfmiddlewaretoken": self.csrf, "time_spent_ms": "1000"},
            headers={"Referer": BASE_URL + url},
        )
        timings.append(time.perf_counter() - started)
        if response.status_code != 302:
            raise RuntimeError(f"submit returned {response.status_code}: {response.text[:300]}")


async def labeling_phase(labelers, seconds: float, think_s: float) -> dict:
    next_timings, submit_timings = [], []
    deadline = time.monotonic() + seconds

    async def work(labeler: Labeler, rng: random.Random):
        if think_s:
            await asyncio.sleep(rng.uniform(0, think_s))  # labelers do not all start at the same instant
        while time.monotonic() < deadline:
            url = await labeler.next_task(next_timings)
            if url is None:
                return
            if think_s:
                # Reading and writing, some faster, some slower; the page then submits and asks for the next.
                await asyncio.sleep(rng.uniform(0.5 * think_s, 1.5 * think_s))
            await labeler.submit(url, submit_timings)

    started = time.monotonic()
    await asyncio.gather(*(work(labeler, random.Random(i)) for i, labeler in enumerate(labelers)))
    elapsed = time.monotonic() - started
    return {"next": next_timings, "submit": submit_timings, "elapsed": elapsed}


async def next_task_phase(clients: list[httpx.AsyncClient], fresh_keys: list[str], seconds: float) -> dict:
    """Next-task alone: each request comes from a labeler who holds no lease, so each one grants a new lease.
    `fresh_keys` are their session keys, taken from the end of the list as they are used.

    The clients are made beforehand: making an httpx client costs ~40 ms of CPU here (it loads the TLS
    certificates), which is not a request's cost but would be counted in this phase's CPU time. Each request
    carries its labeler's session cookie in its own header, as a browser sends it, and as the trivial phase does;
    putting it into the client's cookie jar instead cost this client 0.2 ms of CPU per request here (a jar update
    per request), CPU that the server then lacked."""
    timings = []
    keys = fresh_keys
    deadline = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient):
        while keys and time.monotonic() < deadline:
            headers = {"Cookie": f"sessionid={keys.pop()}"}
            started = time.perf_counter()
            response = await send(http, "GET", "/work/next/", headers=headers)
            timings.append(time.perf_counter() - started)
            if response.status_code != 302 or "/work/" not in response.headers["location"]:
                raise RuntimeError(f"next-task gave no task: {response.status_code}")

    started = time.monotonic()
    await asyncio.gather(*(client(http) for http in clients))
    return {"timings": timings, "elapsed": time.monotonic() - started, "exhausted": not keys}


async def trivial_phase(clients: list[httpx.AsyncClient], session_keys: list[str], seconds: float) -> dict:
    """The trivial endpoint, from the next-task phase's clients, each request with a labeler's session cookie in its
    own header (the endpoint does not read it)."""
    timings = []
    deadline = time.monotonic() + seconds

    async def hammer(http: httpx.AsyncClient, session_key: str):
        headers = {"Cookie": f"sessionid={session_key}"}
        while time.monotonic() < deadline:
            started = time.perf_counter()
            response = await send(http, "GET", "/healthz", headers=headers)
            timings.append(time.perf_counter() - started)
            response.raise_for_status()

    started = time.monotonic()
    await asyncio.gather(*(hammer(http, key) for http, key in zip(clients, session_keys, strict=True)))
    return {"timings": timings, "elapsed": time.monotonic() - started}


def percentile(values, q) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] * 1000


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU time used so far by each process of the web server (gunicorn on PORT), of PostgreSQL serving the bench
    database, and by this client, read from /proc (Linux). The client shares the cores with the server, so where
    the time goes says more than the throughput alone."""
    ticks = os.sysconf("SC_CLK_TCK")
    processes = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended meanwhile
            continue
        if int(pid) == os.getpid():
            part = "client"
        elif "gunicorn" in command and f"127.0.0.1:{PORT}" in command:
            part = "web"
        elif command.startswith("postgres:") and BENCH_DB in command:
            part = "postgres"
        else:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        processes[int(pid)] = (part, (int(fields[11]) + int(fields[12])) / ticks)
    return processes


def cpu_spent(before: dict, after: dict, totals: dict[str, float]) -> None:
    """Adds to `totals`, per part, the CPU time between the two readings (all of it for a process started in
    between; a process that ended in between, such as a database connection past its CONN_MAX_AGE, is missed
    from its last reading)."""
    for pid, (part, seconds) in after.items():
        totals[part] += seconds - (before[pid][1] if pid in before else 0.0)


async def alternating_phases(
    clients: list[httpx.AsyncClient], fresh_keys: list[str], session_keys: list[str], seconds: float
) -> dict[str, dict]:
    """Next-task alone and the trivial endpoint, `seconds` each, in THROUGHPUT_TURNS alternating turns (next-task
    first). This machine's speed drifts: the same endpoint gave 10-40% more or fewer requests a second in runs
    minutes apart. Taking turns makes a drift during the run weigh on both endpoints alike. Each result adds up its
    turns: the timings, the time taken and the CPU time of each part."""
    results = {
        name: {"timings": [], "elapsed": 0.0, "cpu": {"web": 0.0, "postgres": 0.0, "client": 0.0}}
        for name in ("next_task", "trivial")
    }
    for _ in range(THROUGHPUT_TURNS):
        for name in results:
            before = cpu_seconds()
            if name == "next_task":
                turn = await next_task_phase(clients, fresh_keys, seconds / THROUGHPUT_TURNS)
                results[name]["exhausted"] = turn["exhausted"]
            else:
                turn = await trivial_phase(clients, session_keys, seconds / THROUGHPUT_TURNS)
            cpu_spent(before, cpu_seconds(), results[name]["cpu"])
            results[name]["timings"] += turn["timings"]
            results[name]["elapsed"] += turn["elapsed"]
    return results


def round_trips() -> dict:
    """What one database and one Redis round trip cost on this machine (they bound every request)."""
    import redis

    with psycopg.connect(DATABASE_URL.replace("postgres://", "postgresql://"), autocommit=True) as conn:
        conn.execute("SELECT 1")
        started = time.perf_counter()
        for _ in range(500):
            conn.execute("SELECT 1").fetchone()
        db = (time.perf_counter() - started) / 500
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    client.ping()
    started = time.perf_counter()
    for _ in range(500):
        client.get("round-trip")
    return {
        "db_round_trip_ms": round(db * 1000, 3),
        "redis_round_trip_ms": round((time.perf_counter() - started) * 2, 3),
    }


async def run(args) -> dict:
    labelers = [Labeler(key) for key in args.session_keys]
    await asyncio.gather(*(labeler.start() for labeler in labelers))
    figures = {"concurrency": len(labelers), "think_ms": args.think_ms, **round_trips()}
    log(f"round trips: PostgreSQL {figures['db_round_trip_ms']} ms, Redis {figures['redis_round_trip_ms']} ms")
    fresh_clients = [
        httpx.AsyncClient(base_url=BASE_URL, timeout=30, follow_redirects=False) for _ in range(len(labelers))
    ]
    # Measured on a server that has been running, as the targets are about labelers at work: every web thread's
    # database connection has compiled the queue function and planned its statements (~15 ms on a connection's
    # first next-task, once in its lifetime, DATABASE_CONN_MAX_AGE). Uses fresh labelers the later phase does not.
    warm_up = await next_task_phase(fresh_clients, args.fresh_keys[-WARM_UP_REQUESTS:], seconds=120)
    del args.fresh_keys[-WARM_UP_REQUESTS:]
    log(f"warm-up: {len(warm_up['timings'])} next-task requests")

    log(f"latency phase: {len(labelers)} labelers, think time {args.think_ms} ms, {args.seconds} s")
    latency = await labeling_phase(labelers, args.seconds, args.think_ms / 1000)
    figures.update(
        next_task_p50_ms=round(percentile(latency["next"], 50), 1),
        next_task_p99_ms=round(percentile(latency["next"], 99), 1),
        submit_p50_ms=round(percentile(latency["submit"], 50), 1),
        submit_p99_ms=round(percentile(latency["submit"], 99), 1),
        tasks_done_latency_phase=len(latency["submit"]),
    )
    log(
        f"  next-task p50 {figures['next_task_p50_ms']} ms, p99 {figures['next_task_p99_ms']} ms; "
        f"submit p50 {figures['submit_p50_ms']} ms, p99 {figures['submit_p99_ms']} ms; "
        f"{len(latency['submit'])} tasks done"
    )

    log(
        f"throughput phase: {len(labelers)} clients, no think time, {args.seconds} s each "
        f"(next-task alone and the trivial endpoint in {THROUGHPUT_TURNS} turns each, alternating)"
    )
    alternating = await alternating_phases(fresh_clients, args.fresh_keys, args.session_keys, args.seconds)
    await asyncio.gather(*(http.aclose() for http in fresh_clients))
    alone, trivial = alternating["next_task"], alternating["trivial"]
    for name, result in alternating.items():
        figures.update(
            {
                f"{name}_{part}_cpu_ms": round(seconds * 1000 / max(len(result["timings"]), 1), 3)
                for part, seconds in result["cpu"].items()
            }
        )
    cycles = await labeling_phase(labelers, args.seconds, 0)
    figures.update(
        next_task_rps=round(len(alone["timings"]) / alone["elapsed"], 1),
        saturated_next_task_p50_ms=round(percentile(alone["timings"], 50), 1),
        saturated_next_task_p99_ms=round(percentile(alone["timings"], 99), 1),
        cycle_rps=round(len(cycles["submit"]) / cycles["elapsed"], 1),
        trivial_rps=round(len(trivial["timings"]) / trivial["elapsed"], 1),
        trivial_p50_ms=round(percentile(trivial["timings"], 50), 1),
        trivial_p99_ms=round(percentile(trivial["timings"], 99), 1),
    )
    figures["next_task_vs_trivial"] = round(figures["next_task_rps"] / figures["trivial_rps"], 3)
    figures["cycle_vs_trivial"] = round(figures["cycle_rps"] / figures["trivial_rps"], 3)
    # The throughput ratio a server with cores of its own would reach: this client shares the cores and costs
    # about as much for both endpoints, which brings next_task_vs_trivial closer to 1.
    server_cpu = {
        name: figures[f"{name}_web_cpu_ms"] + figures[f"{name}_postgres_cpu_ms"] for name in ("next_task", "trivial")
    }
    figures["next_task_vs_trivial_server_cpu"] = round(server_cpu["trivial"] / max(server_cpu["next_task"], 1e-9), 3)
    log(
        "  CPU per request, web / PostgreSQL / this client: next-task "
        + " / ".join(f"{figures[f'next_task_{part}_cpu_ms']} ms" for part in ("web", "postgres", "client"))
        + "; trivial "
        + " / ".join(f"{figures[f'trivial_{part}_cpu_ms']} ms" for part in ("web", "postgres", "client"))
        + f"; by the server's CPU alone, next-task = {figures['next_task_vs_trivial_server_cpu']:.2f}x trivial"
    )
    if alone["exhausted"]:
        log("  (the fresh labelers ran out before the time was up; raise --fresh-labelers)")
    log(
        f"  next-task alone (each a new lease): {figures['next_task_rps']} req/s; "
        f"next-task + submit cycles: {figures['cycle_rps']}/s; trivial /healthz: {figures['trivial_rps']} req/s; "
        f"next-task = {figures['next_task_vs_trivial']:.2f}x trivial, "
        f"a whole cycle = {figures['cycle_vs_trivial']:.2f}x"
    )
    await asyncio.gather(*(labeler.client.aclose() for labeler in labelers))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labelers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument(
        "--think-ms", type=int, default=2000, help="time on a task page between next-task and submit (people: 10 s+)"
    )
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument(
        "--fresh-labelers", type=int, default=16000, help="labelers for the next-task-alone phase (one request each)"
    )
    args = parser.parse_args()

    subprocess.run([str(ROOT / "bin" / "services")], check=True)
    recreate_database(BENCH_DB)
    empty_redis_database(os.environ["REDIS_URL"])
    django.setup()
    log(f"seeding {args.labelers} labelers and {args.tasks} tasks ...")
    args.session_keys = seed(args.labelers, args.tasks)
    args.fresh_keys = make_labelers("fresh", args.fresh_labelers)
    from django.db import connections

    connections.close_all()
    servers = []
    upkeep = QueueUpkeep()
    try:
        servers.append(start_server())
        upkeep.start()
        figures = asyncio.run(run(args))
        figures["queue_vacuums"] = upkeep.vacuums
    finally:
        upkeep.stop()
        procs.stop(servers, timeout_s=20)
        drop_database(BENCH_DB)
        empty_redis_database(os.environ["REDIS_URL"])
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
