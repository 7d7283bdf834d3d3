"""What rides along the training loop without being written into it: features and loggers, each one object.

A :class:`Feature` (an averaged copy of the weights, an early-stop rule, a teacher for distillation) is passed to
:func:`~.loop.fit` at setup and sees the run at three points: after each optimizer step, after each dev evaluation,
and when the loop asks whether to stop. Its state goes into every checkpoint under its ``name`` and comes back on
``--resume``, so a feature resumes exactly like the rest of the run. A :class:`Logger` receives every record the
run writes to ``metrics.jsonl``. Neither adds a branch to the loop: with no features and the default logger the
loop is what it would be without this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..storage import append_jsonl

if TYPE_CHECKING:
    from .state import TrainState


class Feature:
    """Base class: every hook is a no-op, so a feature overrides only what it uses."""

    name = "feature"
    """Key of its state in checkpoints: unique among the run's features."""

    def after_step(self, state: TrainState) -> None:
        """After each optimizer step (``state.position.step`` already counts it)."""

    def after_eval(self, state: TrainState, dev_eer: float) -> None:
        """After each dev evaluation, before the checkpoints of that evaluation are written."""

    def should_stop(self, state: TrainState) -> bool:
        """Asked after each dev evaluation; True ends the run there (every rank asks, and all must agree)."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain types only: checkpoints load with ``weights_only=True``."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, on ``--resume``."""


class Logger(Protocol):
    def log(self, record: dict[str, Any]) -> None:
        """One record: a step (``step``, ``loss``, ``lr`` ...), an evaluation (``dev_eer``) or an ``event``."""


class JsonlLogger:
    """``metrics.jsonl``: one JSON object per line, appended and flushed as it happens."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def log(self, record: dict[str, Any]) -> None:
        append_jsonl(self.path, record)


class NullLogger:
    """For the ranks that do not write (under torchrun only rank 0 logs)."""

    def log(self, record: dict[str, Any]) -> None:
        pass
