"""Settings for `make run` on a developer's machine: safe defaults for everything, still overridable."""

import os

if not os.environ.get("DJANGO_SECRET_KEY"):  # unset, or empty as in a copy of .env.example
    os.environ["DJANGO_SECRET_KEY"] = "local-development-only-not-secret"
os.environ.setdefault("DJANGO_DEBUG", "true")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/feedback_loop")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/0")

from config.settings.base import *  # noqa: F403

# Serve static files straight from static/ while developing; bin/setup still runs collectstatic.
WHITENOISE_USE_FINDERS = DEBUG  # noqa: F405
WHITENOISE_AUTOREFRESH = DEBUG  # noqa: F405
