"""The memory engine's glue: candidate techniques for a device, their calibrated costs, the device's overheads,
and the plan. ``probe`` and ``fit --budget`` both call :func:`plan_run`; the planner itself stays pure.

Costs come from the fake-tensor estimator (no real allocation, so probing never runs out of memory) at micro-batch
1 and 2 of the recipe's crop: fixed part and slope per sample. Device overheads come from one small *real* step on
the device: what the process holds beyond live tensors (CPU: libraries and kernel scratch in RSS; CUDA: context,
allocator reserve). Costs are cached per torch version, model and technique, so a second probe is instant.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..models import ModelFamily, build_model, family_of, get_family
from ..storage import atomic_write_json
from .device import DeviceFacts
from .inference import InferenceCost, inference_cost
from .plan import REF_CROP, Cost, ModelLimits, NoPlanError, Overheads, Plan, Technique, best_plan
from .techniques import apply_channels_last, apply_checkpointing, apply_lean_pooling

CACHE_VERSION = 8
CALIBRATION_MICRO_BATCHES = (2, 4)


def prepare_model(model: nn.Module, checkpoint: str, channels_last: bool = False) -> list[str]:
    """Apply a plan's techniques at setup: the exact lean building blocks always, then the checkpoint policy (one
    of the model family's), then the layout."""
    family = family_of(model)
    applied = [f"lean-pool:{name}" for name in apply_lean_pooling(model)]
    applied += [f"checkpoint:{name}" for name in apply_checkpointing(model, family.policy(checkpoint))]
    if channels_last:
        apply_channels_last(model)
        applied.append(f"channels-last:{family.channels_last_module}")
    return applied


def model_limits(family: ModelFamily) -> ModelLimits:
    """What the planner needs to know of a family: its micro-batch limits, fallback crops and policy speeds."""
    lim = family.limits
    return ModelLimits(lim.min_micro_batch, lim.why_min, lim.noisy_below, lim.fallback_crops,
                       tuple((name, p.relative_time) for name, p in family.policies().items()))


def candidate_techniques(
    facts: DeviceFacts,
    precision: str = "auto",
    checkpoint: str = "auto",
    optimizer: str = "adam",
    auto_policies: tuple[str, ...] = ("none",),
) -> list[Technique]:
    """Techniques worth planning with on this device: the family's ``auto_policies`` unless one is forced (the
    others never win: benchmarks/results/cpu/memory_matrix.md, and leaving them out keeps a first probe short).
    ``auto`` precision is the one precision the device runs best: where autocast is native it needs less memory
    and time than fp32 at every micro-batch, so fp32 could never win and calibrating it would only slow ``probe``
    down."""
    if precision != "auto":
        precisions = [precision]
    elif facts.kind == "cuda":
        precisions = ["bf16" if facts.native_bf16 else "fp16"]
    else:
        precisions = ["bf16" if facts.native_bf16 else "fp32"]
    policies = list(auto_policies) if checkpoint == "auto" else [checkpoint]
    optimizers = ["adam"] if optimizer == "auto" else [optimizer]
    return [Technique(p, c, o) for p in precisions for c in policies for o in optimizers]


def _cache_path() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lowmem-aasist" / "costs.json"


def _key(model_name: str, t: Technique, channels_last: bool) -> str:
    return f"v{CACHE_VERSION}|torch {torch.__version__}|{model_name}|{t.precision}|{t.checkpoint}|{t.optimizer}|cl={channels_last}"


def technique_costs(
    model_name: str,
    techniques: list[Technique],
    channels_last: bool = False,
    cache: Path | None = None,
    on_progress: Callable[[Technique], None] | None = None,
) -> dict[Technique, Cost]:
    """Fixed bytes and bytes per sample (crop 64,600) of each technique, from the estimator at micro-batch 1 and 2."""
    from .estimate import estimate_step_peak

    cache = cache or _cache_path()
    stored = _load_cache(cache)
    costs: dict[Technique, Cost] = {}
    for t in techniques:
        key = _key(model_name, t, channels_last)
        if key not in stored:
            def prepare(m: nn.Module, t: Technique = t) -> None:
                prepare_model(m, t.checkpoint, channels_last)

            p1, p2 = (
                estimate_step_peak(model_name, mb, REF_CROP, mb, t.precision, prepare=prepare, optimizer=t.optimizer)
                for mb in (1, 2)
            )
            stored[key] = {"fixed_bytes": int(2 * p1 - p2), "per_sample_bytes": float(p2 - p1)}
        costs[t] = Cost(**stored[key])
        if on_progress:
            on_progress(t)
    _store_cache(cache, stored)
    return costs


@dataclass(frozen=True)
class Calibration:
    overheads: dict[str, Overheads]
    """Per precision."""
    note: str

    def to_dict(self) -> dict:
        return {
            "per_precision": {
                p: {"base_bytes": o.base_bytes, "per_sample_bytes": round(o.per_sample_bytes), "slack_fraction": o.slack_fraction}
                for p, o in self.overheads.items()
            },
            "how": self.note,
        }


def _calibration_step(model_name: str, device: torch.device, precision: str, micro_batch: int, crop: int):
    """The model ``fit`` would build (lean blocks, no checkpointing), its Adam and one training step."""
    from .measure import build_step

    torch.manual_seed(0)
    model = build_model(model_name).to(device)
    prepare_model(model, "none")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    return model, optimizer, build_step(model, optimizer, micro_batch, crop, micro_batch, precision, device)


def _real_step_memory(model_name: str, device: torch.device, precision: str, micro_batch: int, crop: int):
    """One tracked real step (CUDA calibration: allocator reserve against live tensors)."""
    from .measure import measure_step

    model, optimizer, step = _calibration_step(model_name, device, precision, micro_batch, crop)
    return measure_step(step, model, optimizer, device)


def _real_steps_rss(model_name: str, precision: str, micro_batches: tuple[int, ...], crop: int) -> list[int] | None:
    """Peak resident memory of one plain CPU training step per micro-batch, in that order, after one warm-up step at
    the first: run as ``fit`` runs it, with no dispatch-mode tracker in the way (the live bytes to subtract come
    from the estimator, which is exact). Measured at micro-batch 2 then 4, the second step reads the same peak
    with or without a warm-up of its own (1,207 vs 1,205 MiB, AASIST bf16), so one warm-up serves both. Smaller
    calibration steps (1 and 2) were faster but read ~40% more excess per sample and planned 3 GiB too timidly."""
    from .measure import reset_rss_peak, rss_peak

    peaks = []
    for i, mb in enumerate(micro_batches):
        _, _, step = _calibration_step(model_name, torch.device("cpu"), precision, mb, crop)
        if i == 0:
            step()
        if not reset_rss_peak():
            return None
        step()
        peaks.append(rss_peak())
    return peaks


def _load_cache(cache: Path) -> dict:
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}


def _store_cache(cache: Path, stored: dict) -> None:
    try:
        atomic_write_json(cache, stored)
    except OSError:  # a read-only home is no reason to fail a probe
        pass


def calibrate_overheads(
    facts: DeviceFacts, device: torch.device, model_name: str, precisions: list[str], crop: int, cache: Path | None = None
) -> Calibration:
    """Real steps at micro-batch 2 and 4 of the planned crop, per precision: what the process holds beyond live
    tensors, fixed and per sample. CPU: resident memory with the allocator settings ``fit`` uses (calibrating at a
    shorter crop than the run's mispredicts: at 32,000 the per-sample overhead came out twice the 64,600 figure);
    CUDA: context and allocator reserve. Cached per device, torch version, model, precision and crop."""
    from .enforce import release_freed_memory_promptly

    if device.type == "cpu":
        release_freed_memory_promptly()  # as fit does: calibrate the process the run will be
    cache = cache or _cache_path()
    lives = technique_costs(model_name, [Technique(p, "none", "adam") for p in precisions], cache=cache)
    stored = _load_cache(cache)
    scale = REF_CROP / crop
    overheads = {}
    for precision in precisions:
        key = f"overheads|v{CACHE_VERSION}|torch {torch.__version__}|{facts.kind}|{facts.name}|{model_name}|{precision}|{crop}"
        if key not in stored:
            lo, hi = CALIBRATION_MICRO_BATCHES
            if device.type == "cuda":
                two = _real_step_memory(model_name, device, precision, hi, crop)
                slack = max((two.cuda_peak_reserved or two.peak_bytes) / max(two.peak_bytes, 1) - 1.0, 0.05)
                stored[key] = {"base_bytes": facts.context_bytes, "per_sample_bytes": 0.0, "slack_fraction": slack}
            else:
                # Resident memory beyond live tensors: real RSS of plain steps minus the estimator's exact live peak.
                live = lives[Technique(precision, "none", "adam")]
                rss = _real_steps_rss(model_name, precision, (lo, hi), crop) or [0, 0]
                extra1, extra2 = (r - live.peak(mb, crop) for r, mb in zip(rss, (lo, hi), strict=True))
                per_sample = max(extra2 - extra1, 0) / (hi - lo) * scale
                base = max(extra1 - lo * per_sample / scale, 0)
                stored[key] = {"base_bytes": int(base), "per_sample_bytes": per_sample, "slack_fraction": 0.0}
        overheads[precision] = Overheads(**stored[key])
    _store_cache(cache, stored)
    how = (
        "CUDA context (NVML) + caching-allocator reserve over live tensors"
        if device.type == "cuda"
        else "process RSS beyond live tensors (libraries; kernel scratch per sample)"
    )
    lo, hi = CALIBRATION_MICRO_BATCHES
    return Calibration(overheads, f"{how}, from real steps at micro-batch {lo} and {hi}, crop {crop:,}")


