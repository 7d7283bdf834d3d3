"""``fit``: setup, then one training loop read top to bottom, then the result.

The loop never branches on which options are on: autocast is a no-op context in fp32, the GradScaler is disabled
unless fp16, a world of one makes every collective a no-op, and features and loggers (:mod:`.features`) are
objects it calls at fixed points. Its pieces are plain functions of the :class:`~.state.TrainState`:
:func:`train_step` (one optimizer step, with out-of-memory backoff), :func:`end_of_epoch` (dev EER, best model,
checkpoints), and :func:`~.state.save` / :func:`~.state.restore`.

A run can stop at any step boundary (``--max-steps``, Ctrl-C, SIGTERM, a kill after a save) and resume to exactly
the run it would have been: the checkpoint holds the data position (epoch, step within it; crops and order are pure
functions of the seed) and every random-number state, so the weights come out bit-identical on CPU.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from ..checkpoint import rng_state, set_rng_state
from ..config import Config
from ..data.dataset import Batch
from ..distributed import join_world, leave_world
from ..interrupt import Interrupted, StopRequests
from ..memory.enforce import PeakReader
from ..memory.engine import record_observed
from ..memory.fused_step import stepping
from ..memory.plan import NoPlanError
from ..metrics import eer_percent
from ..progress import progress_bar
from ..report import plot_run, plot_score_file_det
from ..scoring import score_split, write_score_file
from ..step import forward_backward
from ..storage import atomic_write_json
from .features import Feature, Logger
from .setup import setup
from .state import TrainState, save

SAVE_EVERY_S = 300.0
"""Default checkpoint interval: a kill loses at most about five minutes of work."""


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


def fit(
    cfg: Config,
    out: Path,
    device: str = "auto",
    console: Console | None = None,
    resume: bool = False,
    features: Sequence[Feature] = (),
    logger: Logger | None = None,
) -> FitResult:
    """Train; under torchrun every rank calls this and only rank 0 prints and writes files."""
    world, device = join_world(device)
    try:
        state = setup(cfg, out, device, console or Console(), resume, world, features, logger)
        peak = train(state)
        if world.is_main:
            plot_run(out / "metrics.jsonl", out / "training.png")
            plot_score_file_det(out / "scores" / "dev.txt", out / "dev_det.png", "dev DET, last evaluation")
            if state.plan is not None:  # the peak measured at the planned micro-batch refines the next plan
                record_observed(state.plan, state.micro_batch, peak)
        return _result(state, peak)
    finally:
        leave_world(world)


def train(s: TrainState) -> int:
    """The loop: epochs of steps and a dev evaluation at each epoch's end, until the recipe's epochs, ``--max-steps``,
    a signal (save, then :class:`Interrupted`) or a feature's stop. Returns the highest memory peak logged."""
    tc, pos, loss = s.cfg.train, s.position, math.nan
    meter = StepMeter(PeakReader(s.device))
    last_save = time.perf_counter()
    with StopRequests() as stop:
        try:
            while pos.epoch < tc.epochs and pos.step < s.schedule.stop_at:
                s.model.train()
                s.sampler.set_epoch(pos.epoch, skip=min(pos.epoch_step * tc.batch, len(s.train_data.readable)))
                todo = min(s.schedule.steps_per_epoch - pos.epoch_step, s.schedule.stop_at - pos.step)
                with progress_bar(s.console, f"epoch {pos.epoch + 1}/{tc.epochs}", todo) as bar:
                    for batch in s.loader if todo > 0 else ():
                        for index, message in batch.problems:
                            s.problems.report(s.train_split, index, message)
                        # A sync point (and, across ranks, the global batch's loss): once per step is cheap.
                        loss = s.world.sum(train_step(s, batch)).item() / s.world.size
                        pos.step, pos.epoch_step = pos.step + 1, pos.epoch_step + 1
                        bar.advance(1, status=f"loss {loss:.4f}")
                        meter.log(s, loss, len(batch.index) * s.world.size)  # the global batch
                        for feature in s.features:
                            feature.after_step(s)
                        due = pos.step % tc.save_every == 0 if tc.save_every else time.perf_counter() - last_save > SAVE_EVERY_S
                        stopping = s.world.any(stop.requested, s.device)  # every rank stops at the same step
                        if s.world.any(due, s.device) or stopping:
                            save(s)
                            last_save = time.perf_counter()
                        if stopping:
                            raise Interrupted(f"interrupted at step {pos.step:,}; saved {s.checkpoints / 'last.pt'}",
                                              stop.exit_code if stop.requested else 143)
                        if pos.step >= s.schedule.stop_at:
                            break
                finished = end_of_epoch(s, stop, loss)
                last_save = time.perf_counter()
                if not finished or s.world.any(any(f.should_stop(s) for f in s.features), s.device):
                    break
        except Interrupted as exc:
            raise Interrupted(f"{exc}; resume with: lowmem-aasist fit --out {s.out} --resume", exc.exit_code) from None
    return meter.peak


