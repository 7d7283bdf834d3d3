"""Training: :func:`fit` = :func:`.setup.setup`, then :func:`.loop.train`, then the result.

``setup`` turns the config into a :class:`.state.TrainState`; the loop's pieces (``train_step``, ``end_of_epoch``,
``save`` / ``restore``) are plain functions over it; features and loggers enter as objects (:mod:`.features`).
"""

from .features import Feature, JsonlLogger, Logger, NullLogger
from .loop import FitResult, end_of_epoch, fit, smaller_micro_batch, train, train_step
from .setup import RunFolderError, cosine_lr, seed_everything, setup
from .state import TrainState, restore, save

__all__ = [
    "Feature",
    "FitResult",
    "JsonlLogger",
    "Logger",
    "NullLogger",
    "RunFolderError",
    "TrainState",
    "cosine_lr",
    "end_of_epoch",
    "fit",
    "restore",
    "save",
    "seed_everything",
    "setup",
    "smaller_micro_batch",
    "train",
    "train_step",
]
