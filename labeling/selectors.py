"""Reads from the labeling domain."""

from django.db.models import Count, Q
from django.utils import timezone

from labeling.models import Assignment, Message


def message_thread(message: Message) -> list[Message]:
    """The messages from the root of the tree down to `message`, inclusive, oldest first.

    One query: every ancestor has a smaller depth in the same conversation, and we walk parents in memory.
    """
    candidates = {
        m.pk: m
        for m in Message.objects.filter(conversation_id=message.conversation_id, depth__lte=message.depth).only(
            "id", "parent_id", "role", "text", "depth", "origin", "conversation_id"
        )
    }
    thread, node = [], candidates.get(message.pk, message)
    while node is not None:
        thread.append(node)
        node = candidates.get(node.parent_id) if node.parent_id else None
    return list(reversed(thread))


def thread_as_chat(messages: list[Message]) -> list[dict]:
    """A thread in the {"role", "content"} form chat templates and exports use."""
    return [{"role": m.role, "content": m.text} for m in messages]


def labeler_counts(user) -> dict:
    """What a labeler has submitted, today and overall, by task kind."""
    start_of_day = timezone.localtime().replace(hour=0, minute=0, second=0, microsecond=0)
    submitted = Assignment.objects.filter(labeler=user, status=Assignment.Status.SUBMITTED)
    totals = submitted.aggregate(total=Count("id"), today=Count("id", filter=Q(submitted_at__gte=start_of_day)))
    return {"today": totals["today"], "total": totals["total"]}
