"""Helpers shared by the tests."""

from labeling import services as labeling_services
from labeling.models import Message, Role
from labeling.services import message_create
from tests.support.factories import ConversationFactory, MessageFactory, UserFactory
from tests.support.labeling import make_rank_task
from training_jobs.models import LoopSettings


def demonstration(split: str, i: int) -> Message:
    writer = UserFactory(username=f"writer-{split}-{i}")
    prompt = MessageFactory(conversation=ConversationFactory(split=split), text=f"Question {i}?", author=writer)
    return message_create(
        conversation=prompt.conversation,
        parent=prompt,
        role=Role.ASSISTANT,
        text=f"Answer {i}.",
        origin=Message.Origin.IMPORT,
        review_status=Message.ReviewStatus.ACCEPTED,
    )


def ranked_task(split: str, i: int, labeler, *, dataset: str = ""):
    """A finished ranking: three candidates, the one saying 'banana' ranked first."""
    from labeling import services as labeling_services
    from labeling.importing import ImportRecord, Turn
    from labeling.services.records import records_import

    if dataset:
        records_import(
            [
                ImportRecord(
                    kind="preference",
                    context=[Turn("user", f"Imported question {i}?")],
                    chosen=f"banana answer {i}",
                    rejected=f"plain answer {i}",
                    dataset=dataset,
                )
            ]
        )
        return

    task = make_rank_task(k=3, texts=[f"banana reply {i}", f"plain reply {i}", f"other reply {i}"])
    task.conversation.split = split
    task.conversation.save(update_fields=["split"])
    assignment = labeling_services.task_lease_next(user=labeler)
    ids = {m.text.split()[0]: m.pk for m in task.candidates.all()}
    labeling_services.ranking_submit(
        assignment=assignment,
        ranking=labeling_services.RankingInput(
            order=[[ids["banana"]], [ids["plain"], ids["other"]]], flags={}, quality_rating=4
        ),
    )


def set_loop(**fields) -> LoopSettings:
    settings = LoopSettings.load()
    for name, value in fields.items():
        setattr(settings, name, value)
    settings.save()
    return settings


def rank(labeler, task, order_of):
    """Submit `labeler`'s ranking of `task`: order_of(candidate ids in display order) -> groups, best first."""
    assignment = labeling_services.task_lease_next(user=labeler)
    assert assignment.task_id == task.pk
    labeling_services.ranking_submit(
        assignment=assignment,
        ranking=labeling_services.RankingInput(
            order=order_of(labeling_services.display_order(task, labeler.pk)), flags={}, confirm_untouched=True
        ),
    )
