"""The memory engine's glue: candidate techniques for a device, their measured costs, the device's overheads, and
the plan. ``probe`` and ``fit --budget`` both call :func:`plan_run`, ``eval`` calls :func:`plan_inference`; the
planner itself (:mod:`.plan`) stays pure.

CPU (the budget is the process's resident memory): each technique is measured by real steps at two micro-batches
of the run's crop, each in a fresh process (:mod:`.calibrate`), best case first, until no technique left could
beat the plan found; the peaks a ``fit`` then observes at its planned micro-batch are added to the measurements.
CUDA: live-tensor costs from the fake-tensor estimator (no real allocation, so probing never runs out of memory)
at micro-batch 1 and 2, plus the CUDA context and the allocator's reserve from one small real step. Everything is
cached per torch version, device, model and technique, so a second probe is instant.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..models import ModelFamily, build_model, family_of, get_family
from ..storage import atomic_write_json
from .calibrate import cache_path, shutdown
from .device import DeviceFacts
from .inference import InferenceCost, inference_cost
from .plan import (
    CPU_MARGIN,
    REF_CROP,
    Cost,
    DataPath,
    ModelLimits,
    NoPlanError,
    Overheads,
    Plan,
    Technique,
    best_plan,
)
from .techniques import apply_channels_last, apply_checkpointing, apply_lean_pooling

CACHE_VERSION = 9  # 9: CPU steps in children forked from one server, not fresh interpreters
CUDA_CALIBRATION_MICRO_BATCH = 4
CPU_CALIBRATION_LEVER = 3
"""CPU calibration steps at micro-batch m and 3m (m: the model's smallest). Repeated readings of one configuration's
resident peak spread by about 3 MiB; with m and 2m that noise made tiled's small per-sample scratch (8-15 MiB) come
out anywhere from 3 to 15 MiB, and a plan at micro-batch 24 8-11% off; 3m cuts the slope's noise in half."""


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
    return dataclasses.replace(family.limits,
                               policy_time=tuple((name, p.relative_time) for name, p in family.policies().items()))


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

    cache = cache or cache_path()
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
    overheads: dict
    """Per precision (CUDA) or per (precision, checkpoint policy) (CPU): what the device holds beyond live tensors."""
    note: str
    skipped: tuple[Technique, ...] = ()
    """Techniques not measured because even their best case could not beat a plan already found."""
    sources: dict = field(default_factory=dict, compare=False, repr=False)
    """CPU: (precision, policy) -> (cache key, process extra, cache file) of the measurements behind its overheads."""
    data_path: DataPath | None = None
    """CPU: the data path counted in every overhead (its bytes are part of each ``base_bytes``)."""

    def to_dict(self) -> dict:
        return {
            "overheads": {
                label(key): {"base_bytes": o.base_bytes, "per_sample_bytes": round(o.per_sample_bytes),
                             "slack_fraction": o.slack_fraction}
                for key, o in self.overheads.items()
            },
            "how": self.note,
            "not_measured": [label((t.precision, t.checkpoint)) for t in self.skipped],
            **({"data_path": self.data_path.to_dict()} if self.data_path else {}),
        }


def label(key: str | tuple[str, ...]) -> str:
    return key if isinstance(key, str) else " ".join(key)


def _real_step_memory(model_name: str, device: torch.device, precision: str, micro_batch: int, crop: int):
    """One tracked real step of the model ``fit`` would build (lean blocks, no checkpointing) with its Adam."""
    from .measure import build_step, measure_step

    torch.manual_seed(0)
    model = build_model(model_name).to(device)
    prepare_model(model, "none")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    step = build_step(model, optimizer, micro_batch, crop, micro_batch, precision, device)
    return measure_step(step, model, optimizer, device)


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


def calibrate_cuda(facts: DeviceFacts, device: torch.device, model_name: str, precisions: list[str], crop: int,
                   cache: Path | None = None) -> Calibration:
    """CUDA: the context (from NVML) and the caching allocator's reserve over live tensors, from one real step at
    micro-batch 4 of the planned crop per precision. Cached per device, torch version, model, precision and crop."""
    cache = cache or cache_path()
    stored = _load_cache(cache)
    overheads = {}
    for precision in precisions:
        key = f"cuda|v{CACHE_VERSION}|torch {torch.__version__}|{facts.name}|{model_name}|{precision}|{crop}"
        if key not in stored:
            step = _real_step_memory(model_name, device, precision, CUDA_CALIBRATION_MICRO_BATCH, crop)
            slack = max((step.cuda_peak_reserved or step.peak_bytes) / max(step.peak_bytes, 1) - 1.0, 0.05)
            stored[key] = {"base_bytes": facts.context_bytes, "per_sample_bytes": 0.0, "slack_fraction": slack}
        overheads[precision] = Overheads(**stored[key])
    _store_cache(cache, stored)
    return Calibration(overheads, "CUDA context (NVML) + caching-allocator reserve over live tensors, from a real step "
                                  f"at micro-batch {CUDA_CALIBRATION_MICRO_BATCH}, crop {crop:,}")


def _cpu_measured(facts: DeviceFacts, model_name: str, t: Technique, crop: int, channels_last: bool, smallest: int,
                  stored: dict) -> tuple[str, dict]:
    """The two measured steps of a technique (torch Adam; 8-bit state is swapped in by arithmetic), cached."""
    from .calibrate import Job, measure

    key = (f"cpu|v{CACHE_VERSION}|torch {torch.__version__}|{facts.name}|{model_name}|{t.precision}|{t.checkpoint}|"
           f"cl={channels_last}|{crop}")
    if key not in stored:
        jobs = [Job(model_name, t.checkpoint, t.precision, crop, mb, channels_last) for mb in (smallest, CPU_CALIBRATION_LEVER * smallest)]
        stored[key] = {"points": [{"micro_batch": p.job.micro_batch, "rss_start": p.rss_start, "rss_peak": p.rss_peak,
                                   "live_peak": p.live_peak, "seconds": p.seconds} for p in measure(jobs)]}
    return key, stored[key]


def _line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) through (micro-batch, bytes) points at two or more micro-batches."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - slope * mx, slope


