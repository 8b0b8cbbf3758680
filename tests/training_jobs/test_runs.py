"""Training runs against real Postgres with tiny models: lifecycle, data snapshot, refusals, cancel, reaping."""

import datetime as dt

import pytest
from django.core.exceptions import ValidationError
from django.test import override_settings
from django.utils import timezone

from labeling import splits
from labeling.models import Message
from models_service.models import ModelVersion
from tests.support.factories import UserFactory
from tests.support.models import register_tiny_policy
from tests.support.training import demonstration, ranked_task
from training_jobs import runner, services
from training_jobs.models import TrainingRun

pytestmark = pytest.mark.django_db

FAST_SFT = {"epochs": 1, "learning_rate": 1e-3, "batch_size": 4, "max_length": 96}


@pytest.fixture
def demonstrations(db):
    return [demonstration(splits.TRAIN, i) for i in range(10)] + [demonstration(splits.VALIDATION, i) for i in range(3)]


@override_settings(TRAINING_MIN_DEMONSTRATIONS=8)
def test_an_sft_run_trains_records_its_data_and_registers_an_inactive_model(tiny_policy, demonstrations, admin_user):
    run = services.training_run_create(kind="sft", config=FAST_SFT, triggered_by=admin_user)
    assert run.status == TrainingRun.Status.QUEUED
    assert runner.execute(run.pk, worker="test") == TrainingRun.Status.SUCCEEDED
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.SUCCEEDED and run.finished_at and run.started_at
    assert run.base_model == tiny_policy
    assert run.progress_step == run.progress_total > 0
    assert {"sft/train_loss", "sft/val_loss"} <= set(run.metrics)
    snapshot = run.data_snapshot["demonstrations"]
    assert snapshot["train_count"] == 10 and snapshot["validation_count"] == 3
    assert sorted(snapshot["train_ids"]) == sorted(d.pk for d in demonstrations[:10])
    assert run.library_versions["torch"].startswith("2.13")
    version = ModelVersion.objects.get(training_run=run)
    assert (version.stage, version.parent, version.is_active) == ("sft", tiny_policy, False)
    assert version.artifact_dir.is_dir() and run.summary["model_version"] == version.pk
    assert not Message.objects.filter(pk__in=snapshot["train_ids"], used_in_training_at__isnull=True).exists()
    assert "registered" in run.log_tail


def test_only_one_run_of_a_kind_at_a_time(tiny_policy):
    first = services.training_run_create(kind="sft")
    with pytest.raises(ValidationError, match=f"already queued \\(run #{first.pk}\\)"):
        services.training_run_create(kind="sft")
    services.training_run_create(kind="rm")


@override_settings(TRAINING_MIN_DEMONSTRATIONS=50)
def test_too_little_data_fails_with_the_counts(tiny_policy, demonstrations):
    run = services.training_run_create(kind="sft", config=FAST_SFT)
    assert runner.execute(run.pk) == TrainingRun.Status.FAILED
    run.refresh_from_db()
    assert "10 accepted demonstrations in the training split (at least 50 needed)" in run.error
    assert not ModelVersion.objects.filter(training_run=run).exists()


def test_a_bad_config_fails_with_the_setting_named(tiny_policy, demonstrations):
    run = services.training_run_create(kind="sft", config={"epochs": "many"})
    runner.execute(run.pk)
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.FAILED and "SFTConfig.epochs must be int" in run.error


def test_a_duplicated_message_cannot_start_a_second_copy(tiny_policy, demonstrations):
    run = services.training_run_create(kind="sft", config=FAST_SFT)
    assert services.training_run_claim(run_id=run.pk, worker="first") is not None
    assert services.training_run_claim(run_id=run.pk, worker="second") is None
    assert runner.execute(run.pk, worker="second") is None


def test_cancelling_a_queued_run(tiny_policy, admin_user):
    run = services.training_run_create(kind="sft")
    services.training_run_cancel(run=run, actor=admin_user)
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.CANCELLED and runner.execute(run.pk) is None


