"""The closed loop, end to end, with tiny models and real PostgreSQL, Redis and Celery workers.

Scripted labelers work the queue through the product's services. Their hidden rule: a reply is better the more
often it says "sentence". Demonstrations say it about half of the time. Then, with no one running a script:
thresholds fire; SFT, the reward model and PPO run on the training worker; the gate evaluates and promotes;
and new ranking tasks are sampled from the new policy.

The workers run as on separate hosts (`pytest -m multihost`): the control worker on host A, the training worker on
host B, two sampling workers on hosts C and D, and this test (the web tier) on a host of its own. Each starts with an
empty disk of its own (ARTIFACTS_DIR) and shares only PostgreSQL, Redis and an S3 artifact store (moto's server,
started here): every model a host did not write itself comes from the store.
"""

import io
import json
import random
import re
import time
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.db import connection

from labeling import services
from labeling.models import Conversation, ImportJob, Message, QueueSettings, Ranking, Role, Task, TaskKind
from ml.generation import SamplingParams, sample_completions
from ml.scoring import score_pairs
from models_service.artifact_store import MANIFEST, configured_store, manifest_problems
from models_service.loading import load_version
from models_service.models import ModelVersion, SamplingRequest
from models_service.services import model_version_rollback
from models_service.tasks import fill_ranking_pool
from tests.support.api import api
from tests.support.factories import UserFactory
from tests.support.s3 import create_bucket, running_s3_server, storage_options
from tests.support.workers import running_hosts
from training_jobs.loop import trainable_rankings
from training_jobs.models import Evaluation, LoopSettings, TrainingRun
from training_jobs.tasks import loop_tick

pytestmark = [pytest.mark.slow, pytest.mark.multihost, pytest.mark.django_db(transaction=True)]

# Words that the tiny test tokenizer has as single tokens, so a two-layer model learns them from a few
# dozen demonstrations.
WORD = "sentence"
STARTED = [time.monotonic()]
WORDS = ["and", "are", "can", "for", "from", "given", "have", "not", "one", "that", "with", "your"]
WORKER_ENV = {
    "TRAINING_MIN_DEMONSTRATIONS": "8",
    "TRAINING_MIN_RANKINGS": "8",
    "TRAINING_MIN_PROMPTS": "4",
    "TRAINING_REPORT_INTERVAL_S": "0.5",
    "TRAINING_SFT_CONFIG": '{"epochs": 40, "learning_rate": 0.003, "batch_size": 8, "max_length": 96}',
    "TRAINING_RM_CONFIG": '{"epochs": 20, "learning_rate": 0.002, "rankings_per_batch": 8, "max_length": 64}',
    "TRAINING_PPO_CONFIG": '{"iterations": 40, "learning_rate": 0.002, "value_learning_rate": 0.002, '
    '"rollout_batch_size": 16, "minibatch_size": 8, "max_new_tokens": 12, "max_kl": 1000, '
    '"missing_eos_penalty": null, "kl_coef": 0.02}',
    "SAMPLING_POOL_TARGET": "40",
    "SAMPLING_K": "8",
    "SAMPLING_MAX_NEW_TOKENS": "12",
    "SAMPLING_TEMPERATURE": "0.7",
    "SAMPLING_TOP_P": "1.0",
    "LOG_LEVEL": "WARNING",
    # The tiny models train in fp32 here. On a processor with bf16 support, "auto" trains them under bf16 autocast
    # (right for the default model); on such a machine this test's reward model scored the hidden rule 0.88, 0.80
    # and 0.85 in three of five runs, below its 0.9 bar (two passed). bf16 training is tested in test_precision.py.
    "TRAINING_CPU_BF16": "false",
}


HOSTS = {"host-a": ["control"], "host-b": ["training"], "host-c": ["sampling"], "host-d": ["sampling"]}


@pytest.fixture
def store(settings, tmp_path):
    """An S3 artifact store shared by every host; this test process is the web host, with a disk of its own."""
    with running_s3_server() as endpoint:
        create_bucket(endpoint, "artifacts")
        settings.ARTIFACTS_URL = "s3://artifacts/models"
        settings.ARTIFACTS_STORAGE_OPTIONS = storage_options(endpoint)
        settings.ARTIFACTS_DIR = tmp_path / "web" / "var" / "artifacts"
        yield {
            "ARTIFACTS_URL": settings.ARTIFACTS_URL,
            "ARTIFACTS_STORAGE_OPTIONS": json.dumps(storage_options(endpoint)),
        }