def cpu_cost(measured: dict, t: Technique, model_name: str, crop: int, process_extra: int) -> tuple[Cost, Overheads]:
    """Live-tensor cost and resident overheads of a technique from its measured steps.

    Live bytes are exactly linear in the micro-batch (the tracker's count at the two calibration steps). What the
    process holds beyond them is nearly so (measured: within 1% at micro-batch 8 and 12), but each reading carries a
    few MiB of noise, which the calibration steps' short lever multiplies; so the line is fitted through every
    point known, the peaks ``fit`` itself observed at its planned micro-batch included (:func:`record_observed`).
    ``process_extra`` is what the planning process holds beyond a fresh worker's (fit's data, the caller's own
    state): the run will be this process."""
    from .estimate import adam8bit_saving

    workers = [p for p in measured["points"] if not p.get("observed")]
    live_fixed, live_slope = _line([(p["micro_batch"], p["live_peak"]) for p in workers])
    extra_fixed, extra_slope = _line([(p["micro_batch"], p["rss_peak"] - p["live_peak"]) for p in measured["points"]])
    extra_slope = max(extra_slope, 0.0)
    if t.optimizer.endswith("8bit"):
        with torch.device("meta"):
            live_fixed -= adam8bit_saving(list(build_model(model_name).parameters()))
    unit = REF_CROP / crop
    return Cost(int(live_fixed), live_slope * unit), Overheads(int(extra_fixed + process_extra), extra_slope * unit)


def record_observed(run: RunPlan, micro_batch: int, peak_bytes: int | None) -> bool:
    """Add a fit's observed resident peak at its planned micro-batch to its technique's CPU calibration, so that the
    next plan of that technique fits a line through three points with a long lever. Keeps the highest peak seen per
    micro-batch (the safe side). False when there is nothing to record (CUDA, no peak, no measured source)."""
    p = run.plan
    source = run.calibration.sources.get((p.precision, p.checkpoint))
    if not peak_bytes or source is None:
        return False
    key, process_extra, cache = source
    stored = _load_cache(cache)
    measured = stored.get(key)
    if measured is None:
        return False
    workers = [q for q in measured["points"] if not q.get("observed")]
    fixed, slope = _line([(q["micro_batch"], q["live_peak"]) for q in workers])
    point = {"micro_batch": micro_batch, "live_peak": int(fixed + slope * micro_batch),
             "rss_peak": int(peak_bytes - process_extra), "observed": True}
    earlier = [q for q in measured["points"] if q.get("observed") and q["micro_batch"] == micro_batch]
    if earlier and earlier[0]["rss_peak"] >= point["rss_peak"]:
        return False
    measured["points"] = [q for q in measured["points"] if q not in earlier] + [point]
    _store_cache(cache, stored)
    return True


