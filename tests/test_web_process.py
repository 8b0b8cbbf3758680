"""The web process serves pages without importing torch: model work happens in the workers."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import sys
import django
from django.test import Client
django.setup()
from django.urls import get_resolver
get_resolver().url_patterns  # import every view module
import config.wsgi
Client().get("/healthz")
heavy = sorted(name for name in ("torch", "transformers", "peft", "trl", "datasets") if name in sys.modules)
print("HEAVY:" + ",".join(heavy))
"""


def test_web_process_does_not_import_torch(db):
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env={"DJANGO_SETTINGS_MODULE": "config.settings.test", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "HEAVY:\n" in result.stdout, result.stdout


def test_healthz(client, db):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
