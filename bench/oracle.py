"""Does the loop make the default policy better, round after round? Scripted labelers with a hidden preference rule
drive the real product through its REST API, and the bench measures the policies the loop serves against the SFT
policy (and each round's against the one before).

    .venv/bin/python bench/oracle.py [--rule NAME ...] [--path dpo|ppo|rloo] [--rankings N] [--k K]
                                     [--rewrite 0.25] [--active on|off] [--rounds 1|2]
    .venv/bin/python bench/oracle.py --table     (the latest kept result of each setting, as Markdown)

For each rule (bench/rules.py; all six unless --rule names some), from an empty database:
1. Starts the real product: gunicorn (bin/web), the training, sampling and control workers (bin/worker) and beat,
   with the default model (SmolLM2-135M-Instruct) as base v0. Path, K and thresholds default to the product's own.
2. As an admin, through /api/v1/imports/: Self-Instruct demonstrations (instruction + expert answer) and the other
   Self-Instruct instructions as prompts. `--heldout` instructions are never imported: the bench keeps them for its
   final measurement (their expert answers measure the alignment tax). The SFT threshold is set to what was imported.
3. Scripted labelers lease tasks through /api/v1/tasks/next/ and rank the K candidates the sampling worker produced
   by their rule (equal rule scores are ties). On `--rewrite` of the ranking tasks where no candidate satisfies the
   rule, the labeler also improves the best (the rule's rewrite; "Improve the best"), and the labelers review each
   other's improvements (accepted when they satisfy the rule). The product never sees the rule: only the orders and
   texts it implies. Labelers stop once the reward-model threshold is reached (two cores cannot label, sample and
   train at once without slowing the training they wait for). Should the pool run dry first, the bench does what
   the ops overview offers an admin, through the API: train on what there is (recorded in the figures).
4. Beat runs the loop on its own: SFT, the gate promotes it (no reward model yet), the reward model, the policy step
   of the path, the gate on held-out prompts, promotion. With `--rounds 2` the labelers then rank the new policy's
   samples until the threshold is reached again, and the loop runs its second round from the first round's policy.
5. The bench loads the SFT policy and each round's served policy and samples `--samples` replies to each held-out
   instruction with the serving parameters. Reported per rule and round: rule rates, the win rate (the share of
   prompts, not tied, where the policy's mean rule score beats the other's) against SFT and against the previous
   round, the round's reward model's pairwise accuracy on the rule's rankings of the SFT's held-out replies, the KL to
   SFT (the gate's), mean reply length in words, the loss on held-out demonstrations against SFT's, rankings
   submitted and the share that tied, the rankings that give pairs at the threshold, and wall time per stage.
   `loop_s` runs from the reward-model threshold being reached (its run queued) to the new policy serving.

Targets (issue 27): rm_heldout_accuracy >= 0.75, win_rate_vs_sft >= 0.70, KL within the gate's bound, loop_s <= 1800,
no rise in length the rule did not ask for, held-out demonstration loss at most 5% above SFT's; with two rounds, the
second beats the first on >= 60% of non-tied prompts and beats SFT by more than the first did. Each rule's figures go
to bench/results/oracle/ with the commit, date and machine. The last line is JSON with every figure.
"""

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BENCH_DB = "feedback_loop_bench_oracle"
DATABASE_URL = f"postgres://postgres@127.0.0.1:5432/{BENCH_DB}"
REDIS_URL = "redis://127.0.0.1:6379/11"
ARTIFACTS = ROOT / "var" / "bench-oracle"
LOGS = ROOT / "var" / "bench-oracle-logs"
PORT = 8767
BASE_URL = f"http://127.0.0.1:{PORT}"

OVERRIDES: dict[str, dict] = {}  # --config, per stage

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

from bench.rules import RULES, Rule, rank_by_rule, words  # noqa: E402
from bench.support import (  # noqa: E402
    config_overrides,
    discard_scratch,
    empty_redis_database,
    machine_figures,
    recreate_database,
    self_instruct,
    stage_configs,
)
from config import stages  # noqa: E402
from tests.support import processes as procs  # noqa: E402


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


# --- the product's processes ---


def start_processes(env: dict) -> list[subprocess.Popen]:
    """The product as `make run` starts it: web, the training, sampling and control workers, and beat."""
    return [
        procs.start_web(env=env, log_dir=LOGS),
        *procs.start_workers("training", "sampling", "control", env=env, log_dir=LOGS),
        procs.start_beat(env=env, log_dir=LOGS),
    ]


def api_client(token: str):
    import httpx

    return httpx.Client(base_url=BASE_URL, headers={"Authorization": f"Token {token}"}, timeout=60)


