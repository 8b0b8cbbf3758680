"""docker-compose.yml, the Procfile of `make run` and the entry scripts stay in step."""

import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ENTRY_SCRIPTS = {"bin/web", "bin/worker", "bin/beat", "bin/setup"}
PROCESSES = {"web", "worker-interactive", "worker-sampling", "worker-training", "worker-control", "beat"}


def compose_services() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def procfile() -> dict[str, list[str]]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return {name: shlex.split(command) for name, command in (line.split(":", 1) for line in lines if line.strip())}


def test_compose_has_every_service():
    assert {"db", "redis"} | PROCESSES <= set(compose_services())


def test_every_app_service_runs_an_entry_script():
    for name, service in compose_services().items():
        if name in {"db", "redis"}:
            continue
        command = service["command"]
        assert command[0] in ENTRY_SCRIPTS, f"{name} runs {command}"
        assert (ROOT / command[0]).is_file()


def test_compose_and_the_local_run_use_the_same_commands():
    services, local = compose_services(), procfile()
    assert set(local) == PROCESSES
    for name in PROCESSES:
        assert services[name]["command"] == local[name], name


def test_each_queue_has_a_worker():
    from config.celery_app import QUEUES

    workers = {tuple(command) for name, command in procfile().items() if name.startswith("worker-")}
    assert workers == {("bin/worker", queue) for queue in QUEUES}


def test_entry_scripts_are_executable():
    for script in ENTRY_SCRIPTS | {"bin/services", ".ci/run"}:
        assert (ROOT / script).stat().st_mode & 0o111, script


# --- safe by default when deployed (issue 15, item 13) ---


def test_the_image_and_the_entry_points_default_to_the_production_settings():
    assert "ENV DJANGO_SETTINGS_MODULE=config.settings.production" in (ROOT / "Dockerfile").read_text()
    for name in ("manage.py", "config/wsgi.py", "config/celery_app.py"):
        text = (ROOT / name).read_text()
        assert 'setdefault("DJANGO_SETTINGS_MODULE", "config.settings.production")' in text, name
    assert "${DJANGO_SETTINGS_MODULE:-config.settings.production}" in (ROOT / "bin/_common").read_text()
    assert "export DJANGO_SETTINGS_MODULE ?= config.settings.local" in (ROOT / "Makefile").read_text()


def test_compose_is_local_development_on_127_0_0_1_and_the_production_file_is_not():
    local = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name in PROCESSES | {"setup"}:
        environment = local["services"][name]["environment"]
        assert environment["DJANGO_SETTINGS_MODULE"] == "config.settings.local", name
    published = [port for service in local["services"].values() for port in service.get("ports", [])]
    assert published and all(port.startswith("127.0.0.1:") for port in published)
    production = yaml.safe_load((ROOT / "docker-compose.prod.yml").read_text())["services"]
    for name in PROCESSES | {"setup"}:
        environment = production[name]["environment"]
        assert environment["DJANGO_SETTINGS_MODULE"] == "config.settings.production", name
        assert environment["LOAD_DEMO_DATA"] == "false" and ":?" in environment["DJANGO_SECRET_KEY"], name


PROBE = """
import django, json
django.setup()
from django.conf import settings
print(json.dumps({k: getattr(settings, k, None) for k in (
    "DEBUG", "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE", "SECURE_HSTS_SECONDS", "SECURE_PROXY_SSL_HEADER")}))
"""


STRONG_KEY = "k3V9-wQ2x" * 6  # 54 characters, 9 different: what the production settings accept


def run_probe(**environment):
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "DATABASE_", "REDIS_"))}
    base.pop("DJANGO_SETTINGS_MODULE", None)
    return subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env=base | {"DJANGO_SETTINGS_MODULE": "config.settings.production"} | environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_production_settings_need_a_secret_and_are_secure_from_the_environment():
    import json

    missing = run_probe()
    assert missing.returncode != 0 and "DJANGO_SECRET_KEY" in missing.stderr
    services = {"DATABASE_URL": "postgres://postgres@127.0.0.1:5432/x", "REDIS_URL": "redis://127.0.0.1:6379/0"}
    secure = run_probe(DJANGO_SECRET_KEY=STRONG_KEY, **services)
    assert secure.returncode == 0, secure.stderr
    assert json.loads(secure.stdout) == {
        "DEBUG": False,
        "SESSION_COOKIE_SECURE": True,
        "CSRF_COOKIE_SECURE": True,
        "SECURE_HSTS_SECONDS": 31_536_000,
        "SECURE_PROXY_SSL_HEADER": None,
    }
    behind_a_proxy = run_probe(
        DJANGO_SECRET_KEY=STRONG_KEY,
        DJANGO_SECURE_PROXY_SSL_HEADER="true",
        DJANGO_HSTS_SECONDS="0",
        DJANGO_SECURE_COOKIES="false",
        **services,
    )
    figures = json.loads(behind_a_proxy.stdout)
    assert figures["SECURE_PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_PROTO", "https"]
    assert (figures["SECURE_HSTS_SECONDS"], figures["SESSION_COOKIE_SECURE"]) == (0, False)


