"""Ctrl-C and SIGTERM as requests: the trainer finishes (or abandons) the current step, saves, and exits.

A second Ctrl-C raises KeyboardInterrupt at once, for a user who does not want to wait for the save.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(Exception):
    """Training stopped on a signal after saving; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class StopRequests:
    """Within ``with``: SIGINT/SIGTERM set ``signum`` instead of killing the process (main thread only; elsewhere
    signals cannot be caught and this is a no-op)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 130)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the save
        self.signum = signum

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in EXIT_CODES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def ignore_sigint_in_worker(_worker_id: int) -> None:
    """DataLoader worker init: a terminal's Ctrl-C reaches the whole process group; workers leave it to the main
    process, which stops at a step boundary (a worker that died of it would fail the next fetch instead)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
