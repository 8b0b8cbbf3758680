"""Writes to the labeling domain. Each service is keyword-only and runs in one transaction."""

from django.core.exceptions import ValidationError
from django.db import transaction

from labeling.models import ALLOWED_CHILD_ROLES, Conversation, Message, Role

MAX_MESSAGE_CHARS = 20_000


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
    return Conversation.objects.create(
        source=source,
        created_by=created_by,
        language=language,
        tags=list(tags or []),
        dataset=dataset,
        content_hash=content_hash,
        metadata=metadata or {},
    )


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
    if not isinstance(text, str):
        raise ValidationError({"text": "The text must be a string."})
    if not text.strip() and origin == Message.Origin.HUMAN:
        raise ValidationError({"text": "The text is empty."})
    if len(text) > MAX_MESSAGE_CHARS:
        raise ValidationError({"text": f"The text is {len(text)} characters long; the limit is {MAX_MESSAGE_CHARS}."})


@transaction.atomic
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
