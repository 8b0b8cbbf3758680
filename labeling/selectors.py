"""Reads from the labeling domain: the queue, threads and what a labeler has done."""

import datetime as dt
import hmac
import random
from collections import defaultdict

from django.db.models import (
    Count,
    Q,
)
from django.utils import timezone

from labeling.models import (
    Assignment,
    Conversation,
    ImportJob,
    LabelerProfile,
    Message,
    Ranking,
    Review,
    Task,
    TaskKind,
)


def message_thread(message: Message) -> list[Message]:
    """The messages from the root of the tree down to `message`, inclusive, oldest first.

    One query: every ancestor has a smaller depth in the same conversation, and we walk parents in memory.
    """
    candidates = {
        m.pk: m
        for m in Message.objects.filter(conversation_id=message.conversation_id, depth__lte=message.depth).only(
            "id", "parent_id", "role", "text", "depth", "origin", "conversation_id", "author_id", "model_version_id"
        )
    }
    thread, node = [], candidates.get(message.pk, message)
    while node is not None:
        thread.append(node)
        node = candidates.get(node.parent_id) if node.parent_id else None
    return list(reversed(thread))


def threads_of(messages: list[Message]) -> dict[int, list[Message]]:
    """message id -> its thread, reading each conversation's messages once."""
    by_conversation: dict[int, dict[int, Message]] = defaultdict(dict)
    conversation_ids = {m.conversation_id for m in messages}
    for message in Message.objects.filter(conversation_id__in=conversation_ids).only(
        "id", "parent_id", "role", "text", "conversation_id", "depth"
    ):
        by_conversation[message.conversation_id][message.pk] = message
    threads = {}
    for message in messages:
        nodes, node, thread = by_conversation[message.conversation_id], message, []
        while node is not None:
            thread.append(node)
            node = nodes.get(node.parent_id) if node.parent_id else None
        threads[message.pk] = list(reversed(thread))
    return threads


def thread_as_chat(messages: list[Message]) -> list[dict]:
    """A thread in the {"role", "content"} form chat templates and exports use."""
    return [{"role": m.role, "content": m.text} for m in messages]


# --- roles ---


def labeler_profile(user) -> LabelerProfile | None:
    return LabelerProfile.objects.filter(user=user).first()


def is_reviewer(user, *, profile: LabelerProfile | None = None) -> bool:
    if user.is_staff:
        return True
    profile = profile or labeler_profile(user)
    return bool(profile and profile.is_reviewer)


def kinds_for(user, *, profile: LabelerProfile | None = None) -> list[str]:
    """The task kinds a user may be given: everyone labels, reviewers also review."""
    kinds = [k for k in TaskKind.values if k != TaskKind.REVIEW_DEMONSTRATION]
    if is_reviewer(user, profile=profile):
        kinds.append(TaskKind.REVIEW_DEMONSTRATION)
    return kinds


# --- the queue ---


def live_assignments(now: dt.datetime) -> Q:
    """Assignments that occupy a slot: submitted, or leased and not yet expired."""
    return Q(status=Assignment.Status.SUBMITTED) | Q(status=Assignment.Status.LEASED, lease_expires_at__gt=now)


def live_slot_count(task_id: int, *, now: dt.datetime, excluding: int | None = None) -> int:
    slots = Assignment.objects.filter(live_assignments(now), task_id=task_id)
    if excluding is not None:
        slots = slots.exclude(pk=excluding)
    return slots.count()


def current_assignment(user, *, now: dt.datetime) -> Assignment | None:
    """The task this labeler is in the middle of, if their lease still holds."""
    return (
        Assignment.objects.filter(labeler=user, status=Assignment.Status.LEASED, lease_expires_at__gt=now)
        .select_related("task")
        .order_by("-leased_at")
        .first()
    )


# --- what a labeler has done ---


def labeler_counts(user) -> dict:
    """What a labeler has submitted, today and overall, by task kind."""
    start_of_day = timezone.localtime().replace(hour=0, minute=0, second=0, microsecond=0)
    submitted = Assignment.objects.filter(labeler=user, status=Assignment.Status.SUBMITTED)
    rows = submitted.values("task__kind").annotate(
        total=Count("id"), today=Count("id", filter=Q(submitted_at__gte=start_of_day))
    )
    by_kind = {row["task__kind"]: row for row in rows}
    return {
        "today": sum(row["today"] for row in rows),
        "total": sum(row["total"] for row in rows),
        "by_kind": [
            {"kind": kind, "label": label, **{k: by_kind.get(kind, {}).get(k, 0) for k in ("today", "total")}}
            for kind, label in TaskKind.choices
        ],
    }


