"""glibc's malloc thresholds, the one knob both the trainer and the data-loading workers turn (in opposite ways)."""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def set_malloc_thresholds(threshold: int) -> bool:
    """Serve blocks >= ``threshold`` by mmap and trim the heap past ``threshold`` of free top memory; False where the
    C library is not glibc (its allocator's defaults then stand)."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1
        return ok and libc.mallopt(_M_TRIM_THRESHOLD, threshold) == 1
    except (OSError, AttributeError):
        return False
