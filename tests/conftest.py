import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.factories import UserFactory

# Training tests compare numbers to the bit (a reference pass against a training pass, kept frozen-block states
# against the full model): they run in fp32. tests/training_jobs/test_precision.py turns bf16 on where it tests it.
os.environ.setdefault("TRAINING_CPU_BF16", "false")


@pytest.fixture
def alice(db):
    """A labeler."""
    return UserFactory(username="alice")


@pytest.fixture
def bob(db):
    """Another labeler, who also reviews."""
    return UserFactory(username="bob", profile__is_reviewer=True, profile__languages=["en"])


@pytest.fixture
def charlie(db):
    """A labeler who works in German only."""
    return UserFactory(username="charlie", profile__languages=["de"])


@pytest.fixture
def admin_user(db):
    return UserFactory(username="admin", is_staff=True, is_superuser=True)


ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def running_workers(*queues: str, env: dict | None = None, ready_timeout: float = 90.0):
    """Start one real Celery worker process per queue with bin/worker, on the test Redis and test database.

    The caller's test must commit its data (django_db(transaction=True)) for the workers to see it.
    """
    from django.db import connection

    from config.celery_app import app

    app.control.purge()
    environment = dict(os.environ)
    environment.update(
        DJANGO_SETTINGS_MODULE="config.settings.test",
        DATABASE_URL=_database_url(connection.settings_dict),
        LOG_LEVEL="WARNING",
    )
    environment.update(env or {})
    processes = [
        subprocess.Popen(
            [str(ROOT / "bin" / "worker"), queue],
            cwd=ROOT,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        for queue in queues
    ]
    try:
        _wait_until_ready(app, queues, processes, ready_timeout)
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            if process.stderr:
                process.stderr.close()


def _database_url(settings_dict) -> str:
    host, port = settings_dict["HOST"] or "127.0.0.1", settings_dict["PORT"] or 5432
    password = f":{settings_dict['PASSWORD']}" if settings_dict.get("PASSWORD") else ""
    return f"postgres://{settings_dict['USER']}{password}@{host}:{port}/{settings_dict['NAME']}"


def _wait_until_ready(app, queues, processes, timeout):
    deadline = time.monotonic() + timeout
    expected = {f"{queue}@{socket.gethostname()}" for queue in queues}
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"worker exited with {process.returncode}: {process.stderr.read().decode()[-3000:]}")
        replies = app.control.ping(timeout=1.0) or []
        if expected <= {name for reply in replies for name in reply}:
            return
    raise TimeoutError(f"workers {sorted(expected)} did not answer within {timeout} s")


# --- tiny models ---


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """Two tiny policies (different seeds) built once per test session, outside ARTIFACTS_DIR."""
    from models_service.tiny import build_tiny_policy

    root = tmp_path_factory.mktemp("tiny-models")
    TINY_MODEL_DIRS.update({seed: build_tiny_policy(root / f"policy-seed{seed}", seed=seed) for seed in (0, 1)})
    return TINY_MODEL_DIRS


TINY_MODEL_DIRS: dict = {}  # filled by the tiny_model_dirs fixture


def register_tiny_policy(source_dir, *, name: str, stage: str = "base", activate: bool = False, kind: str = "policy"):
    """Copy a tiny policy (or, with kind="reward", reward model) into ARTIFACTS_DIR and register it (optionally as
    the active one)."""
    import shutil
    import uuid

    from django.conf import settings

    from models_service.models import ModelVersion
    from models_service.services import model_version_activate, model_version_register

    destination = Path(settings.ARTIFACTS_DIR) / "models" / f"{name}-{uuid.uuid4().hex[:8]}"
    shutil.copytree(source_dir, destination)
    version = model_version_register(
        kind=ModelVersion.Kind(kind), stage=stage, artifact_dir=destination, name=name, source=str(source_dir)
    )
    if activate:
        model_version_activate(version=version, reason="test")
        version.refresh_from_db()
    return version


@pytest.fixture
def tiny_policy(db, tiny_model_dirs):
    """The active policy: a tiny model registered in the test database."""
    from models_service import loading

    loading._holders.clear()
    yield register_tiny_policy(tiny_model_dirs[0], name="tiny-policy-v0", activate=True)
    loading._holders.clear()


@pytest.fixture(autouse=True)
def _fresh_queue_settings():
    """Queue settings are cached in Redis and in process memory; each test starts from the database's."""
    from django.core.cache import cache

    from labeling.models import QueueSettings

    cache.delete(QueueSettings.CACHE_KEY)
    QueueSettings._local = None
    yield
    cache.delete(QueueSettings.CACHE_KEY)
    QueueSettings._local = None
