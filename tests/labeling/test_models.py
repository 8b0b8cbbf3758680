"""The conversation tree and task constraints, against real Postgres."""

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction

from labeling.models import Message, Role, Task, TaskKind
from labeling.selectors import message_thread
from labeling.services import conversation_create, message_create
from tests.support.factories import ModelVersionFactory, UserFactory

pytestmark = pytest.mark.django_db


def write(conversation, parent, role, text, author):
    return message_create(
        conversation=conversation, parent=parent, role=role, text=text, origin=Message.Origin.HUMAN, author=author
    )


@pytest.fixture
def tree(alice):
    """user -> assistant (two alternatives) -> user"""
    conversation = conversation_create(created_by=alice)
    prompt = write(conversation, None, Role.USER, "What is RLHF?", alice)
    reply_a = write(conversation, prompt, Role.ASSISTANT, "Reinforcement learning from human feedback.", alice)
    reply_b = write(conversation, prompt, Role.ASSISTANT, "A way to fine-tune models on preferences.", alice)
    follow_up = write(conversation, reply_a, Role.USER, "Who invented it?", alice)
    return conversation, prompt, reply_a, reply_b, follow_up


def test_siblings_are_alternatives_and_depth_follows_the_parent(tree):
    conversation, prompt, reply_a, reply_b, follow_up = tree
    assert [m.pk for m in prompt.children.order_by("pk")] == [reply_a.pk, reply_b.pk]
    assert (prompt.depth, reply_a.depth, reply_b.depth, follow_up.depth) == (0, 1, 1, 2)
    assert [m.pk for m in message_thread(follow_up)] == [prompt.pk, reply_a.pk, follow_up.pk]


def test_a_written_reply_waits_for_review_and_a_prompt_does_not(tree):
    _, prompt, reply_a, _, _ = tree
    assert reply_a.review_status == Message.ReviewStatus.PENDING
    assert prompt.review_status == Message.ReviewStatus.NOT_REVIEWED


def test_service_refuses_a_parent_from_another_conversation(tree, alice):
    _, prompt, _, _, _ = tree
    other = conversation_create(created_by=alice)
    with pytest.raises(ValidationError, match="belongs to conversation"):
        write(other, prompt, Role.ASSISTANT, "hi", alice)


def test_database_refuses_a_parent_from_another_conversation(tree, alice):
    """Even a write that bypasses the service cannot mix two trees: a composite foreign key stops it."""
    _, prompt, _, _, _ = tree
    other = conversation_create(created_by=alice)
    with pytest.raises(IntegrityError, match="message_parent_in_same_conversation"), transaction.atomic():
        Message.objects.create(
            conversation=other, parent=prompt, depth=1, role=Role.ASSISTANT, text="x", origin="human", author=alice
        )


def test_moving_a_message_to_another_conversation_is_refused(tree, alice):
    _, _, reply_a, _, follow_up = tree
    other = conversation_create(created_by=alice)
    with pytest.raises(IntegrityError), transaction.atomic():
        Message.objects.filter(pk=follow_up.pk).update(conversation=other)


def test_one_root_per_conversation(tree, alice):
    conversation = tree[0]
    with pytest.raises(ValidationError, match="already has a first message"):
        write(conversation, None, Role.USER, "second root", alice)
    with pytest.raises(IntegrityError, match="message_one_root_per_conversation"), transaction.atomic():
        Message.objects.create(
            conversation=conversation, depth=0, role=Role.USER, text="x", origin="human", author=alice
        )


@pytest.mark.parametrize(
    ("parent_role", "child_role"),
    [(None, Role.ASSISTANT), (Role.USER, Role.USER), (Role.ASSISTANT, Role.ASSISTANT), (Role.USER, Role.SYSTEM)],
)
def test_roles_must_alternate(alice, parent_role, child_role):
    conversation = conversation_create(created_by=alice)
    parent = None
    if parent_role == Role.USER:
        parent = write(conversation, None, Role.USER, "q", alice)
    elif parent_role == Role.ASSISTANT:
        parent = write(conversation, write(conversation, None, Role.USER, "q", alice), Role.ASSISTANT, "a", alice)
    with pytest.raises(ValidationError) as error:
        write(conversation, parent, child_role, "text", alice)
    assert "role" in error.value.message_dict


def test_a_system_message_may_open_a_conversation(alice):
    conversation = conversation_create(created_by=alice)
    system = write(conversation, None, Role.SYSTEM, "You are terse.", alice)
    assert write(conversation, system, Role.USER, "hi", alice).depth == 1


