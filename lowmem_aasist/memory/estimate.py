"""Estimate a training step's peak memory without allocating it: the real step, run on fake tensors.

:func:`estimate_step_peak` builds the model, runs the same two training steps :func:`.measure.measure_step`
measures (a warm-up step, then the tracked one) under ``FakeTensorMode``, and counts storages with the same
:class:`.measure.LiveTensorTracker`. Fake tensors carry shapes, dtypes, strides and devices but no data, so every
op's output has exactly the size it would have and nothing is computed: a full-size AASIST step takes well under a
second. What it predicts is the live-tensor peak; allocator overheads come on top (see :mod:`.measure`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ..models import build_model
from .measure import build_step, tracked_step
from .plan import OPTIMIZERS

# The trainer's Adam settings (config defaults); only weight decay changes memory (one temporary per parameter).
_ADAM = {"lr": 1e-4, "betas": (0.9, 0.999), "weight_decay": 1e-4}

# bitsandbytes' 8-bit Adam: blockwise uint8 state with one float32 absmax per block, for tensors of at least
# min_8bit_size elements; smaller tensors keep float32 state (bitsandbytes.optim.optimizer.Optimizer2State).
_BNB_BLOCK = 256
_BNB_MIN_8BIT = 4096


def _make_optimizer(name: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if name.startswith("adamw") else torch.optim.Adam
    return cls(params, **_ADAM)


def adam8bit_state_bytes(params: list[nn.Parameter]) -> int:
    """Bytes of bitsandbytes' 8-bit Adam state for ``params``: two uint8 moments plus one float32 absmax per block
    for tensors of at least ``_BNB_MIN_8BIT`` elements, two float32 moments for smaller ones."""
    total = 0
    for p in params:
        n = p.numel()
        total += 2 * (n + 4 * -(-n // _BNB_BLOCK)) if n >= _BNB_MIN_8BIT else 2 * 4 * n
    return total


def adam8bit_saving(params: list[nn.Parameter]) -> int:
    """Bytes of torch Adam's state minus bitsandbytes' 8-bit state for the same parameters.

    bitsandbytes runs neither on the CPU nor on fake tensors, so the estimator steps torch Adam and swaps the
    state's size afterwards. The state is live through the whole steady-state step, so the peak moves by exactly
    this; the two optimizers' update temporaries differ too, but they are parameter-sized and the peak is set by
    activations.
    """
    return sum(2 * 4 * p.numel() for p in params) - adam8bit_state_bytes(params)


def fake_module(model: nn.Module, mode: FakeTensorMode) -> None:
    """Swap every parameter and buffer for a fake tensor of the same size, dtype, strides and requires_grad."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = mode.from_tensor(p)  # stays an nn.Parameter (a fake one)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = mode.from_tensor(b)


def estimate_step_peak(
    model_name: str,
    batch: int,
    crop: int,
    micro_batch: int,
    precision: str,
    *,
    prepare: Callable[[nn.Module], object] | None = None,
    optimizer: str = "adam",
    device: torch.device | str = "cpu",
    full_batch: bool = False,
) -> int:
    """Predicted steady-state live-tensor peak, in bytes, of one training step (see :func:`.measure.measure_step`).

    ``prepare(model)`` applies setup-time techniques (channels-last, checkpointing, ...) to the freshly built model,
    before its tensors are made fake, in the order the trainer applies them: build, prepare, optimizer. It may
    change modules, hooks and the parameters' layout; any tensor it keeps outside the parameters and buffers stays
    real, and using it in the step then fails loudly instead of being silently left out.

    ``device`` is the device the step would run on. A CUDA estimate needs a visible GPU (the small real model is
    built there, and PyTorch disables CUDA autocast without one). ``optimizer`` is one of :data:`OPTIMIZERS`.
    ``full_batch`` runs every micro-batch instead of the equivalent three (slower; the tests check they agree).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("a CUDA estimate needs a visible GPU: without one PyTorch disables CUDA autocast")
    # The model is built for real: its front-end filter bank is computed with NumPy, which fake tensors cannot
    # feed. That costs ~1 MB and milliseconds; every tensor is then swapped for a fake one, so the step itself
    # never meets a real tensor (no allow_non_fake_inputs, which would let real allocations go uncounted).
    model = build_model(model_name).to(device).train()
    if prepare is not None:
        prepare(model)
    mode = FakeTensorMode()
    fake_module(model, mode)
    # Op count, hence time, grows with the number of micro-batches, not their size. Micro-batches after the first
    # repeat its memory exactly once gradients exist, so two full ones and the remainder, if any, go through every
    # state the step has (first, steady, short last, optimizer step); the rest of the batch only adds its share
    # of the batch tensors, which stay live throughout, and is added back below.
    run_batch = min(batch, 2 * micro_batch + batch % micro_batch) if not full_batch else batch
    with mode:
        params = list(model.parameters())
        opt = _make_optimizer(optimizer, params)
        step = build_step(model, opt, run_batch, crop, micro_batch, precision, device)
        step()  # warm-up: creates the optimizer state, as in measure_step
        peak, _ = tracked_step(step, model, opt, device)
        # Per left-out sample: its waveform and label on the CPU (the batch stays there), its label on a GPU
        # (forward_backward moves the labels over whole).
        per_sample = step.y.element_size() + (step.x.element_size() * crop if device.type == "cpu" else 0)
    peak += (batch - run_batch) * per_sample
    if optimizer.endswith("8bit"):
        peak -= adam8bit_saving(params)
    return peak


def fit_linear(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares ``bytes = fixed + slope * samples`` through (samples, bytes) points; returns (fixed, slope).

    ``samples`` is micro-batch x crop: activations grow with both alike. Needs two distinct sample counts.
    """
    if len({s for s, _ in points}) < 2:
        raise ValueError("fit_linear needs points at two or more distinct sample counts")
    n = len(points)
    mean_s = sum(s for s, _ in points) / n
    mean_b = sum(b for _, b in points) / n
    var = sum((s - mean_s) ** 2 for s, _ in points)
    cov = sum((s - mean_s) * (b - mean_b) for s, b in points)
    slope = cov / var
    return mean_b - slope * mean_s, slope
