"""Celery tasks of the training queue. torch is imported inside the task bodies (through the runner)."""

from celery import current_task, shared_task
from django.conf import settings

from training_jobs import services


@shared_task(
    name="training_jobs.tasks.run_training",
    # Acknowledged when a worker takes it, never redelivered: a long run must not start twice (README).
    acks_late=False,
    reject_on_worker_lost=False,
    soft_time_limit=settings.TRAINING_SOFT_TIME_LIMIT_S,
    time_limit=settings.TRAINING_HARD_TIME_LIMIT_S,
    ignore_result=True,
)
def run_training(run_id: int) -> str | None:
    from training_jobs.runner import execute

    status = execute(run_id, worker=getattr(current_task.request, "hostname", "") or "")
    loop_tick.delay()  # the next stage of the chain need not wait for beat
    return status


@shared_task(name="training_jobs.tasks.reap_lost_runs", ignore_result=True, soft_time_limit=60, time_limit=90)
def reap_lost_runs() -> list[int]:
    """Runs whose worker died are marked failed (beat, every minute)."""
    return services.training_runs_reap()


@shared_task(
    name="training_jobs.tasks.evaluate_candidate",
    acks_late=False,
    reject_on_worker_lost=False,
    soft_time_limit=settings.TRAINING_SOFT_TIME_LIMIT_S,
    time_limit=settings.TRAINING_HARD_TIME_LIMIT_S,
    ignore_result=True,
)
def evaluate_candidate(evaluation_id: int) -> str | None:
    """The gate's automatic evaluation of a candidate policy (on the training worker: it loads models)."""
    from training_jobs.evaluate import run_evaluation

    status = run_evaluation(evaluation_id)
    loop_tick.delay()
    return status


@shared_task(name="training_jobs.tasks.loop_tick", ignore_result=True, soft_time_limit=60, time_limit=90)
def loop_tick(from_beat: bool = False) -> str:
    """The retraining policy's periodic decision (beat, with from_beat); also sent when a run or an evaluation ends."""
    from training_jobs.loop import loop_tick as tick
    from training_jobs.loop import record_beat_tick

    if from_beat:
        record_beat_tick()
    return tick().action
