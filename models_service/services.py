"""Writes to the model registry: registering artifacts, activating, promoting and rolling back.

No torch here: the web process calls these (activate and roll back from admin and the ops pages).
"""

import logging
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.db.models.functions import Coalesce
from django.utils import timezone

from labeling.models import Message, Role, Task, TaskKind
from labeling.services import assignment_model_draft_record, message_create, ranking_overlap, task_create
from models_service.artifact_store import artifact_problems, configured_store, manifest_digest
from models_service.models import ModelActivation, ModelVersion, SamplingRequest
from models_service.selectors import (
    TRAINING_BUSY_KEY,
    active_version,
    contexts_needing_candidates,
    in_flight_pool_requests,
    open_pool_size,
)

logger = logging.getLogger(__name__)


def artifact_relative_path(path: Path) -> str:
    root = Path(settings.ARTIFACTS_DIR).resolve()
    path = Path(path).resolve()
    if not path.is_relative_to(root):
        raise ValidationError({"artifact_path": f"{path} is outside ARTIFACTS_DIR ({root})."})
    return str(path.relative_to(root))


def next_version_name(*, kind: str, stage: str) -> str:
    """policy-sft-v3, reward-rm-v1, ...: one counter per kind and stage."""
    prefix = f"{kind}-{stage}-v"
    numbers = [
        int(match.group(1))
        for name in ModelVersion.objects.filter(name__startswith=prefix).values_list("name", flat=True)
        if (match := re.fullmatch(rf"{re.escape(prefix)}(\d+)", name))
    ]
    return f"{prefix}{max(numbers, default=-1) + 1}"


def model_version_register(
    *,
    kind: str,
    stage: str,
    artifact_dir: Path,
    name: str | None = None,
    parent: ModelVersion | None = None,
    training_run=None,
    source: str = "",
    metrics: dict | None = None,
    notes: str = "",
) -> ModelVersion:
    """Register a complete model folder as a ready version. Incomplete folders are refused, so a half-written
    artifact is never registered."""
    problems = artifact_problems(Path(artifact_dir))
    if problems:
        raise ValidationError({"artifact_path": f"{artifact_dir} is not a complete model: {'; '.join(problems)}."})
    name = name or next_version_name(kind=kind, stage=stage)
    relative = artifact_relative_path(artifact_dir)
    store = configured_store()
    digest = ""
    if store is not None:
        # Published before the row exists (its manifest last), so no host ever sees a version it cannot fetch;
        # the row keeps the manifest's digest, so no host fetches files swapped into the store after.
        digest = manifest_digest(store.publish(Path(artifact_dir), name))
    return ModelVersion.objects.create(
        name=name,
        kind=kind,
        stage=stage,
        status=ModelVersion.Status.READY,
        parent=parent,
        training_run=training_run,
        artifact_path=relative,
        manifest_sha256=digest,
        source=source,
        metrics=metrics or {},
        notes=notes,
    )


def model_version_activate(
    *,
    version: ModelVersion,
    actor=None,
    reason: str = "",
    action: str = ModelActivation.Action.ACTIVATE,
    automatic: bool = False,
) -> ModelActivation | None:
    """Make `version` the one serving its kind, atomically, and record who did it, when and why.

    Returns None when it was already active. Workers notice the change at their next task.
    """
    with transaction.atomic():
        current = ModelVersion.objects.select_for_update().filter(kind=version.kind, is_active=True).first()
        version = ModelVersion.objects.select_for_update().get(pk=version.pk)
        if current is not None and current.pk == version.pk:
            return None
        if version.status != ModelVersion.Status.READY:
            raise ValidationError(f"{version.name} is {version.get_status_display().lower()}, not ready to serve.")
        # A version published to the artifact store (its row keeps the manifest's digest) was complete when it was
        # registered, and every host verifies its copy against that digest: the host asking (the web host of a
        # multi-host deployment keeps no models) need not have it. Otherwise its folder here must be complete.
        problems = [] if version.manifest_sha256 else artifact_problems(version.artifact_dir)
        if problems:
            raise ValidationError(f"{version.name} cannot serve: {'; '.join(problems)}.")
        if current is not None:
            ModelVersion.objects.filter(pk=current.pk).update(is_active=False)
        ModelVersion.objects.filter(pk=version.pk).update(is_active=True, activated_at=timezone.now(), load_error="")
        return ModelActivation.objects.create(
            kind=version.kind,
            action=action,
            model_version=version,
            previous=current,
            actor=actor,
            automatic=automatic,
            reason=reason,
        )


