"""The task queue: who gets which task, leases, overlap, skipping and reporting, routing and the kind mix."""

import datetime as dt
import random

import pytest
from django.core.exceptions import ValidationError
from django.db import connection
from django.urls import reverse
from django.utils import timezone

from labeling import services
from labeling.models import Assignment, Message, QueueSettings, Role, Task, TaskKind
from labeling.services import task_lease_next
from tests.support.factories import MessageFactory, UserFactory
from tests.support.labeling import expire_lease, make_prompt, make_rank_task, make_reply_task, set_queue

pytestmark = pytest.mark.django_db


def test_highest_priority_first(alice):
    low = make_reply_task(priority=0)
    high = make_reply_task(priority=5)
    assert task_lease_next(user=alice).task == high
    assert Task.objects.get(pk=low.pk).assignments.count() == 0


def test_a_held_lease_is_returned_again(alice):
    make_reply_task()
    make_reply_task()
    first = task_lease_next(user=alice)
    assert task_lease_next(user=alice) == first


def test_nothing_when_the_queue_is_empty(alice):
    assert task_lease_next(user=alice) is None


def test_never_a_task_the_labeler_already_did_or_skipped(alice):
    done = make_reply_task()
    skipped = make_reply_task()
    services.reply_submit(assignment=task_lease_next(user=alice), text="a reply")
    services.assignment_skip(assignment=task_lease_next(user=alice), reason="not my field")
    assert {done.pk, skipped.pk} == set(Assignment.objects.filter(labeler=alice).values_list("task", flat=True))
    assert task_lease_next(user=alice) is None


def test_never_a_reply_to_the_labelers_own_message(alice, bob):
    mine = MessageFactory(author=alice)
    services.task_create(kind=TaskKind.WRITE_ASSISTANT_REPLY, parent_message=mine)
    assert task_lease_next(user=alice) is None
    assert task_lease_next(user=bob).task.parent_message == mine


def test_never_a_ranking_that_contains_the_labelers_reply(alice, bob):
    task = make_rank_task(k=3, candidate_author=alice)
    assert task_lease_next(user=alice) is None
    assert task_lease_next(user=bob).task == task


def test_only_reviewers_review_and_never_their_own_demonstration(alice, bob):
    prompt = MessageFactory(author=bob)
    services.task_create(kind=TaskKind.WRITE_ASSISTANT_REPLY, parent_message=prompt)
    lease = task_lease_next(user=alice)
    demonstration = services.reply_submit(assignment=lease, text="Here is how.").result
    review = Task.objects.get(kind=TaskKind.REVIEW_DEMONSTRATION)
    assert review.target_message == demonstration
    assert task_lease_next(user=alice) is None, "alice is not a reviewer"
    assert task_lease_next(user=bob).task == review


def test_a_reviewer_never_reviews_their_own_demonstration(bob):
    prompt = MessageFactory()
    own = MessageFactory(parent=prompt, author=bob, role=Role.ASSISTANT)
    services.task_create(kind=TaskKind.REVIEW_DEMONSTRATION, target_message=own, conversation=own.conversation)
    assert task_lease_next(user=bob) is None
    other_reviewer = UserFactory(username="erin", profile__is_reviewer=True)
    assert task_lease_next(user=other_reviewer).task.target_message == own


def test_a_reserved_task_goes_only_to_its_labeler(alice, bob):
    task = make_reply_task()
    Task.objects.filter(pk=task.pk).update(reserved_for=bob)
    assert task_lease_next(user=alice) is None
    assert task_lease_next(user=bob).task == task


def test_overlap_gives_a_task_to_that_many_labelers_only(alice, bob, charlie):
    task = make_rank_task(k=4, overlap=2)
    assert task_lease_next(user=alice).task == task
    assert task_lease_next(user=bob).task == task
    assert task_lease_next(user=charlie) is None


def test_an_expired_lease_returns_the_slot_to_the_queue(alice, bob):
    task = make_reply_task()
    lease = task_lease_next(user=alice)
    assert task_lease_next(user=bob) is None
    task.refresh_from_db()
    assert task.free_slots_from == lease.lease_expires_at, "busy until the lease ends, not freed early"
    later = timezone.now() + dt.timedelta(minutes=QueueSettings.load().lease_minutes + 1)
    assert task_lease_next(user=bob, now=later).task == task
    assert services.leases_expire(now=later) == 1
    lease.refresh_from_db()
    assert lease.status == Assignment.Status.EXPIRED


