"""The labeler's waits, measured in a real Chromium against the real product with the default model.

    .venv/bin/python bench/labeler.py [--submissions 50] [--chats 3]

Starts its own database (and Redis database), converts the default model (SmolLM2-135M-Instruct) as base v0 and
serves it, starts the web server (bin/web) and the interactive and training workers (bin/worker, with their
production priorities), and drives Debian's Chromium with Playwright:
- chat: from clicking Send to the first words of the reply on the page (`chat_first_token_s`, the page polls the
  text as it is written) and to the whole reply (`chat_reply_s`); the first chat (the worker loads the model) is
  reported apart as `chat_cold_first_token_s`; `*_server_s` are the same from the request's own timestamps;
- the same while an SFT run of the default model trains on the same cores (`chat_first_token_s_training`);
- drafts: from clicking "Draft from the model" to the first words in the editor (`draft_first_token_s`);
- the next task: from clicking Submit to the next task's editor on the page, over `--submissions` submissions
  (`next_task_visible_p50_ms`, `_p99_ms`), beside the baseline of opening a plain page in the same browser
  (`plain_page_visible_p50_ms`).
Targets on this machine: first token <= 2 s idle and <= 5 s during training; next task p99 <= 300 ms.
Stops everything and drops its database at the end. The last line is JSON with every figure.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BENCH_DB = "feedback_loop_bench_labeler"
DATABASE_URL = f"postgres://postgres@127.0.0.1:5432/{BENCH_DB}"
REDIS_URL = "redis://127.0.0.1:6379/11"
ARTIFACTS = ROOT / "var" / "bench-labeler"
LOGS = ROOT / "var" / "bench-labeler-logs"
PORT = 8771
BASE_URL = f"http://127.0.0.1:{PORT}"
PASSWORD = "bench-labeler-password"

os.environ.update(
    DJANGO_SETTINGS_MODULE="config.settings.local",
    DATABASE_URL=DATABASE_URL,
    REDIS_URL=REDIS_URL,
    ARTIFACTS_DIR=str(ARTIFACTS),
    STATIC_ROOT=str(ARTIFACTS / "static"),
    DJANGO_DEBUG="false",
    LOG_LEVEL="WARNING",
    HF_HUB_OFFLINE="1",
    PAGE_RATE_PREVIEW="100000",
    PAGE_RATE_CHAT="1000",
    PAGE_RATE_DRAFT="1000",
    DJANGO_ALLOW_ASYNC_UNSAFE="true",  # Playwright's sync API runs an event loop here; the ORM calls are sync
)

import django  # noqa: E402

from bench.support import discard_scratch, empty_redis_database, recreate_database  # noqa: E402
from tests.support import processes as procs  # noqa: E402
from tests.support.browser import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

CHAT_PROMPTS = [
    "Give me three tips for a good night's sleep.",
    "How do I boil an egg so the yolk stays soft?",
    "What is the difference between a list and a tuple in Python?",
    "Suggest a name for a small bakery.",
    "Why is the sky blue?",
    "Write a short thank-you note to a colleague.",
    "How long should I rest bread dough?",
]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def seed(tasks: int) -> dict:
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from labeling import services
    from labeling.importing import self_instruct_record
    from labeling.models import Conversation, LabelerProfile, Message, Role, TaskKind
    from labeling.services.records import records_import
    from models_service import default_model

    call_command("migrate", verbosity=0)
    call_command("collectstatic", "--no-input", verbosity=0)  # as bin/setup does: the web process serves them
    started = time.monotonic()
    version, _ = default_model.prepare()
    log(f"base v0 serving: {version.name} ({time.monotonic() - started:.0f} s)")
    user = get_user_model().objects.create_user("bench-labeler", password=PASSWORD)
    LabelerProfile.objects.create(user=user, languages=["en"])
    # Accepted demonstrations for the SFT run that trains while chat is measured.
    import gzip

    from django.conf import settings

    records = []
    path = Path(settings.SHARED_DATA_DIR) / "self_instruct_user_oriented_instructions.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            records.append(self_instruct_record(json.loads(line), dataset="si-user"))
    records_import(records)
    # Write-a-reply tasks for the labeler: fresh prompts of their own conversation each.
    for i in range(tasks):
        conversation = services.conversation_create(source=Conversation.Source.IMPORT, dataset="bench-prompts")
        prompt = services.message_create(
            conversation=conversation,
            parent=None,
            role=Role.USER,
            text=f"{CHAT_PROMPTS[i % len(CHAT_PROMPTS)]} (bench prompt {i})",
            origin=Message.Origin.IMPORT,
        )
        services.task_create(kind=TaskKind.WRITE_ASSISTANT_REPLY, parent_message=prompt, priority=5)
    return {"model": version.name}


def log_in(page) -> None:
    page.goto(f"{BASE_URL}/login/")
    page.fill("input[name=username]", "bench-labeler")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{BASE_URL}/")


def chat_once(page, text: str, timeout_s: float) -> dict:
    """Send a chat message; seconds to the first words on the page and to the whole reply."""
    from models_service.models import SamplingRequest

    page.goto(f"{BASE_URL}/chat/")
    page.fill("[data-testid=chat-input]", text)
    started = time.perf_counter()
    page.click("[data-testid=chat-send]")
    page.wait_for_selector("[data-testid=streaming-reply], .turn-assistant[data-message-id]", timeout=timeout_s * 1000)
    first = time.perf_counter() - started
    page.wait_for_selector(".turn-assistant[data-message-id]", timeout=timeout_s * 1000)
    whole = time.perf_counter() - started
    request = SamplingRequest.objects.filter(purpose="chat").order_by("-created_at").first()
    return {
        "first_token_s": first,
        "reply_s": whole,
        "first_token_server_s": (request.first_token_at - request.created_at).total_seconds(),
        "reply_server_s": (request.finished_at - request.created_at).total_seconds(),
        "tokens": request.sampling_params.get("new_tokens"),
    }


def draft_once(page, timeout_s: float) -> dict:
    """A draft on a fresh reply task (then submitted, so that the next draft starts on an empty editor too)."""
    page.goto(f"{BASE_URL}/work/next/")
    page.wait_for_selector("[data-testid=draft-button]")
    if page.locator("[data-testid=editor]").input_value().strip():
        raise SystemExit("the reply task's editor is not empty: the draft's first words could not be timed")
    started = time.perf_counter()
    page.click("[data-testid=draft-button]")
    page.wait_for_function(
        "document.querySelector('[data-testid=editor]').value.trim() !== ''", timeout=timeout_s * 1000
    )
    first = time.perf_counter() - started
    page.wait_for_function(
        "document.querySelector('[data-testid=draft-status]').textContent.startsWith('Draft by')",
        timeout=timeout_s * 1000,
    )
    result = {"first_token_s": first, "draft_s": time.perf_counter() - started}
    page.click("[data-testid=submit]")
    page.wait_for_selector(".flash-success")
    return result


def submissions(page, n: int) -> dict:
    """Submit n replies; milliseconds from the click to the next task's editor on the page."""
    page.goto(f"{BASE_URL}/work/next/")
    page.wait_for_selector("[data-testid=editor]")
    times = []
    for i in range(n):
        current = page.evaluate("window.location.pathname")
        page.fill("[data-testid=editor]", f"A careful reply number {i}: short, true and helpful.")
        started = time.perf_counter()
        page.click("[data-testid=submit]")
        page.wait_for_function(
            f"window.location.pathname !== {current!r} && document.readyState !== 'loading' "
            "&& document.querySelector('[data-testid=editor]') && document.querySelector('.flash-success')"
        )
        times.append((time.perf_counter() - started) * 1000)
    plain = []
    for _ in range(n):
        started = time.perf_counter()
        page.goto(f"{BASE_URL}/guidelines/")
        plain.append((time.perf_counter() - started) * 1000)
    return {"next_task_ms": times, "plain_page_ms": plain}


