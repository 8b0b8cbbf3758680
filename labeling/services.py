"""Writes to the labeling domain. Each service is keyword-only and runs in one transaction.

State changes are guarded by row locks (`select_for_update`) or conditional UPDATEs, never by a check that can
race: two labelers, two browser tabs or a retried request can call any of these at the same time.
"""

import datetime as dt
import hashlib
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings as django_settings
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.db.models import Case, F, Q, Value, When
from django.utils import timezone
from psycopg import sql as psycopg_sql

from labeling import splits
from labeling.models import (
    ALLOWED_CHILD_ROLES,
    Assignment,
    CandidateFlag,
    Conversation,
    ConversationExclusion,
    ImportJob,
    LabelerProfile,
    Message,
    MessageRevision,
    QueueSettings,
    Ranking,
    RankingEntry,
    Review,
    Role,
    Task,
    TaskCandidate,
    TaskKind,
)
from labeling.selectors import live_slot_count

MAX_MESSAGE_CHARS = 20_000
MIN_CANDIDATES, MAX_CANDIDATES = 2, 9
MAX_TAGS, MAX_TAG_CHARS = 10, 48


class SubmissionRefused(Exception):
    """The submission cannot be accepted in the task's current state. The message says why, for the labeler."""


# --- conversation trees ---


def conversation_create(
    *,
    source: str = Conversation.Source.LABELER,
    created_by=None,
    language: str = "en",
    tags: list[str] | None = None,
    dataset: str = "",
    content_hash: str | None = None,
    metadata: dict | None = None,
) -> Conversation:
    """A new conversation. Its split is drawn at random (train, validation or held out for evaluation), except a
    chat's: a labeler's chat is always train data, never silently held out."""
    fields = {"split": splits.TRAIN} if source == Conversation.Source.CHAT else {}
    return Conversation.objects.create(
        source=source,
        created_by=created_by,
        language=language,
        tags=list(tags or []),
        dataset=dataset,
        content_hash=content_hash,
        metadata=metadata or {},
        **fields,
    )


def unstorable_text(text: str) -> str:
    """Why PostgreSQL cannot store `text` (a NUL character, or a lone surrogate that is not Unicode), or ""."""
    if "\x00" in text:
        return "contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"contains a lone surrogate (U+{ord(text[exc.start]):04X}), which is not valid Unicode"
    return ""


def validate_text(text, *, field: str = "text", allow_empty: bool = False) -> str:
    if not isinstance(text, str):
        raise ValidationError({field: "The text must be a string."})
    problem = unstorable_text(text)
    if problem:
        raise ValidationError({field: f"The text {problem}."})
    if not allow_empty and not text.strip():
        raise ValidationError({field: "The text is empty."})
    if len(text) > MAX_MESSAGE_CHARS:
        raise ValidationError(
            {field: f"The text is {len(text):,} characters long; the limit is {MAX_MESSAGE_CHARS:,}."}
        )
    return text


def _validate_child(*, conversation: Conversation, parent: Message | None, role: str, text: str, origin: str) -> None:
    if parent is not None and parent.conversation_id != conversation.pk:
        where = f"conversation #{parent.conversation_id}, not #{conversation.pk}"
        raise ValidationError({"parent": f"Message #{parent.pk} belongs to {where}."})
    if parent is None and conversation.messages.filter(parent__isnull=True).exists():
        raise ValidationError({"parent": f"Conversation #{conversation.pk} already has a first message."})
    parent_role = Role(parent.role) if parent is not None else None
    if role not in ALLOWED_CHILD_ROLES[parent_role]:
        where = f"after a {parent_role.value} message" if parent_role else "as the first message"
        allowed = ", ".join(sorted(r.value for r in ALLOWED_CHILD_ROLES[parent_role]))
        raise ValidationError({"role": f"A {role} message cannot come {where}; expected {allowed}."})
    validate_text(text, allow_empty=origin != Message.Origin.HUMAN)


def message_create(
    *,
    conversation: Conversation,
    parent: Message | None,
    role: str,
    text: str,
    origin: str,
    author=None,
    model_version=None,
    sampling_params: dict | None = None,
    assignment=None,
    review_status: str | None = None,
) -> Message:
    """Add a node to a conversation tree. Siblings under the same parent are alternatives for one turn.

    A demonstration (an assistant reply written by a person) starts pending review unless told otherwise.
    """
    _validate_child(conversation=conversation, parent=parent, role=role, text=text, origin=origin)
    if review_status is None:
        is_written_reply = role == Role.ASSISTANT and origin == Message.Origin.HUMAN
        review_status = Message.ReviewStatus.PENDING if is_written_reply else Message.ReviewStatus.NOT_REVIEWED
    return Message.objects.create(
        conversation=conversation,
        parent=parent,
        depth=0 if parent is None else parent.depth + 1,
        role=role,
        text=text,
        origin=origin,
        author=author,
        model_version=model_version,
        sampling_params=sampling_params,
        assignment=assignment,
        review_status=review_status,
    )


# --- creating tasks ---


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


def _open_task_exists(**filters) -> bool:
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


# --- the queue: leasing ---


def task_lease_next(*, user, now: dt.datetime | None = None, rng: random.Random | None = None) -> Assignment | None:
    """Give the labeler a task slot and a lease on it, or None when there is nothing for them.

    A labeler who already holds a live lease gets that task back. Otherwise a task kind is drawn by the admin's
    weights among the kinds that have work for this labeler, and the best task of that kind (priority, then
    waiting time and routing) is locked with SKIP LOCKED; its free slots are counted again under the lock, so
    two labelers asking at once never take more slots than the task's overlap. All of it runs in PostgreSQL,
    in one call of labeling_lease_next() (labeling/migrations/0008_lease_next_function.py).
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


def _refresh_free_slots(task_id: int, now: dt.datetime) -> None:
    """Recompute the task's cached "all slots taken until" time (see migration 0008), under its row lock."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT labeling_task_refresh_slots(%s, %s)", [task_id, now])


def leases_expire(*, now: dt.datetime | None = None) -> int:
    """Mark leases past their expiry as expired. Their slots are free already; this keeps the records tidy."""
    now = now or timezone.now()
    return Assignment.objects.filter(status=Assignment.Status.LEASED, lease_expires_at__lte=now).update(
        status=Assignment.Status.EXPIRED
    )


# The tables every next-task call reads and writes.
QUEUE_TABLES = ("labeling_task", "labeling_assignment")


def queue_tables_vacuum(*, min_dead_rows: int = 1000, analyze_fraction: float = 0.1) -> list[str]:
    """VACUUM each queue table holding at least `min_dead_rows` dead rows, and ANALYZE each one whose rows changed
    by more than `analyze_fraction` of it (and at least `min_dead_rows`) since its last analysis. Returns the
    tables vacuumed or analysed.

    A lease that takes a task's last slot leaves the task's entry in the queue's index dead until a vacuum, at
    the front of the index, where every next-task call starts reading: with labelers leasing hundreds of tasks
    a second, thousands pile up between autovacuum runs (and on a server with autovacuum off, for good), and
    each call walks past them all. Vacuuming these tables takes milliseconds (30 ms for 20,000 tasks on a slow
    2-core machine), so beat runs this every few seconds (QUEUE_VACUUM_SCHEDULE_S).

    ANALYZE is not run with every vacuum: it costs more than the vacuum (75 ms against 30 ms for 20,000 tasks on
    a slow 2-core machine), and new statistics make every connection plan the queue function's statements again
    at its next call (4 ms each). The function does not need fresh statistics (0012 fixes its plans' shape);
    the rest of the product's queries get them once a tenth of a table has changed, like autovacuum's rule.
    """
    if connection.in_atomic_block:
        raise RuntimeError("VACUUM cannot run inside a transaction: call queue_tables_vacuum() outside atomic()")
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT relname, n_dead_tup >= %s, n_mod_since_analyze >= greatest(%s, %s * n_live_tup)"
            " FROM pg_stat_user_tables WHERE relname = ANY (%s) ORDER BY relname",
            [min_dead_rows, min_dead_rows, analyze_fraction, list(QUEUE_TABLES)],
        )
        due = [(name, vacuum, analyze) for name, vacuum, analyze in cursor.fetchall() if vacuum or analyze]
        for name, vacuum, analyze in due:
            table = connection.ops.quote_name(name)
            # SKIP_LOCKED: a vacuum still running from the last time is left to finish rather than waited for.
            if vacuum:
                cursor.execute(f"VACUUM ({'ANALYZE, ' if analyze else ''}SKIP_LOCKED) {table}")
            else:
                cursor.execute(f"ANALYZE (SKIP_LOCKED) {table}")
    return [name for name, _, _ in due]


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
        _refresh_free_slots(task.pk, now)
    return current


