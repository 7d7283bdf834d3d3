"""``eval``: score a whole split of any corpus with the reference evaluation input, resumably, within a budget.

Every utterance gets the bona fide logit of its first 64,600 samples (short clips tiled), as the published
evaluation scores it; the score file is the reference CM layout ``UTT ATTACK KEY SCORE`` in split order, and EER /
min t-DCF follow when the split has keys for both classes.

An evaluation set can hold 600k utterances (hours on a small GPU), so a run appends each batch's scores to
``<out>.partial`` as it goes; an interrupted run started again with the same arguments scores only what is left and
writes the same file, byte for byte, as an uninterrupted run would. ``<out>.partial.json`` records what the partial
scores were made with, and a run with other weights, data or settings refuses to mix them in.

The batch comes from the memory engine (:func:`.memory.engine.plan_inference`): a given ``batch`` is used as it is;
otherwise the largest batch up to 64 whose predicted peak fits the budget (``auto``: free memory minus a safety
margin, as for ``fit``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from .data.dataset import EvalInputs, make_loader
from .data.index import IndexResult
from .data.load import load_split, resampling_note
from .data.split import BONAFIDE, SPOOF, UNLABELED, Split
from .memory.device import resolve_device, resolve_precision
from .memory.enforce import enable_expandable_segments
from .memory.engine import plan_inference
from .metrics import CmScores, evaluate, read_asv_scores
from .models import load
from .progress import progress_bar
from .scorefiles import Calibration
from .scoring import as_written, bona_fide_logits, write_score_file
from .storage import atomic_write_json, atomic_write_text

PARTIAL_VERSION = 1


class EvalResumeError(Exception):
    """A ``.partial`` score file left by another evaluation (other weights, data or settings); one line."""


@dataclass(frozen=True)
class EvalResult:
    scores_path: Path
    scored: int  # utterances with a score in the file
    skipped: int  # bad audio, reported
    resumed: int  # utterances found already scored from an interrupted run (0 for a fresh run)
    batch: int  # batch used
    metrics: dict | None  # metrics.evaluate(...) when the split is labeled (both classes present), else None
    seconds: float


# --- the partial score file -----------------------------------------------------------------------------------


def _partial_paths(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.name + ".partial"), out.with_name(out.name + ".partial.json")


def _split_digest(split: Split) -> str:
    # Utterance ids and paths, offsets included: another protocol or another corpus root is another list.
    h = hashlib.sha1()
    for column in (split.utt, split.path):
        h.update(np.ascontiguousarray(column.offsets, dtype="<i8").tobytes())
        h.update(np.ascontiguousarray(column.data, dtype=np.uint8).tobytes())
    return h.hexdigest()


def _identity(weights: Path, split: Split, split_name: str, phase: str, samples: int, precision: str) -> dict[str, Any]:
    """What the scores in a partial file depend on. Precision is in it because bf16 and fp32 scores differ in
    the printed digits; the device and the batch are not (their differences are below the 6 decimals written)."""
    st = weights.stat()
    return {
        "version": PARTIAL_VERSION,
        "weights": str(weights.resolve()),
        "weights_size": st.st_size,
        "weights_mtime_ns": st.st_mtime_ns,
        "layout": split.layout,
        "split": split_name,
        "phase": phase,
        "samples": samples,
        "precision": precision,
        "utterances": len(split),
        "list_sha1": _split_digest(split),
    }


def _refuse(partial: Path, why: str) -> EvalResumeError:
    return EvalResumeError(
        f"{partial}: {why}; delete {partial.name} (and {partial.name}.json) to start over, or give another --out"
    )


def _holds_a_line(partial: Path) -> bool:
    """Whether ``partial`` exists and has at least one whole line (read only up to the first newline)."""
    try:
        with open(partial, "rb") as f:
            while chunk := f.read(1 << 16):
                if b"\n" in chunk:
                    return True
    except FileNotFoundError:
        pass
    return False


def _read_partial(partial: Path, sidecar: Path, identity: dict[str, Any], split: Split) -> dict[int, float]:
    """Scores of an interrupted run (split index -> score); cuts a torn last line off the file so appends continue
    on a line boundary. Raises EvalResumeError when the partial was made differently or is damaged."""
    try:
        stored = json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _refuse(partial, f"found without {sidecar.name}, so what made it is unknown") from None
    except (OSError, ValueError) as exc:
        raise _refuse(partial, f"{sidecar.name} is unreadable ({type(exc).__name__})") from None
    if not isinstance(stored, dict):
        raise _refuse(partial, f"{sidecar.name} is not a JSON object")
    differ = [k for k in identity if stored.get(k) != identity[k]]
    if differ:
        shown = ", ".join(f"{k} {stored.get(k)!r} (now {identity[k]!r})" for k in differ[:2])
        more = f" and {len(differ) - 2} more" if len(differ) > 2 else ""
        raise _refuse(partial, f"left by an evaluation with other settings: {shown}{more}")
    raw = partial.read_bytes()
    whole = raw.rfind(b"\n") + 1  # a crash mid-write leaves a torn last line; it is scored again
    if whole < len(raw):
        with open(partial, "r+b") as f:
            f.truncate(whole)
    done: dict[int, float] = {}
    for number, line in enumerate(raw[:whole].decode("utf-8", errors="replace").split("\n")[:-1], start=1):
        fields = line.split("\t", 2)
        try:
            index, score = int(fields[0]), float(fields[1])
            ok = len(fields) == 3 and 0 <= index < len(split) and np.isfinite(score) and split.utt[index] == fields[2]
        except (ValueError, IndexError):
            ok = False
        if not ok:
            raise _refuse(partial, f"line {number} is not 'INDEX<TAB>SCORE<TAB>UTT' of this split")
        done[index] = score
    return done


class _Appender:
    """Appends score lines to the partial file: flushed every batch (a crash of the process loses nothing written),
    fsync'ed every few seconds (a power cut loses at most those seconds, not the hours before)."""

    FSYNC_EVERY_S = 5.0

    def __init__(self, f: IO[str]) -> None:
        self.f, self.synced = f, time.monotonic()

    def write(self, lines: list[str]) -> None:
        self.f.write("".join(lines))
        self.f.flush()
        if time.monotonic() - self.synced >= self.FSYNC_EVERY_S:
            self.sync()

    def sync(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.synced = time.monotonic()


@contextmanager
def _appending(partial: Path) -> Iterator[_Appender]:
    with open(partial, "a", encoding="utf-8", newline="\n") as f:
        appender = _Appender(f)
        try:
            yield appender
        finally:
            appender.sync()


# --- the run --------------------------------------------------------------------------------------------------


def _warn(console: Console, text: str) -> None:
    console.print(f"[yellow]warning[/yellow] {escape(text)}", highlight=False)


def _metrics(split: Split, scores: np.ndarray, asv_path: Path | None, console: Console) -> dict | None:
    """evaluate() over the scored utterances that have keys, when both classes are among them."""
    scored = np.isfinite(scores)
    keyed = scored & (split.label != UNLABELED)
    if not ((split.label[keyed] == BONAFIDE).any() and (split.label[keyed] == SPOOF).any()):
        if asv_path is not None:
            _warn(console, f"--asv-scores {asv_path} not used: the split has no keys for both classes")
        return None
    if keyed.sum() < scored.sum():
        _warn(console, f"metrics over the {int(keyed.sum()):,} scored utterances with keys; "
                       f"{int(scored.sum() - keyed.sum()):,} have none")
    idx = np.flatnonzero(keyed)
    cm = CmScores(list(split.utt[idx]), list(split.attack[idx]), split.label[idx].astype(np.int8), scores[idx])
    try:
        return evaluate(cm, read_asv_scores(asv_path) if asv_path is not None else None)
    except ValueError as exc:  # e.g. an attack named like a count key: the score file stands, metrics do not
        _warn(console, f"metrics not computed: {exc}")
        return None


def _resume(partial: Path, sidecar: Path, identity: dict[str, Any], split: Split) -> tuple[np.ndarray, int]:
    """The scores an interrupted run left (NaN elsewhere) and how many; a fresh sidecar when there are none."""
    scores = np.full(len(split), np.nan, dtype=np.float64)
    if not _holds_a_line(partial):
        # A run stopped before its first batch left no scores to protect, whatever it was run with: start afresh.
        partial.unlink(missing_ok=True)
        atomic_write_json(sidecar, identity)  # before the partial, so a partial never exists without it
        return scores, 0
    done = _read_partial(partial, sidecar, identity, split)
    scores[np.fromiter(done.keys(), dtype=np.int64)] = np.fromiter(done.values(), dtype=np.float64)
    return scores, len(done)


class _Problems:
    """Bad audio met while scoring: one console line each, and the list written beside the score file."""

    def __init__(self, console: Console) -> None:
        self.console, self.found = console, []

    def report(self, index: int, message: str) -> None:
        self.found.append((index, message))
        self.console.print(f"[yellow]skipped[/yellow] {escape(message)}", highlight=False)

    def write(self, path: Path, split: Split) -> Path:
        if self.found:
            rows = [{"utt": split.utt[i], "path": split.path[i], "error": m} for i, m in sorted(self.found)]
            atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        else:
            path.unlink(missing_ok=True)  # a list from an earlier run would describe files now fine
        return path


def _score_batch(b, todo: np.ndarray, split: Split, scores: np.ndarray, net: torch.nn.Module, dev: torch.device,
                 precision: str, appender: _Appender, problems: _Problems) -> None:
    for position, message in b.problems:
        problems.report(int(todo[position]), message)
    if len(b.index):
        where = todo[b.index.numpy()]
        values = bona_fide_logits(net, b.wave, dev, precision).astype(np.float64)
        scores[where] = values
        # repr() round-trips a float exactly, so resumed scores print as the first run's would.
        appender.write([f"{i}\t{v!r}\t{split.utt[i]}\n" for i, v in zip(where.tolist(), values.tolist(), strict=True)])


@dataclass(frozen=True)
class _Scoring:
    device: torch.device
    precision: str
    samples: int
    batch: int
    workers: int


def _score_remaining(indexed: IndexResult, scores: np.ndarray, net: torch.nn.Module, how: _Scoring, partial: Path,
                     problems: _Problems, label: str, console: Console) -> None:
    """Fill the non-finite entries of ``scores`` (appending each batch to ``partial`` as it is scored), except for
    files the index found bad: those never reach the loader and are reported with the index's reason."""
    sp = indexed.split
    bad = np.zeros(len(sp), dtype=bool)
    for p in indexed.problems:
        if not np.isfinite(scores[p.index]):
            bad[p.index] = True
            problems.report(p.index, f"{p.path}: {p.reason}")
    todo = np.flatnonzero(~np.isfinite(scores) & ~bad)
    try:
        with _appending(partial) as appender, progress_bar(console, label, len(todo)) as bar:
            loader = make_loader(EvalInputs(sp.subset(todo), how.samples), how.batch, how.workers,
                                 pin_memory=how.device.type == "cuda") if len(todo) else ()
            for b in loader:
                _score_batch(b, todo, sp, scores, net, how.device, how.precision, appender, problems)
                bar.advance(len(b.index) + len(b.problems))
    except KeyboardInterrupt:
        kept = int(np.isfinite(scores).sum())
        console.print(f"interrupted: {kept:,} scores kept in {partial}; run the same command again to resume",
                      highlight=False)
        raise


def run_eval(
    root: str | Path,
    weights: str | Path,
    split: str = "eval",
    layout: str = "auto",
    phase: str = "eval",
    out: Path | None = None,
    budget: str = "auto",
    device: str = "auto",
    precision: str = "auto",
    batch: int = 0,
    workers: int = -1,
    asv_scores: Path | None = None,
    console: Console | None = None,
    *,
    model: str = "auto",
    samples: int = 0,
    score_layout: str = "2019",
    calibration: Calibration | None = None,
) -> EvalResult:
    """Score every utterance of ``split`` and write ``UTT ATTACK KEY SCORE`` lines to ``out`` (default
    ``scores-<layout>-<split>.txt`` here); EER / min t-DCF when the split has keys for both classes.

    ``batch`` > 0 forces the batch; 0 takes the largest (up to 64) whose predicted peak fits ``budget``.
    ``samples`` is the input length, by default the model's reference input (AASIST: the first 64,600 samples,
    short clips tiled); other values are for tests and experiments. ``model`` is auto or a family name. ``score_layout``
    "asvspoof5" writes the ASVspoof 5 submission layout instead; ``calibration`` turns the written scores (and the
    metrics) into LLRs, while the resumable partial keeps the model's own. Unreadable audio is reported once per file
    (``skipped PATH: reason``) and left out of the file. Resumes from ``<out>.partial``; raises EvalResumeError
    when that partial was made with other weights, data or settings.
    """
    t0 = time.perf_counter()
    console = console or Console(quiet=True)
    dev = resolve_device(device)
    if dev.type == "cuda":
        enable_expandable_segments()  # before the first CUDA allocation, which device_facts makes
    prec = resolve_precision(precision, dev)
    weights = Path(weights)
    net, family = load(weights, model, map_location="cpu")
    net = net.to(dev)
    samples = samples or family.input.eval_samples
    if samples < family.input.min_samples:
        raise ValueError(f"samples must be at least {family.input.min_samples:,} for {family.name}, got {samples:,}")
    asv_path = Path(asv_scores) if asv_scores is not None else None
    if asv_path is not None:
        read_asv_scores(asv_path)  # a bad file fails now, not after hours of scoring

    # Before indexing, which can take minutes on a large corpus: a budget that cannot work fails at once.
    plan = plan_inference(family.name, dev, budget, batch, samples, prec)
    for warning in plan.warnings:
        _warn(console, warning)
    console.print(plan.line, highlight=False)

    indexed = load_split(root, split, layout, phase, console)
    sp = indexed.split
    if note := resampling_note([sp]):
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    out = Path(out) if out is not None else Path(f"scores-{sp.layout}-{split}.txt")
    partial, sidecar = _partial_paths(out)
    scores, resumed = _resume(partial, sidecar, _identity(weights, sp, split, phase, samples, prec), sp)
    console.print(
        f"scoring {len(sp):,} utterances of {sp.layout} {split} with {weights.name} ({family.name}, {dev}, "
        f"{prec}, first {samples:,} samples) into {out}",
        highlight=False,
    )
    if resumed:
        console.print(f"resuming: {resumed:,} of {len(sp):,} already scored in {partial}", highlight=False)

    problems = _Problems(console)
    _score_remaining(indexed, scores, net, _Scoring(dev, prec, samples, plan.batch, workers), partial, problems,
                     f"scoring {split}", console)
    if calibration is not None:
        scores = calibration.llr(scores)
    scored = write_score_file(out, sp, scores, score_layout)
    problems_path = problems.write(out.with_name(out.name + ".problems.jsonl"), sp)
    partial.unlink(missing_ok=True)
    sidecar.unlink(missing_ok=True)

    metrics = _metrics(sp, as_written(scores), asv_path, console)
    seconds = time.perf_counter() - t0
    skipped = len(sp) - scored
    tail = f", {skipped:,} skipped (listed in {problems_path})" if skipped else ""
    console.print(f"wrote {out}: {scored:,} scores{tail} in {seconds:.1f} s", highlight=False)
    return EvalResult(out, scored, skipped, resumed, plan.batch, metrics, seconds)
