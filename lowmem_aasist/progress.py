"""Progress for long operations: a rich bar on a terminal, nothing at all when output is piped or logged."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class _Bar:
    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: int = 1, status: str | None = None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=n, **({"status": status} if status is not None else {}))


@contextmanager
def progress_bar(console: Console, description: str, total: int | None) -> Iterator[_Bar]:
    """Yield an object with ``advance(n, status=...)``; a no-op where ``console`` is not a terminal."""
    if not console.is_terminal:
        yield _Bar(None, None)
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        yield _Bar(progress, progress.add_task(description, total=total, status=""))
