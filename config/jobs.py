"""Asking a worker for work by the task's name.

Services enqueue through here instead of importing a `tasks` module: the task modules are the workers' side and
reach torch (sampling, training), so the web process and the lower apps never import them. The import-linter
contracts in pyproject.toml hold that line. Routing by name is config/celery_app.py's `task_routes`.
"""

from django.db import transaction


def enqueue(name: str, *args, **options):
    """Send the task `name` (e.g. "training_jobs.tasks.run_training") with positional `args` now."""
    from config.celery_app import app

    return app.send_task(name, args=args, **options)


def enqueue_on_commit(name: str, *args) -> None:
    """Send the task once the current transaction commits (so the worker sees its rows), or now outside one."""
    transaction.on_commit(lambda: enqueue(name, *args))
