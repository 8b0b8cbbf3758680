"""Periodic upkeep of the labeling queue, run by beat on the sampling queue (short, idempotent tasks)."""

from celery import shared_task

from labeling import services


@shared_task(name="labeling.tasks.expire_leases", ignore_result=True, soft_time_limit=60, time_limit=90)
def expire_leases() -> int:
    return services.leases_expire()


@shared_task(name="labeling.tasks.vacuum_queue_tables", ignore_result=True, soft_time_limit=60, time_limit=90)
def vacuum_queue_tables() -> list[str]:
    return services.queue_tables_vacuum()


@shared_task(name="labeling.tasks.replenish_prompt_tasks", ignore_result=True, soft_time_limit=60, time_limit=90)
def replenish_prompt_tasks() -> int:
    return services.prompt_tasks_replenish()


@shared_task(name="labeling.tasks.run_import", ignore_result=True, soft_time_limit=3600, time_limit=3700)
def run_import(job_id: int) -> None:
    """An uploaded JSONL import, on the sampling worker (it needs no model)."""
    services.import_job_run(job_id=job_id)


@shared_task(name="labeling.tasks.reap_imports", ignore_result=True, soft_time_limit=60, time_limit=90)
def reap_imports() -> list[int]:
    """Imports whose worker was lost: started again, or failed with what to do (services.import_jobs_reap)."""
    return services.import_jobs_reap()
