"""The queue: creating tasks, leasing the next one (one call of labeling_lease_next(), see labeling/sql/), and
keeping a lease while the labeler works."""

import datetime as dt
import hashlib
import random
from collections.abc import Sequence

from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.utils import timezone
from psycopg import sql as psycopg_sql

from labeling.limits import (
    MAX_CANDIDATES,
    MIN_CANDIDATES,
)
from labeling.models import (
    Assignment,
    Conversation,
    Message,
    QueueSettings,
    Task,
    TaskCandidate,
    TaskKind,
)
from labeling.validators import validate_text


def ranking_overlap(*, seed: str, settings: QueueSettings | None = None) -> int:
    """How many labelers rank a task: `rank_overlap` for a `rank_overlap_fraction` share of tasks, else one.

    Deterministic in `seed`, so the share holds over many tasks and a retried creation decides the same way.
    """
    settings = settings or QueueSettings.load()
    draw = int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return settings.rank_overlap if draw < settings.rank_overlap_fraction else 1


def task_create(
    *,
    kind: str,
    conversation: Conversation | None = None,
    parent_message: Message | None = None,
    target_message: Message | None = None,
    candidates: Sequence[Message] = (),
    overlap: int = 1,
    priority: int = 0,
    model_version=None,
    reserved_for=None,
    created_by=None,
    payload: dict | None = None,
) -> Task:
    if kind == TaskKind.RANK_REPLIES:
        if not MIN_CANDIDATES <= len(candidates) <= MAX_CANDIDATES:
            needs = f"A ranking needs {MIN_CANDIDATES} to {MAX_CANDIDATES} candidates"
            raise ValidationError({"candidates": f"{needs}, not {len(candidates)}."})
        if any(c.parent_id != parent_message.pk for c in candidates):
            raise ValidationError({"candidates": "Every candidate must reply to the task's context message."})
        if len({c.pk for c in candidates}) != len(candidates):
            raise ValidationError({"candidates": "A candidate appears twice."})
    source = conversation or (parent_message.conversation if parent_message else None)
    with transaction.atomic(savepoint=False):
        task = Task.objects.create(
            kind=kind,
            conversation=source,
            parent_message=parent_message,
            target_message=target_message,
            overlap=overlap,
            priority=priority,
            model_version=model_version,
            reserved_for=reserved_for,
            created_by=created_by,
            language=source.language if source else "en",
            tags=list(source.tags) if source else [],
            payload=payload or {},
        )
        TaskCandidate.objects.bulk_create(
            TaskCandidate(task=task, message=message, position=position) for position, message in enumerate(candidates)
        )
    return task


def open_task_exists(**filters) -> bool:
    return Task.objects.filter(status=Task.Status.OPEN, **filters).exists()


def prompt_tasks_replenish(*, settings: QueueSettings | None = None) -> int:
    """Keep `open_prompt_tasks` 'write a prompt' tasks open. Returns how many were created."""
    settings = settings or QueueSettings.load()
    with transaction.atomic():
        # One replenisher at a time; a transaction-level advisory lock keeps two beats from overfilling.
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [0x464C_5054])
        missing = (
            settings.open_prompt_tasks
            - Task.objects.filter(kind=TaskKind.WRITE_PROMPT, status=Task.Status.OPEN).count()
        )
        for _ in range(max(missing, 0)):
            task_create(kind=TaskKind.WRITE_PROMPT)
    return max(missing, 0)


def prompt_task_for_labeler(*, user) -> Task:
    """A 'write a prompt' task reserved for `user` (the empty queue page offers one): their open one if they have
    it, else a new one. New prompts are always useful: each starts a conversation for the others' queue."""
    with transaction.atomic():
        existing = (
            Task.objects.select_for_update()
            .filter(kind=TaskKind.WRITE_PROMPT, status=Task.Status.OPEN, reserved_for=user)
            .first()
        )
        if existing is not None:
            return existing
        return task_create(kind=TaskKind.WRITE_PROMPT, reserved_for=user, created_by=user, priority=1)


