"""Streaming datasets: each item decodes only the window it needs, straight from disk.

Training items are random crops whose position is a pure function of (seed, epoch, index), so a run is the same
whatever the number of DataLoader workers. Unreadable audio never reaches the model: the item comes back as a
problem record and the collate function drops it (and the trainer reports it once).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..audio import AudioError, audio_info, read_segment, tile
from .asvspoof2019 import Split


def crop_start(n_frames: int, crop: int, rng: np.random.Generator) -> int:
    """Uniform over every valid start, the last one (n_frames - crop) included; 0 when the clip is short."""
    return int(rng.integers(0, n_frames - crop + 1)) if n_frames > crop else 0


def read_window(path: str, start: int, length: int) -> np.ndarray:
    """``length`` samples from ``start``; a clip shorter than that is tiled end to end (the reference rule)."""
    info = audio_info(path)
    available = info.frames_16k
    if available <= 0:
        raise AudioError(path, "empty file (0 samples)")
    if start + length <= available:
        return read_segment(path, start, length, info)
    return tile(read_segment(path, 0, available, info), length)


@dataclass(frozen=True)
class Batch:
    wave: torch.Tensor  # [B, T] float32
    label: torch.Tensor  # [B] int64
    index: torch.Tensor  # [B] int64, positions in the split
    problems: tuple[tuple[int, str], ...]  # (index, "path: reason") of items dropped from this batch


class TrainCrops(Dataset):
    """Random ``crop``-sample windows of a split; keys are (index, epoch) pairs from :class:`EpochSampler`."""

    def __init__(self, split: Split, crop: int, seed: int) -> None:
        self.split, self.crop, self.seed = split, crop, seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, np.ndarray | str]:
        index, epoch = key
        path = str(self.split.path[index])
        try:
            n_frames = audio_info(path).frames_16k
            start = crop_start(n_frames, self.crop, np.random.default_rng([self.seed, epoch, index]))
            return index, read_window(path, start, self.crop)
        except AudioError as exc:
            return index, str(exc)


class EvalInputs(Dataset):
    """The evaluation input of each utterance: its first ``samples`` samples, short clips tiled."""

    def __init__(self, split: Split, samples: int) -> None:
        self.split, self.samples = split, samples

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | str]:
        try:
            return index, read_window(str(self.split.path[index]), 0, self.samples)
        except AudioError as exc:
            return index, str(exc)


class EpochSampler(Sampler):
    """A fresh permutation per epoch from (seed, epoch), yielding (index, epoch) keys; ``skip`` resumes mid-epoch."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.skip = n, seed, 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.n - self.skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = np.random.default_rng([self.seed, self.epoch, 0x5EED]).permutation(self.n)
        for i in order[self.skip :]:
            yield int(i), self.epoch


def collate(items: list[tuple[int, np.ndarray | str]], labels: np.ndarray) -> Batch:
    good = [(i, x) for i, x in items if not isinstance(x, str)]
    problems = tuple((i, x) for i, x in items if isinstance(x, str))
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

    def __call__(self, items: list[tuple[int, np.ndarray | str]]) -> Batch:
        return collate(items, self.labels)


def default_workers() -> int:
    """One worker per core beyond the first, capped at 4: decoding FLAC crops is light next to a training step."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def make_loader(
    dataset: TrainCrops | EvalInputs,
    batch: int,
    workers: int,
    sampler: Sampler | None = None,
    pin_memory: bool = False,
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
        prefetch_factor=2 if workers > 0 else None,
        drop_last=False,
    )
