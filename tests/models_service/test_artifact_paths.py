"""Issue 15, item 15: a model version's artifact path cannot leave ARTIFACTS_DIR, and POLICY_BASE_MODEL loads
safetensors only."""

import pytest
import torch
from django.core.exceptions import SuspiciousFileOperation
from django.db import IntegrityError, transaction

from models_service import default_model
from models_service.loading import load_version
from models_service.models import ModelVersion
from tests.support.models import register_tiny_policy

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("path", ["/etc", "../outside", "models/../../outside", "..", ""])
def test_the_database_refuses_a_path_out_of_the_artifacts(tiny_policy, path):
    with pytest.raises(IntegrityError, match="model_version_artifact_path_inside"), transaction.atomic():
        ModelVersion.objects.filter(pk=tiny_policy.pk).update(artifact_path=path)


def test_a_link_out_of_the_artifacts_is_refused_before_loading(tiny_model_dirs, settings, tmp_path):
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"
    version = register_tiny_policy(tiny_model_dirs[0], name="tiny-linked")
    outside = tmp_path / "elsewhere"
    version.artifact_dir.rename(outside)
    (settings.ARTIFACTS_DIR / version.artifact_path).symlink_to(outside, target_is_directory=True)
    version.refresh_from_db()
    with pytest.raises(SuspiciousFileOperation, match="leaves ARTIFACTS_DIR"):
        load_version(version)


def test_policy_base_model_with_pickled_weights_only_is_refused(tiny_model_dirs, settings, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pickled = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[0])
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(tiny_model_dirs[0]).save_pretrained(pickled)
    assert (pickled / "pytorch_model.bin").exists() and not list(pickled.glob("*.safetensors"))
    settings.POLICY_BASE_MODEL = str(pickled)
    with pytest.raises(default_model.DefaultModelError, match="no safetensors weights"):
        default_model.convert_to(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # The same folder with safetensors converts.
    model.save_pretrained(pickled)
    facts = default_model.convert_to(tmp_path / "out")
    assert facts["parameters"] == sum(p.numel() for p in model.parameters())
    assert torch.is_tensor(next(model.parameters()))
