"""Setup of a training run: from the frozen config to a :class:`~.state.TrainState` the loop can run.

Everything is decided here, once: the device, the plan (precision, micro-batch, checkpointing, optimizer: from the
memory engine under ``--budget``, else the recipe with whatever the config forces), the data, the model with the
plan's techniques applied, the optimizer and schedule, and, on ``--resume``, the checkpoint put back. The loop
then never asks which options are on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from ..audio import SAMPLE_RATE
from ..augment.base import item_rng, parse_spec
from ..checkpoint import ResumeError, config_differences, load_checkpoint
from ..config import Config, ConfigError
from ..data.corpora import has_training_splits, resolve_layout
from ..data.dataset import EpochSampler, TrainCrops, collate, make_loader
from ..data.index import IndexResult, check_max_bad
from ..data.load import load_split, resampling_note
from ..data.split import Split
from ..distributed import World, wrap_for_ranks
from ..memory.device import resolve_device, resolve_precision
from ..memory.enforce import enforce_budget
from ..memory.engine import RunPlan, dev_batch_within, plan_run, prepare_model
from ..memory.fused_step import fused_step_problems
from ..memory.measure import measure_data_path
from ..memory.optim import make_optimizer
from ..memory.plan import DataPath
from ..models import ModelFamily, count_parameters, get_family, load_ssl_front_end
from ..storage import atomic_write_json, atomic_write_text
from .features import Feature, JsonlLogger, Logger, NullLogger
from .state import RANK_SEED_STRIDE, ProblemLog, Schedule, TrainState, restore


class RunFolderError(Exception):
    """The output folder cannot take this run; one line naming it."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cosine_lr(step: int, total: int, lr: float, min_lr: float) -> float:
    """Cosine decay per step from lr (step 0) to min_lr (step ``total``)."""
    progress = min(step, total) / max(total, 1)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunFolderError(f"--out {out}: folder exists and is not empty; add --resume to continue the run in it, "
                             "or choose a new --out (runs are never overwritten)")


def _checkpoint_to_resume(out: Path, cfg: Config) -> dict:
    """The run's ``last.pt``, refused before any indexing or calibrating when the config changes the result."""
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    if diffs := config_differences(ckpt["config"], cfg.to_dict()):
        raise ResumeError(f"--resume: {out} was trained with other settings that change the result "
                          f"({'; '.join(diffs)}); resume without them or start a new --out")
    return ckpt


