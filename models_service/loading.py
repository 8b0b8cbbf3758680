"""Loading models onto the best device, and keeping the active one loaded in a worker process.

Only worker processes import this module: it imports torch.
"""

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from django.conf import settings
from django.utils import timezone

from ml.cpu_inference import pack_linear_layers
from ml.device import inference_device
from models_service.artifact_store import local_dir
from models_service.models import ModelVersion
from models_service.services import artifact_problems

logger = logging.getLogger(__name__)


def check_artifact(path: Path) -> None:
    """A model folder in save_pretrained layout with safetensors weights only."""
    problems = artifact_problems(path)
    if problems:
        raise ValueError(f"{path} is not a loadable model: {'; '.join(problems)}")


@dataclass
class LoadedModel:
    version_id: int
    version_name: str
    model: object
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    loaded_at: float = field(default_factory=time.monotonic)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_version(version: ModelVersion, *, device=None, dtype=None, for_inference: bool = False) -> LoadedModel:
    """Load a registered model: a causal LM for a policy, a sequence classifier for a reward model.

    `for_inference` packs the linear layers for oneDNN on the CPU (see cpu_inference.py); such a model
    cannot be trained.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = local_dir(version)  # its folder here, or a verified copy from the artifact store
    check_artifact(path)
    if device is None or dtype is None:
        device, dtype = inference_device(cpu_dtype=settings.POLICY_CPU_DTYPE)
    model_class = (
        AutoModelForSequenceClassification if version.kind == ModelVersion.Kind.REWARD else AutoModelForCausalLM
    )
    started = time.monotonic()
    model = model_class.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device).eval()
    tokenizer = load_tokenizer(path)
    if for_inference and settings.POLICY_CPU_PACKED_WEIGHTS:
        pack_linear_layers(model, batch_hint=settings.SAMPLING_BATCH_CONTEXTS * settings.SAMPLING_K)
    logger.info(
        "loaded %s (%s) on %s/%s in %.1f s", version.name, version.kind, device, dtype, time.monotonic() - started
    )
    return LoadedModel(version.pk, version.name, model, tokenizer, device, dtype)


class NoActiveModel(RuntimeError):
    pass


class ActiveModelHolder:
    """Keeps the active model of one kind loaded in this process, and swaps it when the active version changes.

    Every `get()` asks the database which version is active (one indexed query), so a promotion or a rollback
    is picked up by the next task, without a restart. If the new version fails to load, the previous one keeps
    serving, the error is recorded on the version, and the load is retried after `retry_after_s`.
    """

    def __init__(self, kind: str, *, retry_after_s: float = 300.0):
        self.kind = kind
        self.retry_after_s = retry_after_s
        self.current: LoadedModel | None = None
        self._failed: dict[int, float] = {}
        self._lock = threading.Lock()  # transformers' loading is not thread-safe (a thread-pool worker)

    def get(self) -> LoadedModel:
        with self._lock:
            return self._get()

    def _get(self) -> LoadedModel:
        active = ModelVersion.objects.filter(kind=self.kind, is_active=True).first()
        if active is None:
            if self.current is not None:
                return self.current
            raise NoActiveModel(f"No active {self.kind} model. Run `manage.py prepare_default_model` or activate one.")
        if self.current is not None and self.current.version_id == active.pk:
            return self.current
        failed_at = self._failed.get(active.pk)
        if failed_at is not None and time.monotonic() - failed_at < self.retry_after_s and self.current is not None:
            return self.current
        try:
            loaded = load_version(active, for_inference=True)
        except Exception as exc:
            self._failed[active.pk] = time.monotonic()
            message = f"{timezone.now():%Y-%m-%d %H:%M:%S} failed to load: {type(exc).__name__}: {exc}"
            ModelVersion.objects.filter(pk=active.pk).update(load_error=message[:2000])
            logger.exception("could not load %s %s", self.kind, active.name)
            if self.current is None:
                raise
            logger.warning("still serving %s", self.current.version_name)
            return self.current
        previous, self.current = self.current, loaded
        self._failed.pop(active.pk, None)
        if previous is not None:
            logger.info("switched %s from %s to %s", self.kind, previous.version_name, loaded.version_name)
            del previous
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return self.current


_holders: dict[str, ActiveModelHolder] = {}
_holders_lock = threading.Lock()


def active_holder(kind: str) -> ActiveModelHolder:
    """The process-wide holder for the active model of `kind`."""
    with _holders_lock:
        if kind not in _holders:
            _holders[kind] = ActiveModelHolder(kind)
        return _holders[kind]
