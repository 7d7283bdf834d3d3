"""``fit``: one training loop, read top to bottom.

Setup builds everything from the frozen config (device, precision, data, model, optimizer, schedule), or restores
it from ``checkpoints/last.pt`` on ``--resume``; the loop then never branches on which options are on: autocast is
a no-op context in fp32 and the GradScaler is disabled unless fp16.

A run can stop at any step boundary (``--max-steps``, Ctrl-C, SIGTERM, a kill after a save) and resume to exactly
the run it would have been: the checkpoint holds the data position (epoch, step within it; crops and order are pure
functions of the seed) and every random-number state, so the weights come out bit-identical on CPU.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from .checkpoint import ResumeError, config_differences, load_checkpoint, rng_state, set_rng_state
from .config import Config, ConfigError
from .data.corpora import has_training_splits, resolve_layout
from .data.dataset import EpochSampler, TrainCrops, make_loader
from .data.index import check_max_bad
from .data.load import load_split, resampling_note
from .data.split import Split
from .distributed import World, join_world, leave_world, wrap_for_ranks
from .interrupt import Interrupted, StopRequests
from .memory.device import resolve_device, resolve_precision
from .memory.enforce import PeakReader, enforce_budget
from .memory.engine import RunPlan, plan_run, prepare_model
from .memory.optim import make_optimizer
from .memory.plan import MIN_MICRO_BATCH, NoPlanError
from .metrics import eer_percent
from .model import AASIST, count_parameters
from .progress import progress_bar
from .report import plot_run
from .scoring import autocast_ctx, score_split, write_score_file
from .step import forward_backward
from .storage import append_jsonl, atomic_torch_save, atomic_write_json, atomic_write_text


class RunFolderError(Exception):
    """The output folder cannot take this run; one line naming it."""


@dataclass(frozen=True)
class FitResult:
    out: Path
    steps: int
    epochs: int
    best_eer: float
    best_epoch: int
    dev_eers: tuple[float, ...]
    wall_s: float
    precision: str
    device: str
    peak_bytes: int | None = None
    """Highest process memory measured at the logged steps (NVML on CUDA, RSS on CPU)."""
    predicted_peak_bytes: int | None = None
    """The plan's prediction, when a budget was planned."""
    resumed_from: int = 0
    """The step a ``--resume`` continued from (0 for a fresh run)."""


RANK_SEED_STRIDE = 1_000_003
"""Rank r > 0 draws dropout masks from seed + r * this (rank 0 keeps the single-process stream)."""

