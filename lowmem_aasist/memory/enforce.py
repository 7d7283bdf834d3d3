"""Holding a run to its budget, and reading the peak it really reached.

CUDA: the caching allocator is capped with ``set_per_process_memory_fraction`` at the budget minus the CUDA
context (which torch does not count but NVML does), so an over-plan raises an out-of-memory error in this
process instead of pushing the card past the budget; the peak is the process's memory as NVML counts it.
CPU: glibc's malloc is told to return large freed blocks to the system at once (otherwise its dynamic mmap
threshold keeps freed activation buffers in the heap and resident memory drifts above what is live); the peak is
the kernel's resident high-water mark, reset after each reading.
"""

from __future__ import annotations

import os

import torch

from ..malloc import set_malloc_thresholds
from .measure import reset_rss_peak, rss_peak


def enable_expandable_segments() -> None:
    """Ask the CUDA caching allocator for expandable segments (less fragmentation) unless the user chose otherwise.

    Must run before the first CUDA allocation; harmless on CPU and on platforms without the feature.
    """
    if os.name == "posix":
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def release_freed_memory_promptly(mmap_threshold: int = 1 << 20) -> bool:
    """glibc: serve blocks >= ``mmap_threshold`` by mmap and trim the heap eagerly; False where not glibc."""
    return set_malloc_thresholds(mmap_threshold)


def enforce_budget(device: torch.device, budget_bytes: int, context_bytes: int) -> str:
    """Apply the budget to this process; returns a one-line description of what was done."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        # No floor: on an 80 GiB card a 1% floor would leave a sub-GiB budget uncapped (the planner has already
        # refused budgets that the context alone exceeds).
        fraction = max(min((budget_bytes - context_bytes) / total, 1.0), 0.0)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        return f"CUDA allocator capped at {fraction:.3f} of {total / 2**30:.2f} GiB (budget minus CUDA context)"
    done = release_freed_memory_promptly()
    return "CPU: malloc returns freed activation memory at once" if done else "CPU: allocator settings unavailable"


class PeakReader:
    """``read()`` returns the peak process memory since the previous call (or since creation)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._reset()

    def _reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_rss_peak()

    def read(self) -> int | None:
        if self.device.type == "cuda":
            from .device import process_gpu_bytes

            nvml = process_gpu_bytes(self.device)
            # NVML sees the process now; torch's reserved peak sees the high-water mark between readings.
            context = (nvml - torch.cuda.memory_reserved(self.device)) if nvml is not None else 0
            peak = torch.cuda.max_memory_reserved(self.device) + max(context, 0)
            value = max(peak, nvml or 0)
        else:
            value = rss_peak()
        self._reset()
        return value
