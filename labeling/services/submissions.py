"""Finishing an assignment: submitting (one path for every task kind, assignment_submit), skipping, reporting,
and editing a ranking one submitted."""

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Case, F, Q, Value, When
from django.utils import timezone

from labeling.limits import (
    CONTENT_SKIP_REASON,
    MAX_TAG_CHARS,
    MAX_TAGS,
    SubmissionRefused,
)
from labeling.models import (
    Assignment,
    CandidateFlag,
    Conversation,
    ConversationExclusion,
    LabelerProfile,
    Message,
    QueueSettings,
    Ranking,
    RankingEntry,
    Review,
    Role,
    Task,
    TaskKind,
)
from labeling.selectors import display_order, live_slot_count
from labeling.services.conversations import (
    conversation_create,
    ensure_editable,
    lock_against_snapshots,
    message_create,
)
from labeling.services.queue import open_task_exists, refresh_free_slots, review_task_create, task_create
from labeling.validators import validate_text


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
        # The queue serves this labeler other conversations first next time (labeling_lease_next, v0018).
        LabelerProfile.objects.filter(user_id=current.labeler_id).update(last_conversation_id=task.conversation_id)
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
        refresh_free_slots(task.pk, now)
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
        drafted = current.model_draft_version_id is not None
        ratio, version = closest_draft(current, text) if drafted else (None, None)
        message = message_create(
            conversation=task.parent_message.conversation,
            parent=task.parent_message,
            role=role,
            text=text,
            origin=Message.Origin.HUMAN,
            author=current.labeler,
            assignment=current,
            draft_model_version=version,
            draft_edit_ratio=ratio,
        )
        if role == Role.ASSISTANT:
            review_task_create(message)
        else:
            task_create(kind=TaskKind.WRITE_ASSISTANT_REPLY, parent_message=message)
        return message

    return _submit(assignment, work, time_spent_ms=time_spent_ms)


def draft_edit_ratio(draft: str, text: str) -> float:
    """How much of a model draft the labeler changed, by words: 0.0 when submitted as drafted (whitespace aside),
    1.0 when no word of it was kept in place. 1 - difflib's similarity ratio of the two word sequences."""
    before, after = draft.split(), text.split()
    if before == after:
        return 0.0
    return round(1.0 - difflib.SequenceMatcher(None, before, after, autojunk=False).ratio(), 4)


def closest_draft(assignment: Assignment, text: str):
    """(edit ratio, version) of the model draft of `assignment` that `text` is closest to: a labeler who asked for
    two drafts and submitted the first as it was has submitted a draft unedited, whichever came last."""
    drafts = assignment.model_drafts or [{"text": assignment.model_draft, "model_version": None}]
    ratio, version_id = min(
        (draft_edit_ratio(d["text"], text), d["model_version"] or assignment.model_draft_version_id) for d in drafts
    )
    if version_id == assignment.model_draft_version_id:
        return ratio, assignment.model_draft_version
    return ratio, Assignment._meta.get_field("model_draft_version").related_model.objects.get(pk=version_id)


def assignment_model_draft_record(*, assignment_id: int, text: str, model_version) -> bool:
    """Keep the draft the model wrote for a labeler's write task (the interactive worker calls this when a draft is
    done), beside the earlier ones, so that the submission can record which version wrote the one it is closest to
    and how much the labeler changed it. A draft that arrives after the task was submitted, skipped or reported
    changes nothing. Returns whether it was kept."""
    with transaction.atomic():
        assignment = (
            Assignment.objects.select_for_update(of=("self",))  # the assignment only, as a submission locks it
            .filter(pk=assignment_id, status__in=[Assignment.Status.LEASED, Assignment.Status.EXPIRED])
            .filter(task__kind__in=[TaskKind.WRITE_ASSISTANT_REPLY, TaskKind.WRITE_USER_REPLY])
            .first()
        )
        if assignment is None:
            return False
        assignment.model_draft, assignment.model_draft_version = text, model_version
        assignment.model_drafts = [*assignment.model_drafts, {"text": text, "model_version": model_version.pk}]
        assignment.save(update_fields=["model_draft", "model_draft_version", "model_drafts"])
        return True


@dataclass
class RankingInput:
    """A labeler's ranking: groups of candidate ids, best group first; a group of several is a tie."""

    order: list[list[int]]
    flags: dict[int, list[str]]
    quality_rating: int | None = None
    all_unacceptable: bool = False
    confirm_untouched: bool = False
    improvement: str = ""  # the labeler's better reply ("Improve the best"); empty: none


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


def validate_improvement(task: Task, ranking: RankingInput) -> None:
    """An improvement is a reply of the labeler's own that differs from every candidate; not on the gate's blind
    comparisons, which compare two policies and nothing else."""
    if not ranking.improvement.strip():
        return
    if "evaluation" in task.payload:
        raise ValidationError({"improvement": "This comparison is for the promotion gate: rank it, nothing more."})
    validate_text(ranking.improvement, field="improvement")
    texts = {c.message_id: " ".join(c.message.text.split()) for c in task.task_candidates.select_related("message")}
    same = [i for i, text in texts.items() if text == " ".join(ranking.improvement.split())]
    if same:
        raise ValidationError(
            {"improvement": "Your improved reply is the same as one of the replies: change it, or leave it empty."}
        )


def _improvement_create(task: Task, assignment: Assignment, ranking: RankingInput) -> Message:
    """The labeler's better reply: a demonstration under the same context, sent to review like any. It starts from
    the reply they ranked best (the page copies it in), so the draft figures record how much they changed it."""
    best = Message.objects.get(pk=ranking.order[0][0])
    drafted = task.model_version_id is not None
    message = message_create(
        conversation=task.parent_message.conversation,
        parent=task.parent_message,
        role=Role.ASSISTANT,
        text=ranking.improvement,
        origin=Message.Origin.HUMAN,
        author=assignment.labeler,
        assignment=assignment,
        draft_model_version=task.model_version if drafted else None,
        draft_edit_ratio=draft_edit_ratio(best.text, ranking.improvement) if drafted else None,
    )
    review_task_create(message)
    return message


def ranking_submit(*, assignment: Assignment, ranking: RankingInput, time_spent_ms=None) -> SubmitResult:
    """Record a labeler's order of the candidates: ties allowed, flags per candidate, an overall 1-7 rating, and
    optionally the labeler's improvement of the best (a demonstration preferred over every candidate once
    accepted)."""
    _expect_kind(assignment, TaskKind.RANK_REPLIES)
    validate_ranking(assignment.task, assignment.labeler_id, ranking)
    validate_improvement(assignment.task, ranking)

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
        if ranking.improvement.strip():
            row.improvement = _improvement_create(task, current, ranking)
            row.save(update_fields=["improvement"])
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
        if not open_task_exists(kind=TaskKind.WRITE_USER_REPLY, parent_message=message):
            task_create(kind=TaskKind.WRITE_USER_REPLY, parent_message=message)
    elif not accepted and not Ranking.objects.filter(improvement=message).exists():
        # A rejected improvement leaves its ranking as it was; a rejected demonstration is written again.
        parent = message.parent
        has_other = parent.children.filter(
            role=Role.ASSISTANT,
            review_status__in=[Message.ReviewStatus.PENDING, Message.ReviewStatus.ACCEPTED],
        ).exclude(pk=message.pk)
        if not has_other.exists() and not open_task_exists(kind=TaskKind.WRITE_ASSISTANT_REPLY, parent_message=parent):
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
        refresh_free_slots(current.task_id, timezone.now())
    return current


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


def ranking_edit(*, ranking: Ranking, user, new: RankingInput) -> Ranking:
    validate_ranking(ranking.task, user.pk, RankingInput(**{**new.__dict__, "confirm_untouched": True}))
    with transaction.atomic():
        lock_against_snapshots()
        current = Ranking.objects.select_for_update().select_related("task").get(pk=ranking.pk)
        ensure_editable(current, user, current.labeler_id)
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


SUBMITTERS = {
    TaskKind.WRITE_PROMPT: prompt_submit,
    TaskKind.WRITE_ASSISTANT_REPLY: reply_submit,
    TaskKind.WRITE_USER_REPLY: reply_submit,
    TaskKind.RANK_REPLIES: ranking_submit,
    TaskKind.REVIEW_DEMONSTRATION: review_submit,
}


def assignment_submit(*, assignment: Assignment, time_spent_ms=None, **work) -> SubmitResult:
    """Submit a leased task, whatever its kind: the one entry point of the pages and the API.

    `work` is the kind's own input: text (and language, tags for a prompt); ranking (a RankingInput); decision and
    reason for a review. Input meant for another kind is a ValidationError naming what this task takes.
    """
    submit = SUBMITTERS[assignment.task.kind]
    accepted = set(inspect.signature(submit).parameters) - {"assignment", "time_spent_ms"}
    unexpected = set(work) - accepted
    if unexpected:
        kind = assignment.task.get_kind_display().lower()
        raise ValidationError(
            {"task": f"A {kind} task takes {', '.join(sorted(accepted))}, not {', '.join(sorted(unexpected))}."}
        )
    return submit(assignment=assignment, time_spent_ms=time_spent_ms, **work)


def ranking_entries_scored(*, entries: list[RankingEntry], scores: list[float], version_id: int) -> None:
    """The reward model `version_id`'s score of each ranked reply (the ops pages' agreement with the labelers)."""
    for entry, score in zip(entries, scores, strict=True):
        entry.rm_score, entry.rm_version_id = score, version_id
    RankingEntry.objects.bulk_update(entries, ["rm_score", "rm_version"])
