"""Where and how fast the trainers compute: the device and dtype, bf16 autocast on capable CPUs, seeds, and the
allocator settings that keep a CPU run's memory down."""

import contextlib
import functools
import os
import random

import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def cpu_bf16() -> bool:
    """Mixed precision on the CPU: matmuls in bf16 under autocast, weights and optimizer state in fp32.

    `TRAINING_CPU_BF16`: auto (the default: on where the processor multiplies bf16 natively, with AMX tiles or
    AVX512-BF16; docs/training.md has the speed-ups measured), true or false. Never on CUDA, where the weights
    themselves are bf16 already."""
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


def inference_device(*, cpu_dtype: str = "float32") -> tuple[torch.device, torch.dtype]:
    """Serving and sampling: CUDA with bf16 (fp16 on GPUs without bf16) when a GPU is present; on the CPU,
    `cpu_dtype` (POLICY_CPU_DTYPE): without bf16 matrix units, bf16 matmuls are hundreds of times slower than fp32
    (bench/sampling.py measures both)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.device("cpu"), getattr(torch, cpu_dtype)


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
    arenas that are only trimmed at their top, so the freed activations of earlier steps stay resident. One
    arena, a fixed 1 MB mmap threshold and trimming give them back (docs/training.md has PPO's figures).
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