def training_run_going(timeout_s: float) -> int:
    """Start an SFT run of the default model and wait until it is in its training steps."""
    from training_jobs import services
    from training_jobs.models import TrainingRun

    run = services.training_run_create(kind="sft", config={"epochs": 3})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run.refresh_from_db()
        if run.status == TrainingRun.Status.RUNNING and run.progress_step >= 1:
            return run.pk
        if run.status in TrainingRun.FINISHED_STATUSES:
            raise SystemExit(f"the SFT run ended before chat could be measured beside it: {run.status} {run.error}")
        time.sleep(1)
    raise SystemExit(f"the SFT run did not start training within {timeout_s:.0f} s")


def stop_on_signals(processes: list) -> None:
    """Ctrl+C or SIGTERM stops what the bench started even while Playwright waits (its event loop keeps a
    KeyboardInterrupt from reaching the code that would clean up): stop the processes, drop the database, exit."""

    def stop(signum, _frame):
        procs.stop(processes, timeout_s=10)
        discard_scratch(BENCH_DB, REDIS_URL, ARTIFACTS)
        os._exit(128 + signum)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def summary(values: list[float], digits: int = 2) -> float:
    return round(statistics.median(values), digits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--submissions", type=int, default=50)
    parser.add_argument("--chats", type=int, default=3, help="chats measured idle, and again during training")
    parser.add_argument("--timeout-s", type=float, default=180)
    args = parser.parse_args()

    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    recreate_database(BENCH_DB)
    empty_redis_database(REDIS_URL)
    django.setup()
    from playwright.sync_api import sync_playwright

    from config.celery_app import app
    from training_jobs.models import TrainingRun

    processes, result = [], {}
    stop_on_signals(processes)
    try:
        result.update(seed(args.submissions + args.chats + 5))
        web = procs.start_web(env={"WEB_BIND": f"127.0.0.1:{PORT}", "WEB_WORKERS": "2"}, log_dir=LOGS)
        processes.append(web)
        app.control.purge()
        workers = procs.start_workers("interactive", "training", log_dir=LOGS)
        processes += workers
        procs.wait_for_http(f"{BASE_URL}/healthz", [web], timeout_s=60)
        procs.wait_for_workers(app, ("interactive", "training"), workers, timeout_s=120)
        log("web and workers up")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
            page.set_default_timeout(args.timeout_s * 1000)
            log_in(page)

            cold = chat_once(page, CHAT_PROMPTS[0], args.timeout_s)
            log(f"cold chat (the worker loads the model): {cold}")
            idle = [chat_once(page, CHAT_PROMPTS[1 + i], args.timeout_s) for i in range(args.chats)]
            log(f"idle chats: {idle}")
            drafts = [draft_once(page, args.timeout_s) for _ in range(2)]
            log(f"drafts: {drafts}")
            timing = submissions(page, args.submissions)
            log(f"next task p50 {percentile(timing['next_task_ms'], 50):.0f} ms")

            run_id = training_run_going(args.timeout_s * 3)
            log(f"SFT run #{run_id} is training; chatting beside it")
            busy = [
                chat_once(page, CHAT_PROMPTS[(4 + i) % len(CHAT_PROMPTS)], args.timeout_s) for i in range(args.chats)
            ]
            run = TrainingRun.objects.get(pk=run_id)
            still_training = run.status == TrainingRun.Status.RUNNING
            log(f"chats during training: {busy} (run still training: {still_training})")
            browser.close()

        result.update(
            {
                "chat_cold_first_token_s": round(cold["first_token_s"], 2),
                "chat_first_token_s": summary([c["first_token_s"] for c in idle]),
                "chat_reply_s": summary([c["reply_s"] for c in idle]),
                "chat_first_token_server_s": summary([c["first_token_server_s"] for c in idle]),
                "chat_reply_server_s": summary([c["reply_server_s"] for c in idle]),
                "chat_reply_tokens": summary([c["tokens"] or 0 for c in idle], 0),
                "chat_first_token_s_training": summary([c["first_token_s"] for c in busy]),
                "chat_reply_s_training": summary([c["reply_s"] for c in busy]),
                "chat_first_token_server_s_training": summary([c["first_token_server_s"] for c in busy]),
                "chat_reply_tokens_training": summary([c["tokens"] or 0 for c in busy], 0),
                "training_still_running_after_chats": still_training,
                "draft_first_token_s": summary([d["first_token_s"] for d in drafts]),
                "draft_s": summary([d["draft_s"] for d in drafts]),
                "next_task_visible_p50_ms": round(percentile(timing["next_task_ms"], 50), 1),
                "next_task_visible_p99_ms": round(percentile(timing["next_task_ms"], 99), 1),
                "next_task_submissions": len(timing["next_task_ms"]),
                "plain_page_visible_p50_ms": round(percentile(timing["plain_page_ms"], 50), 1),
                "worker_niceness": {"interactive": 0, "training": 19},
                "targets": {
                    "chat_first_token_s": 2,
                    "chat_first_token_s_training": 5,
                    "next_task_visible_p99_ms": 300,
                },
            }
        )
        result["targets_met"] = {
            name: result[name] <= target for name, target in result["targets"].items() if name in result
        }
    finally:
        procs.stop(processes, timeout_s=30)
        discard_scratch(BENCH_DB, REDIS_URL, ARTIFACTS)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