@dataclass(frozen=True)
class RunPlan:
    """Everything ``probe`` prints and ``fit --budget`` follows (written to ``plan.json``)."""

    facts: DeviceFacts
    budget_bytes: int
    warnings: tuple[str, ...]
    plan: Plan
    candidates: tuple[Plan, ...]
    calibration: Calibration
    model: str

    def to_dict(self) -> dict:
        plan_keys = ("micro_batch", "grad_accum", "crop", "precision", "checkpoint", "optimizer", "predicted_peak_bytes")

        def short(p: Plan) -> dict:
            d = p.to_dict()
            return {**{k: d[k] for k in plan_keys}, "relative_cost": d["relative_cost"], "notes": d["notes"]}

        return {
            "device": self.facts.to_dict(),
            "model": self.model,
            "budget_bytes": self.budget_bytes,
            "plan": short(self.plan),
            "candidates": [short(p) for p in self.candidates],
            "overheads": self.calibration.to_dict(),
            "warnings": list(self.warnings),
        }


def plan_run(
    model_name: str,
    device: torch.device,
    budget: str,
    effective_batch: int,
    crop: int,
    precision: str = "auto",
    checkpoint: str = "auto",
    optimizer: str = "adam",
    micro_batch: int = 0,
    channels_last: bool = False,
    on_progress: Callable[[Technique], None] | None = None,
) -> RunPlan:
    """Read the device, resolve the budget, calibrate, and plan. Raises BudgetError or NoPlanError (one line)."""
    from .budget import resolve_budget
    from .device import device_facts

    family = get_family(model_name)
    facts = device_facts(device)
    budget_bytes, warnings = resolve_budget(budget, facts)
    techniques = candidate_techniques(facts, precision, checkpoint, optimizer, family.auto_policies)
    costs = technique_costs(model_name, techniques, channels_last, on_progress=on_progress)
    calibration = calibrate_overheads(facts, device, model_name, sorted({t.precision for t in techniques}), crop)
    plan, candidates = best_plan(budget_bytes, costs, calibration.overheads, effective_batch, crop,
                                 model_limits(family), micro_batch)
    return RunPlan(facts, budget_bytes, tuple(warnings), plan, tuple(candidates), calibration, model_name)


@dataclass(frozen=True)
class InferencePlan:
    """The batch ``eval`` scores with, and why (what ``eval`` prints before it starts)."""

    batch: int
    cost: InferenceCost
    budget_bytes: int | None
    """The budget that was enforced, or None when the batch was given (a given batch is used as it is)."""
    line: str
    warnings: tuple[str, ...]


def plan_inference(model_name: str, device: torch.device, budget: str, batch: int, samples: int,
                   precision: str) -> InferencePlan:
    """Read the device, predict scoring's peak per batch and choose the batch: a given ``batch`` (> 0) as it is (an
    explicit budget then only warns, and ``auto`` is not even measured: a full machine must not stop a run the user
    sized by hand); otherwise the largest batch whose predicted peak fits ``budget``, which is then enforced.
    Raises BudgetError or NoPlanError (one line)."""
    from .budget import format_bytes, resolve_budget
    from .device import device_facts
    from .enforce import enforce_budget

    facts = device_facts(device)
    cost = inference_cost(model_name, samples, precision, device, facts.context_bytes)
    explicit = budget.strip().lower() != "auto"
    if batch > 0:
        line = f"batch {batch} (given): predicted peak {format_bytes(cost.peak(batch))}"
        warnings: list[str] = []
        if explicit:
            budget_bytes, warnings = resolve_budget(budget, facts)
            line += f" of the {format_bytes(budget_bytes)} budget"
            if cost.peak(batch) > budget_bytes:
                warnings.append(f"batch {batch} is predicted to need more than --budget {budget.strip()}")
        return InferencePlan(batch, cost, None, line, tuple(warnings))
    budget_bytes, warnings = resolve_budget(budget, facts)
    chosen = cost.largest_batch(budget_bytes)
    if chosen < 1:
        raise NoPlanError(f"scoring needs about {format_bytes(cost.peak(1))} at batch 1, more than the "
                          f"{format_bytes(budget_bytes)} budget; give a larger --budget")
    enforce_budget(device, budget_bytes, facts.context_bytes)
    line = (f"batch {chosen}: predicted peak {format_bytes(cost.peak(chosen))} of the {format_bytes(budget_bytes)} "
            f"budget ({format_bytes(cost.overhead)} {cost.overhead_what} + ({format_bytes(cost.fixed)} + "
            f"{format_bytes(cost.per_sample)} per utterance) x {1 + cost.slack:.2f} for allocator and kernel scratch)")
    return InferencePlan(chosen, cost, budget_bytes, line, tuple(warnings))
