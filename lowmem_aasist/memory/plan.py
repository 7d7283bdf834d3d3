"""The planner: a pure function from device facts, a budget and a memory model to ranked training plans.

It asks no hardware (only ``device.py`` does). A plan keeps the recipe's effective batch (micro-batch x
accumulation) and crop whenever anything fits at that crop, and among the plans that fit it prefers the one with the
highest expected throughput: least recompute, native reduced precision, and the largest micro-batch.

Memory model per technique (precision x checkpoint policy x optimizer): ``fixed + per_sample x micro_batch x
crop / 64,600`` live-tensor bytes (nearly linear, measured), on top of the device's overheads: on CUDA the CUDA
context and the caching allocator's slack; on CPU the process's resident baseline (libraries, data workers) and the
kernel scratch that bf16 convolutions allocate outside any tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

REF_CROP = 64_600
CROPS = (64_600, 48_000, 32_000, 24_000, 16_000)
"""Crops tried in order; shorter ones only when micro-batch 1 at the longer one cannot fit."""

BN_NOISY_BELOW = 8
MIN_MICRO_BATCH = 2
"""AASIST cannot train on one utterance at a time: its graph BatchNorm normalises the master node over the batch,
and one value per channel has no variance (PyTorch refuses it in training mode)."""
"""BatchNorm statistics over fewer utterances than this are noisy (a warning, and a throughput-like penalty)."""

# Relative cost of a training step per sample, used only to rank plans that fit (measured on a 2-core CPU, AASIST,
# crop 64,600, s/sample: fp32 1.19, bf16 0.65, bf16 + checkpoint each block 0.98, + block 0 in segments 1.08).
PRECISION_COST = {"fp32": 1.0, "bf16": 0.55, "fp16": 0.55}
# Checkpoint policies, bf16 step time per sample against none (benchmarks/results/cpu/memory_matrix.md, micro-batch 2
# and 4 summed): encoder 1.52, block0-segments 1.36, block0 1.43, tiled 1.32. Rounded up a little, and tiled
# charged below block0: on this CPU it measured no slower in bf16 and faster in fp32 (0.99x against block0's 1.89x).
CHECKPOINT_COST = {"none": 1.0, "gat": 1.02, "encoder": 1.5, "block0-segments": 1.4, "all": 1.45, "block0": 1.45,
                   "tiled": 1.4}
OPTIMIZER_COST = {"adam": 1.0, "adam8bit": 1.01}


class NoPlanError(Exception):
    """Nothing fits the budget; the message says the smallest budget that would."""


@dataclass(frozen=True)
class Technique:
    precision: str
    checkpoint: str
    optimizer: str = "adam"


@dataclass(frozen=True)
class Cost:
    """Live-tensor bytes of one steady-state training step: fixed part and slope per sample at crop 64,600."""

    fixed_bytes: int
    per_sample_bytes: float

    def peak(self, micro_batch: int, crop: int) -> float:
        return self.fixed_bytes + self.per_sample_bytes * micro_batch * crop / REF_CROP


@dataclass(frozen=True)
class Overheads:
    """What a device adds on top of live tensors, for one precision (calibrated by small real steps)."""

    base_bytes: int
    """CUDA: the CUDA context; CPU: resident memory of the process beyond live tensors (torch, libraries)."""
    per_sample_bytes: float = 0.0
    """CPU: kernel scratch that grows with the batch (oneDNN reorders, bf16 convolution buffers), per sample at
    crop 64,600: resident memory that no tensor accounts for."""
    slack_fraction: float = 0.0
    """CUDA: caching-allocator reserve and fragmentation, as a fraction of live tensor bytes."""


OverheadsArg = Overheads | Mapping[str, Overheads]


def _for_precision(overheads: OverheadsArg, precision: str) -> Overheads:
    return overheads if isinstance(overheads, Overheads) else overheads[precision]


@dataclass(frozen=True)
class Plan:
    micro_batch: int
    grad_accum: int
    crop: int
    precision: str
    checkpoint: str
    optimizer: str
    predicted_peak_bytes: int
    budget_bytes: int
    relative_cost: float
    notes: tuple[str, ...] = field(default=())

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.grad_accum

    def to_dict(self) -> dict:
        d = asdict(self)
        d["notes"] = list(self.notes)
        d["effective_batch"] = self.effective_batch
        return d


def predict_peak(cost: Cost, overheads: OverheadsArg, precision: str, micro_batch: int, crop: int) -> int:
    o = _for_precision(overheads, precision)
    live = cost.peak(micro_batch, crop) * (1.0 + o.slack_fraction)
    return int(o.base_bytes + o.per_sample_bytes * micro_batch * crop / REF_CROP + live)


def micro_batches(effective_batch: int) -> list[int]:
    """Divisors of the effective batch down to MIN_MICRO_BATCH, largest first: accumulation is then a whole number
    of micro-batches."""
    return [m for m in range(effective_batch, MIN_MICRO_BATCH - 1, -1) if effective_batch % m == 0]


def _relative_cost(t: Technique, micro_batch: int, crop: int) -> float:
    # Per-sample cost relative to fp32 without checkpointing; small micro-batches pay launch/overhead costs and,
    # below BN_NOISY_BELOW, noisier BatchNorm statistics, which we treat as a cost too so they win only when needed.
    batch_factor = 1.0 + 0.5 / micro_batch + (0.5 if micro_batch < BN_NOISY_BELOW else 0.0)
    crop_factor = 1.0 if crop == REF_CROP else 3.0  # a shorter crop changes the recipe: a last resort
    return PRECISION_COST[t.precision] * CHECKPOINT_COST[t.checkpoint] * OPTIMIZER_COST[t.optimizer] * batch_factor * crop_factor


def plan_candidates(
    budget_bytes: int,
    costs: Mapping[Technique, Cost],
    overheads: OverheadsArg,
    effective_batch: int = 24,
    crop: int = REF_CROP,
    margin_fraction: float = 0.03,
    micro_batch: int = 0,
) -> list[Plan]:
    """Every (technique, micro-batch, crop) whose predicted peak fits ``budget_bytes`` minus a margin, best first.

    Each technique contributes its largest fitting micro-batch (or only ``micro_batch`` when given, which must
    divide the effective batch). Deterministic: ties are broken by larger micro-batch, then technique name order.
    """
    if micro_batch and effective_batch % micro_batch:
        raise NoPlanError(f"micro-batch {micro_batch} does not divide the effective batch {effective_batch}")
    if micro_batch and micro_batch < MIN_MICRO_BATCH:
        raise NoPlanError(f"micro-batch {micro_batch}: AASIST trains on at least {MIN_MICRO_BATCH} utterances per "
                          "forward pass (its graph BatchNorm needs more than one)")
    sizes = [micro_batch] if micro_batch else micro_batches(effective_batch)
    limit = budget_bytes * (1.0 - margin_fraction)
    crops = [c for c in CROPS if c <= crop] if crop in CROPS else [crop, *[c for c in CROPS if c < crop]]
    plans: list[Plan] = []
    for c in crops:
        for technique, cost in sorted(costs.items(), key=lambda kv: (kv[0].precision, kv[0].checkpoint, kv[0].optimizer)):
            for mb in sizes:
                peak = predict_peak(cost, overheads, technique.precision, mb, c)
                if peak > limit:
                    continue
                notes = []
                if mb < BN_NOISY_BELOW:
                    notes.append(f"micro-batch {mb} < {BN_NOISY_BELOW}: BatchNorm statistics are noisy")
                if c != crop:
                    notes.append(f"CROP SHORTENED to {c} samples: micro-batch {MIN_MICRO_BATCH} at {crop} does not fit the budget")
                plans.append(
                    Plan(mb, effective_batch // mb, c, technique.precision, technique.checkpoint, technique.optimizer,
                         peak, budget_bytes, round(_relative_cost(technique, mb, c), 4), tuple(notes))
                )
                break  # the largest micro-batch that fits is this technique's best at this crop
        if plans:
            break  # the longest crop where anything fits
    plans.sort(key=lambda p: (p.relative_cost, -p.micro_batch, p.precision, p.checkpoint, p.optimizer))
    return plans


def best_plan(
    budget_bytes: int,
    costs: Mapping[Technique, Cost],
    overheads: OverheadsArg,
    effective_batch: int = 24,
    crop: int = REF_CROP,
    micro_batch: int = 0,
) -> tuple[Plan, list[Plan]]:
    """(chosen plan, all candidates best first); raises NoPlanError naming the smallest budget that would fit."""
    plans = plan_candidates(budget_bytes, costs, overheads, effective_batch, crop, micro_batch=micro_batch)
    if plans:
        return plans[0], plans
    mb = micro_batch or MIN_MICRO_BATCH
    smallest = min(predict_peak(cost, overheads, t.precision, mb, min(CROPS)) for t, cost in costs.items())
    raise NoPlanError(
        f"no plan fits {budget_bytes / 2**20:,.0f} MiB: the smallest configuration needs about "
        f"{smallest / 2**20:,.0f} MiB (micro-batch {mb}, crop {min(CROPS)})"
    )