def import_file(admin, rows: list[dict], name: str, format: str) -> dict:
    response = admin.post(
        "/api/v1/imports/",
        files={"file": (name, io.BytesIO(jsonl(rows)), "application/jsonl")},
        data={"format": format, "dataset": name.removesuffix(".jsonl")},
    )
    response.raise_for_status()
    job = response.json()
    deadline = time.monotonic() + 600
    while job["status"] not in ("done", "failed") and time.monotonic() < deadline:
        time.sleep(1)
        job = admin.get(f"/api/v1/imports/{job['id']}/").json()
    if job["status"] != "done":
        raise SystemExit(f"import of {name} did not finish: {job}")
    return job


class Labeler(threading.Thread):
    """A scripted labeler: leases tasks, ranks the candidates by its rule, improves the best on a share of the tasks
    where no candidate satisfies the rule, reviews other labelers' improvements; until told to stop."""

    def __init__(self, token: str, rule: Rule, rewrite: float, stop: threading.Event, counts: dict, lock):
        super().__init__(daemon=True)
        self.client, self.rule, self.rewrite, self.stop = api_client(token), rule, rewrite, stop
        self.counts, self.lock = counts, lock

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + n

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                assignment = self.client.post("/api/v1/tasks/next/").json().get("assignment")
            except Exception:
                time.sleep(2)
                continue
            if assignment is None:
                self.stop.wait(3)
            elif assignment["kind"] == "rank_replies":
                self.rank(assignment)
            elif assignment["kind"] == "review_demonstration":
                self.review(assignment)
            else:
                self.client.post(
                    f"/api/v1/assignments/{assignment['id']}/skip/", json={"reason": "This labeler only ranks."}
                )

    def rank(self, assignment: dict) -> None:
        prompt = assignment["context"][-1]["content"]
        order = rank_by_rule(self.rule, prompt, assignment["candidates"])
        body = {"order": order, "quality_rating": 4, "confirm_untouched": True, "time_spent_ms": 20_000}
        by_id = {c["id"]: c["content"] for c in assignment["candidates"]}
        none_good = not any(self.rule.satisfied(prompt, text) for text in by_id.values())
        if none_good and _share_of(assignment["task_id"]) < self.rewrite:
            rewritten = self.rule.rewrite(prompt, by_id[order[0][0]])
            if rewritten.split() != by_id[order[0][0]].split() and rewritten.strip():
                body["improvement"] = rewritten
        response = self.client.post(f"/api/v1/assignments/{assignment['id']}/submit/", json=body)
        self.count("submitted" if response.status_code in (200, 201) else f"refused_{response.status_code}")
        self.count("all_tied", len(order) == 1)
        self.count("improved", "improvement" in body and response.status_code in (200, 201))

    def review(self, assignment: dict) -> None:
        """An improvement by another labeler: accepted when it satisfies the rule they all hold."""
        prompt = assignment["context"][-1]["content"]
        text = assignment["demonstration"]["content"]
        body = {"decision": "accept"}
        if not self.rule.satisfied(prompt, text):
            body = {"decision": "reject", "reason": "It does not do what we ask of replies."}
        response = self.client.post(f"/api/v1/assignments/{assignment['id']}/submit/", json=body)
        self.count(f"reviews_{body['decision']}", response.status_code in (200, 201))


def _share_of(task_id: int) -> float:
    """A fixed pseudo-random number in [0, 1) per task: which tasks get a rewrite does not depend on timing."""
    import hashlib

    return int(hashlib.sha256(f"rewrite:{task_id}".encode()).hexdigest()[:8], 16) / 16**8


# --- one rule ---


def seed(args) -> dict:
    """Migrate, base v0, users and tokens, loop and queue settings (the admin's part). Returns the API tokens."""
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from labeling.models import LabelerProfile, QueueSettings
    from labeling.services import api_token_rotate
    from models_service import default_model
    from training_jobs.models import LoopSettings

    call_command("migrate", verbosity=0)
    started = time.monotonic()
    default_model.prepare()
    log(f"base v0 ready ({time.monotonic() - started:.0f} s)")
    users = get_user_model()
    admin = users.objects.create_superuser("oracle-admin", "admin@example.com", "x")
    tokens = {"admin": api_token_rotate(user=admin)}
    for i in range(args.labelers):
        user = users.objects.create_user(f"oracle-labeler-{i}", f"l{i}@example.com", "x")
        LabelerProfile.objects.update_or_create(user=user, defaults={"is_reviewer": True})
        tokens[f"labeler-{i}"] = api_token_rotate(user=user)
    queue = QueueSettings.load()
    queue.weight_write_prompt = queue.weight_write_assistant_reply = queue.weight_write_user_reply = 0.0
    queue.weight_review_demonstration = 1.0 if args.rewrite else 0.0
    queue.weight_rank_replies, queue.rank_overlap = 1.0, 1
    queue.save()
    loop = LoopSettings.load()
    loop.sft_threshold = 10**6  # set once the demonstrations are in
    loop.rm_threshold = args.rankings
    loop.policy_path = args.path
    loop.eval_prompts = args.eval_prompts
    loop.eval_max_new_tokens = args.max_new_tokens
    loop.human_comparisons = 0
    loop.auto_promote = True
    loop.check_every_minutes = 1
    loop.save()
    return tokens