def my_work(user) -> dict:
    """A labeler's submissions, newest first, each with whether it can still be edited. Each ranking carries
    `groups`: the replies themselves in the submitted order, best first, a group of several being a tie.

    (Not named "messages": that is the flash messages' name in every template, and a page that passed its Message
    rows under it showed one "user message #N" banner per row.)"""
    written = list(
        Message.objects.filter(author=user, assignment__isnull=False)
        .select_related("conversation", "assignment__task", "draft_model_version")
        .order_by("-created_at")[:200]
    )
    rejected = [m.pk for m in written if m.review_status == Message.ReviewStatus.REJECTED]
    reasons = {}
    for review in Review.objects.filter(message_id__in=rejected, decision=Review.Decision.REJECT).order_by(
        "created_at"
    ):
        reasons[review.message_id] = review.reason  # the latest rejection's reason
    for message in written:
        message.rejection_reason = reasons.get(message.pk, "")
    rankings = list(
        Ranking.objects.filter(labeler=user)
        .select_related("task__parent_message", "improvement")
        .prefetch_related("entries__message")
        .order_by("-created_at")[:200]
    )
    for ranking in rankings:
        by_rank: dict[int, list] = {}
        for entry in sorted(ranking.entries.all(), key=lambda e: (e.rank, e.message_id)):
            by_rank.setdefault(entry.rank, []).append(entry.message)
        ranking.groups = [by_rank[rank] for rank in sorted(by_rank)]
    reviews = Review.objects.filter(reviewer=user).select_related("message").order_by("-created_at")[:200]
    return {"written": written, "rankings": rankings, "reviews": reviews}


def improved_ranking(message: Message) -> dict | None:
    """For a demonstration written as an improvement of the best reply on a ranking task: the replies it is meant
    to beat, in the labeler's order (groups, best first), so that a reviewer can judge it against them."""
    ranking = Ranking.objects.filter(improvement=message).prefetch_related("entries__message").first()
    if ranking is None:
        return None
    by_rank: dict[int, list] = {}
    for entry in sorted(ranking.entries.all(), key=lambda e: (e.rank, e.message_id)):
        by_rank.setdefault(entry.rank, []).append(entry.message)
    return {"ranking": ranking, "groups": [by_rank[rank] for rank in sorted(by_rank)]}


def moderation_queue(limit: int = 100) -> list[dict]:
    """Conversations hidden after reports, waiting for an admin: their first turns and every report on them."""
    hidden = list(Conversation.objects.filter(moderation=Conversation.Moderation.HIDDEN).order_by("created_at")[:limit])
    reports = defaultdict(list)
    for row in (
        Assignment.objects.filter(task__conversation__in=hidden, status=Assignment.Status.REPORTED)
        .select_related("labeler")
        .order_by("leased_at")
        .values("task__conversation_id", "report_reason", "skip_reason", "labeler__username", "leased_at")
    ):
        reports[row["task__conversation_id"]].append(row)
    first_turns = defaultdict(list)
    for message in Message.objects.filter(conversation__in=hidden, depth__lte=1).order_by("depth", "pk"):
        first_turns[message.conversation_id].append(message)
    return [{"conversation": c, "turns": first_turns[c.pk][:3], "reports": reports[c.pk]} for c in hidden]


def candidate_handles(task, labeler_id: int) -> dict[int, str]:
    """{message id: the opaque handle this labeler sees for it on this task}. Message ids would tell which reply
    was created first (in the blind A/B, which policy wrote it); a handle says nothing, differs per task and per
    labeler, and stays the same across reloads."""
    from django.conf import settings

    key = settings.SECRET_KEY.encode()
    return {
        message_id: "c"
        + hmac.new(key, f"candidate:{task.pk}:{labeler_id}:{message_id}".encode(), "sha256").hexdigest()[:11]
        for message_id in task.task_candidates.values_list("message_id", flat=True)
    }


class CandidateHandles:
    """A ranking task's candidates as one labeler's page and API name them (candidate_handles), both ways: what a
    submission names by handle becomes message ids here, and only here."""

    def __init__(self, handles: dict[int, str]):
        self.by_id = dict(handles)
        self.by_handle = {handle: message_id for message_id, handle in self.by_id.items()}

    @classmethod
    def of(cls, task, labeler_id: int) -> "CandidateHandles":
        return cls(candidate_handles(task, labeler_id))

    def unknown(self, handles) -> list[str]:
        """The names among `handles` that are not this task's candidates for this labeler, sorted."""
        return sorted({str(h) for h in handles if not (isinstance(h, str) and h in self.by_handle)})

    def order_ids(self, order: list[list[str]]) -> list[list[int]]:
        return [[self.by_handle[h] for h in group] for group in order]

    def flag_ids(self, flags: dict[str, list]) -> dict[int, list]:
        return {self.by_handle[h]: value for h, value in flags.items()}


def display_order(task: Task, labeler_id: int) -> list[int]:
    """The order a labeler sees the candidates in: shuffled per labeler, so position bias does not add up
    across the labelers who overlap on a task."""
    ids = list(task.task_candidates.order_by("position").values_list("message_id", flat=True))
    random.Random(f"{task.pk}:{labeler_id}").shuffle(ids)
    return ids


def import_alive_key(job_id: int) -> str:
    return f"import-alive:{job_id}"


def import_job_live(job: ImportJob) -> ImportJob:
    """`job` with its worker's latest progress and sign of life (services.import_job_alive), which its row only
    shows once the import's transaction commits. Cache errors leave the row as it is."""
    if job.status != ImportJob.Status.RUNNING:
        return job
    from django.core.cache import cache

    try:
        live = cache.get(import_alive_key(job.pk))
    except Exception:
        return job
    if not isinstance(live, dict):
        return job
    at = dt.datetime.fromtimestamp(float(live.get("at", 0)), tz=dt.UTC)
    if job.heartbeat_at is None or at > job.heartbeat_at:
        job.heartbeat_at = at
    for field in ("lines_done", "added", "existing", "error_count"):
        if isinstance(live.get(field), int):
            setattr(job, field, max(getattr(job, field), live[field]))
    return job
