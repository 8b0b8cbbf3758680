"""Issue 15: reviews judge one revision of a text, a rejected reply is written again by someone else, a content
skip or a report keeps the whole conversation away from that labeler, and the blind A/B stays blind."""

import pytest

from labeling import services
from labeling.models import Message, Review, Role, Task, TaskKind
from labeling.services import task_lease_next
from tests.support.factories import UserFactory
from tests.support.labeling import make_prompt, make_rank_task, make_reply_task, set_queue

pytestmark = pytest.mark.django_db


def reviewers(n):
    return [UserFactory(username=f"reviewer{i}", profile__is_reviewer=True) for i in range(n)]


def review(user, decision, reason="not good"):
    assignment = task_lease_next(user=user)
    assert assignment is not None and assignment.task.kind == TaskKind.REVIEW_DEMONSTRATION, assignment
    return services.review_submit(assignment=assignment, decision=decision, reason=reason)


def demonstration(writer, **queue) -> Message:
    """A demonstration by `writer`, waiting for review; then the queue offers reviews only (and `queue`)."""
    make_reply_task()
    message = services.reply_submit(assignment=task_lease_next(user=writer), text="A careful answer.").result
    set_queue(
        **{"review_overlap": 1, "weight_review_demonstration": 100, "weight_write_assistant_reply": 0}
        | {"weight_write_user_reply": 0, "weight_rank_replies": 0}
        | queue
    )
    return message


def test_only_reviews_of_the_current_text_count(alice):
    """accept, edit, accept, edit to garbage, reject: rejected (earlier verdicts were on other text), and a
    reviewer who judged an earlier text may judge the new one (no 500 from the unique constraint)."""
    (first,) = reviewers(1)
    message = demonstration(alice)
    review(first, "accept")
    message.refresh_from_db()
    assert message.review_status == "accepted"
    services.message_edit(message=message, user=alice, text="A careful answer, improved.")
    review(first, "accept")  # the same reviewer, the new text
    message.refresh_from_db()
    assert (message.review_status, message.revision) == ("accepted", 2)
    services.message_edit(message=message, user=alice, text="garbage")
    review(first, "reject", "it is garbage now")
    message.refresh_from_db()
    assert message.review_status == "rejected"
    assert list(Review.objects.filter(message=message).values_list("revision", "decision")) == [
        (1, "accept"),
        (2, "accept"),
        (3, "reject"),
    ]


def test_an_edit_during_a_review_withdraws_it_and_the_old_verdict_does_not_count(alice):
    (first,) = reviewers(1)
    message = demonstration(alice)
    lease = task_lease_next(user=first)
    services.message_edit(message=message, user=alice, text="Changed while under review.")
    with pytest.raises(services.SubmissionRefused):
        services.review_submit(assignment=lease, decision="accept")
    assert not Review.objects.exists()
    open_reviews = Task.objects.filter(kind=TaskKind.REVIEW_DEMONSTRATION, target_message=message, status="open")
    assert open_reviews.count() == 1 and open_reviews.get().payload["revision"] == 2


def test_a_rejected_replys_rewrite_goes_to_someone_else(alice, bob):
    (judge,) = reviewers(1)
    message = demonstration(alice, weight_write_assistant_reply=1)
    review(judge, "reject", "wrong")
    rewrite = Task.objects.get(kind=TaskKind.WRITE_ASSISTANT_REPLY, parent_message=message.parent, status="open")
    assert rewrite.payload["not_for"] == [alice.pk]
    assert task_lease_next(user=alice) is None, "not back to its writer"
    assert task_lease_next(user=bob).task == rewrite


def test_a_content_skip_keeps_the_whole_conversation_away(alice, bob):
    set_queue(weight_rank_replies=1, weight_write_assistant_reply=1)
    prompt = make_prompt()
    writer = UserFactory(username="writer")
    branch = services.message_create(
        conversation=prompt.conversation,
        parent=prompt,
        role=Role.ASSISTANT,
        text="A reply.",
        origin="human",
        author=writer,
    )
    follow_up = services.message_create(
        conversation=prompt.conversation, parent=branch, role=Role.USER, text="And then?", origin="human", author=writer
    )
    first = services.task_create(kind=TaskKind.WRITE_ASSISTANT_REPLY, parent_message=prompt)
    other_branch = services.task_create(kind=TaskKind.WRITE_ASSISTANT_REPLY, parent_message=follow_up)
    assignment = task_lease_next(user=alice)
    assert assignment.task in (first, other_branch)
    services.assignment_skip(assignment=assignment, reason=services.CONTENT_SKIP_REASON)
    assert task_lease_next(user=alice) is None, "no other branch of the skipped conversation"
    assert task_lease_next(user=bob) is not None, "others still get it"


def test_an_ordinary_skip_keeps_only_that_task_away(alice):
    prompt = make_prompt()
    services.task_create(kind=TaskKind.WRITE_ASSISTANT_REPLY, parent_message=prompt)
    services.assignment_skip(assignment=task_lease_next(user=alice), reason="The task is unclear")
    other = make_reply_task()
    assert task_lease_next(user=alice).task == other


def test_a_report_keeps_the_conversation_and_its_ranking_tasks_away(alice, bob):
    set_queue(reports_to_cancel=5)
    ranking = make_rank_task(k=2, overlap=2)
    reply = services.task_create(kind=TaskKind.WRITE_ASSISTANT_REPLY, parent_message=ranking.parent_message)
    first = task_lease_next(user=alice)
    services.assignment_report(assignment=first, reason="harmful")
    assert task_lease_next(user=alice) is None
    assert {task_lease_next(user=bob).task} <= {ranking, reply}


def test_reports_hide_a_conversation_from_everyone_until_an_admin_decides(client, alice, bob, charlie, admin_user):
    """Issue 15, item 6: after `reports_to_cancel` reports nobody gets a task on it and nothing in it trains; the
    ops page shows it; Keep puts its tasks back, Remove keeps it out for good."""
    from django.urls import reverse

    from labeling.models import Conversation
    from training_jobs import datasets

    set_queue(reports_to_cancel=2)
    ranking = make_rank_task(k=2, overlap=3)
    conversation = ranking.conversation
    for labeler in (alice, bob):
        assignment = task_lease_next(user=labeler)
        assert assignment.task == ranking
        services.assignment_report(assignment=assignment, reason="harmful", note="not for labelers")
    # Another task on the same conversation, created after the reports: hidden too.
    other = services.task_create(kind=TaskKind.WRITE_ASSISTANT_REPLY, parent_message=ranking.parent_message)
    conversation.refresh_from_db()
    assert conversation.moderation == Conversation.Moderation.HIDDEN
    assert task_lease_next(user=charlie) is None, "no task on it for anyone, the other one included"
    assert all(p.conversation_id != conversation.pk for p in datasets.build_prompts(minimum=0))

    client.force_login(admin_user)
    page = client.get(reverse("ops:moderation")).content.decode()
    assert 'data-testid="reported-conversation"' in page and "not for labelers" in page
    client.post(reverse("ops:moderate", args=[conversation.pk]), {"decision": "kept"})
    conversation.refresh_from_db()
    assert conversation.moderation == "kept"
    assert task_lease_next(user=charlie).task in (ranking, other), "its tasks are back"

    client.post(reverse("ops:moderate", args=[conversation.pk]), {"decision": "removed"})
    assert not Task.objects.filter(conversation=conversation, status="open").exists()
    assert 'data-testid="moderation-empty"' in client.get(reverse("ops:moderation")).content.decode()