@pytest.fixture
def tiny_policy(store, tiny_policy):
    """The base policy, registered (and so published to the store) from the web host."""
    return tiny_policy


def host_dirs(root: Path) -> dict[str, Path]:
    return {host: root / host / "var" / "artifacts" for host in HOSTS}


def score(text: str) -> int:
    return len(re.findall(WORD, text))


class ScriptedLabeler:
    """Takes whatever task the queue gives and does it; ranks by the hidden rule; accepts every review."""

    def __init__(self, user, rng):
        self.user, self.rng, self.done = user, rng, []

    def sentence(self) -> str:
        words = self.rng.choices(WORDS, k=4)
        if self.rng.random() < 0.5:
            words.insert(self.rng.randrange(len(words) + 1), WORD)
        return " ".join(words)

    def work(self) -> str | None:
        assignment = services.task_lease_next(user=self.user, rng=self.rng)
        if assignment is None:
            return None
        kind = assignment.task.kind
        if kind == TaskKind.WRITE_PROMPT:
            services.prompt_submit(assignment=assignment, text=f"Tell me about the {self.rng.choice(WORDS)}.")
        elif kind == TaskKind.WRITE_ASSISTANT_REPLY:
            services.reply_submit(assignment=assignment, text=self.sentence())
        elif kind == TaskKind.WRITE_USER_REPLY:
            services.reply_submit(assignment=assignment, text=f"And the {self.rng.choice(WORDS)}?")
        elif kind == TaskKind.REVIEW_DEMONSTRATION:
            services.review_submit(assignment=assignment, decision="accept")
        else:
            candidates = list(assignment.task.candidates.all())
            levels = sorted({score(c.text) for c in candidates}, reverse=True)
            order = [[c.pk for c in candidates if score(c.text) == level] for level in levels]
            services.ranking_submit(
                assignment=assignment,
                ranking=services.RankingInput(order=order, flags={}, quality_rating=4, confirm_untouched=True),
            )
        self.done.append(kind)
        return kind


def held_out_prompts(n: int) -> list[Message]:
    prompts = []
    for i in range(n):
        conversation = Conversation.objects.create(split="holdout", source="import", dataset="e2e-holdout")
        prompts.append(
            services.message_create(
                conversation=conversation,
                parent=None,
                role=Role.USER,
                text=f"Tell me about the {WORDS[i % len(WORDS)]}.",  # as the labelers write them
                origin=Message.Origin.IMPORT,
            )
        )
    return prompts


def rule_rate(version: ModelVersion, chats, seed: int = 7) -> float:
    loaded = load_version(version, for_inference=True)
    params = SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=12, seed=seed)  # as served
    groups, _ = sample_completions(loaded.model, loaded.tokenizer, chats, k=8, params=params)
    texts = [c.text for group in groups for c in group]
    return sum(WORD in text for text in texts) / len(texts)


def rule_accuracy(reward_model: ModelVersion, n: int = 60) -> float:
    """On fresh pairs that differ only by the hidden word, how often the reward model prefers the one with it."""
    rng = random.Random(11)
    loaded = load_version(reward_model, for_inference=True)
    pairs = []
    for i in range(n):
        words = rng.choices(WORDS, k=4)
        with_word = [*words]
        with_word.insert(rng.randrange(len(words) + 1), WORD)
        chat = [{"role": "user", "content": f"Tell me about the {WORDS[i % len(WORDS)]}."}]
        pairs += [(chat, " ".join(with_word)), (chat, " ".join(words))]
    scores = score_pairs(loaded.model, loaded.tokenizer, pairs)
    return sum(scores[i] > scores[i + 1] for i in range(0, len(scores), 2)) / n


def wait_until(predicate, *, timeout: float, labelers, what: str, work_while=lambda: False, fill_pool=True):
    """Beat's tasks are sent until `predicate` holds; meanwhile the labelers work while `work_while()` holds.

    Scripted labelers are far faster than people: left alone they would write hundreds of demonstrations
    while the first run trains, and make every later stage slow. So each phase asks for only what it needs.
    """
    deadline = time.monotonic() + timeout
    last_kick = 0.0
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            print(f"{time.monotonic() - STARTED[0]:7.1f} s: {what}", flush=True)
            return value
        services.prompt_tasks_replenish()
        for labeler in labelers if work_while() else []:
            for _ in range(5):
                if labeler.work() is None:
                    break
        if time.monotonic() - last_kick > 2:
            loop_tick.delay()
            if fill_pool:
                fill_ranking_pool.delay()
            last_kick = time.monotonic()
        connection.close()
        time.sleep(0.2)
    runs = list(TrainingRun.objects.values_list("kind", "status", "error"))
    evaluations = list(Evaluation.objects.values_list("candidate__name", "status", "decision", "decision_reason"))
    raise AssertionError(f"timed out waiting for {what}; runs {runs}; evaluations {evaluations}")


