"""A training worker killed mid-run: the run ends up failed with the reason on the next check, nothing is
registered, and the broker does not hand the run to another worker (no second copy)."""

import datetime as dt
import os
import signal
import time

import pytest
import redis
from django.conf import settings
from django.utils import timezone

from models_service.models import ModelVersion
from tests.support.training import demonstration
from tests.support.workers import running_workers
from training_jobs import services
from training_jobs.models import TrainingRun

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

ENV = {"TRAINING_MIN_DEMONSTRATIONS": "8", "TRAINING_REPORT_INTERVAL_S": "0.2"}


def wait_for(predicate, timeout=90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    raise TimeoutError


def test_a_killed_worker_leaves_a_failed_run_and_no_model(tiny_policy):
    for i in range(10):
        demonstration("train", i)
    for i in range(2):
        demonstration("validation", i)
    with running_workers("training", env=ENV) as (worker,):
        run = services.training_run_create(kind="sft", config={"epochs": 500, "batch_size": 2, "max_length": 64})
        wait_for(lambda: TrainingRun.objects.get(pk=run.pk).progress_step > 3)
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.RUNNING, "nobody has noticed yet"
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)

    later = timezone.now() + dt.timedelta(seconds=200)
    assert services.training_runs_reap(now=later) == [run.pk]
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.FAILED and "stopped reporting" in run.error
    assert not ModelVersion.objects.filter(training_run=run).exists()
    assert not services.staging_dir(run).exists()

    # The message was acknowledged when the worker took it: the broker holds nothing it could hand to another
    # worker (an unacknowledged message would wait in kombu's "unacked" hash to be redelivered).
    assert not [m for m in broker.hvals("unacked") if b"run_training" in m]
    assert broker.llen("training") == 0