def model_version_rollback(*, kind: str, actor=None, reason: str = "") -> ModelActivation:
    """Serve again the version that the current one replaced."""
    last = (
        ModelActivation.objects.filter(kind=kind, model_version__is_active=True)
        .select_related("previous")
        .order_by("-created_at", "-pk")
        .first()
    )
    if last is None or last.previous is None:
        raise ValidationError(f"There is no earlier {kind} version to roll back to.")
    return model_version_activate(
        version=last.previous,
        actor=actor,
        reason=reason or f"rolled back from {last.model_version.name}",
        action=ModelActivation.Action.ROLLBACK,
    )


# --- sampling requests ---

POOL_LOCK_KEY = 0x464C_504C  # "FLPL": one pool claim at a time across workers


def training_busy_mark(*, owner: str, seconds: float) -> None:
    """A training run or an evaluation (`owner`) keeps the training worker's cores busy for the next `seconds`
    unless marked again: the sampling workers keep the pool small meanwhile (selectors.pool_target). Best effort:
    a cache error is ignored."""
    from django.core.cache import cache

    try:
        cache.set(TRAINING_BUSY_KEY, owner, timeout=seconds)
    except Exception:
        logger.warning("could not mark %s as training in the cache", owner, exc_info=True)


def training_busy_clear(*, owner: str) -> None:
    """`owner` ended: drop the mark, unless another has marked it since."""
    from django.core.cache import cache

    try:
        if cache.get(TRAINING_BUSY_KEY) == owner:
            cache.delete(TRAINING_BUSY_KEY)
    except Exception:
        logger.warning("could not clear %s's training mark in the cache", owner, exc_info=True)


def pool_claim(
    *, target: int, batch_contexts: int, k: int, worker: str = "", select_from: int = 1
) -> list[SamplingRequest]:
    """Claim up to `batch_contexts` contexts for the ranking pool, never more than the pool lacks: `k` candidates
    for a fresh context, SAMPLING_RESAMPLE_K for one whose earlier rankings all tied (its `attempt` says which).
    With `select_from` n > 1 (active selection), n contexts are claimed for each task the pool lacks: the worker
    offers the most informative and passes the others over (pool_pass_over).

    Under an advisory lock: count the open pool and the requests still in flight, and claim only the shortfall.
    Two workers running this at once therefore never overfill the pool, and never claim the same context (a
    partial unique index on in-flight requests backs that up).
    """
    policy = active_version(ModelVersion.Kind.POLICY)
    if policy is None:
        return []
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [POOL_LOCK_KEY])
        shortfall = target - open_pool_size(policy) - in_flight_pool_requests()
        if shortfall <= 0:
            return []
        contexts = list(contexts_needing_candidates(policy)[: min(shortfall, batch_contexts) * select_from])
        now = timezone.now()
        return SamplingRequest.objects.bulk_create(
            SamplingRequest(
                purpose=SamplingRequest.Purpose.POOL,
                status=SamplingRequest.Status.RUNNING,
                context=context,
                model_version=policy,
                k=k if context.tied_rounds == 0 else settings.SAMPLING_RESAMPLE_K,
                attempt=context.tied_rounds + 1,
                worker=worker,
                started_at=now,
            )
            for context in contexts
        )


def sampling_request_claim(*, request_id: int, worker: str = "") -> SamplingRequest | None:
    """Move a pending request to running; None if another worker has it, or it is finished (a redelivery)."""
    claimed = SamplingRequest.objects.filter(pk=request_id, status=SamplingRequest.Status.PENDING).update(
        status=SamplingRequest.Status.RUNNING, started_at=timezone.now(), worker=worker
    )
    if not claimed:
        return None
    return SamplingRequest.objects.select_related("context", "keep_message", "assignment__task").get(pk=request_id)


