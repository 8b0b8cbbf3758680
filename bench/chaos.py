"""Reliability: start the real processes, break them, and check the database's invariants afterwards.

    .venv/bin/python bench/chaos.py [--labelers 100] [--seconds 60] [--outage-seconds 40] [--fuzz-examples 20]

!!! It restarts this machine's Redis and PostgreSQL (127.0.0.1:6379 and :5432) mid-run: run nothing else meanwhile.

1. steady: `--labelers` API labelers (threads, each with its own token) lease and submit write tasks against
   gunicorn (bin/web) for `--seconds`.
2. redis: the same while Redis is shut down and started again (it keeps nothing on disk, so sessions, the cache
   and the broker queues are lost with it);
3. postgres: the same while PostgreSQL is restarted (`pg_ctlcluster ... restart -m fast`).
   Requests may fail while a service is down (a 503 with Retry-After); none may be a 5xx outside the outage
   windows, and nothing a labeler was told was saved (a 2xx) may be lost or counted twice.
4. killed training run: a training worker (bin/worker training) on a tiny policy is killed with SIGKILL mid-run;
   the reaper must mark the run failed, leave the active policy as it was and the staging folder gone.
5. killed sampling worker: a sampling worker is killed with SIGKILL while it samples a batch; once the lost
   requests are reaped and a new worker runs, every context of the killed batch gets its ranking task, once.
6. fuzz: schemathesis against /api/schema/, as a labeler and as an admin (`--fuzz-examples` per operation); the
   gunicorn access log counts the requests and the 5xx.

Invariants (SQL on the bench's database): every acknowledged submission is there exactly once, with its text
(`submissions_lost`, `double_counted`); no task has more live leases plus submissions than its overlap, and no
labeler holds two live leases (`double_leases`); a task's submitted count equals its submitted assignments.
The last line is JSON with every figure.
"""

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BENCH_DB = "feedback_loop_bench_chaos"
DATABASE_URL = f"postgres://postgres@127.0.0.1:5432/{BENCH_DB}"
REDIS_URL = "redis://127.0.0.1:6379/13"
ARTIFACTS = ROOT / "var" / "bench-chaos"
LOGS = ROOT / "var" / "bench-chaos-logs"
PORT = 8769
BASE_URL = f"http://127.0.0.1:{PORT}"

os.environ.update(
    DJANGO_SETTINGS_MODULE="config.settings.local",
    DATABASE_URL=DATABASE_URL,
    REDIS_URL=REDIS_URL,
    ARTIFACTS_DIR=str(ARTIFACTS),
    DJANGO_DEBUG="false",
    LOG_LEVEL="WARNING",
    HF_HUB_OFFLINE="1",
    API_RATE_USER="1000000/hour",  # the labelers here are scripts; the bench measures integrity, not throttles
    PAGE_RATE_PREVIEW="100000",
)

import django  # noqa: E402

from bench.support import drop_database, recreate_database  # noqa: E402
from tests.support import processes as procs  # noqa: E402


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- the services this bench breaks ---


def redis_restart(down_s: float) -> tuple[float, float]:
    """Shut Redis down (nothing saved), wait, start it as bin/services does. Returns (down at, back at)."""
    down = time.time()
    subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", "6379", "shutdown", "nosave"], capture_output=True)
    time.sleep(down_s)
    subprocess.run(
        ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379", "--save", "", "--appendonly",
         "no"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    _wait(lambda: subprocess.run(["redis-cli", "ping"], capture_output=True).returncode == 0, 30)
    return down, time.time()


def postgres_restart() -> tuple[float, float]:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    down = time.time()
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart", "-m", "fast"],
        check=True,
        capture_output=True,
    )
    _wait(lambda: subprocess.run(["pg_isready", "-h", "127.0.0.1", "-q"]).returncode == 0, 60)
    return down, time.time()


