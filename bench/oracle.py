"""Does the loop make the default policy better? Scripted labelers with a hidden preference rule drive the real
product through its REST API, and the bench measures the policy the loop serves at the end against the SFT policy.

    .venv/bin/python bench/oracle.py [--rule NAME ...] [--path ppo|dpo|rloo] [--rankings 160] [--k 4]

For each rule (all of RULES unless --rule names some), from an empty database:
1. Starts the real product: gunicorn (bin/web), the training and sampling workers (bin/worker) and beat (bin/beat),
   with the default model (SmolLM2-135M-Instruct) as base v0.
2. As an admin, through /api/v1/imports/: Self-Instruct demonstrations (instruction + expert answer) and the other
   Self-Instruct instructions as prompts. `--heldout` instructions are never imported: the bench keeps them for its
   final measurement. Thresholds are set to what was imported (SFT) and to `--rankings` (reward model).
3. Scripted labelers lease tasks through /api/v1/tasks/next/ and rank the K candidates the sampling worker
   produced by their rule (equal rule scores are ties), through /api/v1/assignments/{id}/submit/. The product never
   sees the rule: only the orders it implies. Labelers stop once the reward-model threshold is reached (two cores
   cannot label, sample and train at once without slowing the training they wait for).
4. Beat runs the loop on its own: SFT, the gate promotes it (no reward model yet), the reward model, the policy
   step of `--path`, the gate on held-out prompts, promotion.
5. The bench then loads the SFT policy and the served policy from the artifact store and samples `--samples`
   replies to each held-out instruction with the serving parameters. Reported per rule: the rule rate of both,
   the share of prompts (not tied) where the served policy's mean rule score beats the SFT's, the final reward
   model's pairwise accuracy on the rule's rankings of the SFT's held-out replies, the KL to SFT (the gate's), the
   mean reply length in words of both, and wall time per stage. `loop_s` runs from the reward-model threshold
   being reached (the reward-model run queued) to the new policy serving.

Targets (issue 14): rm_heldout_accuracy >= 0.75, win_rate_vs_sft >= 0.70, KL within the gate's bound, loop_s
<= 1800, and no rise in length the rule did not ask for. The last line is JSON with every figure.
"""

import argparse
import gzip
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
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

from bench.support import (  # noqa: E402
    config_overrides,
    discard_scratch,
    empty_redis_database,
    machine_figures,
    recreate_database,
    stage_configs,
)
from tests.support import processes as procs  # noqa: E402


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- the rules: only the bench reads them ---

_STOPWORDS_TEXT = (
    "a an the and or but if then than that this these those there their them they you your yours we our "
    "ours i me my mine he she it its his her him of to in on at by for with from into onto about as is "
    "are was were be been being do does did have has had not no so such can could would should will shall "
    "may might must what which who whom whose when where why how all any each every some more most other "
    "another also just very only own same too out up down over under again further once here please give "
    "write make tell list find"
)
STOPWORDS = frozenset(_STOPWORDS_TEXT.split())


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def content_words(text: str) -> set[str]:
    return {w for w in words(text) if len(w) > 2 and w not in STOPWORDS and not w.isdigit()}


@dataclass(frozen=True)
class Rule:
    """A labeler's hidden preference: a score per reply (higher is better; equal scores are ties), and whether a
    reply satisfies the rule (the rule rate)."""

    name: str
    description: str
    score: object  # (prompt, reply) -> float
    threshold: float = 1.0  # a reply satisfies the rule when its score is at least this

    def satisfied(self, prompt: str, reply: str) -> bool:
        return self.score(prompt, reply) >= self.threshold


def _question(prompt: str, reply: str) -> float:
    """1 for a reply that ends with a question, 0.5 for one that asks one elsewhere, 0 otherwise."""
    if reply.rstrip().rstrip("\"')*_").endswith("?"):
        return 1.0
    return 0.5 if "?" in reply else 0.0


def _brief(prompt: str, reply: str) -> float:
    return 1.0 if len(words(reply)) < 50 else 0.0


def _share(wanted: set[str], found: set[str]) -> float:
    return len(wanted & found) / len(wanted) if wanted else 0.0


def _echo(prompt: str, reply: str) -> float:
    """The share of the prompt's content words that the reply reuses, in quarters."""
    return round(4 * _share(content_words(prompt), set(words(reply)))) / 4


def _restate(prompt: str, reply: str) -> float:
    """The share of the prompt's content words (its first 8) found in the reply's first 20 words, in quarters."""
    vocabulary = content_words(prompt)
    wanted = set(list(dict.fromkeys(w for w in words(prompt) if w in vocabulary))[:8])
    return round(4 * _share(wanted, set(words(reply)[:20]))) / 4


RULES = {
    rule.name: rule
    for rule in (
        Rule("question", "prefers replies that end with a question", _question),
        Rule("brief", "prefers replies under 50 words", _brief),
        Rule("echo", "prefers replies that reuse the user's own words (half of them or more)", _echo, 0.5),
        Rule("restate", "prefers replies that open by restating the request (first 20 words)", _restate, 0.5),
    )
}


def rank_by_rule(rule: Rule, prompt: str, candidates: list[dict]) -> list[list[int]]:
    """Groups of candidate ids, best first; equal scores form one group (a tie)."""
    scored = {}
    for candidate in candidates:
        scored.setdefault(rule.score(prompt, candidate["content"]), []).append(candidate["id"])
    return [scored[s] for s in sorted(scored, reverse=True)]


# --- data ---


def self_instruct() -> list[dict]:
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
    """A scripted labeler: leases tasks and ranks the candidates by its rule, until told to stop."""

    def __init__(self, token: str, rule: Rule, stop: threading.Event, counts: dict, lock: threading.Lock):
        super().__init__(daemon=True)
        self.client, self.rule, self.stop, self.counts, self.lock = api_client(token), rule, stop, counts, lock

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                assignment = self.client.post("/api/v1/tasks/next/").json().get("assignment")
            except Exception:
                time.sleep(2)
                continue
            if assignment is None:
                self.stop.wait(3)
                continue
            if assignment["kind"] != "rank_replies":
                self.client.post(
                    f"/api/v1/assignments/{assignment['id']}/skip/", json={"reason": "This labeler only ranks."}
                )
                continue
            prompt = assignment["context"][-1]["content"]
            order = rank_by_rule(self.rule, prompt, assignment["candidates"])
            body = {"order": order, "quality_rating": 4, "confirm_untouched": True, "time_spent_ms": 20_000}
            response = self.client.post(f"/api/v1/assignments/{assignment['id']}/submit/", json=body)
            with self.lock:
                key = "submitted" if response.status_code in (200, 201) else f"refused_{response.status_code}"
                self.counts[key] = self.counts.get(key, 0) + 1
                self.counts["all_tied"] = self.counts.get("all_tied", 0) + (len(order) == 1)


# --- one rule ---


def seed(args, rule: Rule, data: list[dict]) -> tuple[dict, dict]:
    """Migrate, base v0, users and tokens, loop and queue settings (the admin's part). Returns tokens and counts."""
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from rest_framework.authtoken.models import Token

    from labeling.models import QueueSettings
    from models_service import default_model
    from training_jobs.models import LoopSettings

    call_command("migrate", verbosity=0)
    started = time.monotonic()
    default_model.prepare()
    log(f"base v0 ready ({time.monotonic() - started:.0f} s)")
    users = get_user_model()
    admin = users.objects.create_superuser("oracle-admin", "admin@example.com", "x")
    tokens = {"admin": Token.objects.create(user=admin).key}
    for i in range(args.labelers):
        user = users.objects.create_user(f"oracle-labeler-{i}", f"l{i}@example.com", "x")
        tokens[f"labeler-{i}"] = Token.objects.create(user=user).key
    queue = QueueSettings.load()
    queue.weight_write_prompt = queue.weight_write_assistant_reply = queue.weight_write_user_reply = 0.0
    queue.weight_review_demonstration = 0.0
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
    return tokens, {}


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