def test_a_person_cannot_write_an_empty_message(alice):
    with pytest.raises(ValidationError, match="empty"):
        write(conversation_create(created_by=alice), None, Role.USER, "   ", alice)


def test_depth_must_match_having_a_parent(tree, alice):
    conversation, prompt, *_ = tree
    with pytest.raises(IntegrityError, match="message_depth_matches_parent"), transaction.atomic():
        Message.objects.create(
            conversation=conversation, parent=prompt, depth=0, role="assistant", text="x", origin="human", author=alice
        )


def test_a_sampled_message_records_its_model_and_parameters(tree):
    conversation, prompt, *_ = tree
    policy = ModelVersionFactory()
    with pytest.raises(IntegrityError, match="message_model_origin_has_version_and_params"), transaction.atomic():
        Message.objects.create(
            conversation=conversation, parent=prompt, depth=1, role="assistant", text="x", origin="model"
        )
    sampled = message_create(
        conversation=conversation,
        parent=prompt,
        role=Role.ASSISTANT,
        text="sampled",
        origin=Message.Origin.MODEL,
        model_version=policy,
        sampling_params={"temperature": 1.0, "top_p": 0.9, "seed": 3},
    )
    assert sampled.model_version == policy and sampled.sampling_params["seed"] == 3
    assert sampled.review_status == Message.ReviewStatus.NOT_REVIEWED


def test_a_human_message_needs_an_author(tree):
    conversation, prompt, *_ = tree
    with pytest.raises(IntegrityError, match="message_human_origin_has_author"), transaction.atomic():
        Message.objects.create(
            conversation=conversation, parent=prompt, depth=1, role="assistant", text="x", origin="human"
        )


def test_task_constraints(tree):
    conversation, prompt, *_ = tree
    with pytest.raises(IntegrityError, match="task_reply_and_rank_have_context"), transaction.atomic():
        Task.objects.create(kind=TaskKind.RANK_REPLIES)
    with pytest.raises(IntegrityError, match="task_write_prompt_starts_fresh"), transaction.atomic():
        Task.objects.create(kind=TaskKind.WRITE_PROMPT, conversation=conversation)
    with pytest.raises(IntegrityError, match="task_review_has_target"), transaction.atomic():
        Task.objects.create(kind=TaskKind.REVIEW_DEMONSTRATION, conversation=conversation)
    with pytest.raises(IntegrityError, match="task_submitted_le_overlap"), transaction.atomic():
        Task.objects.create(kind=TaskKind.WRITE_PROMPT, overlap=1, submitted_count=2)
    with pytest.raises(IntegrityError, match="task_done_means_all_submitted"), transaction.atomic():
        Task.objects.create(kind=TaskKind.WRITE_PROMPT, overlap=2, submitted_count=1, status=Task.Status.DONE)
    task = Task.objects.create(kind=TaskKind.WRITE_ASSISTANT_REPLY, conversation=conversation, parent_message=prompt)
    assert task.remaining == 1


def test_deleting_what_a_task_points_to_finds_the_tasks_through_an_index(tree, alice):
    """Four foreign keys of tasks are indexed only where set (migration 0015); deleting a user, message or model
    version looks its tasks up by value, which those partial indexes must serve. A table scan instead would read
    every task at each such deletion."""
    conversation, prompt, *_ = tree
    Task.objects.create(kind=TaskKind.WRITE_ASSISTANT_REPLY, conversation=conversation, parent_message=prompt)
    lookups = {
        "task_reserved_for": Task.objects.filter(reserved_for__in=[alice]),
        "task_created_by": Task.objects.filter(created_by__in=[alice]),
        "task_target_message": Task.objects.filter(target_message__in=[prompt]),
        "task_model_version": Task.objects.filter(model_version__in=[ModelVersionFactory()]),
    }
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")  # a table this small would otherwise be read whole
        for index, lookup in lookups.items():
            plan = lookup.explain()
            assert f"Index Scan using {index} " in plan or f"Bitmap Index Scan on {index}" in plan, plan


def test_pseudonym_is_stable_and_hides_the_name(alice):
    profile = alice.labeler_profile
    assert profile.pseudonym == profile.pseudonym
    assert "alice" not in profile.pseudonym
    assert profile.pseudonym != UserFactory(username="dora").labeler_profile.pseudonym