def plan_cpu(
    facts: DeviceFacts,
    model_name: str,
    techniques: list[Technique],
    budget_bytes: int,
    effective_batch: int,
    crop: int,
    limits: ModelLimits,
    micro_batch: int = 0,
    channels_last: bool = False,
    cache: Path | None = None,
    on_progress: Callable[[Technique], None] | None = None,
    data_path: DataPath | None = None,
) -> tuple[Plan, list[Plan], Calibration]:
    """Measure techniques best case first, and stop as soon as the best remaining one could not beat the plan found
    (its cost at the largest micro-batch, the cheapest it can be, is no better): a budget that fits the fastest
    technique never measures the others. ``data_path`` (a batch read and augmented in this process, measured) is
    counted in every technique's fixed overhead, as a part of what the process holds beyond a fresh worker."""
    from .measure import rss_now
    from .plan import plan_candidates, relative_cost

    cache = cache or cache_path()
    stored = _load_cache(cache)
    best_case = {t: relative_cost(t, micro_batch or effective_batch, crop, crop, limits) for t in techniques}
    costs: dict[Technique, Cost] = {}
    overheads: dict[tuple[str, str], Overheads] = {}
    sources: dict[tuple[str, str], tuple[str, int, Path]] = {}
    timed: dict[tuple[str, str], list[dict]] = {}
    skipped: list[Technique] = []
    plans: list[Plan] = []
    rss_before = rss_now()
    known = len(stored)
    for t in sorted(techniques, key=lambda t: (best_case[t], t.checkpoint)):
        if plans and best_case[t] >= plans[0].relative_cost:
            skipped.append(t)
            continue
        key, measured = _cpu_measured(facts, model_name, t, crop, channels_last, limits.min_micro_batch, stored)
        _store_cache(cache, stored)
        process_extra = max(rss_before - min(p["rss_start"] for p in measured["points"] if "rss_start" in p), 0)
        process_extra += data_path.bytes if data_path else 0
        costs[t], overheads[(t.precision, t.checkpoint)] = cpu_cost(measured, t, model_name, crop, process_extra)
        sources[(t.precision, t.checkpoint)] = (key, process_extra, cache)
        timed[(t.precision, t.checkpoint)] = measured["points"]
        if on_progress:
            on_progress(t)
        plans = plan_candidates(budget_bytes, costs, overheads, effective_batch, crop, limits, CPU_MARGIN, micro_batch)
    if len(stored) > known:
        shutdown()  # the calibration server holds some 300 MB the run may need
    plan, candidates = best_plan(budget_bytes, costs, overheads, effective_batch, crop, limits, micro_batch, CPU_MARGIN)
    if data_path is not None:
        points = timed[(plan.precision, plan.checkpoint)]
        plan = dataclasses.replace(plan, notes=(*plan.notes, data_path_note(data_path, points, plan)))
        candidates[0] = plan
    lo = limits.min_micro_batch
    note = (f"process RSS beyond live tensors, per technique, from real steps at micro-batch {lo} and {CPU_CALIBRATION_LEVER * lo}, crop "
            f"{crop:,}, each in a fresh process")
    return plan, candidates, Calibration(overheads, note, tuple(skipped), sources, data_path)


def data_path_note(data_path: DataPath, points: list[dict], plan: Plan) -> str:
    """One line on what the data path costs the planned run: its memory (counted) and its time against the step's,
    the step time per sample read off the calibration's measured steps at the planned micro-batch."""
    line = (f"data path in the training process ({data_path.what}): {data_path.bytes / 2**20:,.1f} MiB counted in the "
            f"peak, {1000 * data_path.seconds_per_item:,.1f} ms per utterance")
    timed = [(p["micro_batch"], p["seconds"]) for p in points if "seconds" in p]
    if len({mb for mb, _ in timed}) >= 2:
        fixed, slope = _line(timed)
        step = (fixed + slope * plan.micro_batch) / plan.micro_batch
        if step > 0:
            line += f" = {100 * data_path.seconds_per_item / step:.1f}% on the calibration steps' {step:.2f} s per utterance"
    return line


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
    data_path: Callable[[], DataPath] | None = None,
) -> RunPlan:
    """Read the device, resolve the budget, calibrate, and plan. Raises BudgetError or NoPlanError (one line).
    ``data_path`` measures what reading and augmenting a batch costs this process: on the CPU, where ``fit --budget``
    reads in the training process, it is measured and counted; on CUDA the data workers' host memory is not the
    budget's."""
    from .budget import resolve_budget
    from .device import device_facts

    family = get_family(model_name)
    facts = device_facts(device)
    budget_bytes, warnings = resolve_budget(budget, facts)
    techniques = candidate_techniques(facts, precision, checkpoint, optimizer, family.auto_policies)
    limits = model_limits(family)
    if device.type == "cpu":
        plan, candidates, calibration = plan_cpu(facts, model_name, techniques, budget_bytes, effective_batch, crop,
                                                 limits, micro_batch, channels_last, on_progress=on_progress,
                                                 data_path=data_path() if data_path else None)
    else:
        costs = technique_costs(model_name, techniques, channels_last, on_progress=on_progress)
        calibration = calibrate_cuda(facts, device, model_name, sorted({t.precision for t in techniques}), crop)
        plan, candidates = best_plan(budget_bytes, costs, calibration.overheads, effective_batch, crop, limits,
                                     micro_batch)
    return RunPlan(facts, budget_bytes, tuple(warnings), plan, tuple(candidates), calibration, model_name)


def dev_batch_within(run: RunPlan, samples: int, precision: str, wanted: int) -> int:
    """The largest dev-scoring batch up to ``wanted`` whose no-grad forward fits the run's budget (at least 1):
    scoring dev between epochs runs under the same cap as training."""
    cost = inference_cost(run.model, samples, precision, torch.device(run.facts.kind), run.facts.context_bytes)
    return max(1, min(wanted, cost.largest_batch(run.budget_bytes)))


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