def task_lease_next(*, user, now: dt.datetime | None = None, rng: random.Random | None = None) -> Assignment | None:
    """Give the labeler a task slot and a lease on it, or None when there is nothing for them.

    A labeler who already holds a live lease gets that task back. Otherwise a task kind is drawn by the admin's
    weights among the kinds that have work for this labeler, and the best task of that kind (priority, then
    waiting time and routing) is locked with SKIP LOCKED; its free slots are counted again under the lock, so
    two labelers asking at once never take more slots than the task's overlap. All of it runs in PostgreSQL,
    in one call of labeling_lease_next() (labeling/sql/, newest lease_next_v*.sql; 0008 explains the rules).
    """
    assignment_id = task_lease_next_id(user=user, now=now, rng=rng)
    if assignment_id is None:
        return None
    return Assignment.objects.select_related("task").get(pk=assignment_id)


def task_lease_next_id(*, user, now: dt.datetime | None = None, rng: random.Random | None = None) -> int | None:
    """task_lease_next in one database round trip, returning only the assignment's id (the queue's hot path).

    `rng` seeds the draw of the task kind (for tests); without it PostgreSQL's random() draws.
    """
    now = now or timezone.now()
    draws = [rng.random() for _ in TaskKind.values] if rng is not None else None
    with connection.cursor() as cursor:
        # Outside an explicit transaction the call is its own transaction: one round trip.
        cursor.execute(_lease_next_statement(QueueSettings.load()), [user.pk, now, draws])
        (assignment_id,) = cursor.fetchone()
    return assignment_id


def _lease_next_statement(settings: QueueSettings) -> str:
    """The call of labeling_lease_next() with the admin's settings written in as SQL literals.

    They change rarely, and turning them into SQL at every call (three arrays among them) was a tenth of the web
    process's CPU on the queue's hot path; the statement is kept on the settings object, which
    QueueSettings.load() hands out again for several seconds (a change loads a new object).
    """
    statement = settings.__dict__.get("_lease_next_statement")
    if statement is None:
        weights = settings.kind_weights
        literals = (
            TaskKind.values,
            [float(weights.get(kind, 0)) for kind in TaskKind.values],
            int(settings.lease_minutes),
            float(settings.language_bonus_minutes),
            float(settings.topic_bonus_minutes),
            float(settings.max_age_minutes),
        )
        # psycopg writes the float array with its cast ('{...}'::float8[]); the other literals get theirs here.
        statement = (
            psycopg_sql.SQL(
                "SELECT labeling_lease_next(%s, %s, {}::text[], {}, %s::float8[], {}::integer, {}::float8,"
                " {}::float8, {}::float8)"
            )
            .format(*(psycopg_sql.Literal(value) for value in literals))
            .as_string()
        )
        settings.__dict__["_lease_next_statement"] = statement
    return statement


def refresh_free_slots(task_id: int, now: dt.datetime) -> None:
    """Recompute the task's cached "all slots taken until" time (see migration 0008), under its row lock."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT labeling_task_refresh_slots(%s, %s)", [task_id, now])


def leases_expire(*, now: dt.datetime | None = None) -> int:
    """Mark leases past their expiry as expired. Their slots are free already; this keeps the records tidy."""
    now = now or timezone.now()
    return Assignment.objects.filter(status=Assignment.Status.LEASED, lease_expires_at__lte=now).update(
        status=Assignment.Status.EXPIRED
    )


def assignment_save_draft(*, assignment: Assignment, draft: str, now: dt.datetime | None = None) -> Assignment:
    """Keep what the labeler typed, and extend their lease while it still holds. An expired lease stays expired
    (the draft is kept all the same): saving does not take a slot back that the queue may have given to someone
    else; a late submission is still accepted while the slot is free (see `_submit`)."""
    now = now or timezone.now()
    validate_text(draft, field="draft", allow_empty=True)
    with transaction.atomic():
        task = Task.objects.select_for_update().get(pk=assignment.task_id)
        current = Assignment.objects.select_for_update().get(pk=assignment.pk)
        current.draft = draft
        fields = ["draft"]
        holds = current.status == Assignment.Status.LEASED and current.lease_expires_at > now
        if holds and task.status == Task.Status.OPEN:
            current.lease_expires_at = now + dt.timedelta(minutes=QueueSettings.load().lease_minutes)
            fields += ["lease_expires_at"]
        current.save(update_fields=fields)
        refresh_free_slots(task.pk, now)
    return current


def review_task_create(message: Message) -> Task:
    """A review of the message's current text (its revision: reviews of earlier text do not count for it)."""
    return task_create(
        kind=TaskKind.REVIEW_DEMONSTRATION,
        conversation=message.conversation,
        target_message=message,
        overlap=QueueSettings.load().review_overlap,
        payload={"revision": message.revision},
    )