def wait_until(what: str, condition, timeout_s: float, every_s: float = 5.0, report=None):
    from django.db import connection

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        line = report() if report else ""
        if line and line != last:
            log(f"waiting for {what}: {line}")
            last = line
        connection.close()
        time.sleep(every_s)
    raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")


def loop_state() -> str:
    from training_jobs.models import Evaluation, LoopSettings, TrainingRun

    runs = "; ".join(
        f"{r.kind} #{r.pk} {r.status} {r.progress_step}/{r.progress_total}" for r in TrainingRun.objects.order_by("pk")
    )
    evaluations = "; ".join(
        f"eval {e.candidate.name} {e.status}/{e.decision}" for e in Evaluation.objects.select_related("candidate")
    )
    paused = LoopSettings.load().paused_reason
    return f"{runs} | {evaluations}" + (f" | PAUSED: {paused}" if paused else "")


def loop_paused() -> str:
    from training_jobs.models import LoopSettings

    return LoopSettings.load().paused_reason


def pairs_between(start, end) -> int:
    """Rankings that give pairs (the loop's count, improvements included), made between two times."""
    from training_jobs import loop

    rankings = loop.trainable_rankings().filter(task__conversation__split__in=loop.TRAINING_SPLITS)
    if start is not None:
        rankings = rankings.filter(created_at__gt=start)
    return rankings.filter(created_at__lte=end).count()


def rankings_by_policy(start, end) -> dict:
    """How many of the rankings made between two times ranked which policy's samples (a new round's pool still
    holds the open tasks sampled from the policy before)."""
    from django.db.models import Count

    from labeling.models import Ranking

    rankings = Ranking.objects.filter(created_at__lte=end, task__model_version__isnull=False)
    if start is not None:
        rankings = rankings.filter(created_at__gt=start)
    counted = rankings.values("task__model_version__name").annotate(n=Count("pk"))
    return {row["task__model_version__name"]: row["n"] for row in counted}


def label_one_round(args, rule: Rule, tokens: dict, admin, number: int, previous_rm_at) -> dict:
    """Labelers work until the loop queues this round's reward-model run (its threshold reached), or until the pool
    runs dry, when the bench trains on what there is as the ops overview offers. Returns the round's labeling
    figures and its reward-model run."""
    from django.utils import timezone

    from training_jobs.models import TrainingRun

    stop, counts, lock = threading.Event(), {}, threading.Lock()
    labelers = [
        Labeler(token, rule, args.rewrite, stop, counts, lock) for name, token in tokens.items() if name != "admin"
    ]
    for labeler in labelers:
        labeler.start()
    started = time.monotonic()
    figures: dict = {}

    def threshold_reached():
        if loop_paused():
            raise SystemExit(f"the loop paused: {loop_paused()}")
        run = TrainingRun.objects.filter(kind="rm").order_by("pk")[number - 1 : number].first()
        if run is not None:
            return run
        if stop.is_set():
            return None
        if pairs_between(previous_rm_at, timezone.now()) >= args.rankings:
            # Scripted labelers are far faster than the loop's check (once a minute): the labels a round needs
            # are in, and those made while the loop has yet to notice would only inflate rankings_submitted.
            stop.set()
            log(f"round {number}: {args.rankings} rankings give pairs; labelers stop until the loop queues its run")
            return None
        outlook = admin.get("/api/v1/loop/outlook/").json()
        if outlook.get("stalled"):
            log(f"the pool ran dry: {outlook['sentence']} Training on what there is, as an admin would.")
            figures["trained_below_threshold"] = outlook
            admin.post("/api/v1/loop/train-now/").raise_for_status()
        return None

    try:
        rm_run = wait_until(
            f"round {number}'s reward-model threshold",
            threshold_reached,
            args.timeout_min * 60,
            report=lambda: f"labelers {dict(counts)}",
        )
    finally:
        stop.set()
        for labeler in labelers:
            labeler.join(timeout=30)
    submitted = counts.get("submitted", 0)
    figures.update(
        labeling_s=round(time.monotonic() - started, 1),
        labeler_counts=dict(counts),
        rankings_submitted=submitted,
        tied_share=round(counts.get("all_tied", 0) / max(submitted, 1), 3),
        pairs_at_threshold=pairs_between(previous_rm_at, rm_run.created_at),
        rankings_by_sampling_policy=rankings_by_policy(previous_rm_at, rm_run.created_at),
    )
    log(f"round {number}: reward-model run #{rm_run.pk} queued after {dict(counts)}")
    return figures, rm_run


