"""Settings for the test suite: real Postgres and Redis, on their own database numbers."""

import os

os.environ.setdefault("DJANGO_SECRET_KEY", "test-only-not-secret")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/feedback_loop")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/14")
os.environ.setdefault("ARTIFACTS_DIR", "/tmp/feedback-loop-test-artifacts")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from config.settings.base import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
DATABASES["default"]["CONN_MAX_AGE"] = 0  # noqa: F405

# Serve static files straight from static/ (no collectstatic in tests).
WHITENOISE_USE_FINDERS = True
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # noqa: F405

# The tests' sampling workers sample when a test asks (tests/test_e2e_loop.py keeps the base policy's replies out).
SAMPLING_FILL_ON_START = False
