import os

import pytest

from tests.support.factories import UserFactory
from tests.support.models import TINY_MODEL_DIRS, register_tiny_policy

# Training tests compare numbers to the bit (a reference pass against a training pass, kept frozen-block states
# against the full model): they run in fp32. tests/ml/test_precision.py turns bf16 on where it tests it.
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


# --- tiny models ---


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """Two tiny policies (different seeds) built once per test session, outside ARTIFACTS_DIR."""
    from models_service.tiny import build_tiny_policy

    root = tmp_path_factory.mktemp("tiny-models")
    TINY_MODEL_DIRS.update({seed: build_tiny_policy(root / f"policy-seed{seed}", seed=seed) for seed in (0, 1)})
    return TINY_MODEL_DIRS


@pytest.fixture
def tiny_policy(db, tiny_model_dirs):
    """The active policy: a tiny model registered in the test database."""
    from models_service import loading

    loading._holders.clear()
    yield register_tiny_policy(tiny_model_dirs[0], name="tiny-policy-v0", activate=True)
    loading._holders.clear()


@pytest.fixture(autouse=True)
def _fresh_queue_settings():
    """Queue settings are cached in Redis and in process memory; each test starts from the database's. So do beat's
    last tick, the workers the ops page saw, the mark of a training run and sign-in failures (kept in Redis too)."""
    from django.core.cache import cache

    from labeling.models import QueueSettings
    from models_service.selectors import TRAINING_BUSY_KEY
    from training_jobs.loop import BEAT_TICK_KEY

    keys = [QueueSettings.CACHE_KEY, BEAT_TICK_KEY, "ops:queue-last-seen", TRAINING_BUSY_KEY]

    def forget():
        cache.delete_many(keys)
        client = cache._cache.get_client(write=True)  # sign-in failures per username (config.auth.slow_down)
        stale = list(client.scan_iter(match=cache.make_key("login-failures:*")))
        if stale:
            client.delete(*stale)
        QueueSettings._local = None

    forget()
    yield
    forget()
