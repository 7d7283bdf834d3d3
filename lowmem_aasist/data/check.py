"""``check-data``: what a corpus holds and what is wrong with it, before a long run finds out.

The default check is the index (every listed file exists, is non-empty and has a readable header); ``deep``
also decodes every readable file in full, which finds truncated data and non-finite samples that a header
cannot show.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from rich.console import Console

from ..audio import AudioError, read_audio
from ..progress import progress_bar
from .corpora import ProtocolNotFound, resolve_layout
from .index import sample_rates
from .load import load_split
from .split import SPOOF, UNLABELED, Split


def _decode_problem(path: str) -> str | None:
    try:
        read_audio(path)
    except AudioError as exc:
        return exc.reason
    return None


def deep_problems(split: Split, workers: int, progress: Callable[[int], None] | None = None) -> list[tuple[int, str]]:
    """(index, reason) of every indexed-readable file that fails a full decode. libsndfile decodes outside the
    GIL, so threads use every core without copying the split into worker processes."""
    readable = np.flatnonzero(split.frames > 0).tolist()
    found = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for i, reason in zip(readable, pool.map(_decode_problem, (split.path[i] for i in readable)), strict=True):
            if reason is not None:
                found.append((i, reason))
            if progress:
                progress(1)
    return found


def _summary(split: Split, bad: set[int]) -> dict:
    good = np.ones(len(split), dtype=bool)
    good[list(bad)] = False
    frames = split.frames[good & (split.frames > 0)]
    counts = split.counts()
    if (split.label == UNLABELED).any():
        counts["unlabeled"] = int((split.label == UNLABELED).sum())
    return {
        "files": len(split),
        **counts,
        "attacks": split.attack.counts(split.label == SPOOF),
        "hours": round(float(frames.sum(dtype=np.int64)) / 16_000 / 3600, 4),
        "sample_rates": {str(rate): n for rate, n in sample_rates(split).items()},
        "problems": len(bad),
    }


def check_data(
    root: str | Path, layout: str = "auto", phase: str = "eval", deep: bool = False, workers: int = 2,
    console: Console | None = None,
) -> dict:
    """What the corpus at ``root`` holds and what is wrong with it, as one JSON-ready dict::

        {"layout", "root", "deep",
         "splits": {name: summary},          # the splits whose protocol is present, in the layout's order
         "absent": {name: protocol path},    # the splits whose protocol file is missing ({} when none is)
         "problems": [{"path", "split", "error"}]}

    A split whose protocol file is missing is not an error: partial copies are common (ASVspoof 5 was released
    in stages), so it is listed under ``absent`` and the other splits are checked as usual. Raises LayoutError
    for a folder that is not a known corpus, ProtocolError for a protocol that is present but unreadable or
    malformed, and ProtocolNotFound when no split's protocol is present (there is nothing to check).
    """
    console = console or Console(quiet=True)
    found = resolve_layout(root, layout)
    report: dict = {"layout": found.name, "root": str(root), "deep": deep, "splits": {}, "absent": {}, "problems": []}
    missing: list[ProtocolNotFound] = []
    for name in found.splits:
        try:
            ix = load_split(root, name, found.name, phase, console)
        except ProtocolNotFound as exc:
            missing.append(exc)
            report["absent"][name] = str(exc.path)
            continue
        split = ix.split
        problems = [(p.index, p.reason) for p in ix.problems]
        if deep:
            with progress_bar(console, f"decoding {name}", int((split.frames > 0).sum())) as bar:
                problems += deep_problems(split, workers, bar.advance)
        report["splits"][name] = _summary(split, {i for i, _ in problems})
        report["problems"] += [{"path": split.path[i], "split": name, "error": reason} for i, reason in sorted(problems)]
    if not report["splits"]:
        if len(missing) == 1:  # a one-split layout: its own message says it all
            raise missing[0]
        looked = ", ".join(f"{name} {path}" for name, path in report["absent"].items())
        raise ProtocolNotFound(
            f"{root}: no protocol of {found.describe()} (layout {found.name}) found ({looked}); {missing[0].hint}",
            missing[0].path, missing[0].hint,
        )
    return report


def absent_line(report: dict) -> str | None:
    """One line for ``check_data``'s absent splits (None when every split was there): the missing protocol
    files and which splits were checked instead."""
    absent = report["absent"]
    if not absent:
        return None
    many = len(absent) > 1
    return (f"{', '.join(absent)} split{'s' if many else ''} absent: protocol{'s' if many else ''} "
            f"{', '.join(absent.values())} not found; checked {', '.join(report['splits'])} only")