def gate_figures(args, number: int, rm_run) -> dict:
    """Wait for the round's policy step and its gate; the figures of the runs, the gate and the promotion."""
    from models_service.models import ModelActivation, ModelVersion
    from training_jobs.models import Evaluation, LoopSettings, TrainingRun

    def decided():
        if loop_paused():
            return "paused"
        evaluations = Evaluation.objects.filter(candidate__stage=args.path).order_by("pk")
        evaluation = evaluations[number - 1 : number].first()
        return evaluation.decision if evaluation and evaluation.decision != "pending" else None

    outcome = wait_until(
        f"round {number}'s {args.path} gate", decided, args.timeout_min * 60, every_s=10, report=loop_state
    )
    figures: dict = {"outcome": outcome if outcome != "paused" else f"paused: {loop_paused()}"}
    log(f"round {number} gate: {figures['outcome']}")
    rm_run.refresh_from_db()
    figures.update(
        rm_val_accuracy=rm_run.summary.get("val_accuracy"),
        rm_val_pairs=rm_run.summary.get("val_pairs"),
        rm_train_rankings=rm_run.summary.get("train_rankings"),
    )
    for run in TrainingRun.objects.filter(created_at__gte=rm_run.created_at).order_by("pk"):
        figures[f"{run.kind}_run_s"] = round(((run.finished_at or run.created_at) - run.created_at).total_seconds(), 1)
        figures[f"{run.kind}_summary"] = {
            k: v for k, v in run.summary.items() if isinstance(v, (int, float, str, bool)) or v is None
        }
        if run.error:
            figures[f"{run.kind}_error"] = run.error[-400:]
    evaluation = Evaluation.objects.filter(candidate__stage=args.path).order_by("pk")[number - 1 : number].first()
    if evaluation is not None:
        figures["gate_metrics"] = {
            "rm_gain": evaluation.metrics.get("rm_gain"),
            "candidate": evaluation.metrics.get("candidate"),
            "baseline": evaluation.metrics.get("baseline"),
        }
        figures["gate_reason"] = evaluation.decision_reason
        figures["kl"] = (evaluation.metrics.get("candidate") or {}).get("kl")
        if evaluation.finished_at:
            figures["gate_s"] = round((evaluation.finished_at - evaluation.created_at).total_seconds(), 1)
    figures["kl_bound"] = LoopSettings.load().max_kl
    served = ModelVersion.objects.filter(kind="policy", is_active=True).first()
    activation = ModelActivation.objects.filter(model_version=served).order_by("-created_at").first()
    figures["served"] = served.name
    promoted = evaluation is not None and served.pk == evaluation.candidate_id
    figures["loop_s"] = round((activation.created_at - rm_run.created_at).total_seconds(), 1) if promoted else None
    figures["policy"] = served if promoted else None
    figures["refused"] = evaluation.candidate if evaluation is not None and not promoted else None
    figures["reward_model"] = ModelVersion.objects.filter(training_run=rm_run).first()
    return figures