# --- the queue: finishing an assignment ---


@dataclass
class SubmitResult:
    assignment: Assignment
    created: bool  # False when this was a repeat of an earlier submission (double click, retry, stale tab)
    result: object = None


def _submit(assignment: Assignment, work: Callable[[Task, Assignment], object], *, time_spent_ms=None, now=None):
    """The shared path of every submission: lock, check the slot, do the work, count it once.

    Idempotent: a second submission of the same assignment returns the first one's result and counts nothing.
    A submission on an expired lease is accepted while the task still has a free slot.
    """
    now = now or timezone.now()
    with transaction.atomic():
        task = (
            Task.objects.select_for_update(of=("self",))
            .select_related("parent_message__conversation", "target_message")
            .get(pk=assignment.task_id)
        )
        current = Assignment.objects.select_for_update(of=("self",)).select_related("labeler").get(pk=assignment.pk)
        if current.status == Assignment.Status.SUBMITTED:
            return SubmitResult(current, created=False, result=_existing_result(current))
        if current.status in (Assignment.Status.SKIPPED, Assignment.Status.REPORTED):
            raise SubmissionRefused(f"You {current.get_status_display().lower()} this task, so it cannot be submitted.")
        if task.status == Task.Status.CANCELLED:
            raise SubmissionRefused(
                "This task was withdrawn while you worked on it. Your text is kept here, copy it if you need it."
            )
        holds = current.status == Assignment.Status.LEASED and current.lease_expires_at > now
        if not holds and (
            task.status == Task.Status.DONE or live_slot_count(task.pk, now=now, excluding=current.pk) >= task.overlap
        ):
            raise SubmissionRefused(
                "Your lease on this task expired and other labelers have filled it in the meantime. "
                "Your text is kept here, copy it if you need it."
            )
        result = work(task, current)
        current.status = Assignment.Status.SUBMITTED
        current.submitted_at = now
        current.time_spent_ms = time_spent_ms
        current.save(update_fields=["status", "submitted_at", "time_spent_ms"])
        last = Q(submitted_count__gte=F("overlap") - 1)
        Task.objects.filter(pk=task.pk).update(
            submitted_count=F("submitted_count") + 1,
            status=Case(When(last, then=Value(Task.Status.DONE)), default=F("status")),
            completed_at=Case(When(last, then=Value(now)), default=F("completed_at")),
        )
        _refresh_free_slots(task.pk, now)
    return SubmitResult(current, created=True, result=result)


def _existing_result(assignment: Assignment):
    for attribute in ("written_message", "ranking", "review"):
        try:
            return getattr(assignment, attribute)
        except (Message.DoesNotExist, Ranking.DoesNotExist, Review.DoesNotExist):
            continue
    return None


def _expect_kind(assignment: Assignment, *kinds: str) -> None:
    if assignment.task.kind not in kinds:
        raise ValidationError({"task": f"This is a {assignment.task.get_kind_display().lower()} task."})


def _clean_tags(tags) -> list[str]:
    tags = [str(t).strip().lower() for t in (tags or []) if str(t).strip()]
    if len(tags) > MAX_TAGS:
        raise ValidationError({"tags": f"At most {MAX_TAGS} tags."})
    if any(len(t) > MAX_TAG_CHARS for t in tags):
        raise ValidationError({"tags": f"A tag is at most {MAX_TAG_CHARS} characters."})
    return sorted(set(tags))


def prompt_submit(
    *, assignment: Assignment, text: str, language: str = "en", tags=None, time_spent_ms=None
) -> SubmitResult:
    """A new conversation from the labeler's prompt, and a task to write the assistant's reply to it."""
    _expect_kind(assignment, TaskKind.WRITE_PROMPT)
    validate_text(text)
    tags = _clean_tags(tags)
    if not isinstance(language, str) or not 2 <= len(language) <= 16:
        raise ValidationError({"language": "Give a language code such as en or de."})

    def work(task, current):
        conversation = conversation_create(created_by=current.labeler, language=language, tags=tags)
        prompt = message_create(
            conversation=conversation,
            parent=None,
            role=Role.USER,
            text=text,
            origin=Message.Origin.HUMAN,
            author=current.labeler,
            assignment=current,
        )
        task_create(kind=TaskKind.WRITE_ASSISTANT_REPLY, parent_message=prompt)
        return prompt

    return _submit(assignment, work, time_spent_ms=time_spent_ms)


