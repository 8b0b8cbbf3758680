"""The ops pages: who may see them, a run's page and its live data, promote and roll back, retrain now, the
overview's warnings and the import page."""

import pytest
from django.urls import reverse
from django.utils import timezone

from models_service.models import ModelActivation
from tests.support.factories import TrainingRunFactory
from tests.support.models import register_tiny_policy
from tests.support.training import demonstration, set_loop
from training_jobs import loop
from training_jobs.models import Evaluation, LoopSettings, TrainingRun

pytestmark = pytest.mark.django_db

OPS_PAGES = [
    ("ops:overview", {}),
    ("ops:runs", {}),
    ("ops:models", {}),
    ("ops:labelers", {}),
]


def test_a_cancelled_run_waits_for_the_next_regular_check(tiny_policy, client, admin_user):
    """Issue 17, item 10: an admin's cancel is not undone at the next tick, nor does the loop move on to a reward
    model on the base policy; the overview's next check is in the future."""
    set_loop(sft_threshold=1, rm_threshold=1, check_every_minutes=60, last_checked_at=timezone.now())
    demonstration("train", 0)
    TrainingRunFactory(kind="sft", status="cancelled", finished_at=timezone.now())
    assert loop.loop_tick().action == "nothing"
    assert not TrainingRun.objects.exclude(status="cancelled").exists()
    LoopSettings.objects.update(last_checked_at=timezone.now() - timezone.timedelta(hours=3))
    client.force_login(admin_user)
    overview = client.get(reverse("ops:overview"))
    assert overview.context["next_check"] > timezone.now()
    assert loop.loop_tick().action == "sft"


@pytest.mark.parametrize(("name", "kwargs"), OPS_PAGES)
def test_ops_pages_are_for_admins_only(client, alice, admin_user, name, kwargs):
    url = reverse(name, kwargs=kwargs)
    assert client.get(url).status_code == 302, "anonymous visitors log in first"
    client.force_login(alice)
    assert client.get(url).status_code == 403
    client.force_login(admin_user)
    assert client.get(url).status_code == 200


def test_ops_run_page_and_its_live_data(client, admin_user, tiny_policy):
    run = TrainingRunFactory(
        kind="ppo",
        status="running",
        progress_step=3,
        progress_total=10,
        metrics={"ppo/mean_reward": [[0, 0.1], [1, 0.2]], "ppo/kl": [[0, 0.0], [1, 0.5]]},
        log_tail="iteration 1",
    )
    client.force_login(admin_user)
    assert "Cancel" in client.get(reverse("ops:run", args=[run.pk])).content.decode()
    data = client.get(reverse("ops:run_data", args=[run.pk])).json()
    assert (data["step"], data["total"], data["finished"]) == (3, 10, False)
    assert [c["title"] for c in data["charts"]] == ["PPO reward", "KL from the SFT policy"]
    response = client.post(reverse("ops:cancel_run", args=[run.pk]))
    assert response.status_code == 302
    assert TrainingRun.objects.get(pk=run.pk).cancel_requested_at is not None


def test_ops_promote_and_rollback_are_one_click_and_recorded(client, admin_user, tiny_policy, tiny_model_dirs):
    candidate = register_tiny_policy(tiny_model_dirs[1], name="policy-ppo-v0", stage="ppo")
    evaluation = Evaluation.objects.create(candidate=candidate, baseline=tiny_policy, status="done", metrics={})
    client.force_login(admin_user)
    assert client.get(reverse("ops:evaluation", args=[evaluation.pk])).status_code == 200
    client.post(reverse("ops:promote", args=[evaluation.pk]), {"reason": "better in the A/B"})
    candidate.refresh_from_db()
    assert candidate.is_active
    client.post(reverse("ops:rollback", args=["policy"]), {"reason": "complaints"})
    tiny_policy.refresh_from_db()
    assert tiny_policy.is_active
    actions = list(ModelActivation.objects.filter(actor=admin_user).values_list("action", "reason"))
    assert actions == [("rollback", "complaints"), ("promote", "better in the A/B")]


def test_retrain_now_from_the_ops_page(client, admin_user, tiny_policy):
    client.force_login(admin_user)
    response = client.post(reverse("ops:start_run"), {"kind": "sft"})
    run = TrainingRun.objects.get()
    assert response.url == reverse("ops:run", args=[run.pk]) and run.triggered_by == admin_user
    response = client.post(reverse("ops:start_run"), {"kind": "sft"}, follow=True)
    assert "already queued" in response.content.decode()