SAVE_EVERY_S = 300.0
"""Default checkpoint interval: a kill loses at most about five minutes of work."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cosine_lr(step: int, total: int, lr: float, min_lr: float) -> float:
    """Cosine decay per step from lr (step 0) to min_lr (step ``total``)."""
    progress = min(step, total) / max(total, 1)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _plan_line(run_plan: RunPlan) -> str:
    p = run_plan.plan
    return (f"micro-batch {p.micro_batch} x {p.grad_accum} accumulation, crop {p.crop}, {p.precision}, checkpoint "
            f"{p.checkpoint}, {p.optimizer}; predicted peak {p.predicted_peak_bytes / 2**20:,.0f} MiB of "
            f"{run_plan.budget_bytes / 2**20:,.0f} MiB budget")


def check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunFolderError(f"--out {out}: folder exists and is not empty; add --resume to continue the run in it, "
                             "or choose a new --out (runs are never overwritten)")


def prepare_out_dir(out: Path) -> None:
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out / "scores").mkdir(exist_ok=True)


def smaller_micro_batch(batch: int, micro_batch: int) -> int:
    """The largest divisor of ``batch`` at most half of ``micro_batch``, or 0 below the smallest that trains."""
    return max((d for d in range(MIN_MICRO_BATCH, micro_batch // 2 + 1) if batch % d == 0), default=0)


def _keep_metrics_until(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint a resume starts from: the resumed run writes them again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def fit(cfg: Config, out: Path, device: str = "auto", console: Console | None = None, resume: bool = False) -> FitResult:
    """Train; under torchrun every rank calls this and only rank 0 prints and writes files."""
    world, device = join_world(device)
    try:
        return _fit(cfg, out, device, console or Console(), resume, world)
    finally:
        leave_world(world)


def _fit(cfg: Config, out: Path, device: str, console: Console, resume: bool, world: World) -> FitResult:
    t_start = time.perf_counter()
    tc = cfg.train
    main = world.is_main
    if not main:
        console = Console(quiet=True)

    # --- setup -------------------------------------------------------------------------------------------
    dev = resolve_device(device)
    if tc.batch % world.size:
        raise ConfigError(f"--batch {tc.batch} must be a multiple of the {world.size} processes (the effective batch is "
                          "shared between them)")
    rank_batch = tc.batch // world.size  # --budget plans one rank's share: the budget is per GPU
    state = None
    if resume:  # refuse a mismatched resume before indexing and calibrating, not after
        state = load_checkpoint(out / "checkpoints" / "last.pt")
        if diffs := config_differences(state["config"], cfg.to_dict()):
            raise ResumeError(f"--resume: {out} was trained with other settings that change the result "
                              f"({'; '.join(diffs)}); resume without them or start a new --out")
    else:
        check_out_dir(out)
    world.barrier()  # every rank has looked at --out before rank 0 writes into it
    root = cfg.data.root
    layout = resolve_layout(root, cfg.data.layout)
    if not has_training_splits(layout):
        raise ConfigError(f"--data {root} is {layout.describe()} (layout {layout.name}): it has no train and dev "
                          "splits to fit on; score it with `lowmem-aasist eval`")
    indexed = [load_split(root, name, layout.name, console=console) for name in ("train", "dev")]
    for ix in indexed:  # too much bad audio means the wrong folder or a broken copy: stop before any training
        check_max_bad(len(ix.problems), len(ix.split), cfg.data.max_bad, ix.split.name, data_root=root)
    train_split, dev_split = (ix.split for ix in indexed)
    if note := resampling_note([train_split, dev_split]):
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    mc = cfg.memory
    run_plan = None
    if mc.budget:  # plan within the budget: the planner picks precision, micro-batch, checkpointing, optimizer
        run_plan = plan_run(cfg.model.name, dev, mc.budget, rank_batch, tc.crop, tc.precision, mc.checkpoint,
                            mc.optimizer, mc.micro_batch, tc.channels_last)
        p = run_plan.plan
        precision, micro_batch, crop, checkpoint, optimizer_name = p.precision, p.micro_batch, p.crop, p.checkpoint, p.optimizer
        # CPU budgets count the whole process: decode in it rather than in extra worker processes.
        workers = 0 if dev.type == "cpu" else tc.workers
    else:  # the plain recipe, with whatever the config forces
        precision, micro_batch, crop = resolve_precision(tc.precision, dev), mc.micro_batch or rank_batch, tc.crop
        checkpoint = "none" if mc.checkpoint == "auto" else mc.checkpoint
        optimizer_name = "adam" if mc.optimizer == "auto" else mc.optimizer
        workers = tc.workers
    if rank_batch % micro_batch:
        raise ConfigError(f"--micro-batch {micro_batch} must divide the batch {tc.batch}"
                          + (f" per process ({rank_batch})" if world.distributed else ""))
    if micro_batch < MIN_MICRO_BATCH:
        raise ConfigError(f"--micro-batch {micro_batch}: AASIST trains on at least {MIN_MICRO_BATCH} utterances per "
                          "forward pass (its graph BatchNorm needs more than one)")
    resolved = {"device": str(dev), "precision": precision, "micro_batch": micro_batch, "crop": crop,
                "checkpoint": checkpoint, "optimizer": optimizer_name, "workers": workers, "world_size": world.size}
    plan_record = run_plan.to_dict() if run_plan is not None else None
    if main:
        prepare_out_dir(out)
        atomic_write_json(out / "config.json", {**cfg.to_dict(), "resolved": resolved})
    if plan_record is not None:
        if main:
            atomic_write_json(out / "plan.json", plan_record)
        console.print(f"plan: {_plan_line(run_plan)}", highlight=False)
        console.print(enforce_budget(dev, run_plan.budget_bytes, run_plan.facts.context_bytes), highlight=False)
    metrics_path, problems_path = out / "metrics.jsonl", out / "data_problems.jsonl"

    seed_everything(tc.seed)
    model = AASIST(cfg.model.name).to(dev)
    prepare_model(model, checkpoint, tc.channels_last)
    net = wrap_for_ranks(model, world, dev, cfg.train.sync_bn)  # the model itself in a world of one
    if world.rank:
        torch.manual_seed(tc.seed + RANK_SEED_STRIDE * world.rank)  # own dropout masks; weights came from rank 0
    optimizer = make_optimizer(optimizer_name, model.parameters(), tc.lr, tc.betas, tc.weight_decay)
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
    class_weights = torch.tensor(tc.class_weights, device=dev)

    def autocast():
        return autocast_ctx(dev, precision)

    train_data = TrainCrops(train_split, crop, tc.seed)
    sampler = EpochSampler(train_data.readable, tc.seed, tc.batch, world.rank, world.size)
    loader = make_loader(train_data, rank_batch, workers, sampler, dev.type == "cuda")
    # Whole batches only, as the reference recipe: a last batch of one utterance could not train at all.
    steps_per_epoch = len(train_data.readable) // tc.batch
    if steps_per_epoch == 0:
        raise ConfigError(f"--batch {tc.batch} is larger than the {len(train_data.readable)} readable training utterances")
    # The schedule spans the whole recipe; --max-steps only stops early, so a run stopped by it and resumed is
    # the run that was never stopped.
    total_steps = tc.epochs * steps_per_epoch
    stop_at = min(tc.max_steps, total_steps) if tc.max_steps else total_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, total_steps, tc.lr, tc.min_lr) / tc.lr)
    peaks = PeakReader(dev)

    step, epoch, epoch_step, best_eer, best_epoch, dev_eers = 0, 0, 0, math.inf, -1, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        position = state["position"]
        step, epoch, epoch_step = position["step"], position["epoch"], position["epoch_step"]
        best_eer, best_epoch, dev_eers = state["best_eer"], state["best_epoch"], list(state["dev_eers"])
        if main:
            _keep_metrics_until(metrics_path, step)
        ranks = state.get("rng_ranks") or [state["rng"]]
        if len(ranks) == world.size:  # last: nothing after this may draw random numbers before the loop
            set_rng_state(ranks[world.rank])
        else:  # another world size: exact only in what does not depend on it (rank 0 continues the saved stream)
            set_rng_state(state["rng"])
            if world.rank:
                torch.manual_seed(tc.seed + RANK_SEED_STRIDE * world.rank + step)
    resumed_from = step

    counts = train_split.counts()
    console.print(
        f"fit: {cfg.model.name} ({count_parameters(model):,} parameters) on {dev}, {precision}, "
        f"batch {tc.batch} (micro-batch {micro_batch}) x crop {crop}, lr {tc.lr:g}; train {len(train_split):,} utterances "
        f"({counts['bonafide']:,} bona fide), dev {len(dev_split):,}; {stop_at:,} steps -> {out}"
        + (f" (resumed at step {step:,}, epoch {epoch + 1})" if resume else "")
    )

    reported: set[tuple[str, int]] = set()

    def report_problem(split: Split, index: int, message: str) -> None:
        if (split.name, index) in reported or not main:  # each bad file once per run, not once per epoch
            return
        reported.add((split.name, index))
        console.print(f"[yellow]skipped[/yellow] {message}", highlight=False)
        append_jsonl(problems_path, {"split": split.name, "path": split.path[index], "error": message})

    if not resume:
        for ix in indexed:  # found by the index: never sampled, reported once here
            for problem in ix.problems:
                report_problem(ix.split, problem.index, f"{problem.path}: {problem.reason}")

    def save(name: str = "last.pt") -> None:
        rngs = world.gather(rng_state())  # a collective: every rank saves at the same steps
        if not main:
            return
        atomic_torch_save(out / "checkpoints" / name, {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rngs[0],
            "rng_ranks": rngs if world.distributed else [],
            "position": {"step": step, "epoch": epoch, "epoch_step": epoch_step, "seed": tc.seed},
            "step": step,
            "epoch": epoch,
            "best_eer": best_eer,
            "best_epoch": best_epoch,
            "dev_eers": list(dev_eers),
            "dev_eer": dev_eers[-1] if dev_eers else math.nan,
            "config": cfg.to_dict(),
            "plan": plan_record,
        })

    def train_step(wave: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """One optimizer step; on an out-of-memory error, halve the micro-batch and redo it from the same data."""
        nonlocal micro_batch
        rng = rng_state()
        while True:
            optimizer.zero_grad(set_to_none=True)
            try:
                if not world.distributed:
                    return forward_backward(model, wave, label, class_weights, micro_batch, autocast, scaler.scale)
                total = world.sum(class_weights[label.to(dev)].sum()) / world.size
                return forward_backward(net, wave, label, class_weights, micro_batch, autocast, scaler.scale,
                                        total_weight=total, no_sync=net.no_sync)
            except torch.OutOfMemoryError:
                if world.distributed:  # the other ranks are already in the step's collectives: no redo in step
                    raise NoPlanError(f"out of memory on rank {world.rank} at micro-batch {micro_batch}; under torchrun "
                                      "resume with a smaller --micro-batch (--resume keeps the run)") from None
                # leave the except block first, so the error's traceback frees the step's tensors
            optimizer.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            smaller = smaller_micro_batch(rank_batch, micro_batch)
            if not smaller:
                raise NoPlanError(f"out of memory at micro-batch {micro_batch} x crop {crop:,}, the smallest that "
                                  "trains; give a larger --budget, a shorter --crop or AASIST-L")
            console.print(f"[yellow]out of memory[/yellow] at step {step + 1}: micro-batch {micro_batch} -> {smaller} "
                          f"(accumulation {tc.batch // smaller}); redoing the step", highlight=False)
            append_jsonl(metrics_path, {"event": "oom_backoff", "step": step + 1, "micro_batch": smaller,
                                        "grad_accum": rank_batch // smaller, "previous_micro_batch": micro_batch})
            micro_batch = smaller
            if plan_record is not None:
                plan_record["plan"].update(micro_batch=smaller, grad_accum=rank_batch // smaller)
                atomic_write_json(out / "plan.json", plan_record)
            set_rng_state(rng)  # the retry draws the same dropout masks as a step that never failed

    # --- loop ----------------------------------------------------------------------------------------------
    loss_value, last_save, peak_seen = math.nan, time.perf_counter(), 0
    window_t, window_samples = time.perf_counter(), 0
    with StopRequests() as stop:
        try:
            while epoch < tc.epochs and step < stop_at:
                model.train()
                sampler.set_epoch(epoch, skip=min(epoch_step * tc.batch, len(train_data.readable)))
                todo = min(steps_per_epoch - epoch_step, stop_at - step)
                with progress_bar(console, f"epoch {epoch + 1}/{tc.epochs}", todo) as bar:
                    for batch in loader if todo > 0 else ():
                        for index, message in batch.problems:
                            report_problem(train_split, index, message)
                        loss = train_step(batch.wave, batch.label)
                        scaler.step(optimizer)
                        scaler.update()
                        scheduler.step()
                        step, epoch_step = step + 1, epoch_step + 1
                        window_samples += len(batch.index) * world.size  # the global batch

                        # A sync point (and, across ranks, the global batch's loss): once per step is cheap.
                        loss_value = world.sum(loss).item() / world.size
                        bar.advance(1, status=f"loss {loss_value:.4f}")
                        if main and (step % tc.log_every == 0 or step == stop_at):
                            now = time.perf_counter()
                            peak = peaks.read()
                            peak_seen = max(peak_seen, peak or 0)
                            append_jsonl(metrics_path, {
                                "step": step, "epoch": epoch, "loss": loss_value, "lr": optimizer.param_groups[0]["lr"],
                                "samples_per_s": window_samples / max(now - window_t, 1e-9), "peak_bytes": peak,
                            })
                            window_t, window_samples = now, 0
                        due = step % tc.save_every == 0 if tc.save_every else time.perf_counter() - last_save > SAVE_EVERY_S
                        stopping = world.any(stop.requested, dev)  # every rank stops at the same step
                        if world.any(due, dev) or stopping:
                            save()
                            last_save = time.perf_counter()
                        if stopping:
                            raise Interrupted(f"interrupted at step {step:,}; saved {out / 'checkpoints' / 'last.pt'}",
                                              stop.exit_code if stop.requested else 143)
                        if step >= stop_at:
                            break

                # --- end of epoch (or of the steps asked for): dev EER, scores, checkpoints ---------------------
                t_dev = time.perf_counter()

                def on_dev_batch(n: int) -> None:  # called within this iteration only
                    bar.advance(n)  # noqa: B023
                    if stop.requested and not world.distributed:  # abandon scoring; a resume scores it again
                        save()
                        raise Interrupted(f"interrupted while scoring dev after step {step:,}; saved "  # noqa: B023
                                          f"{out / 'checkpoints' / 'last.pt'}", stop.exit_code)

                # Rank 0 scores dev alone, on the unwrapped model (DDP's forward would wait for the other ranks).
                scores = np.full(len(dev_split), np.nan)
                if main:
                    with progress_bar(console, "dev", len(dev_split)) as bar:
                        scores = score_split(model, dev_split, dev, precision, cfg.data.eval_samples,
                                             cfg.data.dev_batch, tc.workers, on_batch=on_dev_batch,
                                             on_problem=lambda i, m: report_problem(dev_split, i, m))
                world.barrier()
                scored = np.isfinite(scores)
                labels = dev_split.label[scored]
                # A dev split reduced to one class by bad audio has no EER; keep training and say so in the log.
                dev_eer = eer_percent(scores[scored], labels) if 0 < labels.sum() < labels.size else math.nan
                dev_eer = world.sum(torch.tensor([dev_eer if main else 0.0])).item()  # every rank: rank 0's EER
                dev_eers.append(dev_eer)
                if main:
                    write_score_file(out / "scores" / "dev.txt", dev_split, scores)
                improved = dev_eer < best_eer
                if improved:
                    best_eer, best_epoch = dev_eer, epoch + 1
                finished = epoch_step >= steps_per_epoch
                if finished:
                    epoch, epoch_step = epoch + 1, 0
                save()
                last_save = time.perf_counter()
                if improved:
                    save("best.pt")
                if main:
                    append_jsonl(metrics_path, {"epoch": epoch if finished else epoch + 1, "step": step,
                                                "dev_eer": dev_eer, "dev_s": time.perf_counter() - t_dev,
                                                "wall_s": time.perf_counter() - t_start})
                console.print(
                    f"epoch {epoch if finished else epoch + 1}/{tc.epochs}  step {step}  loss {loss_value:.4f}  "
                    f"dev EER {dev_eer:.2f}%" + ("  (best)" if improved else "")
                    + f"  [{time.perf_counter() - t_start:.0f} s]",
                    highlight=False,
                )
                if not finished:
                    break
        except Interrupted as exc:
            raise Interrupted(f"{exc}; resume with: lowmem-aasist fit --out {out} --resume", exc.exit_code) from None

    if main:
        plot_run(metrics_path, out / "training.png")
    return FitResult(
        out=out,
        steps=step,
        epochs=epoch,
        best_eer=best_eer,
        best_epoch=best_epoch,
        dev_eers=tuple(dev_eers),
        wall_s=time.perf_counter() - t_start,
        precision=precision,
        device=str(dev),
        peak_bytes=peak_seen or None,
        predicted_peak_bytes=run_plan.plan.predicted_peak_bytes if run_plan is not None else None,
        resumed_from=resumed_from,
    )