def reply_submit(*, assignment: Assignment, text: str, time_spent_ms=None) -> SubmitResult:
    """The labeler's assistant reply (a demonstration, sent to review) or user reply (which then needs an answer)."""
    _expect_kind(assignment, TaskKind.WRITE_ASSISTANT_REPLY, TaskKind.WRITE_USER_REPLY)
    validate_text(text)

    def work(task, current):
        role = Role.ASSISTANT if task.kind == TaskKind.WRITE_ASSISTANT_REPLY else Role.USER
        message = message_create(
            conversation=task.parent_message.conversation,
            parent=task.parent_message,
            role=role,
            text=text,
            origin=Message.Origin.HUMAN,
            author=current.labeler,
            assignment=current,
        )
        if role == Role.ASSISTANT:
            _review_task_create(message)
        else:
            task_create(kind=TaskKind.WRITE_ASSISTANT_REPLY, parent_message=message)
        return message

    return _submit(assignment, work, time_spent_ms=time_spent_ms)


def _review_task_create(message: Message) -> Task:
    """A review of the message's current text (its revision: reviews of earlier text do not count for it)."""
    return task_create(
        kind=TaskKind.REVIEW_DEMONSTRATION,
        conversation=message.conversation,
        target_message=message,
        overlap=QueueSettings.load().review_overlap,
        payload={"revision": message.revision},
    )


@dataclass
class RankingInput:
    """A labeler's ranking: groups of candidate ids, best group first; a group of several is a tie."""

    order: list[list[int]]
    flags: dict[int, list[str]]
    quality_rating: int | None = None
    all_unacceptable: bool = False
    confirm_untouched: bool = False


def display_order(task: Task, labeler_id: int) -> list[int]:
    """The order a labeler sees the candidates in: shuffled per labeler, so position bias does not add up
    across the labelers who overlap on a task."""
    ids = list(task.task_candidates.order_by("position").values_list("message_id", flat=True))
    random.Random(f"{task.pk}:{labeler_id}").shuffle(ids)
    return ids


def validate_ranking(task: Task, labeler_id: int, ranking: RankingInput) -> None:
    candidate_ids = set(task.task_candidates.values_list("message_id", flat=True))
    order = ranking.order
    if not isinstance(order, list) or not order or not all(isinstance(g, list) and g for g in order):
        raise ValidationError({"order": "Give the order as a list of groups of candidate ids, best first."})
    flat = [i for group in order for i in group]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in flat):
        raise ValidationError({"order": "Candidate ids must be integers."})
    if len(flat) != len(set(flat)):
        raise ValidationError({"order": "A candidate appears twice in the order."})
    unknown = set(flat) - candidate_ids
    if unknown:
        raise ValidationError({"order": f"Not candidates of this task: {', '.join(map(str, sorted(unknown)))}."})
    missing = candidate_ids - set(flat)
    if missing:
        raise ValidationError({"order": f"The order misses candidates {', '.join(map(str, sorted(missing)))}."})
    if not isinstance(ranking.flags, dict):
        raise ValidationError({"flags": "Flags must map candidate ids to lists of flags."})
    for message_id, flags in ranking.flags.items():
        if message_id not in candidate_ids:
            raise ValidationError({"flags": f"Message {message_id} is not a candidate of this task."})
        if not isinstance(flags, list) or any(f not in CandidateFlag.values for f in flags):
            raise ValidationError(
                {"flags": f"Unknown flag for candidate {message_id}; use {', '.join(CandidateFlag.values)}."}
            )
    rating = ranking.quality_rating
    if rating is not None and (not isinstance(rating, int) or isinstance(rating, bool) or not 1 <= rating <= 7):
        raise ValidationError({"quality_rating": "The overall rating is a whole number from 1 to 7."})
    untouched = all(len(g) == 1 for g in order) and flat == display_order(task, labeler_id)
    if untouched and not ranking.confirm_untouched and not ranking.all_unacceptable:
        message = "You left the candidates in the order they were shown. Rank them, or confirm this order."
        raise ValidationError({"order": ValidationError(message, code="untouched")})


def _write_entries(ranking_row: Ranking, ranking: RankingInput) -> None:
    RankingEntry.objects.bulk_create(
        RankingEntry(
            ranking=ranking_row, message_id=message_id, rank=rank, flags=sorted(set(ranking.flags.get(message_id, [])))
        )
        for rank, group in enumerate(ranking.order, start=1)
        for message_id in group
    )


