"""Using a model: score utterances of a split, or arbitrary audio files, with bounded memory.

Scores are the bona fide logit (class 1), as the published evaluation reports them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .audio import AudioError, eval_input, iter_windows
from .data.dataset import EvalInputs, make_loader
from .data.split import Split
from .memory.device import autocast_ctx
from .models import InputSpec, family_of
from .scorefiles import ASVSPOOF5_HEADER
from .storage import atomic_write_text


@torch.no_grad()
def bona_fide_logits(model: torch.nn.Module, wave: torch.Tensor, device: torch.device, precision: str) -> np.ndarray:
    """The score of each waveform: the bona fide logit, the class the model's family names."""
    with autocast_ctx(device, precision):
        logits = model(wave.to(device, non_blocking=True))
    return logits[:, family_of(model).input.bona_fide_class].float().cpu().numpy()


def score_split(
    model: torch.nn.Module,
    split: Split,
    device: torch.device,
    precision: str,
    samples: int,
    batch: int,
    workers: int,
    on_batch: Callable[[int], None] | None = None,
    on_problem: Callable[[int, str], None] | None = None,
) -> np.ndarray:
    """Scores of every utterance of ``split`` (NaN where the audio was unreadable), in eval mode."""
    was_training = model.training
    model.eval()
    scores = np.full(len(split), np.nan, dtype=np.float64)
    loader = make_loader(EvalInputs(split, samples), batch, workers, pin_memory=device.type == "cuda")
    try:
        for b in loader:
            for index, message in b.problems:
                if on_problem:
                    on_problem(index, message)
            if len(b.index):
                scores[b.index.numpy()] = bona_fide_logits(model, b.wave, device, precision)
            if on_batch:
                on_batch(len(b.index) + len(b.problems))
    finally:
        model.train(was_training)
    return scores


SCORE_DECIMALS = 6
"""Decimals of a score in a score file, as the reference score files have them."""


def as_written(scores: np.ndarray) -> np.ndarray:
    """``scores`` as a score file holds them, so that metrics reported beside a file are the file's metrics
    (rounding can tie two utterances, and a threshold is one of the scores)."""
    return np.array([float(f"{s:.{SCORE_DECIMALS}f}") if np.isfinite(s) else s for s in scores], dtype=np.float64)


def write_score_file(path: str | Path, split: Split, scores: np.ndarray, layout: str = "2019") -> int:
    """Write the scored utterances in ``layout`` (see ``scorefiles.SCORE_LAYOUTS``); unscored ones are left out."""
    keys = np.where(split.label == 1, "bonafide", np.where(split.label == 0, "spoof", "-"))  # "-": no key
    rows = [(u, a, k, f"{s:.{SCORE_DECIMALS}f}")
            for u, a, k, s in zip(split.utt, split.attack, keys, scores, strict=True) if np.isfinite(s)]
    if layout == "asvspoof5":
        lines = [ASVSPOOF5_HEADER, *(f"{u}\t{s}" for u, _, _, s in rows)]
        atomic_write_text(path, "\n".join(lines) + "\n")
        return len(rows)
    lines = [" ".join(row) for row in rows]
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
    return len(lines)


@dataclass(frozen=True)
class FileScore:
    path: str
    score: float | None = None
    windows: int = 0
    error: str | None = None


def _batched(items: Iterable, n: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def score_file_full(model: torch.nn.Module, path: Path, device: torch.device, precision: str, batch: int,
                    spec: InputSpec) -> FileScore:
    """Whole recording: overlapping reference-length windows (``spec.eval_samples`` every ``spec.full_hop``) read
    in chunks; score = mean window logit."""
    total, count = 0.0, 0
    for windows in _batched(iter_windows(path, spec.eval_samples, spec.full_hop), batch):
        logits = bona_fide_logits(model, torch.from_numpy(np.stack(windows)), device, precision)
        total += float(logits.sum())
        count += len(windows)
    return FileScore(str(path), total / count, count)


def score_files(
    model: torch.nn.Module,
    paths: Iterable[Path],
    device: torch.device,
    precision: str = "fp32",
    full: bool = False,
    batch: int = 8,
) -> Iterator[FileScore]:
    """Score each file (the model's reference input by default, ``full`` for whole recordings); bad files yield an
    error."""
    model.eval()
    spec = family_of(model).input
    if full:
        for path in paths:
            try:
                yield score_file_full(model, path, device, precision, batch, spec)
            except AudioError as exc:
                yield FileScore(str(path), error=str(exc))
        return
    for group in _batched(paths, batch):
        results: list[FileScore | None] = [None] * len(group)
        waves, slots = [], []
        for slot, path in enumerate(group):
            try:
                waves.append(eval_input(path, spec.eval_samples))
                slots.append(slot)
            except AudioError as exc:
                results[slot] = FileScore(str(path), error=str(exc))
        if waves:
            logits = bona_fide_logits(model, torch.from_numpy(np.stack(waves)), device, precision)
            for slot, s in zip(slots, logits, strict=True):
                results[slot] = FileScore(str(group[slot]), float(s), 1)
        yield from results  # input order, errors in place
