"""Issue 15, item 1: what depended on a text keeps it. An edit of a message that replies, rankings or taken
tasks were built on is a new branch; otherwise a new revision with the old text kept. A training run's read of
its data and its "used in training" mark exclude edits."""

import threading
import time

import pytest

from labeling import services
from labeling.models import Message, MessageRevision, Role, Task, TaskKind
from labeling.services import task_lease_next
from tests.support.factories import UserFactory
from tests.support.labeling import make_prompt


def written_prompt(author):
    """A prompt `author` wrote through the page, with its reply task."""
    services.task_create(kind=TaskKind.WRITE_PROMPT)
    return services.prompt_submit(assignment=task_lease_next(user=author), text="What is a good first prompt?").result


@pytest.mark.django_db
def test_editing_a_prompt_others_replied_to_makes_a_new_branch(alice, bob):
    prompt = written_prompt(alice)
    reply = services.reply_submit(assignment=task_lease_next(user=bob), text="Here is a reply.").result
    edited = services.message_edit(message=prompt, user=alice, text="What is a better first prompt?")
    assert edited.pk != prompt.pk and edited.text == "What is a better first prompt?"
    prompt.refresh_from_db()
    reply.refresh_from_db()
    assert prompt.text == "What is a good first prompt?" and reply.parent_id == prompt.pk, "the reply keeps its text"
    assert edited.assignment_id is not None and prompt.assignment_id is None, "My work shows the new text"
    assert Task.objects.filter(kind=TaskKind.WRITE_ASSISTANT_REPLY, parent_message=edited, status="open").exists()


@pytest.mark.django_db
def test_editing_a_message_nothing_was_built_on_is_a_new_revision_with_the_old_text_kept(alice):
    prompt = written_prompt(alice)
    Task.objects.filter(parent_message=prompt).delete()  # nobody took its reply task yet: nothing depends on it
    edited = services.message_edit(message=prompt, user=alice, text="Reworded before anyone answered.")
    assert edited.pk == prompt.pk and edited.revision == 2
    assert MessageRevision.objects.get(message=prompt, revision=1).text == "What is a good first prompt?"


@pytest.mark.django_db
def test_a_ranking_candidate_is_never_changed_in_place(alice):
    prompt = make_prompt()
    mine = services.message_create(
        conversation=prompt.conversation, parent=prompt, role=Role.ASSISTANT, text="Mine.", origin="human", author=alice
    )
    other = services.message_create(
        conversation=prompt.conversation,
        parent=prompt,
        role=Role.ASSISTANT,
        text="Other.",
        origin="human",
        author=UserFactory(username="someone-else"),
    )
    services.task_create(kind=TaskKind.RANK_REPLIES, parent_message=prompt, candidates=[mine, other])
    edited = services.message_edit(message=mine, user=alice, text="Mine, changed.")
    assert edited.pk != mine.pk and Message.objects.get(pk=mine.pk).text == "Mine."


@pytest.mark.django_db(transaction=True)
def test_an_edit_waits_for_a_training_snapshot_and_then_finds_the_text_frozen(alice):
    from django.db import connection

    from training_jobs import datasets
    from training_jobs.runner import data_snapshot

    prompt = make_prompt()
    demo = services.message_create(
        conversation=prompt.conversation,
        parent=prompt,
        role=Role.ASSISTANT,
        text="An accepted answer.",
        origin="human",
        author=alice,
        review_status=Message.ReviewStatus.ACCEPTED,
    )
    prompt.conversation.__class__.objects.filter(pk=prompt.conversation_id).update(split="train")
    holding, snapshot = threading.Event(), {}

    def training_run():
        try:
            with data_snapshot():
                data = datasets.build_sft(minimum_train=1, minimum_validation=0)
                snapshot.update(data.snapshot("message_id"))
                holding.set()
                time.sleep(1.0)  # an edit arriving now must wait
                services.mark_used_in_training(message_ids=[e.message_id for e in data.train])
        finally:
            connection.close()

    thread = threading.Thread(target=training_run)
    thread.start()
    assert holding.wait(10)
    started = time.monotonic()
    with pytest.raises(services.SubmissionRefused, match="already used to train"):
        services.message_edit(message=demo, user=alice, text="Changed after the snapshot was read.")
    waited = time.monotonic() - started
    thread.join()
    assert waited > 0.5, "the edit waited for the snapshot's transaction"
    assert Message.objects.get(pk=demo.pk).text == "An accepted answer."
    assert snapshot["revisions"] == {str(demo.pk): 1}