def ranking_submit(*, assignment: Assignment, ranking: RankingInput, time_spent_ms=None) -> SubmitResult:
    """Record a labeler's order of the candidates: ties allowed, flags per candidate, an overall 1-7 rating."""
    _expect_kind(assignment, TaskKind.RANK_REPLIES)
    validate_ranking(assignment.task, assignment.labeler_id, ranking)

    def work(task, current):
        row = Ranking.objects.create(
            assignment=current,
            task=task,
            labeler=current.labeler,
            all_unacceptable=ranking.all_unacceptable,
            quality_rating=ranking.quality_rating,
            order_untouched=ranking.confirm_untouched,
            time_spent_ms=time_spent_ms,
        )
        _write_entries(row, ranking)
        return row

    return _submit(assignment, work, time_spent_ms=time_spent_ms)


def review_submit(*, assignment: Assignment, decision: str, reason: str = "", time_spent_ms=None) -> SubmitResult:
    """A reviewer's verdict. Once every reviewer slot is in, the majority decides (a tie rejects); an accepted
    demonstration becomes SFT data and may be continued with a user reply, a rejected one is written again."""
    _expect_kind(assignment, TaskKind.REVIEW_DEMONSTRATION)
    if decision not in Review.Decision.values:
        raise ValidationError({"decision": "Accept or reject."})
    reason = (reason or "").strip()
    if decision == Review.Decision.REJECT and not reason:
        raise ValidationError({"reason": "Say why you reject it, so the writer can learn from it."})
    validate_text(reason, field="reason", allow_empty=True)

    def work(task, current):
        target = task.target_message
        if target.author_id == current.labeler_id:
            raise SubmissionRefused("You cannot review your own demonstration.")
        if task.payload.get("revision", 1) != target.revision:
            raise SubmissionRefused(
                "The writer edited this demonstration while you reviewed it; the new text has a review of its own."
            )
        if Review.objects.filter(message=target, revision=target.revision, reviewer=current.labeler).exists():
            raise SubmissionRefused("You already reviewed this text of the demonstration.")
        review = Review.objects.create(
            assignment=current,
            message=target,
            revision=target.revision,
            reviewer=current.labeler,
            decision=decision,
            reason=reason,
        )
        if task.submitted_count + 1 >= task.overlap:
            _decide_demonstration(task.target_message)
        return review

    return _submit(assignment, work, time_spent_ms=time_spent_ms)


def _decide_demonstration(message: Message) -> None:
    """The majority of the reviews of the message's current text decides (earlier text's verdicts do not count)."""
    verdicts = list(
        Review.objects.filter(message=message, revision=message.revision).values_list("decision", flat=True)
    )
    accepted = verdicts.count(Review.Decision.ACCEPT) > verdicts.count(Review.Decision.REJECT)
    status = Message.ReviewStatus.ACCEPTED if accepted else Message.ReviewStatus.REJECTED
    Message.objects.filter(pk=message.pk).update(review_status=status)
    settings = QueueSettings.load()
    if accepted and message.depth + 1 < settings.max_conversation_turns:
        if not _open_task_exists(kind=TaskKind.WRITE_USER_REPLY, parent_message=message):
            task_create(kind=TaskKind.WRITE_USER_REPLY, parent_message=message)
    elif not accepted:
        parent = message.parent
        has_other = parent.children.filter(
            role=Role.ASSISTANT,
            review_status__in=[Message.ReviewStatus.PENDING, Message.ReviewStatus.ACCEPTED],
        ).exclude(pk=message.pk)
        if not has_other.exists() and not _open_task_exists(kind=TaskKind.WRITE_ASSISTANT_REPLY, parent_message=parent):
            # Written again by someone else, as the guidelines say: not offered to the rejected reply's writer.
            not_for = [message.author_id] if message.author_id else []
            task_create(kind=TaskKind.WRITE_ASSISTANT_REPLY, parent_message=parent, payload={"not_for": not_for})


def _leave(assignment: Assignment, *, status: str, **fields) -> Assignment:
    with transaction.atomic():
        Task.objects.select_for_update().filter(pk=assignment.task_id).first()
        current = Assignment.objects.select_for_update().get(pk=assignment.pk)
        if current.status == Assignment.Status.SUBMITTED:
            raise SubmissionRefused("This task is already submitted.")
        if current.status == status:
            return current  # a repeated click
        for name, value in fields.items():
            setattr(current, name, value)
        current.status = status
        current.save(update_fields=["status", *fields])
        _refresh_free_slots(current.task_id, timezone.now())
    return current


