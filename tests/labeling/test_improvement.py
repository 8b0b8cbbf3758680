"""Improve the best: a labeler's own better reply on a ranking task is a demonstration, reviewed like any, and once
accepted a preference over every candidate (training data, the loop's count, exports)."""

import json

import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse

from labeling import services, splits
from labeling.exporting import ExportFilters, preference_rows, ranking_rows
from labeling.models import Conversation, Message, Ranking, Task, TaskKind
from labeling.selectors import display_order
from labeling.services import RankingInput
from tests.support.api import api
from tests.support.factories import UserFactory
from tests.support.labeling import handle_order, make_rank_task
from training_jobs import datasets, loop

pytestmark = pytest.mark.django_db
BETTER = "A better reply, written by the labeler: it answers the question and then asks one back?"


def rank(assignment, order=None, improvement="", **kwargs):
    order = order or [list(display_order(assignment.task, assignment.labeler_id))]  # all tied
    return services.ranking_submit(
        assignment=assignment, ranking=RankingInput(order=order, flags={}, improvement=improvement, **kwargs)
    )


def review(message, decision, reason=""):
    reviewer = UserFactory(profile__is_reviewer=True)
    assignment = services.task_lease_next(user=reviewer)
    assert assignment.task.kind == TaskKind.REVIEW_DEMONSTRATION and assignment.task.target_message_id == message.pk
    services.review_submit(assignment=assignment, decision=decision, reason=reason)
    message.refresh_from_db()


@pytest.fixture
def leased(alice):
    task = make_rank_task(k=4, texts=["First reply.", "Second reply.", "Third reply.", "Fourth reply."])
    Conversation.objects.filter(pk=task.conversation_id).update(split=splits.TRAIN)  # not held out
    return services.task_lease_next(user=alice)


def test_an_improvement_is_a_demonstration_under_the_same_context_sent_to_review(leased, alice):
    best = display_order(leased.task, alice.pk)[2]
    others = [i for i in display_order(leased.task, alice.pk) if i != best]
    ranking = rank(leased, [[best], others], improvement=BETTER).result
    improvement = ranking.improvement
    assert improvement.text == BETTER and improvement.parent_id == leased.task.parent_message_id
    assert improvement.role == "assistant" and improvement.origin == Message.Origin.HUMAN
    assert improvement.author == alice and improvement.review_status == Message.ReviewStatus.PENDING
    # It started from the reply ranked best: the draft figures say how much of that the labeler changed.
    assert improvement.draft_model_version_id == leased.task.model_version_id
    assert 0 < improvement.draft_edit_ratio <= 1
    assert Task.objects.filter(kind=TaskKind.REVIEW_DEMONSTRATION, target_message=improvement).exists()


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("Second reply.", "the same as one of the replies"),
        ("  Second   reply. ", "the same as one of the replies"),
        ("bad \x00 byte", "text"),
        ("x" * 20_001, "limit"),
    ],
)
def test_an_improvement_that_is_not_one_is_refused_and_nothing_is_stored(leased, text, phrase):
    with pytest.raises(ValidationError, match=phrase) as error:
        rank(leased, improvement=text)
    assert "improvement" in error.value.error_dict
    assert not Ranking.objects.exists() and not Message.objects.filter(origin=Message.Origin.HUMAN, role="assistant")


def test_the_gates_blind_comparisons_take_no_improvement(leased):
    Task.objects.filter(pk=leased.task_id).update(payload={"evaluation": 1})
    leased.task.refresh_from_db()
    with pytest.raises(ValidationError, match="promotion gate"):
        rank(leased, improvement=BETTER)


def test_an_all_tied_ranking_counts_and_trains_once_its_improvement_is_accepted(leased):
    ranking = rank(leased, improvement=BETTER).result
    assert loop.new_rankings() == 0 and loop.tied_rankings()["all_tied"] == 1  # pending review: no pair yet
    assert datasets.build_rankings(minimum_train=0, minimum_validation=0).train == []
    review(ranking.improvement, "accept")
    assert loop.new_rankings() == 1 and loop.tied_rankings()["all_tied"] == 0
    data = datasets.build_rankings(minimum_train=0, minimum_validation=0)
    (example,) = data.train + data.validation
    assert example.candidates[0] == BETTER and example.candidate_ids[0] == ranking.improvement_id
    assert example.ranks == [1, 2, 2, 2, 2]  # better than every candidate, which stay tied with each other
    assert len(example.pairs) == 4
    # And it is an accepted demonstration: SFT trains on it.
    sft = datasets.build_sft(minimum_train=0, minimum_validation=0)
    assert ranking.improvement_id in [e.message_id for e in sft.train + sft.validation]


def test_an_improvement_ranks_above_an_ordered_ranking_too(leased):
    a, b, c, d = display_order(leased.task, leased.labeler_id)
    ranking = rank(leased, [[c], [a, b], [d]], improvement=BETTER).result
    review(ranking.improvement, "accept")
    data = datasets.build_rankings(minimum_train=0, minimum_validation=0)
    (example,) = data.train + data.validation
    assert dict(zip(example.candidate_ids, example.ranks)) == {ranking.improvement_id: 1, c: 2, a: 3, b: 3, d: 4}


