"""Measure one training step's peak memory: exact live-tensor bytes, plus the process RSS and CUDA allocator peaks.

The live-tensor count is the quantity the estimator (:mod:`.estimate`) predicts without allocating: the bytes of
every tensor storage alive at once (parameters, buffers, gradients, optimizer state, inputs, activations saved for
backward, temporaries). It leaves out what no tensor owns (allocator caching and fragmentation, kernel workspaces,
the Python heap), which the RSS and CUDA allocator figures show beside it.

All figures are for the steady-state step: :func:`measure_step` runs a warm-up step first, because the first
optimizer step creates the Adam state inside the step, where later steps find it already allocated.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..step import forward_backward
from .device import autocast_ctx

CLASS_WEIGHTS = (0.1, 0.9)
"""Spoof and bona fide loss weights of the paper's recipe; the probes use them so the loss matches training."""


def _tensors_in(obj: object) -> Iterator[Tensor]:
    # Op arguments and results are tensors, or (nested) tuples / lists of them (cat, split, foreach ops).
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors_in(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors_in(item)


def _storage(t: Tensor) -> torch.UntypedStorage | None:
    # Sparse and other non-strided layouts own no single storage; AASIST never makes them.
    return t.untyped_storage() if t.layout is torch.strided else None


class LiveTensorTracker(TorchDispatchMode):
    """Exact live-tensor accounting for the ops run inside the mode, including those autograd runs in backward.

    Every storage an op returns that is neither already tracked nor shared with one of the op's inputs is a new
    allocation: views and in-place / ``out=`` results share an input's storage, so they add nothing. Storages are
    keyed by the identity of their Python ``UntypedStorage`` object, not by ``data_ptr`` (meta and fake tensors all
    have a null one); PyTorch keeps that object alive for as long as any C++ reference to the storage lives, so
    a weak reference to it fires exactly when the memory is released, even for tensors only autograd holds
    (saved activations die when backward frees the graph, and the weak reference sees it).

    ``device`` restricts the count to tensors on one device (e.g. only GPU memory when the batch stays on the
    CPU); fake tensors report the device they pretend to be on. :meth:`track` adds tensors that already exist
    (the model and optimizer state) so that freeing them, like ``zero_grad(set_to_none=True)`` does, is seen.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.device = torch.device(device) if device is not None else None
        self.current_bytes = 0
        self.peak_bytes = 0
        # id(storage) -> (weak reference, bytes); the weak reference's callback removes the entry on release.
        self._live: dict[int, tuple[weakref.ref, int]] = {}
        # Release callbacks can run on autograd's device threads (CUDA backward), so updates take a lock.
        self._lock = threading.Lock()

    def _counts(self, t: Tensor) -> bool:
        if self.device is None:
            return True
        d = t.device
        return d.type == self.device.type and (self.device.index is None or d.index == self.device.index)

    def _released(self, key: int, ref: weakref.ref) -> None:
        with self._lock:
            entry = self._live.get(key)
            if entry is not None and entry[0] is ref:  # the id may already name a newer storage
                del self._live[key]
                self.current_bytes -= entry[1]

    def _add(self, storage: torch.UntypedStorage) -> int:
        key = id(storage)
        size = storage.nbytes()
        ref = weakref.ref(storage, lambda r, k=key: self._released(k, r))
        with self._lock:
            self._live[key] = (ref, size)
            self.current_bytes += size
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        return size

    def _resized(self, storage: torch.UntypedStorage) -> None:
        # resize_ (and out= ops that resize) grow a tracked storage in place.
        key = id(storage)
        with self._lock:
            ref, size = self._live[key]
            new = storage.nbytes()
            if new != size:
                self._live[key] = (ref, new)
                self.current_bytes += new - size
                self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def track(self, tensors: Iterable[Tensor]) -> int:
        """Count tensors that already exist (each storage once); return the bytes this added."""
        added = 0
        for t in tensors:
            st = _storage(t) if self._counts(t) else None
            if st is not None and id(st) not in self._live:
                added += self._add(st)
        return added

    def reset_peak(self) -> None:
        """Start a new peak from what is live now."""
        with self._lock:
            self.peak_bytes = self.current_bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs: set[int] | None = None  # storages of the inputs, worked out only when an untracked result needs it
        for t in _tensors_in(out):
            st = _storage(t) if self._counts(t) else None
            if st is None:
                continue
            if id(st) in self._live:
                self._resized(st)
                continue
            if inputs is None:
                inputs = {id(s) for s in map(_storage, _tensors_in((args, kwargs))) if s is not None}
            if id(st) not in inputs:  # neither a view nor an in-place result of an input: a new allocation
                self._add(st)
        return out


def tensors_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and repeats counted once)."""
    seen: dict[int, torch.UntypedStorage] = {}  # holding the storages keeps their ids from being reused meanwhile
    for t in tensors:
        st = _storage(t)
        if st is not None:
            seen.setdefault(id(st), st)
    return sum(st.nbytes() for st in seen.values())


def state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[Tensor]:
    """The fixed tensors of training: parameters, buffers, gradients and optimizer state."""
    params = list(model.parameters())
    out = [*params, *model.buffers(), *(p.grad for p in params if p.grad is not None)]
    if optimizer is not None:
        for group in optimizer.param_groups:
            out += [p.grad for p in group["params"] if p.grad is not None]  # params outside the model, if any
        out += list(_tensors_in(list(optimizer.state.values())))
    return out


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of parameters, buffers, gradients and optimizer state now (distinct storages)."""
    return tensors_bytes(state_tensors(model, optimizer))


@dataclass(frozen=True)
class StepMemory:
    """Memory of one steady-state training step (the step after a warm-up step)."""

    peak_bytes: int
    """Live-tensor peak over the step: what was live at its start (state and inputs) plus what the step allocated,
    minus what it had freed by then (e.g. the previous gradients, freed by ``zero_grad``)."""
    state_bytes: int
    """Parameters, buffers, gradients and optimizer state at the start of the step (not the inputs)."""
    rss_peak_bytes: int | None
    """Whole-process peak resident memory during the step (Linux only; None elsewhere). It includes the Python
    interpreter, PyTorch's libraries and the allocator's cache, and, on CUDA, only host memory."""
    cuda_peak_allocated: int | None
    """``torch.cuda.max_memory_allocated`` over the step (None on CPU)."""
    cuda_peak_reserved: int | None
    """``torch.cuda.max_memory_reserved`` over the step (None on CPU)."""
    step_s: float
    """Wall time of the measured step (with the tracker's small per-op overhead)."""


_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_rss_peak() -> bool:
    # Writing 5 to clear_refs resets the kernel's high-water mark (VmHWM) to the current RSS (Linux >= 4.0).
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_now() -> int:
    """Resident memory of this process now (0 where /proc is not there)."""
    return _status_kib("VmRSS:") or 0


def rss_peak() -> int | None:
    """The kernel's resident high-water mark since the last :func:`reset_rss_peak` (None where unreadable)."""
    return _status_kib("VmHWM:")


def measure_data_path(read_batch: Callable[[], object], items: int) -> tuple[int, float]:
    """(resident bytes, seconds per item) of ``read_batch``: its resident peak above the level the process settles
    at, holding what it returns, as a CPU run holds a batch through its steps. A first call loads libraries and fills
    caches; what stays of it is the process's own, which the planner counts with the process. The planner's
    allocator settings apply (freed blocks go back at once), so heap kept from the first call cannot hide the
    second one's peak."""
    from .enforce import release_freed_memory_promptly

    release_freed_memory_promptly()
    read_batch()
    gc.collect()
    start = rss_now()
    resettable = reset_rss_peak()
    t0 = time.perf_counter()
    held = read_batch()
    seconds = time.perf_counter() - t0
    peak = (rss_peak() if resettable else None) or rss_now()
    del held
    return max(peak - start, 0), seconds / max(items, 1)


def _inputs_of(step: Callable[[], object]) -> tuple[Tensor, ...]:
    return tuple(getattr(step, "inputs", ()))


def tracked_step(
    step: Callable[[], object], model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device | str | None
) -> tuple[int, int]:
    """Run ``step`` once under a :class:`LiveTensorTracker`; return (live-tensor peak, state bytes at its start).

    The tracker starts from the state and the step's ``inputs`` (when the step has that attribute), so their bytes
    are in the peak and their release inside the step is seen. Shared by the measurement and the estimator.
    """
    tracker = LiveTensorTracker(device)
    state = state_tensors(model, optimizer)
    fixed = tensors_bytes(t for t in state if tracker._counts(t))
    tracker.track(state)
    tracker.track(_inputs_of(step))
    del state  # our own references would keep the old gradients alive past zero_grad
    tracker.reset_peak()
    with tracker:
        step()
    return tracker.peak_bytes, fixed


def measure_step(
    step: Callable[[], object],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device | str,
    warmup: int = 1,
) -> StepMemory:
    """Run ``warmup`` untracked steps, then measure one: the steady-state step (Adam state already allocated).

    ``step`` runs one whole training step (:func:`build_step` makes one); tensors it names in an ``inputs``
    attribute (the batch) count from the start, like the state, because they were made before the step. On CUDA the live-tensor count covers
    device tensors only, the same memory ``cuda_peak_allocated`` reports (which adds allocator rounding and cuDNN
    workspaces); on the CPU it covers every tensor, the batch included.
    """
    device = torch.device(device)
    for _ in range(warmup):
        step()
    gc.collect()  # drop reference cycles from the warm-up so their tensors do not sit in the measured step
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    rss_ok = reset_rss_peak()
    start = time.perf_counter()
    peak, fixed = tracked_step(step, model, optimizer, device)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return StepMemory(
        peak_bytes=peak,
        state_bytes=fixed,
        rss_peak_bytes=rss_peak() if rss_ok else None,
        cuda_peak_allocated=torch.cuda.max_memory_allocated(device) if cuda else None,
        cuda_peak_reserved=torch.cuda.max_memory_reserved(device) if cuda else None,
        step_s=seconds,
    )


class TrainingStep:
    """One training step on a fixed batch: ``zero_grad(set_to_none=True)``, :func:`forward_backward`, ``step()``.

    The batch lives on the CPU, as the trainer's loader delivers it; ``forward_backward`` moves each micro-batch
    to the device. ``inputs`` names the batch so the measurement counts it.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        x: Tensor,
        y: Tensor,
        class_weights: Tensor,
        micro_batch: int,
        device: torch.device,
        precision: str,
    ) -> None:
        self.model, self.optimizer = model, optimizer
        self.x, self.y, self.class_weights = x, y, class_weights
        self.micro_batch, self.device, self.precision = micro_batch, device, precision

    @property
    def inputs(self) -> tuple[Tensor, ...]:
        return self.x, self.y, self.class_weights

    def _autocast(self):
        return autocast_ctx(self.device, self.precision)

    def __call__(self) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = forward_backward(self.model, self.x, self.y, self.class_weights, self.micro_batch, self._autocast)
        self.optimizer.step()
        return loss


def build_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: int,
    crop: int,
    micro_batch: int,
    precision: str,
    device: torch.device | str,
) -> TrainingStep:
    """A training step on a seeded random batch of ``batch`` waveforms of ``crop`` samples.

    Labels alternate spoof / bona fide so both classes (and both loss weights) appear from batch 2 up. Under a
    ``FakeTensorMode`` the batch is fake too (the estimator builds its step with this same function). fp16 runs
    without a GradScaler: the scaler's few scalars do not change the memory.
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, crop, generator=gen)
    y = torch.arange(batch) % 2
    class_weights = torch.tensor(CLASS_WEIGHTS, device=device)
    return TrainingStep(model, optimizer, x, y, class_weights, micro_batch, device, precision)