CONTENT_SKIP_REASON = "I'd rather not work on this content"


def _exclude_conversation(assignment: Assignment, reason: str) -> None:
    """Keep the task's whole conversation (every branch, every task kind) away from this labeler from now on."""
    conversation_id = Task.objects.filter(pk=assignment.task_id).values_list("conversation_id", flat=True).first()
    if conversation_id is not None:
        ConversationExclusion.objects.get_or_create(
            labeler_id=assignment.labeler_id, conversation_id=conversation_id, defaults={"reason": reason[:200]}
        )


def assignment_skip(*, assignment: Assignment, reason: str) -> Assignment:
    """The labeler passes on the task; it stays open for others and never comes back to them. Skipped as content
    they would rather not work on, the whole conversation stays away from them."""
    reason = (reason or "").strip()
    if not reason:
        raise ValidationError({"reason": "Choose or write a reason for skipping."})
    validate_text(reason, field="reason")
    with transaction.atomic():
        skipped = _leave(assignment, status=Assignment.Status.SKIPPED, skip_reason=reason[:500])
        if reason == CONTENT_SKIP_REASON:
            _exclude_conversation(assignment, f"skipped: {reason}")
    return skipped


def assignment_report(*, assignment: Assignment, reason: str, note: str = "") -> Assignment:
    """The labeler reports the content. After `reports_to_cancel` reports the task leaves the queue for admins."""
    if reason not in Assignment.ReportReason.values:
        raise ValidationError({"reason": f"Choose one of: {', '.join(Assignment.ReportReason.labels)}."})
    note = (note or "").strip()
    validate_text(note, field="note", allow_empty=True)
    with transaction.atomic():
        reported = _leave(assignment, status=Assignment.Status.REPORTED, report_reason=reason, skip_reason=note[:500])
        _exclude_conversation(assignment, f"reported: {reason}")
        task = Task.objects.select_for_update().get(pk=assignment.task_id)
        reports = task.assignments.filter(status=Assignment.Status.REPORTED)
        if task.status == Task.Status.OPEN and reports.count() >= QueueSettings.load().reports_to_cancel:
            reasons = sorted(set(reports.values_list("report_reason", flat=True)))
            task.status = Task.Status.CANCELLED
            task.cancelled_reason = f"Reported {reports.count()} times ({', '.join(reasons)})."
            task.save(update_fields=["status", "cancelled_reason"])
            # The whole conversation is hidden from everyone (no task, no training) until an admin decides,
            # unless an admin already kept it after earlier reports.
            Conversation.objects.filter(pk=task.conversation_id, moderation=Conversation.Moderation.NONE).update(
                moderation=Conversation.Moderation.HIDDEN
            )
    return reported


def conversation_moderate(*, conversation: Conversation, decision: str, actor) -> Conversation:
    """An admin's decision on a reported conversation: keep it (its tasks reported out of the queue open again;
    later reports no longer hide it) or remove it (its open tasks are withdrawn; it never trains)."""
    if decision not in (Conversation.Moderation.KEPT, Conversation.Moderation.REMOVED):
        raise ValidationError({"decision": "Keep or remove."})
    with transaction.atomic():
        current = Conversation.objects.select_for_update().get(pk=conversation.pk)
        current.moderation = decision
        current.save(update_fields=["moderation"])
        tasks = Task.objects.filter(conversation=current)
        if decision == Conversation.Moderation.KEPT:
            for task in tasks.filter(status=Task.Status.CANCELLED, cancelled_reason__startswith="Reported"):
                task.status, task.cancelled_reason = Task.Status.OPEN, ""
                task.save(update_fields=["status", "cancelled_reason"])
                _refresh_free_slots(task.pk, timezone.now())
        else:
            tasks.filter(status=Task.Status.OPEN).update(
                status=Task.Status.CANCELLED, cancelled_reason=f"Removed by {actor} after reports."
            )
    return current


# --- editing one's own work ---


def _ensure_editable(obj, user, owner_id: int) -> None:
    if owner_id != user.pk:
        raise SubmissionRefused("You can only edit your own work.")
    if obj.used_in_training_at is not None:
        raise SubmissionRefused("This was already used to train a model, so it can no longer be changed.")


