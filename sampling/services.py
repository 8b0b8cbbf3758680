"""Chat with the active policy, the web side: a labeler's messages, and the sampling requests for the policy's
replies, for alternatives to rank, and for drafts of the reply a labeler writes in a task. The interactive worker
answers them (models_service.tasks.chat_reply, chat_alternatives and draft_reply, by name); models_service.services
chat_complete, alternatives_complete and draft_complete record the answers.
"""

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from config.jobs import enqueue_on_commit
from labeling.models import Assignment, Conversation, Message, Role, TaskKind
from labeling.services import conversation_create, message_create
from models_service.models import ModelVersion, SamplingRequest
from models_service.selectors import active_version

NO_POLICY = "No policy is serving yet, so the model cannot {what}. An admin activates one on the Models page."


def chat_request_create(*, user_message: Message, user) -> SamplingRequest:
    """Ask the interactive worker for the assistant's reply to `user_message`."""
    if user_message.role != Role.USER:
        raise ValidationError({"message": "The model replies to a user message."})
    if active_version(ModelVersion.Kind.POLICY) is None:
        raise ValidationError(NO_POLICY.format(what="reply"))
    with transaction.atomic():
        request = SamplingRequest.objects.create(
            purpose=SamplingRequest.Purpose.CHAT, context=user_message, k=1, requested_by=user
        )
        enqueue_on_commit("models_service.tasks.chat_reply", request.pk)
    return request


def alternatives_request_create(
    *, model_message: Message, user, k: int, reserve_for_requester: bool
) -> SamplingRequest:
    """Rank a model turn against freshly sampled siblings: k - 1 new samples plus the chosen turn."""
    if model_message.role != Role.ASSISTANT or model_message.origin != Message.Origin.MODEL:
        raise ValidationError({"message": "Alternatives are sampled for a turn the model wrote."})
    if not 2 <= k <= 9:
        raise ValidationError({"k": "Ask for 2 to 9 replies in the ranking."})
    already = SamplingRequest.objects.filter(
        purpose=SamplingRequest.Purpose.ALTERNATIVES, keep_message=model_message
    ).exclude(status=SamplingRequest.Status.FAILED)
    if already.exists():
        raise ValidationError({"message": ALTERNATIVES_ALREADY})
    try:
        with transaction.atomic():
            request = SamplingRequest.objects.create(
                purpose=SamplingRequest.Purpose.ALTERNATIVES,
                context=model_message.parent,
                keep_message=model_message,
                k=k - 1,
                requested_by=user,
                reserve_for_requester=reserve_for_requester,
            )
            enqueue_on_commit("models_service.tasks.chat_alternatives", request.pk)
    except IntegrityError as exc:  # a second click raced the first past the check above
        if "sampling_request_one_in_flight_per_context" not in str(exc):
            raise
        raise ValidationError({"message": ALTERNATIVES_ALREADY}) from None
    return request


ALTERNATIVES_ALREADY = (
    "Alternatives to this reply were already asked for: they are being sampled or are waiting in their ranking task."
)


def chat_start(*, user, text: str, language: str = "en") -> tuple[Message, SamplingRequest]:
    """A new chat conversation: the labeler's first message, and a request for the policy's reply."""
    with transaction.atomic():
        conversation = conversation_create(source=Conversation.Source.CHAT, created_by=user, language=language)
        message = message_create(
            conversation=conversation, parent=None, role=Role.USER, text=text, origin=Message.Origin.HUMAN, author=user
        )
        return message, chat_request_create(user_message=message, user=user)


def chat_continue(*, user, parent: Message, text: str) -> tuple[Message, SamplingRequest]:
    """The labeler's next message after a model turn of their chat, and a request for the reply."""
    if parent.conversation.created_by_id != user.pk or parent.conversation.source != Conversation.Source.CHAT:
        raise ValidationError({"parent": "That message is not in one of your chats."})
    if parent.role != Role.ASSISTANT:
        raise ValidationError({"parent": "Wait for the assistant's reply before writing again."})
    with transaction.atomic():
        message = message_create(
            conversation=parent.conversation,
            parent=parent,
            role=Role.USER,
            text=text,
            origin=Message.Origin.HUMAN,
            author=user,
        )
        return message, chat_request_create(user_message=message, user=user)


def chat_retry(*, user, failed: SamplingRequest) -> SamplingRequest:
    """Ask again for the reply that `failed` (a chat reply of the labeler's own chat) did not give, while its
    message is still the chat's latest."""
    if (
        failed.purpose != SamplingRequest.Purpose.CHAT
        or failed.requested_by_id != user.pk
        or failed.context.conversation.created_by_id != user.pk
    ):
        raise ValidationError("That reply is not one of your chat's.")
    if failed.status != SamplingRequest.Status.FAILED:
        raise ValidationError("That reply did not fail: reload the page to see it.")
    latest = SamplingRequest.objects.filter(context=failed.context, purpose=SamplingRequest.Purpose.CHAT).latest(
        "created_at", "pk"
    )
    if latest.pk != failed.pk:
        raise ValidationError("The reply was already asked for again: reload the page to see it.")
    return chat_request_create(user_message=failed.context, user=user)


DRAFT_KINDS = (TaskKind.WRITE_ASSISTANT_REPLY, TaskKind.WRITE_USER_REPLY)


def draft_request_create(*, assignment: Assignment, user) -> SamplingRequest:
    """Ask the serving policy for a draft of the reply `user` writes in `assignment` (assistant or user side).

    A second request while one is in flight returns the one in flight (a double click streams the same draft)."""
    if assignment.labeler_id != user.pk:
        raise ValidationError("That task is not yours.")
    task = assignment.task
    if task.kind not in DRAFT_KINDS or task.parent_message_id is None:
        raise ValidationError("The model drafts replies only: assistant and user replies in a conversation.")
    if assignment.status not in (Assignment.Status.LEASED, Assignment.Status.EXPIRED):
        raise ValidationError(f"This task is {assignment.get_status_display().lower()}: there is nothing to draft.")
    if assignment.status == Assignment.Status.EXPIRED or assignment.lease_expires_at <= timezone.now():
        raise ValidationError("Your time on this task ran out: submit what you have or take the next task.")
    if active_version(ModelVersion.Kind.POLICY) is None:
        raise ValidationError(NO_POLICY.format(what="write a draft"))
    in_flight = SamplingRequest.objects.filter(
        purpose=SamplingRequest.Purpose.DRAFT,
        assignment=assignment,
        status__in=[SamplingRequest.Status.PENDING, SamplingRequest.Status.RUNNING],
    )
    try:
        with transaction.atomic():
            request = SamplingRequest.objects.create(
                purpose=SamplingRequest.Purpose.DRAFT,
                context_id=task.parent_message_id,
                assignment=assignment,
                k=1,
                requested_by=user,
            )
            enqueue_on_commit("models_service.tasks.draft_reply", request.pk)
    except IntegrityError as exc:
        if "sampling_request_one_draft_in_flight" not in str(exc):
            raise
        request = in_flight.first()
        if request is None:  # it finished between the insert and this read: ask again
            return draft_request_create(assignment=assignment, user=user)
    return request