def test_a_labeler_whose_lease_expired_can_take_the_task_again(alice):
    task = make_reply_task()
    first = task_lease_next(user=alice)
    later = timezone.now() + dt.timedelta(hours=2)
    services.leases_expire(now=later)
    again = task_lease_next(user=alice, now=later)
    assert again.pk == first.pk and again.task == task and again.status == Assignment.Status.LEASED


def test_submitting_twice_counts_once(alice):
    task = make_reply_task()
    lease = task_lease_next(user=alice)
    first = services.reply_submit(assignment=lease, text="The answer.")
    second = services.reply_submit(assignment=lease, text="The answer.")
    assert first.created and not second.created
    assert second.result == first.result
    task.refresh_from_db()
    assert task.submitted_count == 1 and task.status == Task.Status.DONE
    assert Message.objects.filter(parent=task.parent_message).count() == 1


def test_a_submission_on_an_expired_lease_is_accepted_while_the_slot_is_free(alice):
    task = make_reply_task()
    lease = task_lease_next(user=alice)
    expire_lease(lease)
    result = services.reply_submit(assignment=lease, text="Late but fine.")
    assert result.created
    task.refresh_from_db()
    assert task.status == Task.Status.DONE


def test_a_submission_on_an_expired_lease_is_refused_when_others_filled_the_slot(alice, bob):
    task = make_reply_task()
    lease = task_lease_next(user=alice)
    expire_lease(lease)
    services.reply_submit(assignment=task_lease_next(user=bob), text="Bob's reply.")
    with pytest.raises(services.SubmissionRefused, match="lease on this task expired"):
        services.reply_submit(assignment=lease, text="Alice's late reply.")
    task.refresh_from_db()
    assert task.submitted_count == 1
    assert not Message.objects.filter(text="Alice's late reply.").exists()


def test_saving_a_draft_keeps_the_text_and_extends_the_lease(alice):
    make_reply_task()
    lease = task_lease_next(user=alice)
    before = lease.lease_expires_at
    later = timezone.now() + dt.timedelta(minutes=5)
    saved = services.assignment_save_draft(assignment=lease, draft="half a reply", now=later)
    assert saved.draft == "half a reply" and saved.lease_expires_at > before


def test_saving_a_draft_does_not_revive_an_expired_lease(alice, bob):
    task = make_reply_task()
    lease = task_lease_next(user=alice)
    expire_lease(lease)
    lease.refresh_from_db()
    saved = services.assignment_save_draft(assignment=lease, draft="still typing")
    assert saved.draft == "still typing", "the text is kept"
    assert saved.lease_expires_at == lease.lease_expires_at < timezone.now(), "the lease is not extended"
    assert task_lease_next(user=bob).task == task, "the slot is free for someone else"


def test_the_draft_page_says_when_the_time_on_a_task_ran_out(client, alice):
    make_reply_task()
    lease = task_lease_next(user=alice)
    client.force_login(alice)
    url = reverse("labeling:draft", args=[lease.pk])
    assert "ran out" not in client.post(url, {"text": "first"}).content.decode()
    expire_lease(lease)
    page = client.post(url, {"text": "second"}).content.decode()
    assert "Draft saved" in page and "ran out" in page


def test_a_skip_needs_a_reason(alice):
    make_reply_task()
    with pytest.raises(ValidationError, match="reason"):
        services.assignment_skip(assignment=task_lease_next(user=alice), reason="  ")


def test_reports_take_a_task_out_of_the_queue(alice, bob, charlie):
    set_queue(reports_to_cancel=2)
    task = make_rank_task(k=2, overlap=3)
    services.assignment_report(assignment=task_lease_next(user=alice), reason="spam")
    task.refresh_from_db()
    assert task.status == Task.Status.OPEN
    services.assignment_report(assignment=task_lease_next(user=bob), reason="personal_data", note="a phone number")
    task.refresh_from_db()
    assert task.status == Task.Status.CANCELLED
    assert "personal_data" in task.cancelled_reason and "spam" in task.cancelled_reason
    assert task_lease_next(user=charlie) is None
    with pytest.raises(ValidationError):
        services.assignment_report(assignment=Assignment.objects.get(labeler=alice), reason="boring")


def test_routing_prefers_the_labelers_language_without_starving_others(charlie):
    """charlie works in German: a fresh German task beats a fresh English one, but an English task that has
    waited longer than the language bonus is served first."""
    set_queue(language_bonus_minutes=120, weight_write_user_reply=0)
    english = make_reply_task(language="en")
    german = make_reply_task(language="de")
    assert task_lease_next(user=charlie).task == german
    Task.objects.filter(pk=german.pk).delete()
    german_new = make_reply_task(language="de")
    Task.objects.filter(pk=english.pk).update(created_at=timezone.now() - dt.timedelta(minutes=180))
    other = UserFactory(username="dora", profile__languages=["de"])
    assert task_lease_next(user=other).task == english
    assert task_lease_next(user=charlie).task == german_new


