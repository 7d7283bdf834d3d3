"""glibc malloc thresholds: set, remembered, and lifted only inside a heap_reuse block."""

from __future__ import annotations

import pytest

from lowmem_aasist import malloc


class FakeLibc:
    def __init__(self, max_threshold: int = 1 << 40) -> None:
        self.calls: list[tuple] = []
        self.max_threshold = max_threshold

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return int(value <= self.max_threshold)

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


@pytest.fixture
def libc(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(malloc, "_libc", lambda: fake)
    monkeypatch.setattr(malloc, "_current", None)
    return fake


def test_heap_reuse_does_nothing_where_the_threshold_was_never_lowered(libc):
    with malloc.heap_reuse(512 << 20):
        pass
    assert libc.calls == [] and malloc._current is None


def test_heap_reuse_lifts_then_restores_and_trims(libc):
    assert malloc.set_malloc_thresholds(1 << 20)
    libc.calls.clear()
    with malloc.heap_reuse(512 << 20):
        assert malloc._current == 512 << 20
    assert malloc._current == 1 << 20
    mmap, trim = malloc._M_MMAP_THRESHOLD, malloc._M_TRIM_THRESHOLD
    assert libc.calls == [("mallopt", mmap, 512 << 20), ("mallopt", trim, 512 << 20),
                          ("mallopt", mmap, 1 << 20), ("mallopt", trim, 1 << 20), ("malloc_trim", 0)]


def test_heap_reuse_restores_after_an_error(libc):
    malloc.set_malloc_thresholds(1 << 20)
    with pytest.raises(RuntimeError), malloc.heap_reuse(512 << 20):
        raise RuntimeError("inside the loop")
    assert malloc._current == 1 << 20


def test_old_glibc_gets_the_largest_threshold_it_allows(libc):
    libc.max_threshold = 32 << 20  # glibc before 2.35: HEAP_MAX_SIZE / 2
    malloc.set_malloc_thresholds(1 << 20)
    with malloc.heap_reuse(512 << 20):
        assert malloc._current == 32 << 20
    assert malloc._current == 1 << 20


def test_without_glibc_nothing_is_set(monkeypatch):
    monkeypatch.setattr(malloc, "_libc", lambda: None)
    monkeypatch.setattr(malloc, "_current", None)
    assert not malloc.set_malloc_thresholds(1 << 20)
    assert malloc._current is None
