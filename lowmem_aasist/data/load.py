"""A split ready to stream: protocol read (any layout), audio indexed (lengths, rates, bad files), with progress.

What ``fit``, ``eval`` and ``check-data`` share before they touch a sample.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from ..progress import progress_bar
from .corpora import read_split
from .index import IndexResult, index_split, sample_rates
from .split import Split


def load_split(
    root: str | Path,
    split: str,
    layout: str = "auto",
    phase: str = "eval",
    console: Console | None = None,
    cache_dir: Path | None = None,
) -> IndexResult:
    """Read one split's protocol and index its audio; a first scan of a large corpus shows a progress bar (and
    one plain line when output is not a terminal), a cached one is silent."""
    parsed = read_split(root, split, layout, phase)
    console = console or Console(quiet=True)
    with progress_bar(console, f"indexing {split}", len(parsed)) as bar:
        result = index_split(parsed, cache_dir, progress=bar.advance)
    if result.scanned and not console.is_terminal:
        console.print(f"indexed {split}: {result.scanned:,} audio headers read in {result.seconds:.1f} s "
                      f"(cached for the next run)", highlight=False)
    return result


def resampling_note(splits: list[Split]) -> str | None:
    """One line for a whole corpus whose audio is not all at 16 kHz (resampled on the fly), else None."""
    rates: dict[int, int] = {}
    for s in splits:
        for rate, n in sample_rates(s).items():
            rates[rate] = rates.get(rate, 0) + n
    other = {r: n for r, n in sorted(rates.items()) if r != 16_000}
    if not other:
        return None
    listed = ", ".join(f"{n:,} at {r:,} Hz" for r, n in other.items())
    return f"audio not at 16 kHz ({listed}): resampled to 16 kHz on the fly with soxr"
