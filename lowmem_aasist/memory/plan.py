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
"""The unit of per-sample costs: bytes per utterance of this many samples (the published recipe's crop, ~4 s at
16 kHz). Costs scale linearly with the crop, so any unit would do; this one keeps the figures readable."""

# Relative step time per sample, used only to rank plans that fit (measured on a 2-core CPU, AASIST, crop 64,600,
# s/sample: fp32 1.19, bf16 0.65). One table per kind: the names the CLI and the config accept are its keys, so
# nothing can be accepted that the planner cannot rank.
PRECISION_TIME = {"fp32": 1.0, "bf16": 0.55, "fp16": 0.55}
PRECISIONS = tuple(PRECISION_TIME)
"""Training precisions: fp32, bf16 (autocast), fp16 (autocast + GradScaler, CUDA only)."""
OPTIMIZER_TIME = {"adam": 1.0, "adam8bit": 1.01, "adamw8bit": 1.01}
OPTIMIZERS = tuple(OPTIMIZER_TIME)
"""adam (torch, L2 weight decay as the published recipe), adam8bit and adamw8bit (bitsandbytes)."""

CUDA_MARGIN = 0.03
"""Share of the budget a CUDA plan leaves unused: live tensors are counted exactly and the allocator's reserve is
calibrated, so this covers fragmentation that one calibration step did not show."""
CPU_MARGIN = 0.05
"""Share of the budget a CPU plan leaves unused. Resident memory is a noisy reading: the same calibration step in
fresh processes peaked 8 MiB (micro-batch 2) and 16 MiB (micro-batch 6) apart, which the line's extrapolation to
micro-batch 24 turns into about +-4% (AASIST-L, tiled, bf16, 64,600; docs/memory.md). A CPU prediction is an estimate
within that band, not an upper bound, and the margin is what keeps the measured peak under the budget."""


@dataclass(frozen=True)
class ModelLimits:
    """What a model family tells the planner and the trainer (``ModelFamily.limits``, with ``policy_time`` from its
    policies)."""

    min_micro_batch: int = 1
    """Fewest utterances per forward pass that train at all."""
    why_min: str = ""
    noisy_below: int = 0
    """Micro-batches below this get noisy normalisation statistics: flagged, and ranked as a cost."""
    fallback_crops: tuple[int, ...] = ()
    """Shorter crops to fall back to, longest first, when nothing fits at the recipe's crop."""
    policy_time: tuple[tuple[str, float], ...] = ()
    """(checkpoint policy, step time per sample against none), measured; a policy not listed costs 1.0."""

    def time_of(self, policy: str) -> float:
        return dict(self.policy_time).get(policy, 1.0)


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


@dataclass(frozen=True)
class DataPath:
    """What the training process's own data path holds under a CPU budget, where ``fit`` reads and augments in the
    process rather than in worker processes: one batch of crops (the items and their collated tensor) and the
    augmentation's temporaries, measured in the planning process (:func:`.measure.measure_data_path`). Counted in
    every CPU plan's fixed overhead, though it peaks between steps rather than inside one: the safe side."""

    what: str
    """The augmentation spec, or "none"."""
    bytes: int
    """Resident peak of reading and augmenting one batch, above the process's settled level."""
    seconds_per_item: float
    """Time the process spends per training utterance outside the step."""

    def to_dict(self) -> dict:
        return {"augment": self.what, "bytes": self.bytes, "seconds_per_item": round(self.seconds_per_item, 6)}


OverheadsArg = Overheads | Mapping[str, Overheads] | Mapping[tuple[str, str], Overheads]
"""One device's overheads: the same for every technique, per precision, or per (precision, checkpoint policy)
(on the CPU, kernel scratch depends on what the policy recomputes and in what pieces)."""


def overheads_for(overheads: OverheadsArg, technique: Technique | str) -> Overheads:
    """The overheads that apply to ``technique`` (or to a precision, given by name)."""
    if isinstance(overheads, Overheads):
        return overheads
    if isinstance(technique, str):
        return overheads[technique]  # type: ignore[index]
    per_policy = overheads.get((technique.precision, technique.checkpoint))  # type: ignore[call-overload]
    return per_policy if per_policy is not None else overheads[technique.precision]  # type: ignore[index]


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


def predict_peak(cost: Cost, overheads: OverheadsArg, technique: Technique | str, micro_batch: int, crop: int) -> int:
    """Predicted peak of a step: the device's overheads for ``technique`` (or a precision) plus live tensors."""
    o = overheads_for(overheads, technique)
    live = cost.peak(micro_batch, crop) * (1.0 + o.slack_fraction)
    return int(o.base_bytes + o.per_sample_bytes * micro_batch * crop / REF_CROP + live)