def depends_on(message: Message) -> bool:
    """Whether something was built on this message's text: a reply to it, a ranking task over it, or a task on it
    that someone took. Its text then never changes in place."""
    return (
        message.children.exists()
        or TaskCandidate.objects.filter(message=message).exists()
        or Task.objects.filter(parent_message=message, assignments__isnull=False).exists()
    )


def message_edit(*, message: Message, user, text: str) -> Message:
    """Change the text of a prompt or reply one wrote; returns the message that now holds the new text.

    Nothing that depended on the old text changes with it. When replies, rankings or taken tasks were built on
    the message, the edit is a new branch: a sibling turn with the new text (a new conversation, for a first
    prompt), which takes over the labeler's submission, while the old turn keeps its text and everything built
    on it. Otherwise the text changes in place as a new revision (the old text is kept in MessageRevision), and a
    demonstration goes back to review: reviews judge one revision, so earlier verdicts never count for the new
    text."""
    validate_text(text)
    with transaction.atomic():
        _lock_against_snapshots()
        current = Message.objects.select_for_update().get(pk=message.pk)
        _ensure_editable(current, user, current.author_id)
        if current.text == text:
            return current
        if depends_on(current):
            return _branch(current, text)
        MessageRevision.objects.create(message=current, revision=current.revision, text=current.text)
        current.text = text
        current.revision += 1
        fields = ["text", "revision", "updated_at"]
        if current.review_status in (
            Message.ReviewStatus.ACCEPTED,
            Message.ReviewStatus.REJECTED,
            Message.ReviewStatus.PENDING,
        ):
            # An open review of the old text is withdrawn (its reviewers are told when they submit).
            Task.objects.filter(
                kind=TaskKind.REVIEW_DEMONSTRATION, target_message=current, status=Task.Status.OPEN
            ).update(status=Task.Status.CANCELLED, cancelled_reason="The demonstration was edited.")
            current.review_status = Message.ReviewStatus.PENDING
            fields.append("review_status")
            current.save(update_fields=fields)
            _review_task_create(current)
            return current
        current.save(update_fields=fields)
    return current


def _branch(old: Message, text: str) -> Message:
    """A new turn beside `old` with `text`, by the same author, taking over old's submission (My work shows it)."""
    conversation = old.conversation
    if old.parent_id is None:
        conversation = conversation_create(
            source=conversation.source,
            created_by=conversation.created_by,
            language=conversation.language,
            tags=conversation.tags,
            dataset=conversation.dataset,
        )
    assignment = old.assignment
    if assignment is not None:
        Message.objects.filter(pk=old.pk).update(assignment=None)
    new = message_create(
        conversation=conversation,
        parent=old.parent,
        role=old.role,
        text=text,
        origin=old.origin,
        author=old.author,
        assignment=assignment,
    )
    if new.role == Role.ASSISTANT and new.review_status == Message.ReviewStatus.PENDING:
        _review_task_create(new)
    elif new.role == Role.USER:
        task_create(kind=TaskKind.WRITE_ASSISTANT_REPLY, parent_message=new)
    return new


def ranking_edit(*, ranking: Ranking, user, new: RankingInput) -> Ranking:
    validate_ranking(ranking.task, user.pk, RankingInput(**{**new.__dict__, "confirm_untouched": True}))
    with transaction.atomic():
        _lock_against_snapshots()
        current = Ranking.objects.select_for_update().select_related("task").get(pk=ranking.pk)
        _ensure_editable(current, user, current.labeler_id)
        if current.task.payload.get("decided"):
            raise SubmissionRefused(
                "The promotion gate has already counted this comparison, so it can no longer change."
            )
        current.entries.all().delete()
        _write_entries(current, new)
        current.quality_rating = new.quality_rating
        current.all_unacceptable = new.all_unacceptable
        current.save(update_fields=["quality_rating", "all_unacceptable", "updated_at"])
    return current


# Edits and training snapshots exclude each other: an edit holds this advisory lock shared until it commits, a
# training run's read of its data set and its "used in training" mark hold it exclusively, in one transaction.
# So no text can change between the read and the mark, and an edit that comes after sees the mark.
_EDIT_LOCK_KEY = 0x464C_4544  # "FLED"


def _lock_against_snapshots() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock_shared(%s)", [_EDIT_LOCK_KEY])