class StepMeter:
    """Logs a record every ``log_every`` steps (and at the last): loss, learning rate, throughput since the last
    record, and the process's memory peak since then (NVML on CUDA, RSS on CPU)."""

    def __init__(self, peaks: PeakReader) -> None:
        self.peaks, self.peak = peaks, 0
        self.since, self.samples = time.perf_counter(), 0

    def log(self, s: TrainState, loss: float, samples: int) -> None:
        self.samples += samples
        step = s.position.step
        if not s.world.is_main or (step % s.cfg.train.log_every and step != s.schedule.stop_at):
            return
        now, peak = time.perf_counter(), self.peaks.read()
        self.peak = max(self.peak, peak or 0)
        s.logger.log({"step": step, "epoch": s.position.epoch, "loss": loss, "lr": s.optimizer.param_groups[0]["lr"],
                      "samples_per_s": self.samples / max(now - self.since, 1e-9), "peak_bytes": peak})
        self.since, self.samples = now, 0


def train_step(s: TrainState, batch: Batch) -> torch.Tensor:
    """One optimizer step over ``batch`` in micro-batches; returns this rank's loss (detached).

    On an out-of-memory error the step is freed, the micro-batch halved (accumulation doubled: the effective batch
    is kept) and the step redone from the same data and random state, as if it had never failed.
    """
    rng = rng_state()
    # A failed forward has already moved BatchNorm's running statistics: the retry must start from the same ones.
    buffers = [b.detach().clone() for b in s.model.buffers()]
    while True:
        s.optimizer.zero_grad(set_to_none=True)
        try:
            loss = _accumulate(s, batch)
            break
        except torch.OutOfMemoryError:
            if s.world.distributed:  # the other ranks are already in the step's collectives: no redo in step
                raise NoPlanError(f"out of memory on rank {s.world.rank} at micro-batch {s.micro_batch}; under "
                                  "torchrun resume with a smaller --micro-batch (--resume keeps the run)") from None
            # leave the except block first, so the error's traceback frees the step's tensors
        s.optimizer.zero_grad(set_to_none=True)
        back_off(s)
        set_rng_state(rng)  # the retry draws the same dropout masks as a step that never failed
        with torch.no_grad():
            for live, saved in zip(s.model.buffers(), buffers, strict=True):
                live.copy_(saved)
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.scheduler.step()
    return loss


def _accumulate(s: TrainState, batch: Batch) -> torch.Tensor:
    # Weighted by the global batch's total weight (summed over ranks), so DDP's averaging of the ranks' gradients
    # gives the single-process gradient; in a world of one the sum is the rank's own total.
    total = s.world.sum(s.class_weights[batch.label.to(s.device)].sum()) / s.world.size
    no_sync = getattr(s.net, "no_sync", nullcontext)
    # With the optimizer step in backward, the last micro-batch's backward applies the update (a no-op otherwise).
    return forward_backward(s.net, batch.wave, batch.label, s.class_weights, s.micro_batch, s.autocast,
                            s.scaler.scale, total_weight=total, no_sync=no_sync,
                            last=functools.partial(stepping, s.optimizer))