def run_rule(args, rule: Rule, data: list[dict], heldout: list[dict]) -> dict:
    from django.utils import timezone

    from labeling.models import Task, TaskKind
    from models_service.models import ModelVersion
    from training_jobs import loop
    from training_jobs.models import Evaluation, LoopSettings

    tokens = seed(args)
    configs = stage_configs(OVERRIDES)
    env = {name: json.dumps(value) for name, value in configs.items()} | {
        "WEB_BIND": f"127.0.0.1:{PORT}",
        "WEB_WORKERS": "2",
        "WEB_THREADS": "4",
        "LOOP_TICK_S": "5",
        "SAMPLING_POOL_SCHEDULE_S": "5",
        "SAMPLING_POOL_TARGET": str(args.pool),
        "SAMPLING_K": str(args.k),
        "SAMPLING_MAX_NEW_TOKENS": str(args.max_new_tokens),
        "SAMPLING_BATCH_CONTEXTS": "8",
        "SAMPLING_ACTIVE_SELECTION": "true" if args.active == "on" else "false",
        "CELERY_BEAT_SCHEDULE_FILE": str(LOGS / "celerybeat-schedule"),
        "TRAINING_RM_HOLDOUT_PAIRS": "0",
    }
    processes = start_processes(env)
    figures: dict = {"path": args.path, "rule": rule.description, "rounds": []}
    stage_started = time.monotonic()
    policies: dict = {}
    try:
        admin = api_client(tokens["admin"])
        procs.wait_for_http(f"{BASE_URL}/healthz", processes)
        demos = data[: args.demonstrations]
        prompts = data[args.demonstrations :]
        import_file(
            admin,
            [
                {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}]}
                for r in demos
            ],
            "oracle-demonstrations.jsonl",
            "demonstrations",
        )
        import_file(admin, [{"prompt": r["prompt"]} for r in prompts], "oracle-prompts.jsonl", "prompts")
        settings = LoopSettings.load()
        settings.sft_threshold = loop.new_demonstrations()
        settings.save()
        figures["demonstrations"] = settings.sft_threshold
        figures["import_s"] = round(time.monotonic() - stage_started, 1)
        log(f"imported {len(demos)} demonstrations and {len(prompts)} prompts; SFT threshold {settings.sft_threshold}")

        def sft_serving():
            if loop_paused():
                raise SystemExit(f"the loop paused: {loop_paused()}")
            refused = Evaluation.objects.filter(candidate__stage="sft", decision="not_promoted").first()
            if refused is not None:
                raise SystemExit(f"the gate kept the base policy: {refused.decision_reason}")
            return ModelVersion.objects.filter(stage="sft", is_active=True).first()

        sft = wait_until("the SFT policy to serve", sft_serving, args.timeout_min * 60, report=loop_state)
        figures["sft_serving_s"] = round(time.monotonic() - stage_started, 1)
        log(f"{sft.name} serves: {sft.metrics.get('val_loss_initial')} -> {sft.metrics.get('val_loss')} val loss")
        policies["sft"] = sft
        previous_rm_at = None
        for number in range(1, args.rounds + 1):
            labeled, rm_run = label_one_round(args, rule, tokens, admin, number, previous_rm_at)
            previous_rm_at = rm_run.created_at
            round_figures = {"round": number, **labeled, **gate_figures(args, number, rm_run)}
            policy, refused = round_figures.pop("policy"), round_figures.pop("refused")
            policies[f"round{number}_rm"] = round_figures.pop("reward_model")
            figures["rounds"].append(round_figures)
            if refused is not None:
                policies[f"round{number}_refused"] = refused  # measured too: was the gate right to refuse it?
            if policy is None:
                log(f"round {number}: no new policy serves; the rounds end here")
                break
            policies[f"round{number}"] = policy
            wait_until(
                "a ranking task sampled from the new policy",
                lambda p=policy: Task.objects.filter(kind=TaskKind.RANK_REPLIES, model_version=p).exists(),
                600,
            )
            first = Task.objects.filter(kind=TaskKind.RANK_REPLIES, model_version=policy).earliest("created_at")
            round_figures["first_task_from_new_policy_s"] = round(
                (first.created_at - policy.activated_at).total_seconds(), 1
            )
    finally:
        procs.stop(processes, timeout_s=30)
    figures["finished_at"] = timezone.now().isoformat()
    figures.update(measure(args, rule, heldout, policies))
    return figures


# --- the measurement, outside the product ---


def sample_heldout(args, version, chats: list[list[dict]]) -> list[list[str]]:
    from ml.generation import sample_completions
    from models_service.loading import load_version
    from models_service.sampling import serving_params

    params = serving_params(max_new_tokens=args.max_new_tokens, seed=2026)
    loaded = load_version(version, for_inference=True)
    groups = []
    for start in range(0, len(chats), 8):
        batch, _ = sample_completions(
            loaded.model, loaded.tokenizer, chats[start : start + 8], k=args.samples, params=params
        )
        groups.extend([[c.text for c in group] for group in batch])
    return groups


def win_rate(rule: Rule, heldout: list[dict], ours: list[list[str]], theirs: list[list[str]]) -> dict:
    """The share of prompts, among those where the two policies' mean rule scores differ, where ours is higher."""
    wins = losses = ties = 0
    for row, a, b in zip(heldout, ours, theirs):
        mine = sum(rule.score(row["prompt"], t) for t in a) / len(a)
        other = sum(rule.score(row["prompt"], t) for t in b) / len(b)
        wins, losses, ties = wins + (mine > other), losses + (mine < other), ties + (mine == other)
    return {
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "rate": round(wins / (wins + losses), 3) if wins + losses else None,
    }


def rm_accuracy(rm_version, rule: Rule, heldout: list[dict], replies: list[list[str]]) -> tuple[float | None, int]:
    from ml.scoring import score_pairs
    from models_service.loading import load_version

    rm = load_version(rm_version, for_inference=True)
    correct = total = 0
    for row, group in zip(heldout, replies):
        scores = score_pairs(rm.model, rm.tokenizer, [([{"role": "user", "content": row["prompt"]}], t) for t in group])
        rule_scores = [rule.score(row["prompt"], t) for t in group]
        for i in range(len(group)):
            for j in range(len(group)):
                if rule_scores[i] > rule_scores[j]:
                    total += 1
                    correct += scores[i] > scores[j]
    return (round(correct / total, 3) if total else None), total