def sampling_request_progress(*, request_id: int, text: str) -> bool:
    """The text a chat reply or draft has so far, for the page that streams it (the first call also stamps the
    time of the first token). Returns False once the request is no longer running (reaped, or failed)."""
    return bool(
        SamplingRequest.objects.filter(pk=request_id, status=SamplingRequest.Status.RUNNING).update(
            partial_text=text, first_token_at=Coalesce("first_token_at", timezone.now())
        )
    )


def sampling_request_fail(*, request: SamplingRequest, error: str) -> None:
    """A pending or running request failed with `error`; a finished one (done, or failed earlier) keeps its end."""
    unfinished = (SamplingRequest.Status.PENDING, SamplingRequest.Status.RUNNING)
    SamplingRequest.objects.filter(pk=request.pk, status__in=unfinished).update(
        status=SamplingRequest.Status.FAILED, error=error[:4000] or "unknown error", finished_at=timezone.now()
    )


def _sampled_message(request, *, version: ModelVersion, text: str, params: dict):
    return message_create(
        conversation=request.context.conversation,
        parent=request.context,
        role=Role.ASSISTANT,
        text=text,
        origin=Message.Origin.MODEL,
        model_version=version,
        sampling_params=params,
    )


@dataclass
class SampledReply:
    text: str
    params: dict  # the sampling parameters as used, including seed and batch row


def pool_pass_over(*, request: SamplingRequest, version: ModelVersion, note: str) -> None:
    """Active selection offered other contexts of the batch: this one goes back to the pool (its samples are not
    kept), after the contexts not passed over yet."""
    SamplingRequest.objects.filter(pk=request.pk, status=SamplingRequest.Status.RUNNING).update(
        status=SamplingRequest.Status.PASSED_OVER,
        model_version=version,
        sampling_params={"passed_over": note},
        finished_at=timezone.now(),
    )


class RequestNotRunning(ValidationError):
    """A result for a request that is no longer running (the reaper failed it, or another worker finished it):
    it completes nothing."""


def _running(request_id: int, *, related=()) -> SamplingRequest:
    """The request, locked, if it is still running; else RequestNotRunning."""
    current = SamplingRequest.objects.select_for_update(of=("self",)).select_related(*related).get(pk=request_id)
    if current.status != SamplingRequest.Status.RUNNING:
        raise RequestNotRunning(f"sampling request #{request_id} is {current.status}, not running")
    return current


def pool_complete(
    *, request: SamplingRequest, version: ModelVersion, replies: list[SampledReply], selection: dict | None = None
) -> Task:
    """Store the sampled candidates under the context and open a ranking task for them (with `selection`: why
    active selection offered it, kept in the task's payload)."""
    with transaction.atomic():
        current = _running(request.pk)
        candidates = [_sampled_message(current, version=version, text=r.text, params=r.params) for r in replies]
        task = task_create(
            kind=TaskKind.RANK_REPLIES,
            parent_message=current.context,
            candidates=candidates,
            overlap=ranking_overlap(seed=f"context-{current.context_id}-policy-{version.pk}"),
            model_version=version,
            payload={"sampling_request": current.pk, **({"selection": selection} if selection else {})},
        )
        current.status = SamplingRequest.Status.DONE
        current.task = task
        current.model_version = version
        current.sampling_params = replies[0].params if replies else {}
        current.finished_at = timezone.now()
        current.save(update_fields=["status", "task", "model_version", "sampling_params", "finished_at"])
    return task


def chat_complete(*, request: SamplingRequest, version: ModelVersion, reply: SampledReply) -> Message:
    """The chat's reply is written: a message under the context. Only while the request runs (RequestNotRunning
    for a late reply after the reaper failed it: the labeler was already told, and may have asked again)."""
    with transaction.atomic():
        current = _running(request.pk)
        message = _sampled_message(current, version=version, text=reply.text, params=reply.params)
        current.status, current.reply, current.model_version = SamplingRequest.Status.DONE, message, version
        current.sampling_params, current.finished_at, current.partial_text = reply.params, timezone.now(), reply.text
        current.first_token_at = current.first_token_at or current.finished_at
        current.save(
            update_fields=[
                "status",
                "reply",
                "model_version",
                "sampling_params",
                "finished_at",
                "partial_text",
                "first_token_at",
            ]
        )
    return message


