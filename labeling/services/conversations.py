"""Conversation trees: new conversations and turns, edits that never change what depended on the old text,
moderation, and the lock that keeps edits and training snapshots apart."""

from collections.abc import Sequence

from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.utils import timezone

from labeling import splits
from labeling.limits import (
    SubmissionRefused,
)
from labeling.models import (
    ALLOWED_CHILD_ROLES,
    Conversation,
    LabelerProfile,
    Message,
    MessageRevision,
    Ranking,
    Role,
    Task,
    TaskCandidate,
    TaskKind,
)
from labeling.services.queue import refresh_free_slots, review_task_create, task_create
from labeling.validators import validate_text


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
    draft_model_version=None,
    draft_edit_ratio: float | None = None,
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
        draft_model_version=draft_model_version,
        draft_edit_ratio=draft_edit_ratio,
    )


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
                refresh_free_slots(task.pk, timezone.now())
        else:
            tasks.filter(status=Task.Status.OPEN).update(
                status=Task.Status.CANCELLED, cancelled_reason=f"Removed by {actor} after reports."
            )
    return current


def ensure_editable(obj, user, owner_id: int) -> None:
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
        lock_against_snapshots()
        current = Message.objects.select_for_update().get(pk=message.pk)
        ensure_editable(current, user, current.author_id)
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
            review_task_create(current)
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
        review_task_create(new)
    elif new.role == Role.USER:
        task_create(kind=TaskKind.WRITE_ASSISTANT_REPLY, parent_message=new)
    return new


# Edits and training snapshots exclude each other: an edit holds this advisory lock shared until it commits, a
# training run's read of its data set and its "used in training" mark hold it exclusively, in one transaction.
# So no text can change between the read and the mark, and an edit that comes after sees the mark.
_EDIT_LOCK_KEY = 0x464C_4544  # "FLED"


def lock_against_snapshots() -> None:
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


def release_used_in_training(*, message_ids: Sequence[int] = (), ranking_ids: Sequence[int] = (), since) -> int:
    """Undo mark_used_in_training for a run that ended without a model (cancelled, failed, lost): the rows it
    marked first (at `since` or later) count as new data again and can be edited again. Nothing depends on them:
    no model was registered from that read. Returns how many rows were released."""
    released = Message.objects.filter(pk__in=message_ids, used_in_training_at__gte=since).update(
        used_in_training_at=None
    )
    return released + Ranking.objects.filter(pk__in=ranking_ids, used_in_training_at__gte=since).update(
        used_in_training_at=None
    )


def labeler_profile_update(*, user, languages: Sequence[str], topics: Sequence[str]) -> LabelerProfile:
    """What the labeler is good at; the queue prefers matching tasks."""
    profile, _ = LabelerProfile.objects.get_or_create(user=user)
    profile.languages = list(languages)
    profile.topics = list(topics)
    profile.save(update_fields=["languages", "topics"])
    return profile


def api_token_rotate(*, user) -> str:
    """Replace `user`'s REST API token with a new one; returns its key, which is kept nowhere (only its SHA-256):
    the caller shows it once."""
    import secrets

    from django.contrib.auth import get_user_model

    from labeling.models import ApiToken

    key = secrets.token_hex(20)
    with transaction.atomic():
        get_user_model().objects.select_for_update().filter(pk=user.pk).first()  # two at once: one after the other
        ApiToken.objects.filter(user=user).delete()
        ApiToken.objects.create(user=user, digest=ApiToken.digest_of(key), prefix=key[:6])
    return key


def api_token_revoke(*, user) -> bool:
    """Delete `user`'s REST API token, if any; True if there was one."""
    from labeling.models import ApiToken

    return ApiToken.objects.filter(user=user).delete()[0] > 0
