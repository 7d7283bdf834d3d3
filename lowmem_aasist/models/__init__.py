"""The model registry: every trainable model is one :class:`~.family.ModelFamily` entry in :data:`FAMILIES`.

``fit``, ``score``, ``eval``, ``probe`` and the memory engine find models here by name, or recognise them from a
weights file, and learn everything else from the entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .aasist import FAMILIES as _AASIST_FAMILIES
from .family import InputSpec, MissingDependencyError, ModelFamily, Section, WeightsError
from .ssl_aasist import FAMILIES as _SSL_FAMILIES

__all__ = [
    "FAMILIES",
    "InputSpec",
    "Loaded",
    "MissingDependencyError",
    "ModelFamily",
    "Section",
    "WeightsError",
    "build_model",
    "count_parameters",
    "detect_family",
    "family_of",
    "get_family",
    "load",
    "load_model",
    "load_ssl_front_end",
]

FAMILIES: dict[str, ModelFamily] = {**_AASIST_FAMILIES, **_SSL_FAMILIES}
"""Every model ``--model`` accepts, by name. The XLSR-AASIST families need the ``ssl`` extra (transformers) only
when a model is built."""


def _known() -> str:
    names = list(FAMILIES)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def get_family(name: str) -> ModelFamily:
    """The family called ``name``; ValueError listing the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(FAMILIES)}") from None


def family_of(model: nn.Module) -> ModelFamily:
    """The family a built model belongs to (unwrapping DistributedDataParallel)."""
    model = getattr(model, "module", model)
    for family in FAMILIES.values():
        if family.owns(model):
            return family
    raise ValueError(f"{type(model).__name__} is not a model of any registered family ({_known()})")


def build_model(name: str) -> nn.Module:
    """A fresh model of family ``name`` on the CPU, in train mode."""
    return get_family(name).build()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def detect_family(state: dict[str, Tensor]) -> ModelFamily | None:
    """The family whose parameter names and shapes match ``state`` exactly (in the model's own names, or in another
    layout the family converts, such as the published XLSR-AASIST files'), else None. WeightsError when ``state`` is
    recognisably a family's published layout but a tensor is missing, unexpected or misshapen."""
    return next((f for f in FAMILIES.values() if f.adopt(state) is not None), None)


def load_ssl_front_end(model: nn.Module, source: str | Path, trusted: bool = False) -> list[str]:
    """Initialise an XLSR-AASIST model's wav2vec 2.0 front end from a fairseq checkpoint, a Hugging Face folder or hub
    id (``fit --ssl-weights``); see :func:`.ssl_weights.load_ssl_front_end`. Returns notes, one line each."""
    from .ssl_weights import load_ssl_front_end as _load

    return _load(model, source, trusted=trusted)


class Loaded(NamedTuple):
    model: nn.Module
    family: ModelFamily


def _state_dict_of(obj: object) -> dict[str, Tensor] | None:
    # Accept a bare state dict (the published files) or one of our checkpoints ({"model": state_dict, ...}).
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        return obj
    return None


def load(path: str | Path, name: str = "auto", map_location: str | torch.device = "cpu",
         notes: list[str] | None = None) -> Loaded:
    """Build the model of ``path``'s weights (a published state dict or a run checkpoint) and load them strictly,
    in eval mode. ``name`` forces a family; ``auto`` recognises it by tensor names and shapes. Raises
    WeightsError (one line naming the file). ``notes``, when given, receives one line per thing dropped on the way
    (the pre-training-only tensors of the published XLSR-AASIST files)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # any unpickling/zip error means "not a weights file" to the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"{path}: not a PyTorch weights file ({reason[:120]})") from None
    state = _state_dict_of(obj)
    if state is None:
        raise WeightsError(f"{path}: not an {_known()} state dict (expected a dict of tensors)")
    try:
        adopted = {f.name: a for f in FAMILIES.values() if (a := f.adopt(state)) is not None}
    except WeightsError as exc:
        raise WeightsError(f"{path}: {exc}") from None
    detected = FAMILIES[next(iter(adopted))] if adopted else None
    if name == "auto":
        if detected is None:
            raise WeightsError(f"{path}: not an {_known()} state dict (keys or tensor shapes differ)")
        chosen = detected
    else:
        if name not in FAMILIES:
            raise WeightsError(f"unknown model {name!r}; choose one of: auto, {', '.join(FAMILIES)}")
        chosen = FAMILIES[name]
        if detected is not chosen:
            found = detected.name if detected else "none of the known models"
            raise WeightsError(f"{path}: weights are {found}, but --model {name} was asked; use --model auto")
    own, dropped = adopted[chosen.name]
    model = chosen.build()
    model.load_state_dict(own, strict=True)
    if notes is not None:
        notes.extend(dropped)
    return Loaded(model.eval(), chosen)


def load_model(path: str | Path, arch: str = "auto", map_location: str | torch.device = "cpu") -> nn.Module:
    """:func:`load`'s model alone."""
    return load(path, arch, map_location).model
