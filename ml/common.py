"""What the trainers share: results, progress reporting, cancellation, seeds, configs, devices.

Trainers are plain functions, `train_x(config, data, ...) -> TrainResult`: no Django models, no Celery. They
report through a `Progress` object and stop when it says the run was cancelled. Library types (TRL, peft,
datasets) stay inside the trainer modules.
"""

import contextlib
import dataclasses
import functools
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


class Cancelled(Exception):
    """The run was cancelled; the trainer stops at the next step and writes nothing."""


class TrainingFailed(Exception):
    """The run cannot go on (for example PPO's KL exceeded its bound). The message says why."""


@dataclass
class TrainResult:
    output_dir: Path  # a complete save_pretrained folder (safetensors)
    metrics: dict  # final figures, e.g. {"val_loss": 1.23, "best_epoch": 2}
    series: dict = field(default_factory=dict)  # name -> [[step, value], ...]


class Progress:
    """Collects metric series and progress, and hands them to `sink` at most every `interval_s` seconds
    (and always at the end). `should_stop` is asked at every step; when it says so, the trainer stops."""

    def __init__(
        self,
        sink: Callable[["Progress"], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        interval_s: float = 2.0,
    ):
        self.sink = sink
        self.should_stop = should_stop
        self.interval_s = interval_s
        self.step = 0
        self.total = 0
        self.series: dict[str, list[list[float]]] = {}
        self.log: list[str] = []
        self._last_flush = 0.0

    def start(self, total: int) -> None:
        self.total = max(int(total), 1)
        self.flush(force=True)

    def metric(self, name: str, value: float, step: int | None = None) -> None:
        value = float(value)
        if math.isfinite(value):
            self.series.setdefault(name, []).append([int(self.step if step is None else step), round(value, 6)])

    def message(self, text: str) -> None:
        stamped = f"{time.strftime('%H:%M:%S')} {text}"
        logger.info(text)
        self.log.append(stamped)
        del self.log[:-200]

    def advance(self, steps: int = 1) -> None:
        """One more step done; flushes when due and raises Cancelled if the run was cancelled."""
        self.step = min(self.step + steps, self.total) if self.total else self.step + steps
        self.flush()
        if self.should_stop is not None and self.should_stop():
            raise Cancelled("cancelled")

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.sink is not None and (force or now - self._last_flush >= self.interval_s):
            self._last_flush = now
            self.sink(self)


def rollout_summary(history: list[dict], *, episodes_per_iteration: int, started: float) -> dict:
    """The final figures of an RL run (PPO, RLOO) from its per-iteration figures: the mean reward over the first
    and the last iterations (up to 3 each, never overlapping), the last KL and reply length."""
    head = history[: max(1, min(3, len(history) // 2))]
    tail = history[-len(head) :]
    return {
        "iterations": len(history),
        "episodes": len(history) * episodes_per_iteration,
        "mean_reward_first": sum(h["mean_reward"] for h in head) / len(head),
        "mean_reward_last": sum(h["mean_reward"] for h in tail) / len(tail),
        "kl_last": history[-1]["kl"],
        "response_length_last": history[-1]["response_length"],
        "seconds": round(time.monotonic() - started, 1),
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def cpu_bf16() -> bool:
    """Mixed precision on the CPU: matmuls in bf16 under autocast, weights and optimizer state in fp32.

    `TRAINING_CPU_BF16`: auto (the default: on where the processor multiplies bf16 natively, with AMX tiles or
    AVX512-BF16; the default model's forward pass ran 2.4x as fast as fp32 with AMX on one machine here, and 1.9x
    with AVX512-BF16 on another), true or false. Never on CUDA, where the weights themselves are bf16 already."""
    if torch.cuda.is_available():
        return False
    # The words config.env accepts (ml/ cannot import it); the settings refuse a bad value at start-up too.
    value = (os.environ.get("TRAINING_CPU_BF16") or "auto").strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    if value != "auto":
        raise ValueError(f"TRAINING_CPU_BF16={value!r} is invalid: expected auto, true/false, yes/no, on/off or 1/0.")
    return any(
        bool(getattr(torch.cpu, probe, lambda: False)())
        for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    )


def autocast():
    """The forward passes' precision context: bf16 autocast on the CPU when `cpu_bf16()`, else nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if cpu_bf16() else contextlib.nullcontext()


def training_device() -> tuple[torch.device, torch.dtype]:
    """Training runs on CUDA in bf16 (fp16 without bf16 support) when present, in fp32 on the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.device("cpu"), torch.float32


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


@functools.cache
def _glibc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def limit_allocator_caching() -> bool:
    """Make glibc's malloc give freed memory back to the system on the CPU. Returns whether it could.

    Training allocates activations of a different size at every step (prompt and reply lengths vary). With
    glibc's defaults, buffers under its adaptive mmap threshold (which climbs to 32 MB) come from per-thread
    arenas that are only trimmed at their top, so the freed activations of earlier steps stay resident: PPO with
    the default model rested at 2.7 GB and peaked at 4.2 GB after 3 iterations, against 1.6 and 3.0 GB with
    one arena, a fixed 1 MB mmap threshold and trimming. Buffers of 1 MB and more are then mapped and unmapped
    by the kernel (a few microseconds against the milliseconds of the matmuls that fill them).
    """
    libc = _glibc()
    if libc is None or torch.cuda.is_available():
        return False
    libc.mallopt(_M_ARENA_MAX, 1)
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
    return True


def release_freed_memory() -> None:
    """Return the allocator's free pages to the system (glibc's malloc_trim); a no-op elsewhere."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def config_from(cls, values: dict | None):
    """A config dataclass from a dict, refusing unknown keys and wrong types with the key's name."""
    values = dict(values or {})
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} setting(s): {', '.join(unknown)}")
    converted = {}
    for name, value in values.items():
        if value is None and "None" in str(known[name].type):
            converted[name] = None
            continue
        kind = type(getattr(cls(), name))
        try:
            converted[name] = kind(value) if kind in (int, float, bool, str) else value
        except (TypeError, ValueError):
            raise ValueError(f"{cls.__name__}.{name} must be {kind.__name__}, not {value!r}") from None
        if kind is bool and not isinstance(value, bool):
            raise ValueError(f"{cls.__name__}.{name} must be true or false, not {value!r}")
    return cls(**converted)


def cosine_schedule(optimizer, *, total_steps: int, warmup_steps: int = 0, final_fraction: float = 0.1):
    """Linear warm-up, then cosine decay to `final_fraction` of the learning rate (InstructGPT: 10%)."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def library_versions() -> dict:
    import importlib.metadata

    versions = {}
    for package in ("torch", "transformers", "peft", "trl", "accelerate", "safetensors", "tokenizers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def apply_lora(
    model, *, rank: int, alpha: int, dropout: float = 0.0, task_type: str = "CAUSAL_LM", top_layers: int = 0
):
    """Wrap a model with LoRA adapters on its attention and MLP projections (peft).

    `top_layers` > 0 puts adapters on the top blocks only: the backward pass then stops at the lowest adapted
    block, which on a CPU is most of a step's cost (0: every block)."""
    from peft import LoraConfig, get_peft_model

    layers = model.config.num_hidden_layers
    config = LoraConfig(
        layers_to_transform=list(range(max(layers - top_layers, 0), layers)) if top_layers > 0 else None,
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type=task_type,
        modules_to_save=["score"] if task_type == "SEQ_CLS" else None,
    )
    return get_peft_model(model, config)


ADAPTER_DIR = "adapter"  # a LoRA policy's adapter alone, inside its model folder


def save_model(model, tokenizer, output_dir: Path) -> Path:
    """save_pretrained with safetensors; a LoRA model is merged first, so the folder loads without peft. A LoRA
    policy (causal LM) also keeps its adapter alone in ADAPTER_DIR: what a server that serves the starting model
    loads on top of it at run time (vLLM's /v1/load_lora_adapter) instead of restarting on the merged weights."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        peft_config = getattr(model, "active_peft_config", None)
        if peft_config is not None and peft_config.task_type == "CAUSAL_LM":
            model.save_pretrained(output_dir / ADAPTER_DIR, safe_serialization=True)
        model = model.merge_and_unload()
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def train_top_layers_only(model, layers: int) -> int:
    """Freeze the embeddings and all but the top `layers` transformer blocks (0: train everything).

    On a CPU this is what makes training affordable: the backward pass stops at the lowest trained block, and the
    frozen blocks keep no activations. The final norm and the heads (LM head unless tied to the embeddings, the
    reward model's scalar head) stay trainable. Returns the number of trainable parameters.
    """
    if layers > 0:
        blocks = next(
            (
                m
                for m in model.modules()
                if isinstance(m, torch.nn.ModuleList) and len(m) == model.config.num_hidden_layers
            ),
            None,
        )
        if blocks is None:
            raise TrainingFailed(f"cannot find the transformer blocks of {type(model).__name__} to freeze")
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        trained = [*blocks[-layers:]]
        trained += [
            m
            for name, m in model.named_modules()
            if name.endswith(("norm", "score", "classifier")) and "layers." not in name
        ]
        lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if lm_head is not None and lm_head.weight is not model.get_input_embeddings().weight:
            trained.append(lm_head)
        for module in trained:
            for parameter in module.parameters():
                parameter.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def unwrapped(model):
    """The model itself, without a peft (LoRA) wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone_of(model):
    """The transformer under a task head (LlamaModel under LlamaForCausalLM or ...ForSequenceClassification)."""
    inner = unwrapped(model)
    return getattr(inner, inner.base_model_prefix)


def transformer_blocks(model) -> torch.nn.ModuleList:
    return backbone_of(model).layers


class _only_blocks:
    """Run a backbone over its blocks [start:stop] only; the final norm applies only when stop is None."""

    def __init__(self, backbone, start: int, stop: int | None):
        self.backbone, self.start, self.stop = backbone, start, stop

    def __enter__(self):
        self.layers, self.count, self.norm = self.backbone.layers, self.backbone.config.num_hidden_layers, None
        picked = list(self.layers)[self.start : self.stop]
        self.backbone.layers = torch.nn.ModuleList(picked)
        self.backbone.config.num_hidden_layers = len(picked)
        if self.stop is not None:
            self.norm, self.backbone.norm = self.backbone.norm, torch.nn.Identity()
        return self

    def __exit__(self, *exc):
        self.backbone.layers, self.backbone.config.num_hidden_layers = self.layers, self.count
        if self.norm is not None:
            self.backbone.norm = self.norm
        return False


class FrozenBlocks:
    """What enters the lowest trained block, for each token row, computed once with no gradient.

    With only the top n of L blocks training (`train_top_layers_only`), the lower L - n blocks compute the same
    states at every epoch. They run once per row here (one no-grad pass), and training then runs the top n blocks
    alone on the kept states: the backbone is called with `inputs_embeds` and only its top blocks (Llama-style
    backbones add nothing to `inputs_embeds`; a subclass checks that its outputs equal the whole model's, and the
    trainers fall back to full passes when they do not). Positions come from the attention mask, as in a full pass.
    """

    def __init__(self, model, tokenizer, *, trained_blocks: int, max_length: int, batch_size: int = 16):
        self.model, self.tokenizer, self.max_length, self.batch_size = model, tokenizer, max_length, batch_size
        self.below = len(transformer_blocks(model)) - trained_blocks
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.states: dict[tuple, torch.Tensor] = {}

    def _backbone(self):
        return backbone_of(self.model)

    @torch.no_grad()
    def add(self, rows: list[list[int]], *, progress: "Progress | None" = None) -> None:
        """Compute and keep the states of the rows not kept yet (similar lengths batched together). With
        `progress`, each batch reports (the run's heartbeat: this pass takes minutes with the default model) and
        stops the pass when the run was cancelled."""
        from ml.generation import left_pad

        device = next(self.model.parameters()).device
        missing = sorted({tuple(r) for r in rows if tuple(r) not in self.states}, key=len)
        backbone = self._backbone()
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            ids, mask = left_pad([list(r) for r in chunk], self.pad_id, device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with _only_blocks(backbone, 0, self.below), autocast():
                hidden = backbone(
                    input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
                ).last_hidden_state
            for i, row in enumerate(chunk):
                self.states[row] = hidden[i, -len(row) :].detach().clone()
            if progress is not None:
                progress.advance(0)

    def hidden(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The top blocks' output (after the final norm) for left-padded rows, and their attention mask."""
        self.add(rows)
        states = [self.states[tuple(r)] for r in rows]
        width = max(len(s) for s in states)
        embeds = states[0].new_zeros((len(states), width, states[0].shape[-1]))
        mask = torch.zeros((len(states), width), dtype=torch.long, device=states[0].device)
        for i, state in enumerate(states):
            embeds[i, width - len(state) :] = state
            mask[i, width - len(state) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        backbone = self._backbone()
        with _only_blocks(backbone, self.below, None), autocast():
            hidden = backbone(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
            ).last_hidden_state
        return hidden, mask
