"""Reads for the model service: which contexts need candidates, what the pool holds."""

from django.conf import settings
from django.db.models import Case, Count, Exists, IntegerField, OuterRef, Q, QuerySet, Subquery, Value, When
from django.db.models.functions import Coalesce

from labeling import splits
from labeling.models import Conversation, Message, Ranking, Role, Task, TaskKind
from models_service.models import ModelVersion, SamplingRequest

TRAINING_BUSY_KEY = "training-busy"


def training_busy() -> bool:
    """Whether a training run is running now (its heartbeat marks it in the cache, which every process shares):
    the pool then keeps only SAMPLING_POOL_WHILE_TRAINING tasks open. A cache that cannot be read says no."""
    from django.core.cache import cache

    try:
        return cache.get(TRAINING_BUSY_KEY) is not None
    except Exception:
        return False


def pool_target() -> int:
    """The open ranking tasks the pool keeps now: SAMPLING_POOL_TARGET, or SAMPLING_POOL_WHILE_TRAINING (if
    smaller) while a run trains, so that sampling for the policy about to be replaced leaves the cores to it."""
    target = settings.SAMPLING_POOL_TARGET
    return min(target, settings.SAMPLING_POOL_WHILE_TRAINING) if training_busy() else target


def pool_short() -> bool:
    """Whether the pool holds fewer open tasks (with those being sampled) than it should now: the sampling
    worker's time then goes to the pool first."""
    policy = active_version(ModelVersion.Kind.POLICY)
    if policy is None:
        return False
    return open_pool_size(policy) + in_flight_pool_requests() < pool_target()


def open_pool_size(policy: ModelVersion | None = None) -> int:
    """Open ranking tasks that any labeler may take (reserved ones, e.g. chat alternatives, do not count).

    With `policy`, only those sampled from it: once a new policy serves, the older policy's open tasks stay
    in the queue but no longer stop the pool from filling with the new policy's replies.
    """
    tasks = Task.objects.filter(kind=TaskKind.RANK_REPLIES, status=Task.Status.OPEN, reserved_for__isnull=True)
    return (tasks.filter(model_version=policy) if policy is not None else tasks).count()


def in_flight_pool_requests() -> int:
    return SamplingRequest.objects.filter(
        purpose=SamplingRequest.Purpose.POOL,
        status__in=[SamplingRequest.Status.PENDING, SamplingRequest.Status.RUNNING],
    ).count()


def pool_sampling_estimate() -> dict:
    """What the sampling workers are doing for the pool, for the empty queue page: ranking tasks on their way and
    about how long they take (from the recent batches' durations; None before any batch finished)."""
    from django.conf import settings

    in_flight = in_flight_pool_requests()
    recent = (
        SamplingRequest.objects.filter(
            purpose=SamplingRequest.Purpose.POOL,
            status=SamplingRequest.Status.DONE,
            started_at__isnull=False,
            finished_at__isnull=False,
        )
        .order_by("-finished_at")
        .values("started_at", "finished_at")[:50]
    )
    durations = [(r["finished_at"] - r["started_at"]).total_seconds() for r in recent]
    batch_s = sum(durations) / len(durations) if durations else None
    batches = -(-in_flight // settings.SAMPLING_BATCH_CONTEXTS)
    return {
        "in_flight": in_flight,
        "estimate_s": round(batches * batch_s) if batch_s is not None and in_flight else None,
        "policy": active_version(ModelVersion.Kind.POLICY),
        "open_pool": open_pool_size(),
    }


def _tied_rounds(policy: ModelVersion):
    """Per context (OuterRef "pk"): how many ranking tasks this policy's samples of it got."""
    tasks = Task.objects.filter(kind=TaskKind.RANK_REPLIES, parent_message=OuterRef("pk"), model_version=policy)
    counted = tasks.order_by().values("parent_message").annotate(n=Count("pk")).values("n")
    return Coalesce(Subquery(counted, output_field=IntegerField()), Value(0))


def _passed_over(policy: ModelVersion):
    """Per context: how often active selection sampled it from this policy and offered others instead."""
    passed = SamplingRequest.objects.filter(
        context=OuterRef("pk"), model_version=policy, status=SamplingRequest.Status.PASSED_OVER
    )
    counted = passed.order_by().values("context").annotate(n=Count("pk")).values("n")
    return Coalesce(Subquery(counted, output_field=IntegerField()), Value(0))


def _gave_a_pair(policy: ModelVersion):
    """Whether a ranking of this policy's samples of the context (OuterRef "pk") gave a pair: two ranks (ranks are
    numbered 1, 2, ... by group, so an entry at rank 2 means two groups) or an accepted improvement."""
    rankings = Ranking.objects.filter(task__parent_message=OuterRef("pk"), task__model_version=policy)
    return Exists(rankings.filter(entries__rank__gt=1)) | Exists(
        rankings.filter(improvement__review_status=Message.ReviewStatus.ACCEPTED)
    )


def contexts_needing_candidates(policy: ModelVersion, *, resample_tied: int | None = None) -> QuerySet[Message]:
    """User turns of training conversations that this policy should sample candidates for, best first.

    A context this policy has not sampled yet; or one whose ranking tasks of this policy's samples are all done and
    whose rankings all tied (no pair), sampled again up to `resample_tied` times (SAMPLING_RESAMPLE_TIED) before it
    is spent. Fresh contexts come first (`tied_rounds` 0), those active selection never passed over before the others
    (`passed_over`), then never ranked ones, then those written in the product
    (fresh prompts) before imported ones, newest first. Validation conversations are sampled too (the reward model
    is validated on their rankings); held-out conversations never are: the evaluation gate needs prompts nothing was
    trained or validated on.
    Chats never are either: a chat turn becomes a ranking task for others only when its labeler asks for
    alternatives and chooses to share them.
    """
    from django.conf import settings

    resample_tied = settings.SAMPLING_RESAMPLE_TIED if resample_tied is None else resample_tied
    open_ranking = Task.objects.filter(
        kind=TaskKind.RANK_REPLIES, parent_message=OuterRef("pk"), status=Task.Status.OPEN
    )
    any_ranking = Task.objects.filter(kind=TaskKind.RANK_REPLIES, parent_message=OuterRef("pk"))
    not_done = any_ranking.exclude(status=Task.Status.DONE)  # a cancelled task's context is not sampled again
    in_flight = SamplingRequest.objects.filter(
        context=OuterRef("pk"),
        purpose=SamplingRequest.Purpose.POOL,
        status__in=[SamplingRequest.Status.PENDING, SamplingRequest.Status.RUNNING],
    )
    return (
        Message.objects.filter(role=Role.USER, conversation__split__in=[splits.TRAIN, splits.VALIDATION])
        .exclude(conversation__source=Conversation.Source.CHAT)
        .exclude(conversation__moderation__in=[Conversation.Moderation.HIDDEN, Conversation.Moderation.REMOVED])
        .exclude(Exists(open_ranking))
        .exclude(Exists(in_flight))
        .annotate(tied_rounds=_tied_rounds(policy), passed_over=_passed_over(policy))
        .filter(
            Q(tied_rounds=0)
            | (
                Q(tied_rounds__lte=resample_tied)
                & ~_gave_a_pair(policy)
                & ~Exists(not_done.filter(model_version=policy))
            )
        )
        .annotate(
            already_ranked=Exists(any_ranking),
            imported=Case(
                When(conversation__source=Conversation.Source.IMPORT, then=Value(1)),
                default=Value(0),
                output_field=IntegerField(),
            ),
        )
        .order_by("tied_rounds", "passed_over", "already_ranked", "imported", "-created_at", "-pk")
    )


def active_version(kind: str) -> ModelVersion | None:
    """The version of `kind` (policy or reward model) that serves now."""
    return ModelVersion.objects.filter(kind=kind, is_active=True).first()


def newest_ready(kind: str, *stages: str) -> ModelVersion | None:
    """The newest ready version of `kind` among `stages`, preferring the stages listed first."""
    for stage in stages:
        version = ModelVersion.objects.filter(kind=kind, stage=stage, status=ModelVersion.Status.READY).first()
        if version is not None:
            return version
    return None


def rollback_targets() -> list[dict]:
    """For each kind, what serves now and what a rollback would serve again (None: nothing earlier served)."""
    from models_service.models import ModelActivation

    effects = {
        ModelVersion.Kind.POLICY: "Sampling, chat and drafts switch to it at once.",
        ModelVersion.Kind.REWARD: "It scores rankings and evaluations from now on.",
    }
    targets = []
    for kind in (ModelVersion.Kind.POLICY, ModelVersion.Kind.REWARD):
        last = (
            ModelActivation.objects.filter(kind=kind, model_version__is_active=True)
            .select_related("model_version", "previous")
            .order_by("-created_at", "-pk")
            .first()
        )
        targets.append(
            {
                "kind": kind,
                "label": "policy" if kind == ModelVersion.Kind.POLICY else "reward model",
                "current": last.model_version if last else None,
                "previous": last.previous if last else None,
                "effect": effects[kind],
            }
        )
    return targets