STORE_WRITERS, STORE_READERS = {"setup", "worker-training"}, {"worker-interactive", "worker-sampling"}


def test_the_multihost_layout_shares_only_the_database_redis_and_the_store():
    """Issue 18: in docker-compose.multihost.yml every process has a disk of its own and the ones that load models
    find them in the S3-compatible store; the training worker asks for the GPUs."""
    multihost = yaml.safe_load((ROOT / "docker-compose.multihost.yml").read_text())
    services = multihost["services"]
    assert PROCESSES | {"setup"} <= set(services) and {"minio", "minio-bucket"} <= set(services)
    disks = {}
    for name in PROCESSES | {"setup"}:
        service = services[name]
        if name in STORE_WRITERS | STORE_READERS:
            assert service["environment"]["ARTIFACTS_URL"].startswith("s3://"), name
            assert "endpoint_url" in service["environment"]["ARTIFACTS_STORAGE_OPTIONS"], name
        artifacts = [v for v in service["volumes"] if v.endswith(":/data/artifacts")]
        assert len(artifacts) == 1, name
        disks[name] = artifacts[0].split(":")[0]
    assert len(set(disks.values())) == len(disks), "no two processes share an artifacts disk"
    gpu = services["worker-training"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    training = services["worker-training"]["environment"]
    assert (ROOT / training["TRAINING_ACCELERATE_CONFIG"]).is_file(), "the training worker launches with accelerate"


def interpolate(text: str, environment: dict) -> str:
    """Compose's variable interpolation (${VAR}, ${VAR:-default}, ${VAR:?error}, $$): a missing required variable
    raises KeyError naming it, as `docker compose config` fails."""
    import re

    def value(match):
        if match.group(0) == "$$":
            return "$"
        name, operator, argument = match.group(1), match.group(2), match.group(3)
        present = environment.get(name) or None
        if operator == ":?" and present is None:
            raise KeyError(f"{name}: {argument}")
        if operator == ":-" and present is None:
            return argument
        return present or ""

    return re.sub(r"\$\$|\$\{([A-Z0-9_]+)(?:(:\?|:-)([^}]*))?\}", value, text)


SECRETS = {
    "DJANGO_SECRET_KEY": STRONG_KEY,
    "DJANGO_ALLOWED_HOSTS": "labels.example.com",
    "POSTGRES_PASSWORD": "pg-Secret-1",
    "REDIS_PASSWORD": "redis-Secret-2",
    "MINIO_ROOT_USER": "minio-root",
    "MINIO_ROOT_PASSWORD": "minio-Secret-3",
    "STORE_WRITE_KEY": "store-writer",
    "STORE_WRITE_SECRET": "write-Secret-4",
    "STORE_READ_KEY": "store-reader",
    "STORE_READ_SECRET": "read-Secret-5",
}


@pytest.mark.parametrize(
    ("name", "needed"),
    [
        (
            "docker-compose.prod.yml",
            {"DJANGO_SECRET_KEY", "DJANGO_ALLOWED_HOSTS", "POSTGRES_PASSWORD", "REDIS_PASSWORD"},
        ),
        ("docker-compose.multihost.yml", set(SECRETS)),
    ],
)
def test_the_deployment_files_refuse_to_start_without_their_secrets(name, needed):
    """Every secret comes from the environment with no default: leaving any one out fails, naming it; none is
    written in the file."""
    text = (ROOT / name).read_text()
    for secret in needed:
        with pytest.raises(KeyError, match=secret):
            interpolate(text, {k: v for k, v in SECRETS.items() if k != secret})
    interpolate(text, SECRETS)  # with all of them, it starts
    import re

    for service, body in yaml.safe_load(text)["services"].items():
        environment = body.get("environment") or {}
        for variable, value in environment.items() if isinstance(environment, dict) else []:
            if re.search(r"PASSWORD|SECRET|_KEY$|_USER$|STORAGE_OPTIONS|DATABASE_URL|REDIS_URL", variable):
                assert "${" in str(value), f"{service}: {variable} is written in the file"


def test_the_multihost_layout_runs_the_production_settings_with_least_privilege():
    files = [
        yaml.safe_load(interpolate((ROOT / n).read_text(), SECRETS))
        for n in ("docker-compose.yml", "docker-compose.multihost.yml")
    ]
    base, multihost = files[0]["services"], files[1]["services"]
    for name in PROCESSES | {"setup"}:
        environment = base[name].get("environment", {}) | multihost[name]["environment"]
        assert environment["DJANGO_SETTINGS_MODULE"] == "config.settings.production", name
        assert environment["LOAD_DEMO_DATA"] == "false", name
        assert environment["REDIS_URL"] == "redis://:redis-Secret-2@redis:6379/0", name
        options = environment.get("ARTIFACTS_STORAGE_OPTIONS", "")
        if name in STORE_WRITERS:
            assert "write-Secret-4" in options and "read-Secret" not in options, name
        elif name in STORE_READERS:
            assert "read-Secret-5" in options and "write-Secret" not in options, name
        else:
            assert not options and "ARTIFACTS_URL" not in multihost[name]["environment"], (
                f"{name} never reads the store"
            )
        assert "minio-Secret-3" not in str(environment), f"{name} never gets MinIO's root credentials"
    assert "--requirepass" in str(multihost["redis"]["command"])
    production = yaml.safe_load(interpolate((ROOT / "docker-compose.prod.yml").read_text(), SECRETS))["services"]
    assert "--requirepass" in str(production["redis"]["command"])
    assert production["web"]["environment"]["REDIS_URL"] == "redis://:redis-Secret-2@redis:6379/0"


@pytest.mark.parametrize("name", ["docker-compose.prod.yml", "docker-compose.multihost.yml"])
def test_each_process_of_a_deployment_file_starts_the_production_settings(name):
    """Compose merges each service's environment over docker-compose.yml's (local development: DEBUG on): what a
    process gets in the end must pass the production settings' own checks, or every process refuses to start."""
    import json

    base = yaml.safe_load(interpolate((ROOT / "docker-compose.yml").read_text(), SECRETS))["services"]
    override = yaml.safe_load(interpolate((ROOT / name).read_text(), SECRETS))["services"]
    environments = {
        json.dumps(base[process].get("environment", {}) | override[process]["environment"], sort_keys=True)
        for process in PROCESSES | {"setup"}
    }
    for environment in map(json.loads, environments):
        probe = run_probe(**{key: str(value) for key, value in environment.items()})
        assert probe.returncode == 0, probe.stderr[-500:]
        assert json.loads(probe.stdout)["DEBUG"] is False


def test_the_shipped_accelerate_configs_are_valid():
    """config/accelerate/: DDP and DeepSpeed ZeRO-2, for one node and for several; each loads as accelerate's own
    launch config (only ddp.yaml runs in the suite: tests/ml/test_launch.py)."""
    from accelerate.commands.config.config_args import load_config_from_file

    shipped = sorted((ROOT / "config" / "accelerate").glob("*.yaml"))
    assert {p.stem for p in shipped} == {"ddp", "ddp_multinode", "deepspeed_zero2", "deepspeed_zero2_multinode"}
    for path in shipped:
        config = load_config_from_file(str(path))
        assert config.distributed_type in ("MULTI_GPU", "DEEPSPEED"), path.name
        assert (config.num_machines > 1) == ("multinode" in path.stem), path.name
        if config.distributed_type == "DEEPSPEED":
            assert config.deepspeed_config["zero_stage"] == 2, path.name


def test_production_refuses_debug_and_a_placeholder_secret():
    services = {"DATABASE_URL": "postgres://postgres@127.0.0.1:5432/x", "REDIS_URL": "redis://127.0.0.1:6379/0"}
    for key in ("change-me", "local-development-only-not-secret", "django-insecure-" + "a1b2c" * 10, "s" * 50):
        refused = run_probe(DJANGO_SECRET_KEY=key, **services)
        assert refused.returncode != 0 and "DJANGO_SECRET_KEY is a placeholder or too weak" in refused.stderr, key
    debug = run_probe(DJANGO_SECRET_KEY=STRONG_KEY, DJANGO_DEBUG="true", **services)
    assert debug.returncode != 0 and "DJANGO_DEBUG is on with the production settings" in debug.stderr
    assert run_probe(DJANGO_SECRET_KEY=STRONG_KEY, **services).returncode == 0


def test_check_deploy_passes_with_the_example_environment():
    """.env.example, which the deployment docs point at, ships production-safe values: with a generated key and
    the production settings, `manage.py check --deploy` reports no error and no warning about the key or DEBUG."""
    import os
    import secrets
    import subprocess
    import sys

    example = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            name, value = line.split("=", 1)
            example[name.strip()] = value.strip()
    assert example["DJANGO_SETTINGS_MODULE"] == "config.settings.production"
    assert (
        example["DJANGO_DEBUG"] == "false"
        and example["DJANGO_SECRET_KEY"] == ""
        and example["LOAD_DEMO_DATA"] == "false"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "DATABASE_", "REDIS_"))}
    environment = base | {k: v for k, v in example.items() if v} | {"DJANGO_SECRET_KEY": secrets.token_urlsafe(50)}
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = result.stdout + result.stderr
    assert "ERRORS:" not in report
    for warning in ("security.W009", "security.W018", "security.W004", "security.W012", "security.W016"):
        assert warning not in report, (warning, report)


def test_the_image_runs_as_a_user_and_leaves_secrets_and_history_out():
    dockerfile = (ROOT / "Dockerfile").read_text().splitlines()
    users = [line.split()[1] for line in dockerfile if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the image's processes must not run as root"
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".env", ".git", "var/", ".venv"} <= ignored
