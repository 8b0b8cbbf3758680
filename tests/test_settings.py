"""Settings come from the environment and fail loudly, naming the variable."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from config import env

ROOT = Path(__file__).resolve().parent.parent


def start_django(**overrides) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "DATABASE_", "REDIS_"))}
    environment.update(
        DJANGO_SETTINGS_MODULE="config.settings.base",
        DJANGO_SECRET_KEY="x",
        DATABASE_URL="postgres://postgres@127.0.0.1:5432/feedback_loop",
        REDIS_URL="redis://127.0.0.1:6379/0",
    )
    environment.update(overrides)
    environment = {k: v for k, v in environment.items() if v is not None}
    return subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_base_settings_start_with_a_complete_environment():
    result = start_django()
    assert result.returncode == 0, result.stderr
    with_a_key = start_django(SAMPLING_BACKEND="vllm", SAMPLING_VLLM_API_KEY="k", SAMPLING_VLLM_URL="http://gpu:8000")
    assert with_a_key.returncode == 0, with_a_key.stderr
    while_developing = start_django(SAMPLING_BACKEND="vllm", DJANGO_DEBUG="true")
    assert while_developing.returncode == 0, while_developing.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"DJANGO_SECRET_KEY": None}, "Set the DJANGO_SECRET_KEY environment variable"),
        ({"DATABASE_URL": None}, "Set the DATABASE_URL environment variable"),
        ({"DJANGO_DEBUG": "maybe"}, "DJANGO_DEBUG='maybe' is invalid"),
        ({"DATABASE_CONN_MAX_AGE": "sixty"}, "DATABASE_CONN_MAX_AGE='sixty' is invalid: expected an integer"),
        ({"DATABASE_URL": "sqlite:///db.sqlite3"}, "Feedback Loop needs PostgreSQL"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL='localhost:6379' is invalid: expected a redis:// URL"),
        ({"SAMPLING_TOP_P": "1.5"}, "SAMPLING_TOP_P='1.5' is invalid: must be at most 1.0"),
        ({"SAMPLING_BACKEND": "vllm"}, "SAMPLING_BACKEND=vllm needs SAMPLING_VLLM_API_KEY outside DEBUG"),
    ],
)
def test_a_bad_environment_fails_at_start_up_naming_the_variable(overrides, message):
    result = start_django(**overrides)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert message in result.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"DATABASE_URL": "mysql://app:hunter2-secret@db/x"}, "DATABASE_URL='mysql://app:***@db/x' is invalid"),
        ({"DATABASE_URL": "postgres://app:hunter2-secret@db:port/x"}, "DATABASE_URL='postgres://app:***@db:port/x'"),
        ({"REDIS_URL": "http://:hunter2-secret@redis:6379/0"}, "REDIS_URL='http://:***@redis:6379/0' is invalid"),
        (
            {"ARTIFACTS_STORAGE_OPTIONS": '{"key": "k", "secret": "hunter2-secret"'},
            "ARTIFACTS_STORAGE_OPTIONS=<39 characters, not shown> is invalid: not JSON",
        ),
        ({"ARTIFACTS_STORAGE_OPTIONS": '["hunter2-secret"]'}, "expected a JSON object"),
        ({"DATABASE_URL": "mysql://app:hunter2/se@cret@db/x"}, "DATABASE_URL='mysql://app:***@db/x' is invalid"),
    ],
)
def test_a_bad_environment_never_echoes_a_secret(overrides, message):
    result = start_django(**overrides)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-600:]
    assert "hunter2" not in result.stderr


def test_only_secret_variables_are_hidden():
    from config.env import shown

    assert shown("SAMPLING_MAX_NEW_TOKENS", "-1") == "'-1'", "a token count is no secret"
    for name in ("DJANGO_SECRET_KEY", "SAMPLING_VLLM_API_KEY", "REDIS_PASSWORD", "STORE_READ_SECRET", "API_TOKEN"):
        assert shown(name, "hunter2") == "<7 characters, not shown>", name


def test_env_helpers(monkeypatch):
    monkeypatch.setenv("FL_TEST_INT", "12")
    monkeypatch.setenv("FL_TEST_LIST", "a, b,,c")
    monkeypatch.setenv("FL_TEST_CHOICE", "blue")
    assert env.env_int("FL_TEST_INT", min_value=1) == 12
    assert env.env_list("FL_TEST_LIST") == ["a", "b", "c"]
    assert env.env_int("FL_TEST_UNSET", 7) == 7
    with pytest.raises(ImproperlyConfigured, match="FL_TEST_INT='12' is invalid: must be at most 10"):
        env.env_int("FL_TEST_INT", max_value=10)
    with pytest.raises(ImproperlyConfigured, match="FL_TEST_CHOICE='blue' is invalid: expected one of red, green"):
        env.env_str("FL_TEST_CHOICE", choices=["red", "green"])
