"""What every trainer shares about its run: results, progress reporting and cancellation, configs, versions.

Trainers are plain functions, `train_x(config, data, ...) -> TrainResult`: no Django models, no Celery. They
report through a `Progress` object and stop when it says the run was cancelled. Library types (TRL, peft,
datasets) stay inside the trainer modules.
"""

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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


def library_versions() -> dict:
    import importlib.metadata

    versions = {}
    for package in ("torch", "transformers", "peft", "trl", "accelerate", "safetensors", "tokenizers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions
