"""Registering artifacts, activating, promoting and rolling back, with the record of who did what."""

import shutil

import pytest
from django.core.exceptions import ValidationError

from models_service.models import ModelActivation, ModelVersion
from models_service.services import (
    model_version_activate,
    model_version_register,
    model_version_rollback,
    next_version_name,
)
from tests.support.models import register_tiny_policy

pytestmark = pytest.mark.django_db


def test_register_refuses_an_incomplete_or_pickled_artifact(tmp_path, tiny_model_dirs, settings):
    settings.ARTIFACTS_DIR = tmp_path
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dirs[0], broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ValidationError, match="no .safetensors weights"):
        model_version_register(kind="policy", stage="sft", artifact_dir=broken)
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dirs[0], pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValidationError, match="pickle-based weights"):
        model_version_register(kind="policy", stage="sft", artifact_dir=pickled)
    outside = tmp_path.parent / "outside-artifacts"
    shutil.copytree(tiny_model_dirs[0], outside, dirs_exist_ok=True)
    with pytest.raises(ValidationError, match="outside ARTIFACTS_DIR"):
        model_version_register(kind="policy", stage="sft", artifact_dir=outside)
    assert not ModelVersion.objects.exists()


def test_versions_are_numbered_per_kind_and_stage(tiny_model_dirs):
    assert next_version_name(kind="policy", stage="sft") == "policy-sft-v0"
    register_tiny_policy(tiny_model_dirs[0], name="policy-sft-v0", stage="sft")
    register_tiny_policy(tiny_model_dirs[0], name="policy-sft-v7", stage="sft")
    assert next_version_name(kind="policy", stage="sft") == "policy-sft-v8"
    assert next_version_name(kind="policy", stage="ppo") == "policy-ppo-v0"


def test_activate_switches_and_records_who_and_why(tiny_model_dirs, admin_user):
    first = register_tiny_policy(tiny_model_dirs[0], name="base", activate=True)
    second = register_tiny_policy(tiny_model_dirs[1], name="sft", stage="sft")
    activation = model_version_activate(version=second, actor=admin_user, reason="better RM score", action="promote")
    first.refresh_from_db()
    second.refresh_from_db()
    assert second.is_active and not first.is_active
    assert (activation.previous, activation.actor, activation.reason) == (first, admin_user, "better RM score")
    assert model_version_activate(version=second) is None, "activating the active version changes nothing"
    assert ModelVersion.objects.filter(kind="policy", is_active=True).count() == 1


def test_rollback_serves_the_previous_version_again(tiny_model_dirs, admin_user):
    first = register_tiny_policy(tiny_model_dirs[0], name="base", activate=True)
    second = register_tiny_policy(tiny_model_dirs[1], name="sft", stage="sft")
    model_version_activate(version=second, actor=admin_user)
    rollback = model_version_rollback(kind="policy", actor=admin_user, reason="labelers complain")
    first.refresh_from_db()
    assert first.is_active and rollback.action == ModelActivation.Action.ROLLBACK and rollback.previous == second
    assert list(ModelActivation.objects.values_list("action", flat=True)) == ["rollback", "activate", "activate"]


def test_rollback_without_history_is_refused(tiny_model_dirs):
    register_tiny_policy(tiny_model_dirs[0], name="base", activate=True)
    with pytest.raises(ValidationError, match="no earlier policy version"):
        model_version_rollback(kind="policy")


def test_a_version_whose_files_vanished_cannot_be_activated(tiny_model_dirs):
    version = register_tiny_policy(tiny_model_dirs[0], name="gone")
    shutil.rmtree(version.artifact_dir)
    with pytest.raises(ValidationError, match="cannot serve"):
        model_version_activate(version=version)
    version.refresh_from_db()
    assert not version.is_active