def test_a_rejected_improvement_teaches_nothing_and_asks_nobody_to_write_the_reply_again(leased):
    ranking = rank(leased, improvement=BETTER).result
    review(ranking.improvement, "reject", "It invents a fact.")
    assert ranking.improvement.review_status == Message.ReviewStatus.REJECTED
    assert loop.new_rankings() == 0
    assert not Task.objects.filter(kind=TaskKind.WRITE_ASSISTANT_REPLY, status=Task.Status.OPEN).exists()


def test_exports_carry_an_accepted_improvement_as_chosen(leased):
    a, b, c, d = display_order(leased.task, leased.labeler_id)
    ranking = rank(leased, [[c], [a, b, d]], improvement=BETTER).result
    filters = ExportFilters(include_imported=True)
    assert all(not row.get("improvement") for row in preference_rows(filters))
    assert next(ranking_rows(filters))["improvement"] is None
    review(ranking.improvement, "accept")
    rows = list(preference_rows(filters))
    improved = [r for r in rows if r.get("improvement")]
    assert len(rows) == 3 + 4 and len(improved) == 4
    assert all(r["chosen"][0]["content"] == BETTER for r in improved)
    assert {r["rejected"][0]["content"] for r in improved} == {
        "First reply.",
        "Second reply.",
        "Third reply.",
        "Fourth reply.",
    }
    assert next(ranking_rows(filters))["improvement"] == BETTER


def test_an_improvement_through_the_api(alice):
    make_rank_task(k=3)
    client = api(alice)
    assignment = client.post("/api/v1/tasks/next/").json()["assignment"]
    ids = [c["id"] for c in assignment["candidates"]]
    url = f"/api/v1/assignments/{assignment['id']}/submit/"
    same = client.post(url, {"order": [ids], "improvement": assignment["candidates"][0]["content"]}, format="json")
    assert same.status_code == 400 and "improvement" in same.json()
    response = client.post(url, {"order": [ids], "improvement": BETTER}, format="json")
    assert response.status_code == 201, response.content
    assert Ranking.objects.get().improvement.text == BETTER


def test_an_improvement_through_the_page_and_its_error_keeps_the_text(client, alice):
    task = make_rank_task(k=3, texts=["One.", "Two.", "Three."])
    client.force_login(alice)
    work_url = client.get(reverse("labeling:next")).url
    page = client.get(work_url).content.decode()
    assert 'data-testid="improve"' in page and 'data-text="One."' in page
    a, b, c = display_order(task, alice.pk)
    order = json.dumps(handle_order(task, alice, [[b], [a, c]]))
    response = client.post(work_url, {"order": order, "quality_rating": "3", "improvement": "Two."})
    page = response.content.decode()
    assert response.status_code == 422 and 'data-testid="improvement-error"' in page and ">Two.</textarea>" in page
    response = client.post(work_url, {"order": order, "quality_rating": "3", "improvement": BETTER})
    assert response.status_code == 200 and "Saved." in response.content.decode()
    assert Ranking.objects.get(labeler=alice).improvement.text == BETTER


def test_the_reviewer_sees_the_replies_an_improvement_should_beat(client, leased, bob):
    a, b, c, d = display_order(leased.task, leased.labeler_id)
    ranking = rank(leased, [[c], [a, b], [d]], improvement=BETTER).result
    reviewer = UserFactory(username="rosa", profile__is_reviewer=True)
    client.force_login(reviewer)
    page = client.get(client.get(reverse("labeling:next")).url).content.decode()
    assert "The improvement to review" in page and 'data-testid="improved-from"' in page
    text = {i: Message.objects.get(pk=i).text for i in (a, c, d)}
    assert page.index(text[c]) < page.index(text[a]) < page.index(text[d]), "in the labeler's order"
    assert BETTER in page
    client.force_login(leased.labeler)
    mine = client.get(reverse("labeling:mine")).content.decode()
    assert "Improvement of the best reply" in mine and f'data-testid="ranking-improvement-{ranking.pk}"' in mine


def test_a_refused_ranking_comes_back_marked_as_rearranged(client, alice):
    task = make_rank_task(k=3)
    client.force_login(alice)
    work_url = client.get(reverse("labeling:next")).url
    a, b, c = display_order(task, alice.pk)
    rearranged = json.dumps(handle_order(task, alice, [[c], [a], [b]]))
    page = client.post(work_url, {"order": rearranged}).content.decode()  # no rating: refused
    assert "Rate the overall quality" in page and 'data-touched="true"' in page
    shown = json.dumps(handle_order(task, alice, [[a], [b], [c]]))
    assert 'data-touched="true"' not in client.post(work_url, {"order": shown}).content.decode()
