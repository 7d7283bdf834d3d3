"""``fit``: one training loop, read top to bottom.

Setup builds everything from the frozen config (device, precision, data, model, optimizer, schedule); the loop
then never branches on which options are on: autocast is a no-op context in fp32 and the GradScaler is disabled
unless fp16.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from .config import Config, ConfigError
from .data.corpora import has_training_splits, resolve_layout
from .data.dataset import EpochSampler, TrainCrops, make_loader
from .data.index import check_max_bad
from .data.load import load_split, resampling_note
from .data.split import Split
from .memory.device import resolve_device, resolve_precision
from .memory.enforce import PeakReader, enforce_budget
from .memory.engine import RunPlan, plan_run, prepare_model
from .memory.optim import make_optimizer
from .metrics import eer_percent
from .model import AASIST, count_parameters
from .progress import progress_bar
from .scoring import autocast_ctx, score_split, write_score_file
from .step import forward_backward
from .storage import append_jsonl, atomic_torch_save, atomic_write_json


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
        raise RunFolderError(f"--out {out}: folder exists and is not empty; choose a new --out (runs are never overwritten)")


def prepare_out_dir(out: Path) -> None:
    check_out_dir(out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out / "scores").mkdir(exist_ok=True)


def fit(cfg: Config, out: Path, device: str = "auto", console: Console | None = None) -> FitResult:
    console = console or Console()
    t_start = time.perf_counter()
    tc = cfg.train

    # --- setup -------------------------------------------------------------------------------------------
    dev = resolve_device(device)
    root = cfg.data.root
    layout = resolve_layout(root, cfg.data.layout)
    if not has_training_splits(layout):
        raise ConfigError(f"--data {root} is {layout.describe()} (layout {layout.name}): it has no train and dev "
                          "splits to fit on; score it with `lowmem-aasist eval`")
    check_out_dir(out)  # refuse before indexing and a minute of calibration, not after
    indexed = [load_split(root, name, layout.name, console=console) for name in ("train", "dev")]
    for ix in indexed:  # too much bad audio means the wrong folder or a broken copy: stop before any training
        check_max_bad(len(ix.problems), len(ix.split), cfg.data.max_bad, ix.split.name, data_root=root)
    train_split, dev_split = (ix.split for ix in indexed)
    if note := resampling_note([train_split, dev_split]):
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    mc = cfg.memory
    run_plan = None
    if mc.budget:  # plan within the budget: the planner picks precision, micro-batch, checkpointing, optimizer
        run_plan = plan_run(cfg.model.name, dev, mc.budget, tc.batch, tc.crop, tc.precision, mc.checkpoint,
                            mc.optimizer, mc.micro_batch, tc.channels_last)
        p = run_plan.plan
        precision, micro_batch, crop, checkpoint, optimizer_name = p.precision, p.micro_batch, p.crop, p.checkpoint, p.optimizer
        # CPU budgets count the whole process: decode in it rather than in extra worker processes.
        workers = 0 if dev.type == "cpu" else tc.workers
    else:  # the plain recipe, with whatever the config forces
        precision, micro_batch, crop = resolve_precision(tc.precision, dev), mc.micro_batch or tc.batch, tc.crop
        checkpoint = "none" if mc.checkpoint == "auto" else mc.checkpoint
        optimizer_name = "adam" if mc.optimizer == "auto" else mc.optimizer
        workers = tc.workers
    if tc.batch % micro_batch:
        raise ConfigError(f"--micro-batch {micro_batch} must divide the batch {tc.batch}")
    prepare_out_dir(out)
    resolved = {"device": str(dev), "precision": precision, "micro_batch": micro_batch, "crop": crop,
                "checkpoint": checkpoint, "optimizer": optimizer_name, "workers": workers}
    atomic_write_json(out / "config.json", {**cfg.to_dict(), "resolved": resolved})
    if run_plan is not None:
        atomic_write_json(out / "plan.json", run_plan.to_dict())
        console.print(f"plan: {_plan_line(run_plan)}", highlight=False)
        console.print(enforce_budget(dev, run_plan.budget_bytes, run_plan.facts.context_bytes), highlight=False)
    metrics_path, problems_path = out / "metrics.jsonl", out / "data_problems.jsonl"

    seed_everything(tc.seed)
    model = AASIST(cfg.model.name).to(dev)
    prepare_model(model, checkpoint, tc.channels_last)
    optimizer = make_optimizer(optimizer_name, model.parameters(), tc.lr, tc.betas, tc.weight_decay)
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
    class_weights = torch.tensor(tc.class_weights, device=dev)

    def autocast():
        return autocast_ctx(dev, precision)

    train_data = TrainCrops(train_split, crop, tc.seed)
    sampler = EpochSampler(train_data.readable, tc.seed)
    loader = make_loader(train_data, tc.batch, workers, sampler, dev.type == "cuda")
    steps_per_epoch = math.ceil(len(train_data.readable) / tc.batch)
    total_steps = tc.epochs * steps_per_epoch if tc.max_steps == 0 else min(tc.max_steps, tc.epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, total_steps, tc.lr, tc.min_lr) / tc.lr)
    peaks = PeakReader(dev)

    counts = train_split.counts()
    console.print(
        f"fit: {cfg.model.name} ({count_parameters(model):,} parameters) on {dev}, {precision}, "
        f"batch {tc.batch} (micro-batch {micro_batch}) x crop {crop}, lr {tc.lr:g}; train {len(train_split):,} utterances "
        f"({counts['bonafide']:,} bona fide), dev {len(dev_split):,}; {total_steps:,} steps -> {out}"
    )

    reported: set[tuple[str, int]] = set()

    def report_problem(split: Split, index: int, message: str) -> None:
        if (split.name, index) in reported:  # each bad file once per run, not once per epoch
            return
        reported.add((split.name, index))
        console.print(f"[yellow]skipped[/yellow] {message}", highlight=False)
        append_jsonl(problems_path, {"split": split.name, "path": split.path[index], "error": message})

    for ix in indexed:  # found by the index: never sampled, reported once here
        for problem in ix.problems:
            report_problem(ix.split, problem.index, f"{problem.path}: {problem.reason}")

    # --- loop ----------------------------------------------------------------------------------------------
    step, epoch, best_eer, best_epoch, dev_eers, loss_value = 0, 0, math.inf, -1, [], math.nan
    window_t, window_samples = time.perf_counter(), 0
    while epoch < tc.epochs and step < total_steps:
        model.train()
        sampler.set_epoch(epoch)
        with progress_bar(console, f"epoch {epoch + 1}/{tc.epochs}", min(steps_per_epoch, total_steps - step)) as bar:
            for batch in loader:
                for index, message in batch.problems:
                    report_problem(train_split, index, message)
                if len(batch.index) == 0:
                    continue
                optimizer.zero_grad(set_to_none=True)
                loss = forward_backward(
                    model, batch.wave, batch.label, class_weights, micro_batch, autocast, scaler.scale
                )
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                window_samples += len(batch.index)

                loss_value = loss.item()  # a sync point: once per step is cheap next to the step itself
                bar.advance(1, status=f"loss {loss_value:.4f}")
                if step % tc.log_every == 0 or step == total_steps:
                    now = time.perf_counter()
                    append_jsonl(
                        metrics_path,
                        {
                            "step": step,
                            "epoch": epoch,
                            "loss": loss_value,
                            "lr": optimizer.param_groups[0]["lr"],
                            "samples_per_s": window_samples / max(now - window_t, 1e-9),
                            "peak_bytes": peaks.read(),
                        },
                    )
                    window_t, window_samples = now, 0
                if step >= total_steps:
                    break

        # --- end of epoch: dev EER, scores, checkpoints ------------------------------------------------------
        t_dev = time.perf_counter()
        with progress_bar(console, "dev", len(dev_split)) as bar:
            scores = score_split(
                model,
                dev_split,
                dev,
                precision,
                cfg.data.eval_samples,
                cfg.data.dev_batch,
                tc.workers,
                on_batch=bar.advance,
                on_problem=lambda i, m: report_problem(dev_split, i, m),
            )
        scored = np.isfinite(scores)
        labels = dev_split.label[scored]
        # A dev split reduced to one class by bad audio has no EER; keep training and say so in the log.
        dev_eer = eer_percent(scores[scored], labels) if 0 < labels.sum() < labels.size else math.nan
        dev_eers.append(dev_eer)
        write_score_file(out / "scores" / "dev.txt", dev_split, scores)
        checkpoint = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "step": step,
            "epoch": epoch + 1,
            "dev_eer": dev_eer,
            "config": cfg.to_dict(),
        }
        atomic_torch_save(out / "checkpoints" / "last.pt", checkpoint)
        improved = dev_eer < best_eer
        if improved:
            best_eer, best_epoch = dev_eer, epoch + 1
            atomic_torch_save(out / "checkpoints" / "best.pt", checkpoint)
        append_jsonl(
            metrics_path,
            {"epoch": epoch + 1, "step": step, "dev_eer": dev_eer, "dev_s": time.perf_counter() - t_dev,
             "wall_s": time.perf_counter() - t_start},
        )
        console.print(
            f"epoch {epoch + 1}/{tc.epochs}  step {step}  loss {loss_value:.4f}  dev EER {dev_eer:.2f}%"
            + ("  (best)" if improved else "")
            + f"  [{time.perf_counter() - t_start:.0f} s]",
            highlight=False,
        )
        epoch += 1

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
    )
