"""Chat with the active policy, the web side: a labeler's messages, and the sampling requests for the policy's
replies and for alternatives to rank. The interactive worker answers them (models_service.tasks.chat_reply and
chat_alternatives, by name); models_service.services.chat_complete and alternatives_complete record the answers.
"""

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from config.jobs import enqueue_on_commit
from labeling.models import Conversation, Message, Role
from labeling.services import conversation_create, message_create
from models_service.models import SamplingRequest


def chat_request_create(*, user_message: Message, user) -> SamplingRequest:
    """Ask the interactive worker for the assistant's reply to `user_message`."""
    if user_message.role != Role.USER:
        raise ValidationError({"message": "The model replies to a user message."})
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