def measure(args, rule: Rule, heldout: list[dict], policies: dict) -> dict:
    """Sample `--samples` replies per held-out instruction from the SFT policy and each round's served policy, or
    the policy its gate refused (serving parameters); compare them by the rule; score each round's reward model on
    the rule's rankings of the SFT's replies; the loss of each policy on the held-out instructions' expert answers."""
    from bench.recipe import demonstration_loss
    from models_service.artifact_store import local_dir
    from models_service.loading import load_version

    started = time.monotonic()
    chats = [[{"role": "user", "content": r["prompt"]}] for r in heldout]
    machine = machine_figures(load_version(policies["sft"]).model)  # as the trainers load it
    log(f"machine: {json.dumps(machine)}")
    rounds = [f"round{n}{refused}" for n in range(1, args.rounds + 1) for refused in ("", "_refused")]
    names = ["sft"] + [name for name in rounds if name in policies]
    replies = {name: sample_heldout(args, policies[name], chats) for name in names}
    result: dict = {"heldout_prompts": len(chats), "samples_per_prompt": args.samples, "machine": machine}
    for name in names:
        flat = [(r["prompt"], t) for r, group in zip(heldout, replies[name]) for t in group]
        result[f"rule_rate_{name}"] = round(sum(rule.satisfied(p, t) for p, t in flat) / len(flat), 3)
        result[f"length_{name}"] = round(sum(len(words(t)) for _, t in flat) / len(flat), 1)
        result[f"demo_loss_{name}"] = demonstration_loss(local_dir(policies[name]), heldout)
    for name in names[1:]:  # each round's policy, served or refused (the gate against the rule's own verdict)
        versus_sft = win_rate(rule, heldout, replies[name], replies["sft"])
        result[f"{name}_win_rate_vs_sft"], result[f"{name}_vs_sft"] = versus_sft["rate"], versus_sft
        result[f"{name}_demo_loss_ratio"] = round(result[f"demo_loss_{name}"] / result["demo_loss_sft"], 4)
    for n in range(2, args.rounds + 1):
        if f"round{n}" in replies and f"round{n - 1}" in replies:
            versus = win_rate(rule, heldout, replies[f"round{n}"], replies[f"round{n - 1}"])
            result[f"round{n}_win_rate_vs_round{n - 1}"] = versus["rate"]
            result[f"round{n}_vs_round{n - 1}"] = versus
    for n in range(1, args.rounds + 1):
        rm = policies.get(f"round{n}_rm")
        if rm is not None:
            accuracy, pairs = rm_accuracy(rm, rule, heldout, replies["sft"])
            result[f"round{n}_rm_heldout_accuracy"], result[f"round{n}_rm_heldout_pairs"] = accuracy, pairs
    result["measure_s"] = round(time.monotonic() - started, 1)
    result["examples"] = [
        {"prompt": r["prompt"][:200], **{name: replies[name][i][0][:300] for name in names}}
        for i, r in enumerate(heldout[:3])
    ]
    return result


def targets(figures: dict, rule: Rule) -> dict:
    """Issue 27's targets for round 1 (and round 2 where it ran)."""
    first = figures["rounds"][0] if figures.get("rounds") else {}
    kl, bound = first.get("kl"), first.get("kl_bound")

    def no_length_rise(name: str, than: str) -> bool:
        """No rise in mean length beyond 10% (and a word), unless the rule asks for longer replies."""
        if rule.asks_for_length > 0:
            return True
        if figures.get(f"length_{name}") is None:
            return False
        return figures[f"length_{name}"] <= 1.1 * figures[f"length_{than}"] + 1

    checks = {
        "rm_heldout_accuracy": (figures.get("round1_rm_heldout_accuracy") or 0) >= 0.75,
        "win_rate_vs_sft": (figures.get("round1_win_rate_vs_sft") or 0) >= 0.70,
        "kl_within_bound": kl is not None and kl <= bound,
        "loop_within_30_min": first.get("loop_s") is not None and first["loop_s"] <= 1800,
        "no_unasked_length_rise": no_length_rise("round1", "sft"),
        "demo_loss_within_5_percent": (figures.get("round1_demo_loss_ratio") or 99) <= 1.05,
    }
    if len(figures.get("rounds", [])) > 1:
        second = figures["rounds"][1]
        checks.update(
            round2_beats_round1=(figures.get("round2_win_rate_vs_round1") or 0) >= 0.60,
            round2_beats_sft_by_more=(figures.get("round2_win_rate_vs_sft") or 0)
            > (figures.get("round1_win_rate_vs_sft") or 1),
            round2_kl_within_bound=second.get("kl") is not None and second["kl"] <= second["kl_bound"],
            round2_no_length_drift=no_length_rise("round2", "sft"),
        )
    return {"targets": checks, "targets_met": all(checks.values())}


