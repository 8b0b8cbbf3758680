"""The retraining policy: what beat starts next. No torch (beat's task and the ops page call it).

At each tick, one thing at a time:
1. if a run or an evaluation is under way, wait;
2. if the last stage the loop started failed, pause with its reason until an admin resumes;
3. a new SFT or PPO policy without an evaluation is evaluated (SFT only when no PPO will follow it);
4. the chain finishes before anything new starts: a newest SFT and newest reward model that have not been
   through the policy step together -> the policy step of the loop's path (PPO, DPO or RLOO);
5. thresholds are checked (every `check_every_minutes`, and right after a run finished):
   new accepted demonstrations >= N_sft -> SFT; new rankings that give a pair >= N_rm -> a reward model on the
   newest SFT. A ranking whose candidates are all tied trains nothing, so it never counts as new data.
Evaluations waiting for the human A/B result are decided again at every tick.
"""

import datetime as dt
import logging
from dataclasses import dataclass

from django.conf import settings as django_settings
from django.core.cache import cache
from django.db import transaction
from django.db.models import Count, Q
from django.utils import timezone

from config import stages
from labeling import splits
from labeling.models import Message, Ranking, Role
from models_service.models import ModelVersion
from models_service.selectors import active_version, newest_ready
from training_jobs import gate, services
from training_jobs.models import Evaluation, LoopSettings, TrainingRun

logger = logging.getLogger(__name__)
TRAINING_SPLITS = [splits.TRAIN, splits.VALIDATION]


def new_demonstrations() -> int:
    """Accepted demonstrations no run has trained on yet."""
    return Message.objects.filter(
        role=Role.ASSISTANT,
        review_status=Message.ReviewStatus.ACCEPTED,
        used_in_training_at__isnull=True,
        conversation__split__in=TRAINING_SPLITS,
    ).count()


def trainable_rankings():
    """Rankings that give at least one (better, worse) pair: not every candidate tied, or an accepted improvement
    of the best (preferred over every candidate)."""
    return Ranking.objects.annotate(distinct_ranks=Count("entries__rank", distinct=True)).filter(
        Q(distinct_ranks__gte=2) | Q(improvement__review_status=Message.ReviewStatus.ACCEPTED)
    )


def new_rankings() -> int:
    """Rankings that give a pair and that no run has trained on yet."""
    return (
        trainable_rankings()
        .filter(used_in_training_at__isnull=True, task__conversation__split__in=TRAINING_SPLITS)
        .count()
    )


def tied_rankings(*, newest: int = 200) -> dict:
    """Of the newest labeler rankings (imports left out), how many tied every candidate and so gave no pair (an
    accepted improvement gives pairs)."""
    recent = list(
        Ranking.objects.filter(task__conversation__split__in=TRAINING_SPLITS, task__model_version__isnull=False)
        .annotate(distinct_ranks=Count("entries__rank", distinct=True))
        .order_by("-created_at")
        .values_list("distinct_ranks", "improvement__review_status")[:newest]
    )
    tied = sum(1 for ranks, improved in recent if ranks < 2 and improved != Message.ReviewStatus.ACCEPTED)
    return {"rankings": len(recent), "all_tied": tied, "share": tied / len(recent) if recent else None}


@dataclass
class Plan:
    action: str  # wait | paused | evaluate | sft | rm | ppo | nothing
    reason: str
    candidate: ModelVersion | None = None


def _busy() -> str | None:
    run = TrainingRun.objects.filter(status__in=TrainingRun.ACTIVE_STATUSES).first()
    if run is not None:
        return f"{run.get_kind_display()} run #{run.pk} is {run.status}"
    evaluation = Evaluation.objects.filter(status__in=[Evaluation.Status.QUEUED, Evaluation.Status.RUNNING]).first()
    if evaluation is not None:
        return f"evaluation #{evaluation.pk} of {evaluation.candidate} is {evaluation.status}"
    return None


def _failure() -> tuple[str, str] | None:
    """The last automatic stage, if it failed: (key, reason)."""
    run = TrainingRun.objects.exclude(trigger=TrainingRun.Trigger.MANUAL).order_by("-created_at").first()
    evaluation = Evaluation.objects.order_by("-created_at").first()
    candidates = []
    if run is not None and run.status == TrainingRun.Status.FAILED:
        candidates.append(
            (run.created_at, f"run:{run.pk}", f"{run.get_kind_display()} run #{run.pk} failed: {run.error}")
        )
    if evaluation is not None and evaluation.status == Evaluation.Status.FAILED:
        candidates.append(
            (
                evaluation.created_at,
                f"evaluation:{evaluation.pk}",
                f"Evaluation #{evaluation.pk} failed: {evaluation.error}",
            )
        )
    if not candidates:
        return None
    _, key, reason = max(candidates)
    return key, reason


def _unevaluated_policy(settings: LoopSettings) -> ModelVersion | None:
    reward_exists = newest_ready(ModelVersion.Kind.REWARD, stages.RM) is not None
    evaluated = list(stages.policy_steps())
    if not (reward_exists and settings.ppo_after_new_models):
        evaluated.append(stages.SFT)
    return (
        ModelVersion.objects.filter(
            kind=ModelVersion.Kind.POLICY, stage__in=evaluated, status=ModelVersion.Status.READY, is_active=False
        )
        .exclude(evaluations_as_candidate__isnull=False)
        .filter(activations__isnull=True)
        .first()
    )