@override_settings(TRAINING_MIN_DEMONSTRATIONS=8)
def test_cancelling_a_running_run_stops_it_and_registers_nothing(tiny_policy, demonstrations, settings):
    from training_jobs.loop import new_demonstrations

    new_before = new_demonstrations()
    run = services.training_run_create(kind="sft", config=FAST_SFT)
    services.training_run_claim(run_id=run.pk)
    services.training_run_cancel(run=run)  # requested while running: the trainer stops at its next step
    TrainingRun.objects.filter(pk=run.pk).update(status=TrainingRun.Status.QUEUED)  # let execute claim it again
    assert runner.execute(run.pk) == TrainingRun.Status.CANCELLED
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.CANCELLED and run.finished_at
    assert not ModelVersion.objects.filter(training_run=run).exists()
    assert not services.staging_dir(run).exists()
    # Issue 17, item 10: it had read (and frozen) the demonstrations; with no model made they count as new again.
    assert run.data_snapshot["demonstrations"]["train_count"] > 0
    assert new_demonstrations() == new_before > 0
    assert not Message.objects.filter(used_in_training_at__isnull=False).exists()


def test_a_run_whose_worker_went_silent_is_reaped(tiny_policy, settings, tmp_path):
    settings.ARTIFACTS_DIR = tmp_path
    run = services.training_run_create(kind="sft")
    services.training_run_claim(run_id=run.pk, worker="training@lost")
    staging = services.staging_dir(run)
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"half")
    later = timezone.now() + dt.timedelta(seconds=settings.TRAINING_HEARTBEAT_TIMEOUT_S + 1)
    assert services.training_runs_reap(now=timezone.now()) == []
    assert services.training_runs_reap(now=later) == [run.pk]
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.FAILED and "training@lost stopped reporting" in run.error
    assert not staging.exists() and not ModelVersion.objects.filter(training_run=run).exists()


def test_ppo_needs_a_reward_model(tiny_policy):
    with pytest.raises(ValidationError, match="PPO needs a reward model"):
        services.training_run_create(kind="ppo")


def test_a_run_without_a_policy_fails_clearly(db):
    run = services.training_run_create(kind="sft")
    runner.execute(run.pk)
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.FAILED and "prepare_default_model" in run.error


def test_the_reward_model_stage_starts_from_the_newest_sft(tiny_policy, tiny_model_dirs):
    sft = register_tiny_policy(tiny_model_dirs[1], name="policy-sft-v0", stage="sft")
    run = services.training_run_create(kind="rm")
    assert runner.resolve_inputs(run).base_model == sft


@override_settings(TRAINING_MIN_RANKINGS=4)
def test_a_reward_model_run_reports_both_accuracies_and_shifts_scores(tiny_policy, demonstrations):
    labeler = UserFactory(username="ranker")
    for i in range(8):
        ranked_task(splits.TRAIN, i, labeler)
    for i in range(3):
        ranked_task(splits.VALIDATION, 100 + i, labeler)
    for i in range(40):
        ranked_task("", 200 + i, labeler, dataset="hh-rlhf-test")
    config = {"epochs": 2, "learning_rate": 1e-3, "max_length": 64}
    run = services.training_run_create(kind="rm", config=config, base_model=tiny_policy)
    assert runner.execute(run.pk) == TrainingRun.Status.SUCCEEDED, TrainingRun.objects.get(pk=run.pk).error
    run.refresh_from_db()
    version = ModelVersion.objects.get(training_run=run)
    # The first reward model serves at once (there is nothing to gate it against); later ones wait for the loop.
    assert (version.kind, version.stage, version.is_active) == ("reward", "rm", True)
    assert run.summary["val_accuracy"] is not None and run.summary["validation_rankings"] == 3
    assert "holdout_accuracy" in run.summary and run.summary["holdout_pairs"] > 0
    assert "reward_offset" in run.summary
    assert run.data_snapshot["validation_source"] == "labelers"