def test_labels_in_a_better_policy_out(tiny_policy, store, tmp_path):
    STARTED[0] = time.monotonic()
    loop = LoopSettings.load()
    loop.sft_threshold, loop.rm_threshold, loop.check_every_minutes = 40, 140, 1
    loop.eval_prompts, loop.eval_max_new_tokens, loop.human_comparisons = 40, 12, 0
    loop.min_rm_gain, loop.max_kl, loop.auto_promote = 0.0, 1000.0, True
    loop.policy_path = "ppo"  # the path with the most moving parts; the default (DPO) runs in test_policy_paths
    loop.save()
    queue = QueueSettings.load()
    queue.open_prompt_tasks, queue.rank_overlap_fraction, queue.max_conversation_turns = 12, 0.0, 2
    queue.weight_rank_replies = 0.0  # first demonstrations only
    queue.save()
    holdout = held_out_prompts(40)
    rng = random.Random(0)
    labelers = [
        ScriptedLabeler(UserFactory(username=f"e2e-{i}", profile__is_reviewer=True), random.Random(rng.random()))
        for i in range(3)
    ]

    disks = host_dirs(tmp_path)
    assert not any(d.exists() for d in disks.values()), "every host starts with an empty disk"
    hosts = {host: (queues, {"ARTIFACTS_DIR": str(disks[host])}) for host, queues in HOSTS.items()}
    with running_hosts(hosts, env={**WORKER_ENV, **store}):
        sft_run = wait_until(
            lambda: TrainingRun.objects.filter(kind="sft", status="succeeded").first(),
            timeout=240,
            labelers=labelers,
            what="the SFT run",
            work_while=lambda: (
                Message.objects.filter(
                    review_status="accepted", conversation__split__in=["train", "validation"]
                ).count()
                < 44
            ),
            fill_pool=False,  # the base policy's replies would only be ranked as ties
        )
        sft = ModelVersion.objects.get(training_run=sft_run)
        wait_until(
            lambda: ModelVersion.objects.get(pk=sft.pk).is_active, timeout=120, labelers=labelers, what="SFT to serve"
        )
        # From here on the labelers rank and write prompts (no demonstrations, so no second SFT run).
        queue = QueueSettings.load()
        for kind in ("write_assistant_reply", "write_user_reply", "review_demonstration"):
            setattr(queue, f"weight_{kind}", 0.0)
        queue.weight_rank_replies = 3.0  # new prompts are new contexts for the SFT policy to sample
        queue.save()
        wait_until(
            lambda: Task.objects.filter(kind=TaskKind.RANK_REPLIES, model_version=sft).exists(),
            timeout=60,
            labelers=labelers,
            what="ranking tasks sampled from the SFT policy",
        )
        rm_run = wait_until(
            lambda: TrainingRun.objects.filter(kind="rm", status="succeeded").first(),
            timeout=420,
            labelers=labelers,
            what="the reward-model run",
            # Rankings whose candidates all tie give no pair and never count toward the threshold (140).
            work_while=lambda: trainable_rankings().count() < 150,
        )
        tied = Ranking.objects.count() - trainable_rankings().count()
        print(f"{tied} of {Ranking.objects.count()} rankings tied every candidate", flush=True)
        ppo_run = wait_until(
            lambda: TrainingRun.objects.filter(kind="ppo", status="succeeded").first(),
            timeout=300,
            labelers=labelers,
            what="the PPO run",
        )
        ppo = ModelVersion.objects.get(training_run=ppo_run)
        evaluation = wait_until(
            lambda: Evaluation.objects.filter(candidate=ppo, status="done").exclude(decision="pending").first(),
            timeout=180,
            labelers=labelers,
            what="the evaluation of the PPO policy",
        )
        for run in (sft_run, rm_run, ppo_run):
            run.refresh_from_db()
            print(run.kind, run.summary, flush=True)
        print("gate", evaluation.metrics, flush=True)
        assert evaluation.decision == "promoted", (evaluation.decision_reason, evaluation.metrics)
        wait_until(
            lambda: Task.objects.filter(kind=TaskKind.RANK_REPLIES, model_version=ppo).exists(),
            timeout=90,
            labelers=labelers,
            what="ranking tasks sampled from the PPO policy",
        )
        # A file uploaded to the web host (this process) is imported by a worker on another host (the sampling
        # queue's): the upload is in the database, not on the web host's disk.
        admin = UserFactory(username="e2e-admin", is_staff=True, is_superuser=True)
        upload = io.BytesIO(b'{"prompt": "An imported question, uploaded to the web host?"}\n')
        upload.name = "prompts.jsonl"
        response = api(admin).post("/api/v1/imports/", {"file": upload, "format": "prompts"}, format="multipart")
        assert response.status_code == 202, response.content
        job = wait_until(
            lambda: (
                ImportJob.objects.filter(pk=response.json()["id"]).exclude(status__in=["queued", "running"]).first()
            ),
            timeout=120,
            labelers=[],
            what="the import on another host",
        )
        assert (job.status, job.added) == ("done", 1), (job.status, job.failure, job.errors)

    # Every step happened, in order, each with its data snapshot.
    runs = list(TrainingRun.objects.filter(status="succeeded").order_by("created_at"))
    assert [r.kind for r in runs][:3] == ["sft", "rm", "ppo"]
    assert sft_run.trigger == "schedule" and rm_run.trigger == "schedule" and ppo_run.trigger == "chain"
    assert sft_run.data_snapshot["demonstrations"]["train_count"] >= 8
    assert rm_run.data_snapshot["rankings"]["train_count"] >= 8 and rm_run.base_model == sft
    assert ppo_run.base_model == sft and ppo_run.reward_model == ModelVersion.objects.get(training_run=rm_run)
    assert ppo_run.data_snapshot["prompts"] >= 4
    assert rm_run.created_at < ppo_run.created_at < evaluation.created_at
    ppo.refresh_from_db()
    assert ppo.is_active and ppo.activations.get().action == "promote"

    # The reward model learned the rule (on pairs it never saw);
    # the PPO policy follows it more often than the SFT policy.
    assert rm_run.summary["val_accuracy"] is not None, rm_run.summary
    rm = ModelVersion.objects.get(training_run=rm_run)
    assert rule_accuracy(rm) >= 0.9, rm_run.summary
    chats = [[{"role": "user", "content": p.text}] for p in holdout]
    sft_rate, ppo_rate = rule_rate(sft, chats), rule_rate(ppo, chats)
    assert ppo_rate > sft_rate, f"PPO says {WORD!r} in {ppo_rate:.0%} of replies, SFT in {sft_rate:.0%}"

    # Hosts: the PPO policy was trained and written on host B, and sampled on host C or D from a verified copy of
    # the store's; no host but its writer ever held a model's folder, and every registered model is in the store.
    ppo_run.refresh_from_db()
    assert ppo_run.worker == "training@host-b", ppo_run.worker
    assert (disks["host-b"] / ppo.artifact_path / "config.json").is_file()
    store_names = set(configured_store().names())
    assert set(ModelVersion.objects.values_list("name", flat=True)) <= store_names, store_names
    samplers = set(
        SamplingRequest.objects.filter(model_version=ppo, purpose="pool", status="done").values_list(
            "worker", flat=True
        )
    )
    assert samplers and samplers <= {"sampling@host-c", "sampling@host-d"}, samplers
    for worker in samplers:
        disk = disks[worker.split("@")[1]]
        cached = disk / "cache" / ppo.name
        manifest = json.loads((cached / MANIFEST).read_text())
        assert manifest == configured_store().manifest(ppo.name) and not manifest_problems(cached, manifest)
        assert not (disk / "models").exists() and not (disk / "staging").exists(), sorted(disk.iterdir())
    print("PPO policy trained on host B, sampled on", sorted(samplers), flush=True)

    # The web host (this process, whose disk never held a model) rolls the policy back to the SFT version.
    model_version_rollback(kind="policy", reason="rolled back from the web host")
    assert ModelVersion.objects.get(kind="policy", is_active=True) == sft
    assert not (Path(django_settings.ARTIFACTS_DIR) / sft.artifact_path).exists()