def _wait(condition, timeout_s: float, every_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(every_s)
    raise TimeoutError("gave up waiting")


# --- data ---


def seed(labelers: int, tasks: int) -> dict:
    from django.contrib.auth import get_user_model

    from labeling import services
    from labeling.models import Conversation, LabelerProfile, Message, QueueSettings, Role, TaskKind

    settings = QueueSettings.load()
    for field in (
        "weight_write_prompt",
        "weight_write_user_reply",
        "weight_rank_replies",
        "weight_review_demonstration",
    ):
        setattr(settings, field, 0.0)
    settings.weight_write_assistant_reply = 1.0
    settings.save()
    User = get_user_model()
    author = User.objects.create(username="chaos-author")
    tokens = []
    for i in range(labelers):
        user = User.objects.create(username=f"chaos-{i:03d}")
        LabelerProfile.objects.create(user=user, languages=["en"])
        tokens.append(services.api_token_rotate(user=user))
    admin = User.objects.create(username="chaos-admin", is_staff=True, is_superuser=True)
    admin_token = services.api_token_rotate(user=admin)
    conversations = Conversation.objects.bulk_create(Conversation(split="train") for _ in range(tasks))
    prompts = Message.objects.bulk_create(
        Message(conversation=c, depth=0, role=Role.USER, text=f"Chaos prompt {i}?", origin="human", author=author)
        for i, c in enumerate(conversations)
    )
    for i, prompt in enumerate(prompts):  # the queue's own task creation (one row each; a tenth with overlap 2)
        services.task_create(
            kind=TaskKind.WRITE_ASSISTANT_REPLY, parent_message=prompt, overlap=2 if i % 10 == 0 else 1
        )
    return {"tokens": tokens, "admin": admin_token}


# --- labelers ---


class Labeler(threading.Thread):
    """Leases and submits until `stop`; records every response: (time, what, status) and the acknowledged
    submissions (assignment id -> text)."""

    def __init__(self, token: str, stop: threading.Event, record: list, acknowledged: dict, lock: threading.Lock):
        super().__init__(daemon=True)
        self.token, self.stop, self.record, self.acknowledged, self.lock = token, stop, record, acknowledged, lock

    def run(self) -> None:
        import httpx

        with httpx.Client(base_url=BASE_URL, headers={"Authorization": f"Token {self.token}"}, timeout=30) as http:
            while not self.stop.is_set():
                status, assignment = self._call(http, "next", "/api/v1/tasks/next/", None)
                if status != 200 or assignment is None:
                    time.sleep(0.5 if status != 200 else 0.2)
                    continue
                text = f"chaos reply {uuid.uuid4().hex}"
                status, _ = self._call(
                    http, "submit", f"/api/v1/assignments/{assignment['id']}/submit/", {"text": text}
                )
                if status in (200, 201):
                    with self.lock:
                        self.acknowledged.setdefault(assignment["id"], text)

    def _call(self, http, what: str, path: str, body):
        try:
            response = http.post(path, json=body)
            status = response.status_code
            payload = response.json().get("assignment") if what == "next" and status == 200 else None
        except Exception:  # a refused or cut connection while a service restarts
            status, payload = 0, None
        with self.lock:
            self.record.append((time.time(), what, status))
        return status, payload


def run_labelers(tokens: list[str], seconds: float, during=None) -> dict:
    stop, lock, record, acknowledged = threading.Event(), threading.Lock(), [], {}
    threads = [Labeler(token, stop, record, acknowledged, lock) for token in tokens]
    for thread in threads:
        thread.start()
    windows = []
    started = time.monotonic()
    if during is not None:
        time.sleep(min(10.0, seconds / 4))
        windows.append(during())
    time.sleep(max(0.0, seconds - (time.monotonic() - started)))
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    grace = 5.0  # reconnecting after the service is back
    outside = [
        status
        for at, _, status in record
        if status >= 500 and not any(down <= at <= back + grace for down, back in windows)
    ]
    return {
        "requests": len(record),
        "submissions_ok": len(acknowledged),
        "errors_5xx": len(outside),
        "errors_5xx_in_outage": sum(1 for _, _, status in record if status >= 500) - len(outside),
        "unanswered": sum(1 for _, _, status in record if status == 0),
        "outage_s": round(sum(back - down for down, back in windows), 1),
        "acknowledged": acknowledged,
    }


def invariants(acknowledged: dict) -> dict:
    from django.db import connection, connections

    from labeling.models import Message

    connections.close_all()
    texts = dict(Message.objects.filter(assignment_id__in=list(acknowledged)).values_list("assignment_id", "text"))
    lost = sum(1 for assignment, text in acknowledged.items() if texts.get(assignment) != text)
    with connection.cursor() as cursor:
        cursor.execute(
            """SELECT count(*) FROM labeling_task t
               WHERE t.submitted_count <> (SELECT count(*) FROM labeling_assignment a
                                           WHERE a.task_id = t.id AND a.status = 'submitted')
                  OR (SELECT count(*) FROM labeling_message m JOIN labeling_assignment a ON a.id = m.assignment_id
                      WHERE a.task_id = t.id) <> t.submitted_count"""
        )
        double_counted = cursor.fetchone()[0]
        cursor.execute(
            """SELECT count(*) FROM labeling_task t
               WHERE (SELECT count(*) FROM labeling_assignment a WHERE a.task_id = t.id
                      AND (a.status = 'submitted' OR (a.status = 'leased' AND a.lease_expires_at > now())))
                     > t.overlap"""
        )
        over_overlap = cursor.fetchone()[0]
        cursor.execute(
            """SELECT count(*) FROM (SELECT labeler_id FROM labeling_assignment
                                     WHERE status = 'leased' AND lease_expires_at > now()
                                     GROUP BY labeler_id HAVING count(*) > 1) twice"""
        )
        two_leases = cursor.fetchone()[0]
    return {"submissions_lost": lost, "double_counted": double_counted, "double_leases": over_overlap + two_leases}


# --- processes ---


def web_env() -> dict:
    return {"WEB_BIND": f"127.0.0.1:{PORT}", "WEB_WORKERS": "4", "WEB_THREADS": "8"}


def tiny_policy() -> object:
    from models_service.models import ModelVersion
    from models_service.services import model_version_activate, model_version_register
    from models_service.tiny import build_tiny_policy

    directory = ARTIFACTS / "models" / "tiny-policy"
    build_tiny_policy(directory, seed=0)
    version = model_version_register(
        kind=ModelVersion.Kind.POLICY, stage="base", artifact_dir=directory, name="tiny-policy", source="chaos"
    )
    model_version_activate(version=version, reason="chaos bench")
    return version


def killed_training() -> dict:
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.db import connections
    from django.utils import timezone

    from labeling import services
    from labeling.models import Conversation, Message, Role
    from models_service.models import ModelVersion
    from training_jobs import services as training
    from training_jobs.models import TrainingRun

    connections.close_all()
    writer = get_user_model().objects.get(username="chaos-author")
    for i in range(12):
        conversation = Conversation.objects.create(split="validation" if i < 2 else "train")
        prompt = Message.objects.create(
            conversation=conversation, depth=0, role=Role.USER, text=f"Q{i}?", origin="human", author=writer
        )
        services.message_create(
            conversation=conversation,
            parent=prompt,
            role=Role.ASSISTANT,
            text=f"A{i}.",
            origin="human",
            author=writer,
            review_status=Message.ReviewStatus.ACCEPTED,
        )
    active_before = ModelVersion.objects.get(kind="policy", is_active=True).pk
    env = {"TRAINING_MIN_DEMONSTRATIONS": "4", "TRAINING_REPORT_INTERVAL_S": "0.2"}
    worker = procs.start_workers("training", env=env, log_dir=LOGS)[0]
    try:
        run = training.training_run_create(kind="sft", config={"epochs": 500, "batch_size": 2, "max_length": 64})
        _wait(lambda: TrainingRun.objects.get(pk=run.pk).progress_step > 3, 180, 0.5)
        procs.kill(worker)
    finally:
        procs.stop([worker], timeout_s=10)
    staging = training.staging_dir(run)
    later = timezone.now() + dt.timedelta(seconds=settings.TRAINING_HEARTBEAT_TIMEOUT_S + 1)
    training.training_runs_reap(now=later)  # what the control worker's periodic check does once the beats stop
    run.refresh_from_db()
    return {
        "killed_training_run_status": run.status,
        "killed_training_active_policy_unchanged": ModelVersion.objects.get(kind="policy", is_active=True).pk
        == active_before,
        "killed_training_staging_left": staging.exists(),
        "killed_training_model_registered": ModelVersion.objects.filter(training_run=run).exists(),
    }


def killed_sampling(policy) -> dict:
    from celery import current_app
    from django.contrib.auth import get_user_model
    from django.db import connections

    from labeling.models import Conversation, Message, Role, Task, TaskKind
    from models_service import services as models
    from models_service.models import SamplingRequest

    connections.close_all()
    writer = get_user_model().objects.get(username="chaos-author")
    Task.objects.filter(status="open").update(status="cancelled", cancelled_reason="chaos: make room for the pool")
    for i in range(24):
        conversation = Conversation.objects.create(split="train")
        Message.objects.create(
            conversation=conversation,
            depth=0,
            role=Role.USER,
            text=f"Sample for me {i}.",
            origin="human",
            author=writer,
        )
    env = {"SAMPLING_POOL_TARGET": "24", "SAMPLING_K": "2", "SAMPLING_BATCH_CONTEXTS": "8",
           "SAMPLING_MAX_NEW_TOKENS": "400"}  # fmt: skip
    worker = procs.start_workers("sampling", env=env, log_dir=LOGS)[0]
    killed_contexts: list[int] = []
    try:
        current_app.send_task("models_service.tasks.fill_ranking_pool", queue="sampling")
        _wait(lambda: SamplingRequest.objects.filter(status="running").exists(), 120, 0.02)
        killed_contexts = list(SamplingRequest.objects.filter(status="running").values_list("context_id", flat=True))
        procs.kill(worker)
    finally:
        procs.stop([worker], timeout_s=10)
    models.sampling_requests_reap(older_than_s=0)  # the control worker's check, once the requests are stale
    worker = procs.start_workers("sampling", env=env, log_dir=LOGS)[0]
    try:
        current_app.send_task("models_service.tasks.fill_ranking_pool", queue="sampling")

        def recovered():
            return Task.objects.filter(kind=TaskKind.RANK_REPLIES, parent_message_id__in=killed_contexts).values(
                "parent_message_id"
            ).distinct().count() == len(killed_contexts)

        _wait(recovered, 300, 1.0)
    finally:
        procs.stop([worker], timeout_s=30)
    per_context = Task.objects.filter(kind=TaskKind.RANK_REPLIES, model_version=policy).values_list(
        "parent_message_id", flat=True
    )
    duplicates = len(per_context) - len(set(per_context))
    orphans = (
        Message.objects.filter(parent_id__in=killed_contexts, role=Role.ASSISTANT, origin="model")
        .exclude(candidate_in_tasks__isnull=False)
        .count()
    )
    return {
        "killed_sampling_contexts": len(killed_contexts),
        "killed_sampling_contexts_recovered": Task.objects.filter(
            kind=TaskKind.RANK_REPLIES, parent_message_id__in=killed_contexts
        )
        .values("parent_message_id")
        .distinct()
        .count(),
        "duplicate_candidates": duplicates + orphans,
    }


def fuzz(tokens: dict, examples: int) -> dict:
    access = LOGS / "web.out.log"
    before = access.read_text().count("\n") if access.exists() else 0
    for who in ("labeler", "admin"):
        subprocess.run(
            [str(ROOT / ".venv" / "bin" / "schemathesis"), "run", f"{BASE_URL}/api/schema/", "--checks",
             "not_a_server_error", "--max-examples", str(examples), "--header", f"Authorization: Token {tokens[who]}",
             "--seed", "2026", "--request-timeout", "30", "--continue-on-failure", "--generation-allow-x00", "false",
             "--exclude-path-regex", "/api/v1/training-runs/start/"],
            cwd=ROOT,
            stdout=open(LOGS / f"fuzz-{who}.log", "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            timeout=900,
        )  # fmt: skip
    lines = access.read_text().splitlines()[before:]
    statuses = [int(m.group(1)) for line in lines if (m := re.search(r'" (\d{3}) ', line))]
    return {"fuzz_requests": len(statuses), "fuzz_5xx": sum(1 for s in statuses if s >= 500)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labelers", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--outage-seconds", type=float, default=40.0)
    parser.add_argument("--tasks", type=int, default=12000)
    parser.add_argument("--fuzz-examples", type=int, default=20)
    parser.add_argument("--skip", action="append", default=[], choices=["redis", "postgres", "training", "sampling",
                                                                       "fuzz"])  # fmt: skip
    args = parser.parse_args()

    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    shutil.rmtree(LOGS, ignore_errors=True)
    LOGS.mkdir(parents=True)
    recreate_database(BENCH_DB)
    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    started = time.monotonic()
    seeded = seed(args.labelers, args.tasks)
    log(f"seeded {args.labelers} labelers and {args.tasks} write tasks in {time.monotonic() - started:.0f} s")
    policy = tiny_policy()
    figures: dict = {"labelers": args.labelers}
    web = procs.start_web(env=web_env(), log_dir=LOGS, keep_stdout=True)
    try:
        procs.wait_for_http(f"{BASE_URL}/healthz", [web], timeout_s=60)
        phases = [("steady", args.seconds, None)]
        if "redis" not in args.skip:
            phases.append(("redis", args.outage_seconds, lambda: redis_restart(3.0)))
        if "postgres" not in args.skip:
            phases.append(("postgres", args.outage_seconds, postgres_restart))
        for name, seconds, during in phases:
            log(f"{name}: {args.labelers} labelers for {seconds:.0f} s")
            result = run_labelers(seeded["tokens"], seconds, during)
            result.update(invariants(result.pop("acknowledged")))
            log(f"{name}: {json.dumps(result)}")
            prefix = "" if name == "steady" else f"{name}_"
            figures.update({f"{prefix}{key}": value for key, value in result.items()})
        if "fuzz" not in args.skip:
            labeler = seeded["tokens"][0]  # chaos-000's
            log("fuzz: schemathesis as a labeler and as an admin")
            figures.update(fuzz({"labeler": labeler, "admin": seeded["admin"]}, args.fuzz_examples))
            log(f"fuzz: {figures['fuzz_requests']} requests, {figures['fuzz_5xx']} 5xx")
    finally:
        procs.stop([web], timeout_s=30)
    if "training" not in args.skip:
        log("killing a training worker mid-run")
        figures.update(killed_training())
    if "sampling" not in args.skip:
        log("killing a sampling worker mid-batch")
        figures.update(killed_sampling(policy))
    from django.db import connections

    connections.close_all()
    drop_database(BENCH_DB)
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    figures["targets"] = {
        "nothing_lost": all(figures.get(k, 0) == 0 for k in figures if k.endswith("submissions_lost")),
        "nothing_double_counted": all(figures.get(k, 0) == 0 for k in figures if k.endswith("double_counted")),
        "no_double_leases": all(figures.get(k, 0) == 0 for k in figures if k.endswith("double_leases")),
        "no_5xx_outside_outages": all(figures.get(k, 0) == 0 for k in figures if k.endswith("errors_5xx")),
        "no_fuzz_5xx": figures.get("fuzz_5xx", 0) == 0,
        "killed_run_failed_policy_untouched": figures.get("killed_training_run_status", "failed") == "failed"
        and figures.get("killed_training_active_policy_unchanged", True),
    }
    figures["targets_met"] = all(figures["targets"].values())
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
