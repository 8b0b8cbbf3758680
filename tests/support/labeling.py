"""Builders for queue tests: tasks with real conversation trees behind them."""

from django.utils import timezone

from labeling import services
from labeling.models import Assignment, Message, QueueSettings, Role, Task, TaskKind
from tests.support.factories import ConversationFactory, MessageFactory, ModelVersionFactory, UserFactory


def make_prompt(*, language="en", tags=(), author=None) -> Message:
    conversation = ConversationFactory(language=language, tags=list(tags))
    return MessageFactory(conversation=conversation, author=author or UserFactory())


def make_reply_task(*, priority=0, language="en", tags=(), author=None):
    prompt = make_prompt(language=language, tags=tags, author=author)
    return services.task_create(kind=TaskKind.WRITE_ASSISTANT_REPLY, parent_message=prompt, priority=priority)


def make_rank_task(*, k=4, overlap=1, candidate_author=None, texts=None):
    """A ranking task over k sampled replies (or, with candidate_author, replies that person wrote)."""
    prompt = make_prompt()
    policy = ModelVersionFactory()
    texts = texts or [f"candidate reply {i}" for i in range(k)]
    candidates = []
    for i, text in enumerate(texts):
        if candidate_author is not None and i == 0:
            candidates.append(MessageFactory(parent=prompt, role=Role.ASSISTANT, text=text, author=candidate_author))
        else:
            candidates.append(
                services.message_create(
                    conversation=prompt.conversation,
                    parent=prompt,
                    role=Role.ASSISTANT,
                    text=text,
                    origin=Message.Origin.MODEL,
                    model_version=policy,
                    sampling_params={"temperature": 1.0, "top_p": 0.95, "seed": i},
                )
            )
    return services.task_create(
        kind=TaskKind.RANK_REPLIES, parent_message=prompt, candidates=candidates, overlap=overlap, model_version=policy
    )


def expire_lease(assignment) -> None:
    """Let the lease run out, as time passing would: its expiry and the task's cached busy time move to the past."""

    past = timezone.now() - timezone.timedelta(seconds=1)
    Assignment.objects.filter(pk=assignment.pk).update(lease_expires_at=past)
    Task.objects.filter(pk=assignment.task_id, free_slots_from__isnull=False).update(free_slots_from=past)


def handle_order(task, user, order):
    """A ranking's groups of message ids as the page and the API take them: each candidate's opaque handle."""
    from labeling.selectors import candidate_handles

    handles = candidate_handles(task, user.pk)
    return [[handles[i] for i in group] for group in order]


def set_queue(**fields):
    settings, _ = QueueSettings.objects.get_or_create(pk=1)
    for name, value in fields.items():
        setattr(settings, name, value)
    settings.save()
