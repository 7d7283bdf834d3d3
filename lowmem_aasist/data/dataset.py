"""Streaming datasets: each item decodes only the window it needs, straight from disk.

Training items are random crops whose position, and augmentation, are pure functions of (seed, epoch, index), so a
run is the same whatever the number of DataLoader workers. Lengths come from the split's index (file headers read once), so an
item opens its file once and decodes only its window. Unreadable audio never reaches the model: a training item
is replaced by another utterance and the failure travels with the batch for the trainer to report once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..audio import SAMPLE_RATE, AudioError, audio_info, read_segment, tile
from ..augment.base import NO_AUGMENTATION, Chain, item_rng
from ..interrupt import ignore_sigint_in_worker
from ..malloc import set_malloc_thresholds
from .split import CROP_FROM, Split


def crop_start(n_frames: int, crop: int, rng: np.random.Generator) -> int:
    """Uniform over every valid start, the last one (n_frames - crop) included; 0 when the clip is short."""
    return int(rng.integers(0, n_frames - crop + 1)) if n_frames > crop else 0


def read_window(path: str, start: int, length: int, available: int | None = None) -> np.ndarray:
    """``length`` samples from ``start``; a clip shorter than that is tiled end to end (the reference rule).
    ``available`` is the file's length from the index, which saves opening its header twice."""
    if available is None:
        available = audio_info(path).frames_16k
    if available <= 0:
        raise AudioError(path, "empty file (0 samples)")
    try:
        if start + length <= available:
            return read_segment(path, start, length)
        return tile(read_segment(path, 0, available), length)
    except ValueError:  # a window past the end: the file shrank after it was indexed
        raise AudioError(path, "file changed since it was indexed (shorter now); run again to re-index") from None


def _frames(split: Split) -> np.ndarray:
    if split.frames is None:
        raise ValueError(f"split {split.name!r} has no frame counts; index it first (data.index.index_split)")
    return split.frames


@dataclass(frozen=True)
class Batch:
    wave: torch.Tensor  # [B, T] float32
    label: torch.Tensor  # [B] int64
    index: torch.Tensor  # [B] int64, positions in the split
    problems: tuple[tuple[int, str], ...]  # (index, "path: reason") of items that could not be read


Item = tuple[int, "np.ndarray | None", tuple[tuple[int, str], ...]]
"""(index read, its samples or None, problems met on the way)."""

MAX_SUBSTITUTES = 8


class TrainCrops(Dataset):
    """Random ``crop``-sample windows of an indexed split (or its first ``crop`` samples, ``crop_from="start"``); keys
    are (index, epoch) pairs from :class:`EpochSampler`.

    An item that cannot be read is replaced by another readable utterance drawn from the same (seed, epoch,
    index) stream, so its batch stays full, nothing unreadable reaches the model, and the substitute is the
    same whatever the number of workers. The failure travels with the item so the trainer reports it.
    """

    def __init__(self, split: Split, crop: int, seed: int, augment: Chain = NO_AUGMENTATION,
                 crop_from: str = "random") -> None:
        if crop_from not in CROP_FROM:
            raise ValueError(f"crop_from must be one of {', '.join(CROP_FROM)}, got {crop_from!r}")
        self.split, self.crop, self.seed, self.augment = split, crop, seed, augment
        self.from_start = crop_from == "start"
        self.frames = _frames(split)
        self.readable = np.flatnonzero(self.frames > 0)

    def __len__(self) -> int:
        return len(self.split)

    def _read(self, index: int, rng: np.random.Generator) -> np.ndarray:
        n = int(self.frames[index])
        start = 0 if self.from_start else crop_start(n, self.crop, rng)
        return read_window(self.split.path[index], start, self.crop, n)

    def _augmented(self, wave: np.ndarray, epoch: int, index: int) -> np.ndarray:
        # Its own stream, keyed like the crop's: switching augmentation on moves no crop, and a substitute for an
        # unreadable item is augmented by the draws its slot would have had.
        return self.augment(wave, SAMPLE_RATE, item_rng(self.seed, epoch, index)) if self.augment else wave

    def __getitem__(self, key: tuple[int, int]) -> Item:
        index, epoch = key
        rng = np.random.default_rng([self.seed, epoch, index])
        problems: list[tuple[int, str]] = []
        candidate = index
        for _ in range(MAX_SUBSTITUTES + 1):
            try:
                return candidate, self._augmented(self._read(candidate, rng), epoch, index), tuple(problems)
            except AudioError as exc:
                problems.append((candidate, str(exc)))
            if not len(self.readable):
                break
            candidate = int(self.readable[rng.integers(len(self.readable))])
        return index, None, tuple(problems)