def test_topics_count_too(alice):
    services.labeler_profile_update(user=alice, languages=["en"], topics=["cooking"])
    plain = make_reply_task()
    cooking = make_reply_task(tags=["cooking"])
    Task.objects.filter(pk=plain.pk).update(created_at=timezone.now() - dt.timedelta(minutes=10))
    assert task_lease_next(user=alice).task == cooking


def test_the_kind_mix_follows_the_admin_weights(bob):
    """With every kind available, offers follow the weights; a kind of weight 0 is never offered."""
    set_queue(
        weight_write_prompt=0,
        weight_write_assistant_reply=1,
        weight_write_user_reply=0,
        weight_rank_replies=3,
        weight_review_demonstration=0,
    )
    for _ in range(3):
        services.task_create(kind=TaskKind.WRITE_PROMPT)
        make_reply_task()
        make_rank_task(k=2)
    rng = random.Random(7)
    offered = []
    for i in range(200):
        labeler = UserFactory(username=f"mix{i}")
        assignment = task_lease_next(user=labeler, rng=rng)
        offered.append(assignment.task.kind)
        services.assignment_skip(assignment=assignment, reason="measuring the mix")
    assert TaskKind.WRITE_PROMPT not in offered
    share_rank = offered.count(TaskKind.RANK_REPLIES) / len(offered)
    assert 0.65 < share_rank < 0.85, share_rank


def test_ranking_overlap_share_follows_the_setting():
    set_queue(rank_overlap=2, rank_overlap_fraction=0.2)
    overlaps = [services.ranking_overlap(seed=f"context-{i}") for i in range(2000)]
    assert set(overlaps) == {1, 2}
    assert 0.17 < overlaps.count(2) / len(overlaps) < 0.23
    assert services.ranking_overlap(seed="context-5") == services.ranking_overlap(seed="context-5")


def test_prompt_tasks_are_replenished_to_the_target():
    set_queue(open_prompt_tasks=4)
    assert services.prompt_tasks_replenish() == 4
    assert services.prompt_tasks_replenish() == 0
    assert Task.objects.filter(kind=TaskKind.WRITE_PROMPT, status=Task.Status.OPEN).count() == 4


def test_writing_a_prompt_starts_a_conversation_that_needs_a_reply(alice):
    services.task_create(kind=TaskKind.WRITE_PROMPT)
    lease = task_lease_next(user=alice)
    prompt = services.prompt_submit(
        assignment=lease, text="How do I boil an egg?", language="en", tags=["Cooking"]
    ).result
    assert prompt.depth == 0 and prompt.author == alice and prompt.conversation.tags == ["cooking"]
    follow_up = Task.objects.get(kind=TaskKind.WRITE_ASSISTANT_REPLY)
    assert follow_up.parent_message == prompt and follow_up.tags == ["cooking"]


def test_review_accept_makes_sft_data_and_asks_for_a_user_turn(alice, bob):
    make_reply_task()
    demonstration = services.reply_submit(assignment=task_lease_next(user=alice), text="A fine reply.").result
    services.review_submit(assignment=task_lease_next(user=bob), decision="accept")
    demonstration.refresh_from_db()
    assert demonstration.review_status == Message.ReviewStatus.ACCEPTED
    assert Task.objects.filter(kind=TaskKind.WRITE_USER_REPLY, parent_message=demonstration).exists()


def test_review_reject_needs_a_reason_and_asks_for_a_new_reply(alice, bob):
    task = make_reply_task()
    demonstration = services.reply_submit(assignment=task_lease_next(user=alice), text="Wrong.").result
    lease = task_lease_next(user=bob)
    with pytest.raises(ValidationError, match="why"):
        services.review_submit(assignment=lease, decision="reject", reason="")
    services.review_submit(assignment=lease, decision="reject", reason="It does not answer the question.")
    demonstration.refresh_from_db()
    assert demonstration.review_status == Message.ReviewStatus.REJECTED
    rewrite = Task.objects.filter(kind=TaskKind.WRITE_ASSISTANT_REPLY, status=Task.Status.OPEN).get()
    assert rewrite.parent_message == task.parent_message


