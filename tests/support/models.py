"""Tiny models registered in the test database (tests/conftest.py builds them once per session)."""

from pathlib import Path

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
