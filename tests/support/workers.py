"""The product's Celery workers as real processes for a test, on the test database and Redis."""

import contextlib

from tests.support import processes


@contextlib.contextmanager
def running_workers(*queues: str, env: dict | None = None, ready_timeout: float = 90.0):
    """One real Celery worker process per queue (bin/worker), on the test Redis and test database.

    The caller's test must commit its data (django_db(transaction=True)) for the workers to see it.
    """
    from django.db import connection

    from config.celery_app import app

    environment = {
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": _database_url(connection.settings_dict),
        "LOG_LEVEL": "WARNING",
        **(env or {}),
    }
    with processes.running_workers(app, *queues, env=environment, ready_timeout=ready_timeout) as started:
        yield started


@contextlib.contextmanager
def running_hosts(hosts: dict[str, tuple[list[str], dict]], *, env: dict | None = None, ready_timeout: float = 90.0):
    """Workers as on separate hosts ({host: (queues, host env)}), on the test Redis and test database; `env` is
    what every host shares."""
    from django.db import connection

    from config.celery_app import app

    shared = {
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": _database_url(connection.settings_dict),
        "LOG_LEVEL": "WARNING",
        **(env or {}),
    }
    spec = {host: (queues, {**shared, **host_env}) for host, (queues, host_env) in hosts.items()}
    with processes.running_hosts(app, spec, ready_timeout=ready_timeout) as started:
        yield started


def _database_url(settings_dict) -> str:
    host, port = settings_dict["HOST"] or "127.0.0.1", settings_dict["PORT"] or 5432
    password = f":{settings_dict['PASSWORD']}" if settings_dict.get("PASSWORD") else ""
    return f"postgres://{settings_dict['USER']}{password}@{host}:{port}/{settings_dict['NAME']}"
