"""Submitting a ranking: the order with ties, flags, the rating, and every way the input can be wrong."""

import pytest
from django.core.exceptions import ValidationError

from labeling import services
from labeling.models import Ranking
from labeling.services import RankingInput, display_order
from tests.support.labeling import make_rank_task

pytestmark = pytest.mark.django_db


@pytest.fixture
def leased(alice):
    make_rank_task(k=4)
    return services.task_lease_next(user=alice)


def ids(assignment):
    return display_order(assignment.task, assignment.labeler_id)


def submit(assignment, order, **kwargs):
    return services.ranking_submit(
        assignment=assignment, ranking=RankingInput(order=order, flags=kwargs.pop("flags", {}), **kwargs)
    )


def test_a_ranking_keeps_its_order_ties_flags_and_rating(leased):
    a, b, c, d = ids(leased)
    result = submit(leased, [[c], [a, d], [b]], flags={b: ["hallucination", "harmful"]}, quality_rating=5)
    ranking = Ranking.objects.get(pk=result.result.pk)
    assert ranking.ordered_message_ids == [[c], sorted([a, d]), [b]]
    assert {e.message_id: e.rank for e in ranking.entries.all()} == {c: 1, a: 2, d: 2, b: 3}
    assert ranking.entries.get(message_id=b).flags == ["hallucination", "harmful"]
    assert ranking.quality_rating == 5 and not ranking.order_untouched


def test_the_shown_order_needs_confirming(leased):
    shown = [[i] for i in ids(leased)]
    with pytest.raises(ValidationError) as error:
        submit(leased, shown)
    assert error.value.error_dict["order"][0].code == "untouched"
    result = submit(leased, shown, confirm_untouched=True)
    assert result.result.order_untouched


def test_all_unacceptable_needs_no_confirmation(leased):
    shown = [[i] for i in ids(leased)]
    assert submit(leased, shown, all_unacceptable=True).result.all_unacceptable


def test_each_labeler_sees_their_own_shuffle(leased, bob):
    orders = {tuple(display_order(leased.task, labeler)) for labeler in range(1, 30)}
    assert len(orders) > 1
    assert display_order(leased.task, 7) == display_order(leased.task, 7)


@pytest.mark.parametrize(
    ("make_order", "message"),
    [
        (lambda a, b, c, d: [[a], [b], [c]], "misses candidates"),
        (lambda a, b, c, d: [[a], [b], [c], [d], [a]], "appears twice"),
        (lambda a, b, c, d: [[a], [b], [c], [d], [99999]], "Not candidates of this task: 99999"),
        (lambda a, b, c, d: [[a], [], [b, c, d]], "list of groups"),
        (lambda a, b, c, d: [[a], [b], [c], ["d"]], "must be integers"),
        (lambda a, b, c, d: {"best": a}, "list of groups"),
    ],
)
def test_a_malformed_order_is_refused_with_a_clear_message(leased, make_order, message):
    with pytest.raises(ValidationError, match=message):
        submit(leased, make_order(*ids(leased)))
    assert not Ranking.objects.exists()


def test_flags_and_rating_are_checked(leased):
    a, b, c, d = ids(leased)
    order = [[b], [a], [c], [d]]
    with pytest.raises(ValidationError, match="Unknown flag"):
        submit(leased, order, flags={a: ["rude"]})
    with pytest.raises(ValidationError, match="not a candidate"):
        submit(leased, order, flags={12345: ["harmful"]})
    with pytest.raises(ValidationError, match="1 to 7"):
        submit(leased, order, quality_rating=8)


def test_candidates_from_another_task_are_refused(leased):
    other = make_rank_task(k=2)
    foreign = list(other.task_candidates.values_list("message_id", flat=True))
    a, b, c, d = ids(leased)
    with pytest.raises(ValidationError, match="Not candidates of this task"):
        submit(leased, [[a], [b], [c], [d], [foreign[0]]])


def test_a_ranking_can_be_edited_until_used(leased, alice):
    a, b, c, d = ids(leased)
    ranking = submit(leased, [[a], [b], [c], [d]], confirm_untouched=True).result
    services.ranking_edit(ranking=ranking, user=alice, new=RankingInput(order=[[d, c], [b], [a]], flags={}))
    ranking.refresh_from_db()
    assert ranking.ordered_message_ids == [sorted([c, d]), [b], [a]]
    services.mark_used_in_training(ranking_ids=[ranking.pk])
    with pytest.raises(services.SubmissionRefused):
        services.ranking_edit(ranking=ranking, user=alice, new=RankingInput(order=[[a], [b], [c], [d]], flags={}))


def test_task_creation_checks_the_candidates():
    task = make_rank_task(k=2)
    other = make_rank_task(k=2)
    with pytest.raises(ValidationError, match="2 to 9 candidates"):
        services.task_create(kind="rank_replies", parent_message=task.parent_message, candidates=[])
    with pytest.raises(ValidationError, match="reply to the task's context"):
        services.task_create(
            kind="rank_replies",
            parent_message=task.parent_message,
            candidates=[*task.candidates.all(), *other.candidates.all()],
        )