def record(args, name: str, figures: dict) -> Path:
    """Keep a rule's figures under bench/results/oracle/ with the commit, date and machine they were measured on."""
    import datetime as dt
    import platform

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    changed = sorted(
        {
            line[3:]
            for line in dirty.splitlines()
            if line[3:].startswith(("ml/", "training_jobs/", "models_service/", "bench/"))
        }
    )
    now = dt.datetime.now(dt.UTC)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / (
        f"{now:%Y%m%dT%H%M}-{name}-{args.path}-k{args.k}-n{args.rankings}-rewrite{args.rewrite:g}"
        f"-active{args.active}-rounds{args.rounds}.json"
    )
    body = {
        "date": now.isoformat(timespec="seconds"),
        "commit": commit,
        "uncommitted_changes": changed,
        "machine": {"host": platform.node(), **figures.get("machine", {})},
        "rule": name,
        "path": args.path,
        "k": args.k,
        "rankings_threshold": args.rankings,
        "rewrite": args.rewrite,
        "active_selection": args.active,
        "rounds_asked": args.rounds,
        "configs": stage_configs(OVERRIDES),
        "figures": figures,
    }
    path.write_text(json.dumps(body, indent=1, default=str) + "\n")
    return path


RESULTS = ROOT / "bench" / "results" / "oracle"


def _interrupt(*_) -> None:
    """SIGTERM as Ctrl+C: the finally blocks stop the product's processes and drop the scratch database."""
    raise KeyboardInterrupt