def test_editing_is_possible_until_used_in_training(alice, bob):
    make_reply_task()
    demonstration = services.reply_submit(assignment=task_lease_next(user=alice), text="First try.").result
    services.review_submit(assignment=task_lease_next(user=bob), decision="accept")
    edited = services.message_edit(message=demonstration, user=alice, text="Second try.")
    assert edited.text == "Second try." and edited.review_status == Message.ReviewStatus.PENDING
    assert Task.objects.filter(kind=TaskKind.REVIEW_DEMONSTRATION, target_message=edited, status="open").exists()
    with pytest.raises(services.SubmissionRefused, match="own work"):
        services.message_edit(message=demonstration, user=bob, text="Bob's version")
    services.mark_used_in_training(message_ids=[demonstration.pk])
    with pytest.raises(services.SubmissionRefused, match="already used to train"):
        services.message_edit(message=demonstration, user=alice, text="Third try.")


def test_a_busy_tasks_cached_free_time_follows_its_leases(alice, bob):
    task = make_reply_task()
    lease = task_lease_next(user=alice)
    task.refresh_from_db()
    assert task.free_slots_from == lease.lease_expires_at, "all slots taken until the lease expires"
    services.assignment_skip(assignment=lease, reason="not for me")
    task.refresh_from_db()
    assert task.free_slots_from is None
    services.reply_submit(assignment=task_lease_next(user=bob), text="Done.")
    task.refresh_from_db()
    assert task.status == Task.Status.DONE and task.free_slots_from is None


def _sequential_scans(tables) -> dict[str, int]:
    """Sequential scans of each table so far in this transaction."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT relname, seq_scan FROM pg_stat_xact_user_tables WHERE relname = ANY (%s)", [tables])
        return dict(cursor.fetchall())


def test_the_lease_walks_indexes_even_when_the_statistics_say_the_tables_are_empty(alice, bob):
    """Right after an import the statistics say no assignment exists. The lease function keeps one plan per
    query for the life of a connection; made from such statistics, those plans read the whole assignment table
    at every call, however many leases it held by then (migration 0012)."""
    for _ in range(3):
        make_reply_task()
    tables = ["labeling_assignment", "labeling_task", "labeling_message", "labeling_taskcandidate"]
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE labeling_assignment, labeling_taskcandidate")  # both empty
    before = _sequential_scans(tables)
    leases = [services.task_lease_next_id(user=labeler) for labeler in (alice, bob, alice)]
    assert None not in leases and leases[0] == leases[2] != leases[1]
    assert _sequential_scans(tables) == before


def test_one_submit_service_dispatches_on_the_task_kind(alice):
    make_reply_task()
    assignment = task_lease_next(user=alice)
    with pytest.raises(ValidationError, match="takes text, not decision"):
        services.assignment_submit(assignment=assignment, decision="accept")
    result = services.assignment_submit(assignment=assignment, text="A reply.", time_spent_ms=1200)
    assert result.created and result.result.text == "A reply." and result.assignment.time_spent_ms == 1200
    assert result.result.role == Role.ASSISTANT


def test_the_queue_spreads_a_labelers_work_over_conversations(alice):
    """After a submission on a conversation, the next task comes from another one, though older work of that
    conversation waits (seen: a labeler served the same conversation 7 times running); with nothing else free,
    the conversation's own tasks are still served."""
    prompt = make_prompt()
    first = services.task_create(kind=TaskKind.WRITE_ASSISTANT_REPLY, parent_message=prompt)
    second = services.task_create(kind=TaskKind.WRITE_ASSISTANT_REPLY, parent_message=prompt)
    elsewhere = make_reply_task()
    assert task_lease_next(user=alice).task == first
    services.assignment_submit(assignment=Assignment.objects.get(task=first, labeler=alice), text="One reply.")
    assert task_lease_next(user=alice).task == elsewhere  # `second` is older, but on the same conversation
    services.assignment_submit(assignment=Assignment.objects.get(task=elsewhere, labeler=alice), text="Another.")
    assert task_lease_next(user=alice).task == second


def test_with_only_the_last_conversation_left_its_tasks_are_still_served(alice):
    prompt = make_prompt()
    first = services.task_create(kind=TaskKind.WRITE_ASSISTANT_REPLY, parent_message=prompt)
    second = services.task_create(kind=TaskKind.WRITE_ASSISTANT_REPLY, parent_message=prompt)
    assert task_lease_next(user=alice).task == first
    services.assignment_submit(assignment=Assignment.objects.get(task=first, labeler=alice), text="One reply.")
    assert task_lease_next(user=alice).task == second
