import pytest
from django.db import IntegrityError, transaction
from django.utils import timezone

from tests.support.factories import TrainingRunFactory
from training_jobs.models import TrainingRun

pytestmark = pytest.mark.django_db


def test_only_one_active_run_of_a_kind():
    TrainingRunFactory(kind="sft", status=TrainingRun.Status.RUNNING)
    TrainingRunFactory(kind="rm", status=TrainingRun.Status.QUEUED)
    with pytest.raises(IntegrityError, match="training_run_one_active_per_kind"), transaction.atomic():
        TrainingRunFactory(kind="sft", status=TrainingRun.Status.QUEUED)
    finished = TrainingRunFactory(kind="ppo", status=TrainingRun.Status.SUCCEEDED, finished_at=timezone.now())
    assert finished.pk


def test_a_failed_run_carries_its_error():
    with pytest.raises(IntegrityError, match="training_run_failure_has_error"), transaction.atomic():
        TrainingRunFactory(status=TrainingRun.Status.FAILED, finished_at=timezone.now())


def test_progress_stays_within_total():
    with pytest.raises(IntegrityError, match="training_run_progress_within_total"), transaction.atomic():
        TrainingRunFactory(progress_step=5, progress_total=3)
    assert TrainingRunFactory(progress_step=3, progress_total=12).progress_fraction == 0.25