def plan(settings: LoopSettings, *, now: dt.datetime, check_thresholds: bool) -> Plan:
    busy = _busy()
    if busy:
        return Plan("wait", f"Waiting: {busy}.")
    failure = _failure()
    if failure is not None and (settings.paused_reason or failure[0] != settings.paused_for):
        return Plan("paused", settings.paused_reason or failure[1])
    candidate = _unevaluated_policy(settings)
    if candidate is not None:
        return Plan("evaluate", f"{candidate.name} is new and not evaluated yet.", candidate)
    chain = _policy_step(settings)
    if chain is not None:
        return chain
    if check_thresholds:
        demos, rankings = new_demonstrations(), new_rankings()
        if demos >= settings.sft_threshold:
            return Plan("sft", f"{demos} new accepted demonstrations (threshold {settings.sft_threshold}).")
        if rankings >= settings.rm_threshold:
            return Plan("rm", f"{rankings} new rankings that give pairs (threshold {settings.rm_threshold}).")
    return Plan("nothing", "No threshold reached.")


def descends_from(version: ModelVersion, ancestor: ModelVersion) -> bool:
    return any(v.pk == ancestor.pk for v in version.lineage)


def policy_start(path: str, sft: ModelVersion) -> ModelVersion:
    """The policy a run of `path` starts from: the newest SFT policy each round (PPO and RLOO: their KL penalty is
    to it), or for a path that continues the serving policy (iterative DPO on the rankings of its own samples) the
    serving policy when that descends from the newest SFT."""
    if stages.STAGES[path].continues_serving:
        serving = active_version(ModelVersion.Kind.POLICY)
        if serving is not None and descends_from(serving, sft):
            return serving
    return sft


def _policy_step(settings: LoopSettings) -> Plan | None:
    """The chain's last step, when the newest SFT and newest reward model have not been through it together."""
    sft = newest_ready(ModelVersion.Kind.POLICY, stages.SFT)
    rm = newest_ready(ModelVersion.Kind.REWARD, stages.RM)
    if not (settings.ppo_after_new_models and sft and rm):
        return None
    path = settings.policy_path
    runs = TrainingRun.objects.filter(kind=path, reward_model=rm).select_related("base_model")
    if any(run.base_model is not None and descends_from(run.base_model, sft) for run in runs):
        return None
    label = stages.label(path)
    return Plan(path, f"{sft.name} and {rm.name} have not been through {label} together.")


BEAT_TICK_KEY = "loop:last-beat-tick"


def record_beat_tick() -> None:
    """Beat's tick reached the control worker: the ops page tells a running scheduler from a missing one."""
    cache.set(BEAT_TICK_KEY, timezone.now(), timeout=None)


def last_beat_tick() -> dt.datetime | None:
    return cache.get(BEAT_TICK_KEY)


def beat_is_late(last: dt.datetime | None, now: dt.datetime) -> bool:
    """No tick from beat for three of its periods (and at least 90 s): beat, or the control worker, is not running."""
    allowed = dt.timedelta(seconds=max(3 * django_settings.LOOP_TICK_S, 90))
    return last is None or now - last > allowed


def loop_tick(*, now: dt.datetime | None = None, force_check: bool = False) -> Plan:
    """One decision of the loop, acted on. Safe to call from several places at once (a row lock serialises it)."""
    now = now or timezone.now()
    with transaction.atomic():
        settings = LoopSettings.objects.select_for_update().get_or_create(pk=1)[0]
        for evaluation in Evaluation.objects.filter(
            status=Evaluation.Status.DONE, decision=Evaluation.Decision.WAITING_FOR_HUMANS
        ):
            gate.evaluation_decide(evaluation=evaluation, settings=settings)
        if not settings.enabled:
            return Plan("disabled", "The loop is switched off.")
        # A run that made a model is a reason to check at once; a cancelled one is not (the admin stopped it: its
        # data counts as new again, and the next regular check starts it again).
        last_finish = (
            TrainingRun.objects.filter(status=TrainingRun.Status.SUCCEEDED, finished_at__isnull=False)
            .order_by("-finished_at")
            .first()
        )
        due = (
            force_check
            or settings.last_checked_at is None
            or now - settings.last_checked_at >= dt.timedelta(minutes=settings.check_every_minutes)
            or (last_finish is not None and last_finish.finished_at > settings.last_checked_at)
        )
        decision = plan(settings, now=now, check_thresholds=due)
        if due and decision.action not in ("wait", "paused"):
            settings.last_checked_at = now
            settings.save(update_fields=["last_checked_at"])
        if decision.action == "paused" and not settings.paused_reason:
            settings.paused_reason = decision.reason + " The loop waits: fix the cause, then resume it on the ops page."
            settings.paused_for = _failure()[0]
            settings.save(update_fields=["paused_reason", "paused_for"])
        _act(decision)
    if decision.action not in ("wait", "nothing", "disabled"):
        logger.info("loop: %s (%s)", decision.action, decision.reason)
    return decision


def _act(decision: Plan) -> None:
    previous = TrainingRun.objects.filter(status=TrainingRun.Status.SUCCEEDED).order_by("-finished_at").first()
    if decision.action in ("sft", "rm"):
        services.training_run_create(kind=decision.action, trigger=TrainingRun.Trigger.SCHEDULE)
    elif decision.action in stages.policy_steps():
        services.training_run_create(
            kind=decision.action,
            trigger=TrainingRun.Trigger.CHAIN,
            previous_run=previous,
            base_model=policy_start(decision.action, newest_ready(ModelVersion.Kind.POLICY, stages.SFT)),
            reward_model=newest_ready(ModelVersion.Kind.REWARD, stages.RM),
        )
    elif decision.action == "evaluate":
        services.evaluation_create(candidate=decision.candidate)