def test_retrain_now_with_no_training_worker_says_the_run_waits(client, admin_user, tiny_policy):
    client.force_login(admin_user)
    response = client.post(reverse("ops:start_run"), {"kind": "sft"}, follow=True)
    run = TrainingRun.objects.get()
    page = response.content.decode()
    assert f"Queued supervised fine-tuning run #{run.pk}, but no training worker answered" in page
    assert "Started supervised" not in page
    assert "Trigger: Started by admin." in page and "by a person" not in page, "the trigger names the person once"
    assert "Starts from the newest model when a training worker takes it" in page
    assert "Queued: waiting for a training worker to take this run" in page, "the empty log box says why"
    assert 'data-testid="no-training-worker"' in page and "Recorded when the run starts" in page
    # After a reload, the page still says why the run waits (the flash message is gone by then).
    page = client.get(reverse("ops:run", args=[run.pk])).content.decode()
    assert 'data-testid="no-training-worker"' in page and "start <code>bin/worker training</code>" in page
    assert "? It will not start, so the loop starts another" in page and "the data it read" not in page
    # While the run waits, the overview promises no check it will not make: the next one is after the run.
    from django.core.cache import cache

    cache.set(loop.BEAT_TICK_KEY, timezone.now())  # beat ticks
    overview = client.get(reverse("ops:overview")).content.decode()
    assert f"Thresholds are checked again when run #{run.pk} ends" in overview and "next at" not in overview
    # Cancelling says the loop may start another (it did, 30 s later, in the helper's walk).
    response = client.post(reverse("ops:cancel_run", args=[run.pk]), follow=True)
    assert f"Run #{run.pk} is cancelled. The loop starts another at its next check" in response.content.decode()
    response = client.post(reverse("ops:cancel_run", args=[run.pk]), follow=True)
    assert f"Run #{run.pk} has already ended (cancelled)." in response.content.decode()
    # The same words wherever the run is listed (helper walk: three pages said it three ways).
    for listing in ("ops:runs", "ops:overview"):
        listed = client.get(reverse(listing)).content.decode()
        assert "Started by admin" in listed and "Started by a person" not in listed, listing


def test_the_overview_warns_when_beat_does_not_tick(client, admin_user, tiny_policy):
    from training_jobs import tasks

    client.force_login(admin_user)
    page = client.get(reverse("ops:overview")).content.decode()
    assert 'data-testid="loop-no-beat"' in page and "reached a control worker yet" in page
    assert "Thresholds are checked every" not in page, "no promise of a next check that nothing will make"
    tasks.loop_tick(from_beat=False)  # a run ending sends a tick too: not evidence that beat runs
    assert 'data-testid="loop-no-beat"' in client.get(reverse("ops:overview")).content.decode()
    tasks.loop_tick(from_beat=True)
    page = client.get(reverse("ops:overview")).content.decode()
    assert 'data-testid="loop-no-beat"' not in page and "Thresholds are checked every" in page
    from django.core.cache import cache

    cache.set(loop.BEAT_TICK_KEY, timezone.now() - timezone.timedelta(minutes=10))
    page = client.get(reverse("ops:overview")).content.decode()
    assert 'data-testid="loop-no-beat"' in page and "reached a control worker since" in page


def test_the_import_page_uploads_and_shows_progress(client, admin_user, alice):
    import datetime as dt

    from django.core.files.uploadedfile import SimpleUploadedFile

    from labeling.models import ImportJob
    from labeling.services import import_job_run

    client.force_login(alice)
    assert client.get(reverse("ops:imports")).status_code == 403
    client.force_login(admin_user)
    upload = SimpleUploadedFile("p.jsonl", b'{"prompt": "hello"}\n{"prompt": 5}\n')
    response = client.post(reverse("ops:imports"), {"file": upload, "format": "auto", "on_error": "skip"})
    job = ImportJob.objects.get()
    assert response.url == reverse("ops:import", args=[job.pk])
    polling = client.get(response.url, HTTP_HX_REQUEST="true")
    assert polling.status_code == 200 and "hx-trigger" in polling.content.decode()
    assert 'data-testid="import-waiting"' not in polling.content.decode()
    ImportJob.objects.filter(pk=job.pk).update(created_at=timezone.now() - dt.timedelta(minutes=5))
    waiting = client.get(response.url, HTTP_HX_REQUEST="true").content.decode()
    assert 'data-testid="import-waiting"' in waiting and "bin/worker sampling" in waiting, "no worker: say so"
    import_job_run(job_id=job.pk)
    done = client.get(response.url, HTTP_HX_REQUEST="true")
    assert done.status_code == 286, "htmx stops polling when the import has ended"
    assert (
        "1 added" in done.content.decode()
        and "a list ending with a user turn" in client.get(response.url).content.decode()
    )
    assert "Choose a JSONL file" in client.post(reverse("ops:imports"), {}, follow=True).content.decode()