def lock_for_training_snapshot() -> None:
    """Call inside the transaction that reads a training data set and marks it used (mark_used_in_training)."""
    if not connection.in_atomic_block:
        raise RuntimeError("lock_for_training_snapshot() needs the transaction the data set is read and marked in")
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_EDIT_LOCK_KEY])


def mark_used_in_training(*, message_ids: Sequence[int] = (), ranking_ids: Sequence[int] = ()) -> None:
    """Freeze the rows a training run used: from now on their authors can no longer edit them."""
    now = timezone.now()
    Message.objects.filter(pk__in=message_ids, used_in_training_at__isnull=True).update(used_in_training_at=now)
    Ranking.objects.filter(pk__in=ranking_ids, used_in_training_at__isnull=True).update(used_in_training_at=now)


def labeler_profile_update(*, user, languages: Sequence[str], topics: Sequence[str]) -> LabelerProfile:
    """What the labeler is good at; the queue prefers matching tasks."""
    profile, _ = LabelerProfile.objects.get_or_create(user=user)
    profile.languages = list(languages)
    profile.topics = list(topics)
    profile.save(update_fields=["languages", "topics"])
    return profile


# --- imports ---

IMPORT_ERRORS_KEPT = 200


def import_job_create(*, upload, format: str, on_error: str, dataset: str, user) -> ImportJob:
    """Save an uploaded JSONL file and queue its import on a worker."""
    from labeling.importing import FORMATS

    if format != "auto" and format not in FORMATS:
        raise ValidationError({"format": f"Unknown format {format!r}; use auto, {', '.join(FORMATS)}."})
    if on_error not in ImportJob.OnError.values:
        raise ValidationError({"on_error": "Choose skip or abort."})
    if len(dataset) > 64:
        raise ValidationError({"dataset": "At most 64 characters."})
    folder = Path(django_settings.ARTIFACTS_DIR) / "imports"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid.uuid4().hex}.jsonl"
    size, limit = 0, django_settings.IMPORT_MAX_FILE_BYTES
    with path.open("wb") as out:
        for chunk in upload.chunks():
            out.write(chunk)
            size += len(chunk)
            if size > limit:
                break
    if size > limit:
        path.unlink()
        raise ValidationError({"file": f"The file is larger than {limit:,} bytes (IMPORT_MAX_FILE_BYTES); split it."})
    if size == 0:
        path.unlink()
        raise ValidationError({"file": "The file is empty."})
    with transaction.atomic():
        job = ImportJob.objects.create(
            file_path=str(path),
            original_name=getattr(upload, "name", "upload.jsonl")[:255],
            format=format,
            on_error=on_error,
            dataset=dataset,
            size_bytes=size,
            created_by=user,
        )
        from labeling.tasks import run_import

        run_import.delay_on_commit(job.pk)
    return job


def import_job_run(*, job_id: int) -> ImportJob | None:
    """Import a queued job's file, recording progress as it goes. None if another worker has it."""
    from labeling.importing import import_jsonl

    if not ImportJob.objects.filter(pk=job_id, status=ImportJob.Status.QUEUED).update(
        status=ImportJob.Status.RUNNING, started_at=timezone.now()
    ):
        return None
    job = ImportJob.objects.get(pk=job_id)
    path = Path(job.file_path)
    with path.open("rb") as lines:
        total = sum(1 for _ in lines)
    ImportJob.objects.filter(pk=job.pk).update(lines_total=total)

    def progress(lines_done, report):
        ImportJob.objects.filter(pk=job.pk).update(
            lines_done=lines_done, added=report.added, existing=report.existing, error_count=len(report.errors)
        )

    def open_lines():
        return path.open("rb")

    try:
        report = import_jsonl(
            open_lines, format=job.format, dataset=job.dataset, on_error=job.on_error, progress=progress
        )
    except Exception as exc:
        ImportJob.objects.filter(pk=job.pk).update(
            status=ImportJob.Status.FAILED, failure=f"{type(exc).__name__}: {exc}", finished_at=timezone.now()
        )
        raise
    ImportJob.objects.filter(pk=job.pk).update(
        status=ImportJob.Status.ABORTED if report.aborted else ImportJob.Status.DONE,
        lines_done=total if not report.aborted else report.lines,
        added=report.added,
        existing=report.existing,
        errors=report.errors[:IMPORT_ERRORS_KEPT],
        error_count=len(report.errors),
        finished_at=timezone.now(),
    )
    return ImportJob.objects.get(pk=job.pk)