def draft_complete(*, request: SamplingRequest, version: ModelVersion, reply: SampledReply) -> SamplingRequest:
    """A labeler's model draft is written: the request keeps its text, and the assignment keeps it with the version
    that wrote it (the submission then records how much the labeler changed it)."""
    with transaction.atomic():
        current = _running(request.pk)
        current.status, current.model_version, current.partial_text = SamplingRequest.Status.DONE, version, reply.text
        current.sampling_params, current.finished_at = reply.params, timezone.now()
        current.first_token_at = current.first_token_at or current.finished_at
        fields = ["status", "model_version", "partial_text", "sampling_params", "finished_at", "first_token_at"]
        current.save(update_fields=fields)
        assignment_model_draft_record(assignment_id=current.assignment_id, text=reply.text, model_version=version)
    return current


def alternatives_complete(*, request: SamplingRequest, version: ModelVersion, replies: list[SampledReply]) -> Task:
    """A ranking task of the kept reply and the new samples. Only while the request runs (see chat_complete)."""
    with transaction.atomic():
        current = _running(request.pk, related=("keep_message",))
        fresh = [_sampled_message(current, version=version, text=r.text, params=r.params) for r in replies]
        task = task_create(
            kind=TaskKind.RANK_REPLIES,
            parent_message=current.context,
            candidates=[current.keep_message, *fresh],
            overlap=1 if current.reserve_for_requester else ranking_overlap(seed=f"alternatives-{current.pk}"),
            model_version=version,
            reserved_for=current.requested_by if current.reserve_for_requester else None,
            created_by=current.requested_by,
            priority=1 if current.reserve_for_requester else 0,
            payload={"sampling_request": current.pk, "from_chat": True},
        )
        current.status, current.task, current.model_version = SamplingRequest.Status.DONE, task, version
        current.finished_at = timezone.now()
        current.save(update_fields=["status", "task", "model_version", "finished_at"])
    return task


INTERACTIVE_PURPOSES = (
    SamplingRequest.Purpose.CHAT,
    SamplingRequest.Purpose.ALTERNATIVES,
    SamplingRequest.Purpose.DRAFT,
)


def interactive_lost_after_s() -> int:
    """How long a chat reply, alternatives or draft may run before it is taken for lost: past the interactive hard
    limit (soft + 30 s), with a margin."""
    from django.conf import settings

    return settings.INTERACTIVE_SOFT_TIME_LIMIT_S + 60


def _fail_lost(running, *, age_s: int, now) -> int:
    """Fail the requests of `running` (a queryset) started more than `age_s` ago; returns how many."""
    return running.filter(status=SamplingRequest.Status.RUNNING, started_at__lt=now - timedelta(seconds=age_s)).update(
        status=SamplingRequest.Status.FAILED,
        error=f"No result after {age_s} s: the worker was lost or timed out.",
        finished_at=now,
    )


def interactive_request_give_up_if_lost(request: SamplingRequest) -> SamplingRequest:
    """A chat reply, alternatives or draft the page is waiting on, failed on the spot once it has run past
    interactive_lost_after_s (its worker was lost): the page says so and offers to try again, whether or not beat's
    reaper runs. Returns the request as it now is."""
    waiting = request.status == SamplingRequest.Status.RUNNING and request.purpose in INTERACTIVE_PURPOSES
    this_one = SamplingRequest.objects.filter(pk=request.pk)
    if waiting and _fail_lost(this_one, age_s=interactive_lost_after_s(), now=timezone.now()):
        request.refresh_from_db()
    return request


def sampling_requests_reap(*, older_than_s: int, interactive_older_than_s: int | None = None) -> int:
    """Requests left running by a worker that died: mark them failed, which frees their contexts and tells the
    page waiting on them. A labeler waits on chat replies, alternatives and drafts, whose time limit is much
    shorter: they are given up after `interactive_older_than_s` (default: `older_than_s`)."""
    now = timezone.now()
    interactive = SamplingRequest.objects.filter(purpose__in=INTERACTIVE_PURPOSES)
    others = SamplingRequest.objects.exclude(purpose__in=INTERACTIVE_PURPOSES)
    interactive_age = older_than_s if interactive_older_than_s is None else interactive_older_than_s
    return _fail_lost(others, age_s=older_than_s, now=now) + _fail_lost(interactive, age_s=interactive_age, now=now)
