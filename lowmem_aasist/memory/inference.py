"""Memory of scoring (no-grad forwards): a predicted peak per batch, from fake tensors, and the largest batch that
fits a budget.

    predicted peak = overhead + (fixed + per_utterance x batch) x (1 + slack)

``fixed`` and ``per_utterance`` are the exact live-tensor bytes of one no-grad forward under the run's autocast,
from fake-tensor forwards at batch 1 and 2 (nothing is allocated); ``overhead`` is the CUDA context from the device
facts, or a fixed 400 MiB for the process on the CPU; ``slack`` covers what no tensor owns (CPU: 10% in fp32, 50% in
bf16, whose convolutions allocate scratch outside tensors; CUDA: 20%). Data-loader workers are not counted: they
hold a few batches of raw waveforms, about 1% of the activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ..models import build_model
from .budget import MiB
from .device import autocast_ctx
from .estimate import fake_module
from .measure import LiveTensorTracker

MAX_BATCH = 64
"""Beyond this a GPU is already saturated by 64,600-sample inputs; more only delays the first result."""

CPU_PROCESS_BYTES = 400 * MiB
"""CPU: resident memory of the process beyond live tensors (Python, torch's libraries, the loader). Measured about
240 MiB with torch imported and a model loaded; the rest is headroom for data workers and malloc."""

# Resident memory no tensor owns grows with the batch: oneDNN reorders and, much more, the scratch buffers of bf16
# convolutions on the CPU; on CUDA, the caching allocator's rounding and cuDNN workspaces. Measured on a 2-core CPU
# (AASIST, 64,600 samples, RSS minus live tensors minus 240 MiB): fp32 about 3% of the live bytes per utterance,
# bf16 about 36%. CUDA is not calibrated here; 20% is the allocator slack the training planner sees on T4 and
# A100-class cards, with room to spare.
CPU_SLACK = {"fp32": 0.10, "bf16": 0.50}
CUDA_SLACK = 0.20


@dataclass(frozen=True)
class InferenceCost:
    """Predicted peak of scoring, in bytes: ``overhead + (fixed + per_sample * batch) * (1 + slack)``.

    ``fixed`` and ``per_sample`` are live-tensor bytes of one no-grad forward (weights, the input batch and the
    largest set of activations alive at once), exact from a fake-tensor forward; ``overhead`` is what the device
    adds regardless of the batch (the CUDA context, or the process on the CPU) and ``slack`` what it adds in
    proportion (allocator and kernel scratch).
    """

    fixed: int
    per_sample: int
    overhead: int
    slack: float
    overhead_what: str

    def peak(self, batch: int) -> int:
        return int(self.overhead + (self.fixed + self.per_sample * batch) * (1.0 + self.slack))

    def largest_batch(self, budget: int, cap: int = MAX_BATCH) -> int:
        """The largest batch up to ``cap`` whose peak fits ``budget``; 0 when not even one utterance fits."""
        room = (budget - self.overhead) / (1.0 + self.slack) - self.fixed
        batch = max(0, min(cap, int(room // self.per_sample))) if room > 0 else 0
        while batch and self.peak(batch) > budget:  # float rounding must not let the answer overshoot by a byte
            batch -= 1
        return batch

    def describe(self, batch: int) -> str:
        return (f"{self.overhead_what} + (fixed + per utterance x {batch}) x {1 + self.slack:.2f} for allocator and "
                "kernel scratch")


def forward_live_peak(model_name: str, batch: int, samples: int, precision: str, device: torch.device) -> int:
    """Live-tensor peak of one eval-mode, no-grad forward of ``batch`` inputs, from fake tensors (nothing computed).

    As in :mod:`.estimate`, the model is built for real (AASIST's filter bank comes from NumPy) and then every
    tensor is swapped for a fake one, so the forward allocates nothing. The count includes the weights and the
    input, which are live throughout. On CUDA only device tensors count (the batch arrives from the CPU).
    """
    model = build_model(model_name).to(device).eval()
    mode = FakeTensorMode()
    fake_module(model, mode)
    with mode:
        wave = torch.empty(batch, samples, device=device)
        tracker = LiveTensorTracker(device)
        tracker.track([*model.parameters(), *model.buffers(), wave])
        tracker.reset_peak()
        with tracker, torch.no_grad(), autocast_ctx(device, precision):
            model(wave)
    return tracker.peak_bytes


def inference_cost(model_name: str, samples: int, precision: str, device: torch.device,
                   context_bytes: int = 0) -> InferenceCost:
    """Fit the fake forward at batch 1 and 2 (live bytes are linear in the batch: every activation is per item)
    and add the device's overheads (``context_bytes``: the CUDA context from the device facts)."""
    one = forward_live_peak(model_name, 1, samples, precision, device)
    two = forward_live_peak(model_name, 2, samples, precision, device)
    per_sample = max(two - one, 1)
    if device.type == "cuda":
        return InferenceCost(one - per_sample, per_sample, context_bytes, CUDA_SLACK, "CUDA context")
    slack = CPU_SLACK.get(precision, max(CPU_SLACK.values()))
    return InferenceCost(one - per_sample, per_sample, CPU_PROCESS_BYTES, slack, "process")
