"""Never stall in silence: the ops overview (and the API) say when the ranking pool cannot reach the reward-model
threshold, with the numbers, and offer what can be done: import prompts, train on what there is (recorded as a
decision), lower the threshold."""

import pytest
from django.contrib.admin.models import LogEntry
from django.urls import reverse

from labeling import services as labeling_services
from labeling import splits
from labeling.models import Message, Role, Task, TaskKind
from labeling.services import RankingInput
from tests.support.api import api
from tests.support.factories import ConversationFactory, MessageFactory
from tests.support.labeling import set_queue
from tests.support.training import set_loop
from training_jobs.models import LoopSettings, TrainingRun
from training_jobs.selectors import pool_outlook

pytestmark = pytest.mark.django_db


@pytest.fixture
def loop_settings(settings):
    settings.SAMPLING_RESAMPLE_TIED = 0
    settings.TRAINING_MIN_RANKINGS = 1
    set_queue(rank_overlap_fraction=0)
    return settings


def contexts(n):
    return [MessageFactory(conversation=ConversationFactory(split=splits.TRAIN), text=f"prompt {i}") for i in range(n)]


def ranked(context, policy, labeler, *, tied: bool):
    """A ranking task of `policy`'s samples of `context`, ranked by `labeler`: all tied, or the first best."""
    candidates = [
        labeling_services.message_create(
            conversation=context.conversation,
            parent=context,
            role=Role.ASSISTANT,
            text=f"reply {i} to {context.pk}",
            origin=Message.Origin.MODEL,
            model_version=policy,
            sampling_params={"temperature": 1.0},
        )
        for i in range(3)
    ]
    task = labeling_services.task_create(
        kind=TaskKind.RANK_REPLIES, parent_message=context, candidates=candidates, model_version=policy
    )
    assignment = labeling_services.task_lease_next(user=labeler)
    assert assignment.task_id == task.pk
    ids = [c.pk for c in candidates]
    order = [ids] if tied else [ids[:1], ids[1:]]
    labeling_services.ranking_submit(assignment=assignment, ranking=RankingInput(order=order, flags={}))
    labeler.labeler_profile.last_conversation = None
    labeler.labeler_profile.save()
    return task


def test_nothing_left_to_rank_is_a_stall_with_the_numbers(tiny_policy, loop_settings, alice):
    set_loop(rm_threshold=5)
    first, second, third = contexts(3)
    ranked(first, tiny_policy, alice, tied=False)
    ranked(second, tiny_policy, alice, tied=True)
    ranked(third, tiny_policy, alice, tied=True)
    outlook = pool_outlook()
    assert (outlook["have"], outlook["needed"], outlook["prompts"], outlook["spent"]) == (1, 4, 3, 3)
    assert (outlook["fresh"], outlook["resample"], outlook["open_tasks"]) == (0, 0, 0)
    assert outlook["stalled"] and outlook["short"] and outlook["can_train_now"]
    assert (
        "1 of 5 new rankings give pairs" in outlook["sentence"]
        and "waits until new prompts arrive" in outlook["sentence"]
    )


def test_a_tied_context_waiting_for_a_re_sample_is_not_a_stall(tiny_policy, loop_settings, alice):
    loop_settings.SAMPLING_RESAMPLE_TIED = 1
    set_loop(rm_threshold=2)
    (context,) = contexts(1)
    ranked(context, tiny_policy, alice, tied=True)
    outlook = pool_outlook()
    assert outlook["resample"] == 1 and not outlook["stalled"]
    assert outlook["tie_share"] == 1.0 and outlook["expected"] == 0 and outlook["short"]
    assert "100% of the latest 1 ranking tied" in outlook["sentence"]


def test_enough_fresh_prompts_at_the_tie_share_give_no_warning(tiny_policy, loop_settings, alice):
    set_loop(rm_threshold=5)
    first, second, *_ = contexts(12)
    ranked(first, tiny_policy, alice, tied=False)
    ranked(second, tiny_policy, alice, tied=True)
    outlook = pool_outlook()
    assert outlook["fresh"] == 10 and outlook["expected"] == 5.0  # 10 fresh contexts at a 50% tie share
    assert not outlook["short"] and outlook["sentence"] == ""
    set_loop(rm_threshold=7)
    assert pool_outlook()["short"]


def test_the_overview_offers_what_can_be_done_and_train_now_records_the_decision(
    client, tiny_policy, loop_settings, alice, admin_user
):
    set_loop(rm_threshold=5)
    first, second = contexts(2)
    ranked(first, tiny_policy, alice, tied=False)
    ranked(second, tiny_policy, alice, tied=True)
    client.force_login(admin_user)
    page = client.get(reverse("ops:overview")).content.decode()
    for testid in ("pool-outlook", "outlook-import", "outlook-train-now", "outlook-threshold"):
        assert f'data-testid="{testid}"' in page, testid
    response = client.post(reverse("ops:train_now"))
    run = TrainingRun.objects.get()
    assert response.url == reverse("ops:run", args=[run.pk])
    assert run.kind == "rm" and run.triggered_by == admin_user and run.trigger == TrainingRun.Trigger.MANUAL
    assert "below its threshold" in run.reason and "1 of 5 new rankings give pairs" in run.reason
    assert "Decision:" in client.get(response.url).content.decode()
    # The queued run answers the question: the box no longer offers to train again.
    page = client.get(reverse("ops:overview")).content.decode()
    assert 'data-testid="pool-outlook"' not in page and not pool_outlook()["short"]


def test_train_now_below_the_minimum_is_refused_with_the_numbers(client, tiny_policy, loop_settings, admin_user):
    loop_settings.TRAINING_MIN_RANKINGS = 8
    set_loop(rm_threshold=5)
    contexts(1)
    client.force_login(admin_user)
    response = client.post(reverse("ops:train_now"), follow=True)
    assert "needs at least 8" in response.content.decode() and not TrainingRun.objects.exists()
    response = api(admin_user).post("/api/v1/loop/train-now/")
    assert response.status_code == 400 and "needs at least 8" in response.content.decode()


def test_lowering_the_threshold_is_kept_in_admins_history(client, loop_settings, admin_user):
    set_loop(rm_threshold=80)
    client.force_login(admin_user)
    for bad in ("", "ten", "0", "-3", "2.5", "3000000000", "99999999999999999999"):
        response = client.post(reverse("ops:set_rm_threshold"), {"rm_threshold": bad}, follow=True)
        assert response.status_code == 200 and "whole number" in response.content.decode(), bad
    assert LoopSettings.load().rm_threshold == 80
    response = client.post(reverse("ops:set_rm_threshold"), {"rm_threshold": "42"}, follow=True)
    assert "threshold is now 42" in response.content.decode() and LoopSettings.load().rm_threshold == 42
    entry = LogEntry.objects.get()
    assert entry.user == admin_user and "80 -> 42" in entry.change_message


def test_the_api_gives_the_outlook_and_trains_now(tiny_policy, loop_settings, alice, admin_user):
    set_loop(rm_threshold=3)
    (context,) = contexts(1)
    ranked(context, tiny_policy, alice, tied=False)
    client = api(admin_user)
    outlook = client.get("/api/v1/loop/outlook/").json()
    assert outlook["have"] == 1 and outlook["stalled"] is True and outlook["short"] is True
    response = client.post("/api/v1/loop/train-now/")
    assert response.status_code == 201 and response.json()["kind"] == "rm" and response.json()["reason"]
    assert Task.objects.filter(kind=TaskKind.RANK_REPLIES).count() == 1
