"""A training run's state, and its checkpoint: what :func:`save` writes is exactly what :func:`restore` reads back.

A checkpoint holds the model, optimizer (8-bit state included), scheduler, GradScaler, every random-number state of
every rank, the data position (epoch, step within it; crops and order are pure functions of the seed), the best dev
result so far, the config, the plan and each feature's state. Only tensors and plain types: every load can use
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..checkpoint import rng_state, set_rng_state
from ..config import Config
from ..data.dataset import EpochSampler, TrainCrops
from ..data.split import Split
from ..distributed import World
from ..memory.device import autocast_ctx
from ..memory.engine import RunPlan
from ..models import ModelFamily
from ..storage import append_jsonl, atomic_torch_save
from .features import Feature, Logger

RANK_SEED_STRIDE = 1_000_003
"""Rank r > 0 draws dropout masks from seed + r * this (rank 0 keeps the single-process stream)."""


@dataclass
class Position:
    """Where the run is: optimizer steps done in all, the epoch, and steps done within it."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0


@dataclass
class Best:
    """Dev results so far: one EER per evaluation, and the best (chosen on dev, never on eval)."""

    eer: float = math.inf
    epoch: int = -1
    dev_eers: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Schedule:
    steps_per_epoch: int
    total_steps: int
    """The cosine schedule spans the whole recipe, whatever ``--max-steps`` says."""
    stop_at: int


class ProblemLog:
    """Bad audio, reported once per file per run: a console line and a ``data_problems.jsonl`` record (rank 0)."""

    def __init__(self, path: Path, console: Console, writes: bool) -> None:
        self.path, self.console, self.writes = path, console, writes
        self.seen: set[tuple[str, int]] = set()

    def report(self, split: Split, index: int, message: str) -> None:
        if (split.name, index) in self.seen or not self.writes:
            return
        self.seen.add((split.name, index))
        self.console.print(f"[yellow]skipped[/yellow] {message}", highlight=False)
        append_jsonl(self.path, {"split": split.name, "path": split.path[index], "error": message})


@dataclass
class TrainState:
    """Everything the loop's pieces share. Built by :func:`.setup.setup`; the loop changes only ``position``,
    ``best`` and ``micro_batch`` (out-of-memory backoff), besides the objects' own state."""

    cfg: Config
    out: Path
    world: World
    device: torch.device
    family: ModelFamily
    precision: str
    crop: int
    micro_batch: int
    rank_batch: int
    """This process's share of the effective batch (all of it in a world of one)."""
    dev_batch: int
    """Utterances per dev-scoring forward (within the budget when one is planned)."""
    model: nn.Module
    net: nn.Module
    """What steps run through: ``model`` itself, or DistributedDataParallel around it under torchrun."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    class_weights: Tensor
    train_split: Split
    dev_split: Split
    train_data: TrainCrops
    sampler: EpochSampler
    loader: DataLoader
    schedule: Schedule
    plan: RunPlan | None
    plan_record: dict | None
    """``plan.json``'s content; the backoff rewrites its micro-batch."""
    console: Console
    logger: Logger
    problems: ProblemLog
    features: tuple[Feature, ...] = ()
    position: Position = field(default_factory=Position)
    best: Best = field(default_factory=Best)
    resumed_from: int = 0
    started: float = 0.0
    """perf_counter() at the start of the run, for the wall times logged."""

    def autocast(self):
        """The run's precision as a context (a no-op in fp32); a method, so the step can call it per micro-batch."""
        return autocast_ctx(self.device, self.precision)

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"


def save(state: TrainState, name: str = "last.pt") -> None:
    """Write ``checkpoints/<name>`` atomically (rank 0); every rank must call it (the random states are gathered)."""
    rngs = state.world.gather(rng_state())
    if not state.world.is_main:
        return
    p, best = state.position, state.best
    atomic_torch_save(state.checkpoints / name, {
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "rng": rngs[0],
        "rng_ranks": rngs if state.world.distributed else [],
        "position": {"step": p.step, "epoch": p.epoch, "epoch_step": p.epoch_step, "seed": state.cfg.train.seed},
        "best_eer": best.eer,
        "best_epoch": best.epoch,
        "dev_eers": list(best.dev_eers),
        "config": state.cfg.to_dict(),
        "plan": state.plan_record,
        "features": {f.name: f.state_dict() for f in state.features},
    })


def restore(state: TrainState, ckpt: dict[str, Any]) -> None:
    """Put a checkpoint back into a freshly set-up state. Last, because it sets the random states: nothing may draw
    random numbers between this and the first step."""
    state.model.load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    state.scaler.load_state_dict(ckpt["scaler"])
    pos = ckpt["position"]
    state.position = Position(pos["step"], pos["epoch"], pos["epoch_step"])
    state.best = Best(ckpt["best_eer"], ckpt["best_epoch"], list(ckpt["dev_eers"]))
    saved = ckpt.get("features", {})
    for feature in state.features:
        if feature.name in saved:
            feature.load_state_dict(saved[feature.name])
    state.resumed_from = state.position.step
    world = state.world
    ranks = ckpt.get("rng_ranks") or [ckpt["rng"]]
    if len(ranks) == world.size:
        set_rng_state(ranks[world.rank])
    else:  # another world size: exact only in what does not depend on it (rank 0 continues the saved stream)
        set_rng_state(ckpt["rng"])
        if world.rank:
            torch.manual_seed(state.cfg.train.seed + RANK_SEED_STRIDE * world.rank + state.position.step)