def _keep_metrics_until(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint a resume starts from: the resumed run writes them again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _index(cfg: Config, console: Console) -> list[IndexResult]:
    root = cfg.data.root
    layout = resolve_layout(root, cfg.data.layout)
    if not has_training_splits(layout):
        raise ConfigError(f"--data {root} is {layout.describe()} (layout {layout.name}): it has no train and dev "
                          "splits to fit on; score it with `lowmem-aasist eval`")
    indexed = [load_split(root, name, layout.name, console=console) for name in ("train", "dev")]
    for ix in indexed:  # too much bad audio means the wrong folder or a broken copy: stop before any training
        check_max_bad(len(ix.problems), len(ix.split), cfg.data.max_bad, ix.split.name, data_root=root)
    if note := resampling_note([ix.split for ix in indexed]):
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    return indexed


@dataclass(frozen=True)
class Resolved:
    """The techniques a run uses: the memory engine's plan under ``--budget``, else the recipe and what is forced."""

    precision: str
    micro_batch: int
    crop: int
    checkpoint: str
    optimizer: str
    workers: int
    dev_batch: int
    plan: RunPlan | None
    optimizer_in_backward: bool = False

    def to_dict(self, device: torch.device, world: World) -> dict:
        return {"device": str(device), "precision": self.precision, "micro_batch": self.micro_batch, "crop": self.crop,
                "checkpoint": self.checkpoint, "optimizer": self.optimizer, "workers": self.workers,
                "dev_batch": self.dev_batch, "world_size": world.size,
                "optimizer_in_backward": self.optimizer_in_backward}


def data_path_of(data: TrainCrops, batch: int) -> Callable[[], DataPath]:
    """What reading and augmenting one batch costs this process, measured on the first ``batch`` readable items as
    the loader builds them (``fit --budget`` on a CPU reads in the training process)."""
    keys = [(int(i), 0) for i in data.readable[:batch]]

    def measure() -> DataPath:
        nbytes, seconds = measure_data_path(lambda: collate([data[k] for k in keys], data.split.label), len(keys))
        return DataPath(data.augment.spec or "none", nbytes, seconds)

    return measure


def synthetic_data_path(spec: str, crop: int, batch: int, seed: int = 0) -> Callable[[], DataPath]:
    """:func:`data_path_of` without a corpus (``probe``): stand-in crops of noise at speech level, through the same
    augmentation and collation."""
    chain = parse_spec(spec)  # a bad spec fails here, before any calibration

    def measure() -> DataPath:
        # Drawn only when measured (a CPU plan), never on CUDA, where the data path is not counted.
        waves = np.random.default_rng(seed).standard_normal((batch, crop), dtype=np.float32) * 0.1

        def read_batch() -> torch.Tensor:
            return torch.from_numpy(np.stack([chain(w.copy(), SAMPLE_RATE, item_rng(seed, 0, i))
                                              for i, w in enumerate(waves)]))

        nbytes, seconds = measure_data_path(read_batch, batch)
        return DataPath(chain.spec or "none", nbytes, seconds)

    return measure


def resolve(cfg: Config, family: ModelFamily, device: torch.device, world: World, rank_batch: int,
            train_split: Split | None = None) -> Resolved:
    tc, mc = cfg.train, cfg.memory
    if mc.budget:  # the budget is per GPU: the engine plans one rank's share of the batch
        data_path = None
        if train_split is not None:
            data = TrainCrops(train_split, tc.crop, tc.seed, parse_spec(cfg.data.augment), tc.crop_from)
            data_path = data_path_of(data, rank_batch)
        run = plan_run(family.name, device, mc.budget, rank_batch, tc.crop, tc.precision, mc.checkpoint,
                       mc.optimizer, mc.micro_batch, tc.channels_last, data_path=data_path)
        p = run.plan
        # CPU budgets count the whole process: decode in it rather than in extra worker processes.
        workers = 0 if device.type == "cpu" else tc.workers
        dev_batch = dev_batch_within(run, cfg.data.eval_samples, p.precision, cfg.data.dev_batch)
        chosen = Resolved(p.precision, p.micro_batch, p.crop, p.checkpoint, p.optimizer, workers, dev_batch, run)
    else:
        chosen = Resolved(resolve_precision(tc.precision, device), mc.micro_batch or rank_batch, tc.crop,
                          "none" if mc.checkpoint == "auto" else mc.checkpoint,
                          "adam" if mc.optimizer == "auto" else mc.optimizer, tc.workers, cfg.data.dev_batch, None)
    if mc.optimizer_in_backward:
        if problems := fused_step_problems(chosen.precision, world.distributed):
            raise ConfigError(f"memory.optimizer_in_backward: {problems[0]}")
        chosen = dataclasses.replace(chosen, optimizer_in_backward=True)
    if rank_batch % chosen.micro_batch:
        raise ConfigError(f"--micro-batch {chosen.micro_batch} must divide the batch {tc.batch}"
                          + (f" per process ({rank_batch})" if world.distributed else ""))
    smallest = family.limits.min_micro_batch
    if chosen.micro_batch < smallest:
        raise ConfigError(f"--micro-batch {chosen.micro_batch}: {family.name} trains on at least {smallest} "
                          f"utterances per forward pass ({family.limits.why_min})")
    return chosen


def _plan_line(run: RunPlan) -> str:
    p = run.plan
    return (f"micro-batch {p.micro_batch} x {p.grad_accum} accumulation, crop {p.crop}, {p.precision}, checkpoint "
            f"{p.checkpoint}, {p.optimizer}; predicted peak {p.predicted_peak_bytes / 2**20:,.0f} MiB of "
            f"{run.budget_bytes / 2**20:,.0f} MiB budget")


def _write_run_files(cfg: Config, out: Path, chosen: Resolved, device: torch.device, world: World,
                     console: Console) -> dict | None:
    """config.json (with what was resolved) and plan.json; the budget enforced. Returns plan.json's content."""
    record = chosen.plan.to_dict() if chosen.plan is not None else None
    if world.is_main:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        (out / "scores").mkdir(exist_ok=True)
        atomic_write_json(out / "config.json", {**cfg.to_dict(), "resolved": chosen.to_dict(device, world)})
        if record is not None:
            atomic_write_json(out / "plan.json", record)
    if chosen.plan is not None:
        console.print(f"plan: {_plan_line(chosen.plan)}", highlight=False)
        console.print(enforce_budget(device, chosen.plan.budget_bytes, chosen.plan.facts.context_bytes), highlight=False)
    return record


def _training_data(cfg: Config, split: Split, chosen: Resolved, world: World, device: torch.device):
    """Streaming crops, this rank's sampler and loader, and the step schedule of the whole recipe."""
    tc = cfg.train
    train_data = TrainCrops(split, chosen.crop, tc.seed, parse_spec(cfg.data.augment), tc.crop_from)
    sampler = EpochSampler(train_data.readable, tc.seed, tc.batch, world.rank, world.size)
    loader = make_loader(train_data, tc.batch // world.size, chosen.workers, sampler, device.type == "cuda")
    # Whole batches only, as the reference recipe: a last batch of one utterance could not train at all.
    steps_per_epoch = len(train_data.readable) // tc.batch
    if steps_per_epoch == 0:
        raise ConfigError(f"--batch {tc.batch} is larger than the {len(train_data.readable)} readable training utterances")
    # The schedule spans the whole recipe; --max-steps only stops early, so a run stopped by it and resumed is the
    # run that was never stopped.
    total = tc.epochs * steps_per_epoch
    return train_data, sampler, loader, Schedule(steps_per_epoch, total, min(tc.max_steps, total) if tc.max_steps else total)


def setup(
    cfg: Config,
    out: Path,
    device: str,
    console: Console,
    resume: bool,
    world: World,
    features: Sequence[Feature] = (),
    logger: Logger | None = None,
) -> TrainState:
    """Build the run (or rebuild it from ``last.pt`` with ``resume``); only rank 0 prints and writes files."""
    started = time.perf_counter()
    tc = cfg.train
    if not world.is_main:
        console = Console(quiet=True)
    dev = resolve_device(device)
    family = get_family(cfg.model.name)
    if tc.batch % world.size:
        raise ConfigError(f"--batch {tc.batch} must be a multiple of the {world.size} processes (the effective batch is "
                          "shared between them)")
    rank_batch = tc.batch // world.size
    if resume:  # refuse a mismatched resume before indexing and calibrating, not after
        ckpt = _checkpoint_to_resume(out, cfg)
    else:
        check_out_dir(out)
        ckpt = None
    world.barrier()  # every rank has looked at --out before rank 0 writes into it
    indexed = _index(cfg, console)
    train_split, dev_split = (ix.split for ix in indexed)
    chosen = resolve(cfg, family, dev, world, rank_batch, train_split)
    plan_record = _write_run_files(cfg, out, chosen, dev, world, console)

    seed_everything(tc.seed)
    model = family.build()
    if cfg.model.ssl_weights and not resume:  # a resume has every weight in last.pt
        try:
            notes = load_ssl_front_end(model, cfg.model.ssl_weights, cfg.model.ssl_weights_trusted)
        except TypeError as exc:  # a family without a wav2vec 2.0 front end
            raise ConfigError(str(exc)) from None
        for note in notes:
            console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    model = model.to(dev)
    prepare_model(model, chosen.checkpoint, tc.channels_last)
    net = wrap_for_ranks(model, world, dev, tc.sync_bn)  # the model itself in a world of one
    if world.rank:
        torch.manual_seed(tc.seed + RANK_SEED_STRIDE * world.rank)  # own dropout masks; weights came from rank 0
    optimizer = make_optimizer(chosen.optimizer, model.parameters(), tc.lr, tc.betas, tc.weight_decay,
                               in_backward=chosen.optimizer_in_backward)

    train_data, sampler, loader, schedule = _training_data(cfg, train_split, chosen, world, dev)
    total = schedule.total_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, total, tc.lr, tc.min_lr) / tc.lr)

    metrics_path = out / "metrics.jsonl"
    state = TrainState(
        cfg=cfg, out=out, world=world, device=dev, family=family, precision=chosen.precision, crop=chosen.crop,
        micro_batch=chosen.micro_batch, rank_batch=rank_batch, dev_batch=chosen.dev_batch, model=model, net=net, optimizer=optimizer,
        scheduler=scheduler, scaler=torch.amp.GradScaler(dev.type, enabled=chosen.precision == "fp16"),
        class_weights=torch.tensor(tc.class_weights, device=dev), train_split=train_split, dev_split=dev_split,
        train_data=train_data, sampler=sampler, loader=loader, schedule=schedule, plan=chosen.plan,
        plan_record=plan_record, console=console,
        logger=logger or (JsonlLogger(metrics_path) if world.is_main else NullLogger()),
        problems=ProblemLog(out / "data_problems.jsonl", console, world.is_main), features=tuple(features),
        started=started,
    )
    if ckpt is not None:
        if world.is_main:
            _keep_metrics_until(metrics_path, ckpt["position"]["step"])
        restore(state, ckpt)  # last: it sets the random states the first step draws from

    counts, p = train_split.counts(), state.position
    console.print(
        f"fit: {family.name} ({count_parameters(model):,} parameters) on {dev}, {state.precision}, batch {tc.batch} "
        f"(micro-batch {state.micro_batch}) x crop {state.crop}, lr {tc.lr:g}; train {len(train_split):,} utterances "
        f"({counts['bonafide']:,} bona fide), dev {len(dev_split):,}; {schedule.stop_at:,} steps -> {out}"
        + (f" (resumed at step {p.step:,}, epoch {p.epoch + 1})" if resume else "")
        + (f"\naugment: {state.train_data.augment.spec} on each training crop, drawn from (seed, epoch, index); dev "
           "is scored clean" if state.train_data.augment else ""),
        highlight=False,
    )
    if not resume:
        for ix in indexed:  # found by the index: never sampled, reported once here
            for problem in ix.problems:
                state.problems.report(ix.split, problem.index, f"{problem.path}: {problem.reason}")
    return state