def table() -> str:
    """The latest result of each (rule, path, K, threshold, rewrite, active selection, rounds) kept in
    bench/results/oracle/, as a Markdown table (docs/benchmarks.md shows it)."""
    latest: dict[tuple, dict] = {}
    for path in sorted(RESULTS.glob("*.json")):
        body = json.loads(path.read_text())
        key = (
            body["rule"],
            body["path"],
            body["k"],
            body["rankings_threshold"],
            body["rewrite"],
            body["active_selection"],
            body["rounds_asked"],
            json.dumps(body.get("configs", {}), sort_keys=True),
        )
        latest[key] = {**body, "file": path.name}
    defaults = stage_configs({})

    def changes(configs: dict) -> str:
        """What a run's stage configs changed from today's defaults, e.g. `DPO length_balance=true`."""
        changed = [
            f"{name.removeprefix('TRAINING_').removesuffix('_CONFIG')} {key}="
            + (json.dumps(config[key]) if key in config else "unset")
            for name, config in sorted(configs.items())
            for key in sorted(config.keys() | defaults.get(name, {}).keys())
            if config.get(key, "unset") != defaults.get(name, {}).get(key, "unset")
        ]
        return ", ".join(changed) or "defaults"

    def verdict(figures: dict, first: dict, missed: list[str]) -> str:
        """The targets missed; where the gate refused the round's policy, the gate's reason and the rule's verdict."""
        if first.get("outcome") != "not_promoted":
            return ", ".join(missed)
        rule_says = ""
        if figures.get("round1_refused_win_rate_vs_sft") is not None:
            rule_says = (
                f"; by the rule it won {figures['round1_refused_win_rate_vs_sft']:.2f} against SFT, "
                f"{figures.get('length_round1_refused')} words"
            )
        return f"the gate refused it: {first.get('gate_reason', '')}{rule_says}"

    def cell(value, digits=3):
        if value is None:
            return "–"
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    lines = [
        "| rule | path | stage configs | K | N | rewrite | active | rankings submitted | tied | pairs at threshold | "
        "RM held out | "
        "win vs SFT | rule rate SFT → policy | words SFT → policy | KL (bound) | demo loss ratio | loop min | "
        "round 2 vs round 1 | round 2 vs SFT | targets met | commit, date |",
        "|" + "---|" * 21,
    ]
    for key in sorted(latest):
        body = latest[key]
        f = body["figures"]
        first = (f.get("rounds") or [{}])[0]
        second_vs_first = f.get("round2_win_rate_vs_round1")
        loop_min = first.get("loop_s") / 60 if first.get("loop_s") else None
        missed = [name for name, ok in (f.get("targets") or {}).items() if not ok]
        lines.append(
            "| "
            + " | ".join(
                [
                    body["rule"],
                    body["path"],
                    changes(body.get("configs", {})),
                    str(body["k"]),
                    str(body["rankings_threshold"]),
                    f"{body['rewrite']:g}",
                    body["active_selection"],
                    cell(first.get("rankings_submitted")),
                    cell(first.get("tied_share"), 2),
                    cell(first.get("pairs_at_threshold")),
                    cell(f.get("round1_rm_heldout_accuracy"), 2),
                    cell(f.get("round1_win_rate_vs_sft"), 2),
                    f"{cell(f.get('rule_rate_sft'), 2)} → {cell(f.get('rule_rate_round1'), 2)}",
                    f"{cell(f.get('length_sft'), 1)} → {cell(f.get('length_round1'), 1)}",
                    f"{cell(first.get('kl'), 2)} ({cell(first.get('kl_bound'), 0)})",
                    cell(f.get("round1_demo_loss_ratio")),
                    cell(loop_min, 1),
                    cell(second_vs_first, 2),
                    cell(f.get("round2_win_rate_vs_sft"), 2),
                    "yes" if f.get("targets_met") else f"no ({verdict(f, first, missed) or f.get('outcome', '')})",
                    f"{body['commit'][:8]}, {body['date'][:10]}",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:] == ["--table"]:
        django.setup()
        print(table())
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rule", action="append", choices=sorted(RULES), help="a rule to run (repeatable); all")
    parser.add_argument("--path", choices=stages.policy_steps(), help="the policy step (default: the product's)")
    parser.add_argument("--demonstrations", type=int, default=64)
    parser.add_argument("--rankings", type=int, help="the reward-model threshold (default: the product's)")
    parser.add_argument("--k", type=int, help="candidates per ranking task (default: the product's SAMPLING_K)")
    parser.add_argument("--rewrite", type=float, default=0.25, help="share of tasks the labelers improve (0: none)")
    parser.add_argument("--active", choices=["on", "off"], default="on", help="active selection of contexts")
    parser.add_argument("--rounds", type=int, choices=[1, 2], default=1)
    parser.add_argument("--pool", type=int, default=32, help="open ranking tasks kept (SAMPLING_POOL_TARGET)")
    parser.add_argument("--labelers", type=int, default=3)
    parser.add_argument("--heldout", type=int, default=48, help="instructions never imported, for the measurement")
    parser.add_argument("--samples", type=int, default=8, help="replies per held-out instruction and policy")
    parser.add_argument("--eval-prompts", type=int, default=24, help="the gate's held-out prompts")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="SAMPLING_MAX_NEW_TOKENS")
    parser.add_argument("--timeout-min", type=float, default=60.0, help="per stage")
    parser.add_argument("--config", action="append", default=[], help="STAGE=JSON, e.g. dpo='{\"beta\": 0.1}'")
    args = parser.parse_args()
    OVERRIDES.update(config_overrides(args.config, parser.error))

    LOGS.mkdir(parents=True, exist_ok=True)
    # A stopped bench (SIGTERM) stops the product's processes and drops its scratch database on the way out.
    signal.signal(signal.SIGTERM, _interrupt)
    django.setup()
    from django.conf import settings

    from training_jobs.models import LoopSettings

    args.path = args.path or LoopSettings._meta.get_field("policy_path").default
    args.rankings = args.rankings or LoopSettings._meta.get_field("rm_threshold").default
    args.k = args.k or settings.SAMPLING_K
    for name, config in stage_configs(OVERRIDES).items():
        log(f"{name}={json.dumps(config)}")
    data = self_instruct()
    heldout, data = data[: args.heldout], data[args.heldout :]
    results = {}
    for name in args.rule or list(RULES):
        log(
            f"=== rule {name!r} ({RULES[name].description}), path {args.path}, K {args.k}, "
            f"threshold {args.rankings} ==="
        )
        shutil.rmtree(ARTIFACTS, ignore_errors=True)
        ARTIFACTS.mkdir(parents=True)
        recreate_database(BENCH_DB)
        empty_redis_database(REDIS_URL)
        started = time.monotonic()
        try:
            figures = run_rule(args, RULES[name], data, heldout)
        except (SystemExit, TimeoutError) as exc:
            figures = {"path": args.path, "outcome": f"failed: {exc}", "rounds": []}
        finally:
            discard_scratch(BENCH_DB, REDIS_URL, ARTIFACTS)
        figures["rule_total_s"] = round(time.monotonic() - started, 1)
        figures.update(targets(figures, RULES[name]))
        results[name] = figures
        log(f"{name}: {json.dumps({k: v for k, v in figures.items() if k != 'examples'}, default=str)}")
        log(f"kept in {record(args, name, figures)}")
    summary = {
        "rules": results,
        "path": args.path,
        "k": args.k,
        "rankings": args.rankings,
        "rewrite": args.rewrite,
        "active": args.active,
        "rounds": args.rounds,
        "configs": stage_configs(OVERRIDES),
        "all_targets_met": all(r.get("targets_met") for r in results.values()),
        "threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)),
    }
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
