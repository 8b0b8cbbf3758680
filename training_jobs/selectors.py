"""Reads about the loop that more than the ops pages need: what the pool can still give (the outlook), and
what starting or cancelling a run means now (for the ops pages, admin and the API)."""

from django.conf import settings as django_settings
from django.db.models import Count

from config import stages
from labeling.models import Conversation, Message, Role
from models_service.models import ModelVersion
from training_jobs import loop
from training_jobs.models import LoopSettings, TrainingRun

MOST_TIED = 0.5  # above this share of tied rankings, most of the labelers' work trains nothing


def cancel_consequence() -> str:
    """What cancelling a run leads to beyond the run, for the confirmation and the message after it: with the loop
    on, the run's data counts as new again and the loop may start the same stage again."""
    if not LoopSettings.load().enabled:
        return ""
    return (
        "the loop starts another at its next check if a threshold is still met; switch the loop off under "
        "Thresholds and rules to stop that"
    )


def cancel_consequence_sentence() -> str:
    """cancel_consequence() as a sentence to append to a message ("" when there is none)."""
    consequence = cancel_consequence()
    return f" {consequence[:1].upper()}{consequence[1:]}." if consequence else ""


def training_worker_listens() -> bool:
    """Whether any worker answers for the training queue (a broadcast over the broker, 1 s at most)."""
    from config.celery_app import workers_by_queue

    return bool(workers_by_queue(timeout=1.0).get("training"))


def start_notice(run: TrainingRun) -> tuple[int, str]:
    """What to tell the person who just started `run` (a django.contrib.messages level and text): queued and
    waiting when no training worker answers (asked over the broker, 1 s at most), else taken up."""
    from django.contrib import messages

    if not training_worker_listens():
        return messages.WARNING, (
            f"Queued {run.label}, but no training worker answered: it starts when one listens "
            "(bin/worker training on a host that reaches the database, Redis and the artifact store)."
        )
    return messages.SUCCESS, f"Queued {run.label}; a training worker is listening and starts it."


def pool_outlook(settings: LoopSettings | None = None) -> dict:
    """Can the ranking pool still reach the reward-model threshold? What the serving policy has left to sample
    (fresh contexts, tied ones waiting for a re-sample), what is open, and what that should give at the recent tie
    share: each context yields a pair with probability 1 - t per try, and has 1 + SAMPLING_RESAMPLE_TIED tries
    (those waiting for a re-sample are counted with one). `short` when the threshold is out of reach: nothing is
    left to rank (`stalled`), or what is left should not give the missing rankings."""
    from labeling import splits
    from labeling.models import Task, TaskKind
    from models_service.selectors import contexts_needing_candidates, in_flight_pool_requests

    settings = settings or LoopSettings.load()
    have = loop.new_rankings()
    needed = max(settings.rm_threshold - have, 0)
    policy = ModelVersion.objects.filter(kind=ModelVersion.Kind.POLICY, is_active=True).first()
    ties = loop.tied_rankings()
    tie_share = ties["share"]
    tries = 1 + django_settings.SAMPLING_RESAMPLE_TIED
    open_tasks = Task.objects.filter(
        kind=TaskKind.RANK_REPLIES,
        status=Task.Status.OPEN,
        reserved_for__isnull=True,
        conversation__split__in=[splits.TRAIN, splits.VALIDATION],
    ).count()
    in_flight = in_flight_pool_requests()
    fresh = resample = 0
    if policy is not None:
        waiting = dict(
            contexts_needing_candidates(policy)
            .order_by()
            .values_list("tied_rounds")
            .annotate(n=Count("pk"))
            .values_list("tied_rounds", "n")
        )
        fresh = waiting.pop(0, 0)
        resample = sum(waiting.values())
    prompts = (
        Message.objects.filter(role=Role.USER, conversation__split__in=[splits.TRAIN, splits.VALIDATION])
        .exclude(conversation__source=Conversation.Source.CHAT)
        .exclude(conversation__moderation__in=[Conversation.Moderation.HIDDEN, Conversation.Moderation.REMOVED])
        .count()
    )
    left = open_tasks + in_flight + fresh + resample
    expected = None
    if tie_share is not None:
        expected = (open_tasks + in_flight + fresh) * (1 - tie_share**tries) + resample * (1 - tie_share)
    stalled = needed > 0 and left == 0
    # A reward-model run already queued or running answers the question (an admin trained on what there was).
    training = TrainingRun.objects.filter(kind=stages.RM, status__in=TrainingRun.ACTIVE_STATUSES).first()
    short = training is None and needed > 0 and (stalled or (expected is not None and expected < needed))
    outlook = {
        "have": have,
        "threshold": settings.rm_threshold,
        "needed": needed,
        "prompts": prompts,
        "fresh": fresh,
        "resample": resample,
        "open_tasks": open_tasks,
        "in_flight": in_flight,
        "spent": max(prompts - fresh - resample - open_tasks - in_flight, 0),
        "tie_share": tie_share,
        "recent_rankings": ties["rankings"],
        "expected": round(expected, 1) if expected is not None else None,
        "stalled": stalled,
        "short": short,
        "suggested_threshold": max(have + round(expected or 0), django_settings.TRAINING_MIN_RANKINGS),
        "tries": tries,
        "can_train_now": have >= django_settings.TRAINING_MIN_RANKINGS,
        "min_rankings": django_settings.TRAINING_MIN_RANKINGS,
    }
    outlook["sentence"] = _outlook_sentence(outlook) if short else ""
    return outlook


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _outlook_sentence(o: dict) -> str:
    """Why the threshold is out of reach, in numbers."""
    parts = [
        f"{o['have']} of {o['threshold']} new rankings give pairs: the threshold needs {o['needed']} more.",
        f"Of {_count(o['prompts'], 'prompt', 'prompts')}, {o['spent']} are spent for this policy (ranked, or tied on "
        f"every try), {o['fresh']} fresh, {o['resample']} tied and waiting for new candidates; "
        f"{_count(o['open_tasks'], 'ranking task is', 'ranking tasks are')} open.",
    ]
    if o["stalled"]:
        parts.append("The loop waits until new prompts arrive or the threshold changes.")
    else:
        parts.append(
            f"{o['tie_share']:.0%} of the latest {_count(o['recent_rankings'], 'ranking', 'rankings')} tied every "
            f"candidate; at that share, counting up to {o['tries'] - 1} re-samples of a context that ties, what is "
            f"left should give about {o['expected']:.0f} more."
        )
    return " ".join(parts)