def smaller_micro_batch(batch: int, micro_batch: int, smallest: int) -> int:
    """The largest divisor of ``batch`` at most half of ``micro_batch`` and at least ``smallest`` (the model's
    limit), or 0 when there is none."""
    return max((d for d in range(smallest, micro_batch // 2 + 1) if batch % d == 0), default=0)


def back_off(s: TrainState) -> None:
    """Halve the micro-batch after an out-of-memory error: say so, log the event, rewrite plan.json."""
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
    smaller = smaller_micro_batch(s.rank_batch, s.micro_batch, s.family.limits.min_micro_batch)
    step = s.position.step + 1
    if not smaller:
        raise NoPlanError(f"out of memory at micro-batch {s.micro_batch} x crop {s.crop:,}, the smallest that trains; "
                          "give a larger --budget, a shorter --crop or a smaller model")
    s.console.print(f"[yellow]out of memory[/yellow] at step {step}: micro-batch {s.micro_batch} -> {smaller} "
                    f"(accumulation {s.cfg.train.batch // smaller}); redoing the step", highlight=False)
    s.logger.log({"event": "oom_backoff", "step": step, "micro_batch": smaller, "grad_accum": s.rank_batch // smaller,
                  "previous_micro_batch": s.micro_batch})
    s.micro_batch = smaller
    if s.plan_record is not None:
        s.plan_record["plan"].update(micro_batch=smaller, grad_accum=s.rank_batch // smaller)
        if s.world.is_main:
            atomic_write_json(s.out / "plan.json", s.plan_record)


def end_of_epoch(s: TrainState, stop: StopRequests, loss: float) -> bool:
    """Score dev, keep the best model, save, log and print one line. Returns whether the epoch was finished (False
    when the loop stopped inside it, at ``--max-steps``)."""
    t_dev, pos, best = time.perf_counter(), s.position, s.best
    dev_eer = score_dev(s, stop)
    best.dev_eers.append(dev_eer)
    for feature in s.features:
        feature.after_eval(s, dev_eer)
    improved = dev_eer < best.eer
    if improved:
        best.eer, best.epoch = dev_eer, pos.epoch + 1
    finished = pos.epoch_step >= s.schedule.steps_per_epoch
    if finished:
        pos.epoch, pos.epoch_step = pos.epoch + 1, 0
    save(s)
    if improved:
        save(s, "best.pt")
    shown = pos.epoch if finished else pos.epoch + 1
    now = time.perf_counter()
    s.logger.log({"epoch": shown, "step": pos.step, "dev_eer": dev_eer, "dev_s": now - t_dev, "wall_s": now - s.started})
    s.console.print(f"epoch {shown}/{s.cfg.train.epochs}  step {pos.step}  loss {loss:.4f}  dev EER {dev_eer:.2f}%"
                    + ("  (best)" if improved else "") + f"  [{now - s.started:.0f} s]", highlight=False)
    return finished


def score_dev(s: TrainState, stop: StopRequests) -> float:
    """Dev EER (%) of the model now; rank 0 scores alone, on the unwrapped model (DDP's forward would wait for the
    other ranks), writes scores/dev.txt and shares the EER. NaN when bad audio left dev with one class."""
    scores = np.full(len(s.dev_split), np.nan)
    if s.world.is_main:
        with progress_bar(s.console, "dev", len(s.dev_split)) as bar:
            scores = score_split(s.model, s.dev_split, s.device, s.precision, s.cfg.data.eval_samples,
                                 s.dev_batch, s.cfg.train.workers,
                                 on_batch=functools.partial(_dev_progress, s, stop, bar),
                                 on_problem=functools.partial(s.problems.report, s.dev_split))
        write_score_file(s.out / "scores" / "dev.txt", s.dev_split, scores)
    s.world.barrier()
    scored = np.isfinite(scores)
    labels = s.dev_split.label[scored]
    eer = eer_percent(scores[scored], labels) if 0 < labels.sum() < labels.size else math.nan
    return s.world.sum(torch.tensor([eer if s.world.is_main else 0.0])).item()  # every rank: rank 0's EER


def _dev_progress(s: TrainState, stop: StopRequests, bar, n: int) -> None:
    bar.advance(n)
    if stop.requested and not s.world.distributed:  # abandon scoring; a resume scores it again
        save(s)
        raise Interrupted(f"interrupted while scoring dev after step {s.position.step:,}; saved "
                          f"{s.checkpoints / 'last.pt'}", stop.exit_code)


def _result(s: TrainState, peak: int) -> FitResult:
    return FitResult(
        out=s.out,
        steps=s.position.step,
        epochs=s.position.epoch,
        best_eer=s.best.eer,
        best_epoch=s.best.epoch,
        dev_eers=tuple(s.best.dev_eers),
        wall_s=time.perf_counter() - s.started,
        precision=s.precision,
        device=str(s.device),
        peak_bytes=peak or None,
        predicted_peak_bytes=s.plan.plan.predicted_peak_bytes if s.plan is not None else None,
        resumed_from=s.resumed_from,
    )