def micro_batches(effective_batch: int, smallest: int = 1) -> list[int]:
    """Divisors of the effective batch down to ``smallest``, largest first: accumulation is then a whole number of
    micro-batches."""
    return [m for m in range(effective_batch, smallest - 1, -1) if effective_batch % m == 0]


def relative_cost(t: Technique, micro_batch: int, crop: int, recipe_crop: int, limits: ModelLimits) -> float:
    """Per-sample step time relative to fp32 without checkpointing, for ranking plans that fit. Small micro-batches
    pay launch overheads and, below ``limits.noisy_below``, noisier normalisation statistics, which count as a cost
    too so that they win only when needed; a crop shorter than the recipe's changes the recipe: a last resort."""
    batch_factor = 1.0 + 0.5 / micro_batch + (0.5 if micro_batch < limits.noisy_below else 0.0)
    crop_factor = 1.0 if crop == recipe_crop else 3.0
    return (PRECISION_TIME[t.precision] * limits.time_of(t.checkpoint) * OPTIMIZER_TIME[t.optimizer] * batch_factor
            * crop_factor)


def plan_candidates(
    budget_bytes: int,
    costs: Mapping[Technique, Cost],
    overheads: OverheadsArg,
    effective_batch: int,
    crop: int,
    limits: ModelLimits,
    margin_fraction: float = CUDA_MARGIN,
    micro_batch: int = 0,
) -> list[Plan]:
    """Every (technique, micro-batch, crop) whose predicted peak fits ``budget_bytes`` minus a margin, best first.

    Each technique contributes its largest fitting micro-batch (or only ``micro_batch`` when given, which must
    divide the effective batch). Crops shorter than ``crop`` (``limits.fallback_crops``) are tried only when
    nothing fits at ``crop``. Deterministic: ties are broken by larger micro-batch, then technique name order.
    """
    smallest = limits.min_micro_batch
    if micro_batch and effective_batch % micro_batch:
        raise NoPlanError(f"micro-batch {micro_batch} does not divide the effective batch {effective_batch}")
    if micro_batch and micro_batch < smallest:
        raise NoPlanError(f"micro-batch {micro_batch}: the model trains on at least {smallest} utterances per "
                          f"forward pass ({limits.why_min})")
    sizes = [micro_batch] if micro_batch else micro_batches(effective_batch, smallest)
    limit = budget_bytes * (1.0 - margin_fraction)
    crops = [crop, *(c for c in limits.fallback_crops if c < crop)]
    plans: list[Plan] = []
    for c in crops:
        for technique, cost in sorted(costs.items(), key=lambda kv: (kv[0].precision, kv[0].checkpoint, kv[0].optimizer)):
            for mb in sizes:
                peak = predict_peak(cost, overheads, technique, mb, c)
                if peak > limit:
                    continue
                notes = []
                if mb < limits.noisy_below:
                    notes.append(f"micro-batch {mb} < {limits.noisy_below}: BatchNorm statistics are noisy")
                if c != crop:
                    notes.append(f"CROP SHORTENED to {c} samples: micro-batch {smallest} at {crop} does not fit the budget")
                plans.append(
                    Plan(mb, effective_batch // mb, c, technique.precision, technique.checkpoint, technique.optimizer,
                         peak, budget_bytes, round(relative_cost(technique, mb, c, crop, limits), 4), tuple(notes))
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
    effective_batch: int,
    crop: int,
    limits: ModelLimits,
    micro_batch: int = 0,
    margin_fraction: float = CUDA_MARGIN,
) -> tuple[Plan, list[Plan]]:
    """(chosen plan, all candidates best first); raises NoPlanError naming the smallest budget that would fit."""
    plans = plan_candidates(budget_bytes, costs, overheads, effective_batch, crop, limits, margin_fraction, micro_batch)
    if plans:
        return plans[0], plans
    mb = micro_batch or limits.min_micro_batch
    shortest = min((crop, *limits.fallback_crops))
    smallest = min(predict_peak(cost, overheads, t, mb, shortest) for t, cost in costs.items())
    raise NoPlanError(
        f"no plan fits {budget_bytes / 2**20:,.0f} MiB: the smallest configuration needs about "
        f"{smallest / 2**20:,.0f} MiB (micro-batch {mb}, crop {shortest}), so a budget of about "
        f"{smallest / (1 - margin_fraction) / 2**20:,.0f} MiB with the {margin_fraction:.0%} margin"
    )
