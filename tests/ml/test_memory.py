"""The training processes give freed memory back to the system (glibc; see limit_allocator_caching)."""

import torch

from ml.device import limit_allocator_caching, release_freed_memory


def resident_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_freed_activation_sized_buffers_leave_the_process():
    assert limit_allocator_caching()  # glibc here
    release_freed_memory()  # what earlier tests in this process freed, so that the buffers below need new pages
    before = resident_mb()
    # Buffers of a few hundred KB (like one layer's activations) with a small live tensor after each, as
    # activations leave small tensors around them: the heap cannot shrink from its top.
    buffers, pins = [], []
    for _ in range(1500):
        buffers.append(torch.ones(100_000))  # 400 KB each, 600 MB in all
        pins.append(torch.ones(16))
    grown = resident_mb() - before
    del buffers
    release_freed_memory()
    left = resident_mb() - before
    assert grown > 450, grown
    assert left < 60, f"{left:.0f} MB of {grown:.0f} MB freed buffers still resident"
    assert len(pins) == 1500