def run_rule(args, rule: Rule, data: list[dict], heldout: list[dict]) -> dict:
    from django.utils import timezone

    from labeling.models import Task, TaskKind
    from models_service.models import ModelActivation, ModelVersion
    from training_jobs import loop
    from training_jobs.models import Evaluation, LoopSettings, TrainingRun

    tokens, _ = seed(args, rule, data)
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
        "CELERY_BEAT_SCHEDULE_FILE": str(LOGS / "celerybeat-schedule"),
        "TRAINING_RM_HOLDOUT_PAIRS": "0",
    }
    processes = start_processes(env)
    figures: dict = {"path": args.path, "rule": rule.description}
    stage_started = time.monotonic()
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

        stop, counts, lock = threading.Event(), {}, threading.Lock()
        labelers = [
            Labeler(token, rule, stop, counts, lock) for name, token in tokens.items() if name.startswith("labeler")
        ]
        for labeler in labelers:
            labeler.start()
        labeling_started = time.monotonic()

        def threshold_reached():
            if loop_paused():
                raise SystemExit(f"the loop paused: {loop_paused()}")
            return TrainingRun.objects.filter(kind="rm").first()

        rm_run = wait_until(
            "the reward-model threshold",
            threshold_reached,
            args.timeout_min * 60,
            report=lambda: f"{loop.new_rankings()} rankings that give pairs; labelers {dict(counts)}",
        )
        stop.set()
        for labeler in labelers:
            labeler.join(timeout=30)
        figures["labeling_s"] = round(time.monotonic() - labeling_started, 1)
        figures["labeler_counts"] = dict(counts)
        figures["tied_share"] = round(counts.get("all_tied", 0) / max(counts.get("submitted", 1), 1), 3)
        log(f"reward-model threshold reached: {counts}")

        def decided():
            if loop_paused():
                return "paused"
            evaluation = Evaluation.objects.filter(candidate__stage=args.path).exclude(decision="pending").first()
            return evaluation.decision if evaluation else None

        outcome = wait_until(
            f"the {args.path} policy's gate", decided, args.timeout_min * 60, every_s=10, report=loop_state
        )
        figures["outcome"] = outcome if outcome != "paused" else f"paused: {loop_paused()}"
        log(f"gate: {figures['outcome']}")
        rm_run.refresh_from_db()
        figures["rm_val_accuracy"] = rm_run.summary.get("val_accuracy")
        figures["rm_val_pairs"] = rm_run.summary.get("val_pairs")
        figures["rm_train_rankings"] = rm_run.summary.get("train_rankings")
        for run in TrainingRun.objects.order_by("pk"):
            figures[f"{run.kind}_run_s"] = round((run.finished_at - run.created_at).total_seconds(), 1)
            figures[f"{run.kind}_summary"] = {
                k: v for k, v in run.summary.items() if isinstance(v, (int, float, str, bool)) or v is None
            }
            if run.error:
                figures[f"{run.kind}_error"] = run.error[-400:]
        evaluation = Evaluation.objects.filter(candidate__stage=args.path).first()
        if evaluation is not None:
            figures["gate_metrics"] = {
                "rm_gain": evaluation.metrics.get("rm_gain"),
                "candidate": evaluation.metrics.get("candidate"),
                "baseline": evaluation.metrics.get("baseline"),
            }
            figures["gate_reason"] = evaluation.decision_reason
            figures["kl"] = (evaluation.metrics.get("candidate") or {}).get("kl")
            figures["gate_s"] = round((evaluation.finished_at - evaluation.created_at).total_seconds(), 1)
        figures["kl_bound"] = LoopSettings.load().max_kl
        served = ModelVersion.objects.filter(kind="policy", is_active=True).first()
        activation = ModelActivation.objects.filter(model_version=served).order_by("-created_at").first()
        figures["served"] = served.name
        figures["loop_s"] = (
            round((activation.created_at - rm_run.created_at).total_seconds(), 1) if served.stage == args.path else None
        )
        if served.stage == args.path:
            wait_until(
                "a ranking task sampled from the new policy",
                lambda: Task.objects.filter(kind=TaskKind.RANK_REPLIES, model_version=served).exists(),
                600,
            )
            figures["first_task_from_new_policy_s"] = round(
                (
                    Task.objects.filter(kind=TaskKind.RANK_REPLIES, model_version=served)
                    .earliest("created_at")
                    .created_at
                    - activation.created_at
                ).total_seconds(),
                1,
            )
        final_rm = ModelVersion.objects.filter(kind="reward", stage="rm", status="ready").first()
        versions = {"sft": sft, "final": served, "rm": final_rm}
    finally:
        procs.stop(processes, timeout_s=30)
    figures["finished_at"] = timezone.now().isoformat()
    figures.update(measure(args, rule, heldout, versions))
    return figures


# --- the measurement, outside the product ---


def measure(args, rule: Rule, heldout: list[dict], versions: dict) -> dict:
    """Sample `--samples` replies per held-out instruction from the SFT and the served policy (serving parameters),
    and score the final reward model on the rule's rankings of the SFT's replies."""
    from ml.generation import sample_completions
    from ml.scoring import score_pairs
    from models_service.loading import load_version
    from models_service.sampling import serving_params

    started = time.monotonic()
    chats = [[{"role": "user", "content": r["prompt"]}] for r in heldout]
    params = serving_params(max_new_tokens=args.max_new_tokens, seed=2026)
    replies = {}
    for name in ("sft", "final"):
        if name == "final" and versions["final"].pk == versions["sft"].pk:
            replies["final"] = replies["sft"]
            continue
        if name == "sft":  # as the trainers load it (not packed for inference)
            machine = machine_figures(load_version(versions[name]).model)
            log(f"machine: {json.dumps(machine)}")
        loaded = load_version(versions[name], for_inference=True)
        groups = []
        for start in range(0, len(chats), 8):
            batch, _ = sample_completions(
                loaded.model, loaded.tokenizer, chats[start : start + 8], k=args.samples, params=params
            )
            groups.extend([[c.text for c in group] for group in batch])
        replies[name] = groups
        del loaded
    result = {"heldout_prompts": len(chats), "samples_per_prompt": args.samples, "machine": machine}
    for name in ("sft", "final"):
        flat = [(r["prompt"], text) for r, group in zip(heldout, replies[name]) for text in group]
        result[f"rule_rate_{name}"] = round(sum(rule.satisfied(p, t) for p, t in flat) / len(flat), 3)
        result[f"length_{name}"] = round(sum(len(words(t)) for _, t in flat) / len(flat), 1)
    wins = losses = ties = 0
    for r, sft_group, final_group in zip(heldout, replies["sft"], replies["final"]):
        sft_score = sum(rule.score(r["prompt"], t) for t in sft_group) / len(sft_group)
        final_score = sum(rule.score(r["prompt"], t) for t in final_group) / len(final_group)
        wins += final_score > sft_score
        losses += final_score < sft_score
        ties += final_score == sft_score
    result.update(wins=wins, losses=losses, ties=ties)
    result["win_rate_vs_sft"] = round(wins / (wins + losses), 3) if wins + losses else None
    correct = total = 0
    if versions.get("rm") is not None:
        rm = load_version(versions["rm"], for_inference=True)
        for r, group in zip(heldout, replies["sft"]):
            scores = score_pairs(
                rm.model, rm.tokenizer, [([{"role": "user", "content": r["prompt"]}], t) for t in group]
            )
            rule_scores = [rule.score(r["prompt"], t) for t in group]
            for i in range(len(group)):
                for j in range(len(group)):
                    if rule_scores[i] > rule_scores[j]:
                        total += 1
                        correct += scores[i] > scores[j]
        del rm
    result["rm_heldout_accuracy"] = round(correct / total, 3) if total else None
    result["rm_heldout_pairs"] = total
    result["measure_s"] = round(time.monotonic() - started, 1)
    result["examples"] = [
        {"prompt": r["prompt"][:200], "sft": s[0][:300], "final": f[0][:300]}
        for r, s, f in list(zip(heldout, replies["sft"], replies["final"]))[:3]
    ]
    return result


