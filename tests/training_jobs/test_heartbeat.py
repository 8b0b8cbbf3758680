"""Issue 15, item 19: a run is never declared dead while its worker lives. The heartbeat comes from a thread of
the worker, not from the trainer's step reports, so a long validation or save does not look like a death; and a
run that really was reaped registers nothing afterwards.

Transactional: the heartbeat thread writes through its own database connection, which must see the run's row."""

import datetime as dt
import shutil
import time

import pytest
from django.utils import timezone

from ml.runs import TrainResult
from models_service.models import ModelVersion
from training_jobs import runner, services
from training_jobs.models import TrainingRun

pytestmark = pytest.mark.django_db(transaction=True)


def silent_trainer(tiny_dir, *, silent_s: float, during=None):
    """A stage that reports nothing for `silent_s` (a long validation pass or save), calls `during(run)` (what
    happens elsewhere meanwhile), then leaves a complete checkpoint in staging."""

    def trainer(run, staging, progress, reporter):
        time.sleep(silent_s)
        if during is not None:
            during(run)
        shutil.copytree(tiny_dir, staging)
        return TrainResult(output_dir=staging, metrics={"val_loss": 1.0}), "sft", "policy", {}

    return trainer


def test_a_worker_silent_in_its_trainer_but_alive_is_not_reaped(tiny_policy, tiny_model_dirs, settings, monkeypatch):
    settings.TRAINING_HEARTBEAT_TIMEOUT_S = 1.2  # beats every 0.2 s; the trainer says nothing for 2 s
    reaped = []

    def reaper_runs(run):
        reaped.extend(services.training_runs_reap())

    monkeypatch.setattr(runner, "_train_stage", silent_trainer(tiny_model_dirs[1], silent_s=2.0, during=reaper_runs))
    run = services.training_run_create(kind="sft")
    assert runner.execute(run.pk, worker="training@busy") == TrainingRun.Status.SUCCEEDED
    run.refresh_from_db()
    assert reaped == [] and run.status == TrainingRun.Status.SUCCEEDED
    assert ModelVersion.objects.filter(training_run=run, status="ready").count() == 1


def test_without_the_heartbeat_thread_the_same_silence_is_reaped(tiny_policy, tiny_model_dirs, settings, monkeypatch):
    """The test above can fail: with the thread beating no more often than the trainer reports, the reaper takes
    the silent run for dead."""
    settings.TRAINING_HEARTBEAT_TIMEOUT_S = 1.2
    monkeypatch.setattr(runner, "heartbeat_interval_s", lambda: 60.0)
    reaped = []
    monkeypatch.setattr(
        runner,
        "_train_stage",
        silent_trainer(
            tiny_model_dirs[1], silent_s=2.0, during=lambda run: reaped.extend(services.training_runs_reap())
        ),
    )
    run = services.training_run_create(kind="sft")
    assert runner.execute(run.pk) == TrainingRun.Status.FAILED
    assert reaped == [run.pk]


def test_a_run_reaped_while_it_trained_registers_nothing(tiny_policy, tiny_model_dirs, settings, monkeypatch):
    def reaped_meanwhile(run):
        later = timezone.now() + dt.timedelta(seconds=settings.TRAINING_HEARTBEAT_TIMEOUT_S + 60)
        assert services.training_runs_reap(now=later) == [run.pk]

    monkeypatch.setattr(runner, "_train_stage", silent_trainer(tiny_model_dirs[1], silent_s=0, during=reaped_meanwhile))
    run = services.training_run_create(kind="sft")
    assert runner.execute(run.pk) == TrainingRun.Status.FAILED
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.FAILED and "stopped reporting" in run.error
    assert not ModelVersion.objects.filter(training_run=run).exists()
    assert not services.staging_dir(run).exists()
    models = services.staging_dir(run).parent.parent / "models"
    assert not any(p.name.endswith(f"run{run.pk}") or f"-run{run.pk}-" in p.name for p in models.glob("*"))


def test_the_heartbeat_stops_with_the_run(tiny_policy, tiny_model_dirs, settings, monkeypatch):
    settings.TRAINING_HEARTBEAT_TIMEOUT_S = 0.6
    monkeypatch.setattr(runner, "_train_stage", silent_trainer(tiny_model_dirs[1], silent_s=0.5))
    run = services.training_run_create(kind="sft")
    runner.execute(run.pk)
    run.refresh_from_db()
    beat = run.heartbeat_at
    time.sleep(0.5)
    run.refresh_from_db()
    assert run.heartbeat_at == beat and run.status == TrainingRun.Status.SUCCEEDED


def test_a_running_run_marks_training_busy_for_the_sampling_workers(
    tiny_policy, tiny_model_dirs, settings, monkeypatch
):
    """The pool keeps only SAMPLING_POOL_WHILE_TRAINING tasks while a run trains: the run's heartbeat says so in the
    cache from its start (and on every beat, past the mark's own lifetime) until its end."""
    from models_service.selectors import TRAINING_BUSY_KEY, training_busy

    settings.TRAINING_HEARTBEAT_TIMEOUT_S = 1.2  # beats every 0.2 s; the mark lives 5.6 s unless renewed
    seen = []
    monkeypatch.setattr(
        runner,
        "_train_stage",
        silent_trainer(tiny_model_dirs[1], silent_s=0.5, during=lambda run: seen.append(training_busy())),
    )
    assert not training_busy()
    run = services.training_run_create(kind="sft")
    assert runner.execute(run.pk, worker="training@busy") == TrainingRun.Status.SUCCEEDED
    assert seen == [True] and not training_busy()

    from django.core.cache import cache

    with runner.Heartbeat(run.pk, 60.0):
        cache.set(TRAINING_BUSY_KEY, "evaluation-1", timeout=60)  # another worker's evaluation, marked since
    assert cache.get(TRAINING_BUSY_KEY) == "evaluation-1", "a run ending leaves another's mark"
    cache.delete(TRAINING_BUSY_KEY)


def test_an_evaluation_marks_training_busy_while_it_runs(tiny_policy, monkeypatch):
    """The gate's evaluation samples and scores on the training worker's cores: the pool stays small meanwhile."""
    from models_service.selectors import training_busy
    from training_jobs import evaluate
    from training_jobs.models import Evaluation

    seen = []
    monkeypatch.setattr(evaluate, "_evaluate", lambda evaluation, settings: seen.append(training_busy()))
    evaluation = Evaluation.objects.create(candidate=tiny_policy, status=Evaluation.Status.QUEUED)
    evaluate.run_evaluation(evaluation.pk)
    assert seen == [True] and not training_busy()
