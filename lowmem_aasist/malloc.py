"""glibc's malloc thresholds, the one knob both the trainer and the data-loading workers turn (in opposite ways)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Iterator
from contextlib import contextmanager

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_GLIBC_OLD_MAX = 32 << 20
_current: int | None = None  # the threshold this process last set; None: glibc's own dynamic one


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def set_malloc_thresholds(threshold: int) -> bool:
    """Serve blocks >= ``threshold`` by mmap and trim the heap past ``threshold`` of free top memory; False where the
    C library is not glibc (its allocator's defaults then stand)."""
    global _current
    libc = _libc()
    if libc is None:
        return False
    try:
        ok = libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1
        ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, threshold) == 1
    except AttributeError:
        return False
    if ok:
        _current = threshold
    return ok


@contextmanager
def heap_reuse(threshold: int) -> Iterator[None]:
    """Within the block, serve blocks below ``threshold`` from the heap again; on leaving, restore the threshold set
    before and hand the heap's free memory back to the system (``malloc_trim``).

    For loops that allocate and free the same large temporaries many times (the tiled policy's tiles): under a low
    mmap threshold each of them is a fresh mmap whose pages fault in on first touch and go back on free, which
    measured 2.3x slower per step than reusing heap blocks. Does nothing unless this process lowered the threshold.
    """
    before = _current
    if before is None or before >= threshold:
        yield
        return
    # glibc before 2.35 refuses mmap thresholds above 32 MiB (HEAP_MAX_SIZE / 2 on 64-bit): take what it allows.
    if not set_malloc_thresholds(threshold) and not set_malloc_thresholds(min(threshold, _GLIBC_OLD_MAX)):
        yield
        return
    try:
        yield
    finally:
        set_malloc_thresholds(before)
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)
