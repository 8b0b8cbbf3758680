"""Reads for the chat page."""

from django.db.models import Count

from labeling.models import Assignment, Conversation, Message
from labeling.selectors import message_thread
from models_service.models import SamplingRequest


def chat_conversations(user):
    return (
        Conversation.objects.filter(created_by=user, source=Conversation.Source.CHAT)
        .annotate(turns=Count("messages"))
        .order_by("-created_at")
    )


def chat_view(conversation) -> dict:
    """What the chat page shows: the branch ending at the labeler's latest message, its reply (or the request
    still being answered), and each model turn's pending alternatives."""
    latest = (
        Message.objects.filter(conversation=conversation, role="user", origin=Message.Origin.HUMAN)
        .order_by("-created_at", "-pk")
        .first()
    )
    if latest is None:
        return {"thread": [], "pending": None, "failed": None, "alternatives": {}, "ranked_by_me": set()}
    thread = message_thread(latest)
    request = (
        SamplingRequest.objects.filter(context=latest, purpose=SamplingRequest.Purpose.CHAT)
        .select_related("reply")
        .order_by("-created_at")
        .first()
    )
    pending = failed = None
    if request is not None and request.status == SamplingRequest.Status.DONE and request.reply:
        thread.append(request.reply)
    elif request is not None and request.status == SamplingRequest.Status.FAILED:
        failed = request
    elif request is not None:
        pending = request
    return {
        "thread": thread,
        "pending": pending,
        "failed": failed,
        **alternatives_of([m.pk for m in thread], labeler_id=conversation.created_by_id),
        "latest": latest,
    }


def alternatives_of(message_ids: list[int], *, labeler_id: int) -> dict:
    """The alternatives asked for on these model turns ({message id: request}), and which of their ranking tasks
    the labeler has submitted: the chat page's lines under its model turns, and each line as it polls itself."""
    alternatives = {
        r.keep_message_id: r
        for r in SamplingRequest.objects.filter(
            purpose=SamplingRequest.Purpose.ALTERNATIVES, keep_message__in=message_ids
        ).select_related("task")
    }
    task_ids = [r.task_id for r in alternatives.values() if r.task_id]
    ranked_by_me = set(
        Assignment.objects.filter(
            task_id__in=task_ids, labeler_id=labeler_id, status=Assignment.Status.SUBMITTED
        ).values_list("task_id", flat=True)
    )
    return {"alternatives": alternatives, "ranked_by_me": ranked_by_me}