class EvalInputs(Dataset):
    """The evaluation input of each utterance: its first ``samples`` samples, short clips tiled. Unreadable
    utterances come back without samples (no substitute: every utterance needs its own score)."""

    def __init__(self, split: Split, samples: int) -> None:
        self.split, self.samples = split, samples

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> Item:
        known = None if self.split.frames is None else int(self.split.frames[index])
        try:
            if known is not None and known <= 0:
                raise AudioError(self.split.path[index], "unreadable when indexed")
            return index, read_window(self.split.path[index], 0, self.samples, known), ()
        except AudioError as exc:
            return index, None, ((index, str(exc)),)


class EpochSampler(Sampler):
    """A fresh permutation of ``indices`` per epoch from (seed, epoch), yielding (index, epoch) keys.

    With ``batch``, only whole global batches are yielded (the reference recipe drops the last partial one), and
    with ``world`` > 1 this rank's share of each: rank r takes items [r * batch / world, (r + 1) * batch / world) of
    every global batch, so the ranks together see exactly the single-process batches. ``skip`` (global items,
    whole batches under several ranks) resumes mid-epoch.
    """

    def __init__(self, indices: np.ndarray, seed: int, batch: int = 0, rank: int = 0, world: int = 1) -> None:
        if world > 1 and (not batch or batch % world):
            raise ValueError(f"batch {batch} must be a multiple of the world size {world}")
        self.indices, self.seed, self.epoch, self.skip = np.asarray(indices, dtype=np.int64), seed, 0, 0
        self.batch, self.rank, self.world = batch, rank, world

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _order(self) -> np.ndarray:
        order = np.random.default_rng([self.seed, self.epoch, 0x5EED]).permutation(self.indices)
        if self.batch:
            order = order[: len(order) // self.batch * self.batch]
        order = order[self.skip :]
        if self.world > 1:
            per = self.batch // self.world
            order = order[: len(order) // self.batch * self.batch].reshape(-1, self.batch)
            order = order[:, self.rank * per : (self.rank + 1) * per].reshape(-1)
        return order

    def __len__(self) -> int:
        return len(self._order())

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self._order():
            yield int(i), self.epoch


def collate(items: list[Item], labels: np.ndarray) -> Batch:
    good = [(i, x) for i, x, _ in items if x is not None]
    problems = tuple(p for _, _, found in items for p in found)
    if good:
        index = torch.tensor([i for i, _ in good], dtype=torch.int64)
        wave = torch.from_numpy(np.stack([x for _, x in good]))
    else:
        index, wave = torch.zeros(0, dtype=torch.int64), torch.zeros(0, 0)
    return Batch(wave=wave, label=torch.from_numpy(labels[index.numpy()].astype(np.int64)), index=index, problems=problems)


class _Collate:
    # A picklable callable so worker processes can run it.
    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels

    def __call__(self, items: list[Item]) -> Batch:
        return collate(items, self.labels)


WORKER_MMAP_THRESHOLD = 64 << 20


def _init_worker(worker_id: int) -> None:
    """Worker start: leave Ctrl-C to the main process, and let glibc keep freed crop buffers for reuse. By default
    each ~250 KiB crop, tile and batch buffer is a fresh mmap that is unmapped when freed and page-faulted in again
    for the next item; measured, that made one worker 25-30% slower than decoding in the main process
    (benchmarks/results/cpu/loader.md). Workers hold no activations, so keeping the pages costs a few MiB."""
    ignore_sigint_in_worker(worker_id)
    set_malloc_thresholds(WORKER_MMAP_THRESHOLD)


def default_workers() -> int:
    """One worker per core beyond the first, capped at 4: decoding FLAC crops is light next to a training step."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def make_loader(
    dataset: TrainCrops | EvalInputs,
    batch: int,
    workers: int,
    sampler: Sampler | None = None,
    pin_memory: bool = False,
    drop_last: bool = False,
) -> DataLoader:
    workers = default_workers() if workers < 0 else workers
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        collate_fn=_Collate(dataset.split.label),
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        worker_init_fn=_init_worker if workers > 0 else None,
        # Its own generator: the loader draws a seed per epoch, which must not move the global torch RNG that
        # dropout uses, or a resumed run (one fewer epoch start) would drift from the uninterrupted one.
        generator=torch.Generator(),
        prefetch_factor=2 if workers > 0 else None,
        drop_last=drop_last,
    )