def targets(figures: dict, rule_name: str) -> dict:
    length_asked = rule_name == "brief"
    checks = {
        "rm_heldout_accuracy": (figures.get("rm_heldout_accuracy") or 0) >= 0.75,
        "win_rate_vs_sft": (figures.get("win_rate_vs_sft") or 0) >= 0.70,
        "kl_within_bound": figures.get("kl") is not None and figures["kl"] <= figures["kl_bound"],
        "loop_within_30_min": figures.get("loop_s") is not None and figures["loop_s"] <= 1800,
        "no_unasked_length_rise": length_asked
        or figures.get("length_final", 0) <= 1.1 * figures.get("length_sft", 0) + 1,
    }
    return {"targets": checks, "targets_met": all(checks.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rule", action="append", choices=sorted(RULES), help="a rule to run (repeatable); all")
    parser.add_argument("--path", choices=["ppo", "dpo", "rloo"], default="dpo")
    parser.add_argument("--demonstrations", type=int, default=64)
    parser.add_argument("--rankings", type=int, default=160, help="the reward-model threshold")
    parser.add_argument("--k", type=int, default=4, help="candidates per ranking task (SAMPLING_K)")
    parser.add_argument("--pool", type=int, default=32, help="open ranking tasks kept (SAMPLING_POOL_TARGET)")
    parser.add_argument("--labelers", type=int, default=3)
    parser.add_argument("--heldout", type=int, default=48, help="instructions never imported, for the measurement")
    parser.add_argument("--samples", type=int, default=4, help="replies per held-out instruction and policy")
    parser.add_argument("--eval-prompts", type=int, default=24, help="the gate's held-out prompts")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="SAMPLING_MAX_NEW_TOKENS")
    parser.add_argument("--timeout-min", type=float, default=60.0, help="per stage")
    parser.add_argument("--config", action="append", default=[], help="STAGE=JSON, e.g. dpo='{\"beta\": 0.1}'")
    args = parser.parse_args()
    OVERRIDES.update(config_overrides(args.config, parser.error))

    LOGS.mkdir(parents=True, exist_ok=True)
    django.setup()
    for name, config in stage_configs(OVERRIDES).items():
        log(f"{name}={json.dumps(config)}")
    data = self_instruct()
    heldout, data = data[: args.heldout], data[args.heldout :]
    results = {}
    for name in args.rule or sorted(RULES):
        log(f"=== rule {name!r} ({RULES[name].description}), path {args.path} ===")
        shutil.rmtree(ARTIFACTS, ignore_errors=True)
        ARTIFACTS.mkdir(parents=True)
        recreate_database(BENCH_DB)
        empty_redis_database(REDIS_URL)
        started = time.monotonic()
        try:
            figures = run_rule(args, RULES[name], data, heldout)
        except (SystemExit, TimeoutError) as exc:
            figures = {"path": args.path, "outcome": f"failed: {exc}"}
        finally:
            discard_scratch(BENCH_DB, REDIS_URL, ARTIFACTS)
        figures["rule_total_s"] = round(time.monotonic() - started, 1)
        figures.update(targets(figures, name))
        results[name] = figures
        log(f"{name}: {json.dumps({k: v for k, v in figures.items() if k != 'examples'})}")
    summary = {
        "rules": results,
        "path": args.path,
        "configs": stage_configs(OVERRIDES),
        "all_targets_met": all(r.get("targets_met") for r in results.values()),
        "threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
