"""docker-compose.yml, the Procfile of `make run` and the entry scripts stay in step."""

import shlex
from pathlib import Path

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
