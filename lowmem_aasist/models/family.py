"""What the rest of the package may know about a model: one :class:`ModelFamily` entry per trainable model.

The trainer, the scorer, the evaluation, the planner and the memory estimator never name a model's layers or
constants. They look its family up (:mod:`lowmem_aasist.models`) and use what the entry says: how to build the
model, how to recognise its weights, its recipe profile, its input contract, the smallest micro-batch it trains
on, and which memory techniques apply to it. A new model is one new entry.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..memory.plan import ModelLimits

if TYPE_CHECKING:  # the policy type lives with the techniques; importing it here would load them eagerly
    from ..memory.techniques import Policy


class WeightsError(Exception):
    """A weights or checkpoint file that cannot be used; the message is one line naming the file."""


class MissingDependencyError(ImportError):
    """A family needs an optional package that is not installed; the message is one line saying what to install."""


@dataclass(frozen=True)
class InputSpec:
    """The waveform a family takes and how it is scored."""

    sample_rate: int
    eval_samples: int
    """The reference evaluation input: the first N samples of a recording, short ones tiled end to end."""
    min_samples: int
    """The shortest input a forward pass accepts."""
    full_hop: int
    """``score --full``: hop between ``eval_samples``-long windows over a whole recording."""
    bona_fide_class: int = 1
    """The logit reported as the score."""


@dataclass(frozen=True)
class Section:
    """A part of the forward pass that ``probe --explain`` charges saved activations to: it starts at the forward
    pre-hook (``at="start"``) or the forward hook (``at="end"``) of the module at ``path`` ("" is the model)."""

    label: str
    path: str
    at: str = "start"


@dataclass(frozen=True)
class ModelFamily:
    name: str
    summary: str
    build: Callable[[], nn.Module]
    """A fresh model on the CPU, in train mode (call under ``torch.device("meta")`` for shapes only)."""
    owns: Callable[[nn.Module], bool]
    """Whether a built model is this family's."""
    profile: str
    """The family's published recipe, a profile name in profiles/."""
    input: InputSpec
    limits: ModelLimits
    """What the planner and the trainer must respect when they split a batch (its ``policy_time`` is filled from
    the policies by the engine)."""
    policy_names: tuple[str, ...]
    """Activation-checkpointing policies that apply (``--checkpoint``), as data so that listing them is cheap."""
    auto_policies: tuple[str, ...]
    """The policies the planner weighs on its own (the others only when asked for by name)."""
    load_policies: Callable[[], Mapping[str, Policy]] = field(repr=False)
    """The policy objects, imported on first use: they carry autograd Functions the CLI need not load."""
    channels_last_module: str | None = None
    """The 2-D convolution trunk that ``channels_last`` converts, by qualified name."""
    never_trained: Callable[[str], bool] = lambda name: False
    """Parameters that receive no gradient by construction (frozen under DistributedDataParallel)."""
    sections: tuple[Section, ...] = ()
    convert_state: Callable[[Mapping[str, Tensor]], tuple[dict[str, Tensor], tuple[str, ...]] | None] | None = field(
        default=None, repr=False)
    """For a family whose weights also come in another layout (the published files' names, a ``module.`` prefix):
    ``state`` renamed to the model's own names, with one note per thing dropped on the way, or None when ``state``
    is plainly not this family's (decided cheaply: no build, no optional import). A state that is recognisably this
    family's but has a missing, unexpected or misshapen tensor raises WeightsError naming it. Without this, a state
    is this family's only when its names and shapes are exactly the model's."""

    def policies(self) -> Mapping[str, Policy]:
        return _policies(self)

    def policy(self, name: str) -> Policy:
        table = self.policies()
        if name not in table:
            raise ValueError(f"unknown checkpoint policy {name!r} for {self.name}; choose one of: {', '.join(table)}")
        return table[name]

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(_shapes(self))

    def matches(self, state: Mapping[str, Tensor]) -> bool:
        """Whether ``state`` has exactly this family's parameter and buffer names and shapes."""
        return self.expected_shapes() == {k: tuple(v.shape) for k, v in state.items()}

    def adopt(self, state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], tuple[str, ...]] | None:
        """``state`` in this model's own names, ready for a strict ``load_state_dict``, with notes on what was
        dropped; None when it is not this family's weights."""
        if self.convert_state is None:
            return (dict(state), ()) if self.matches(state) else None
        converted = self.convert_state(state)
        if converted is None or not self.matches(converted[0]):
            return None
        return converted


# Families are frozen and compared by identity of their callables, so caching on the entry itself is safe.
@functools.cache
def _policies(family: ModelFamily) -> Mapping[str, Policy]:
    table = family.load_policies()
    if tuple(table) != family.policy_names:  # the cheap list the CLI shows must be the table the engine applies
        raise RuntimeError(f"{family.name}: policy_names {family.policy_names} differ from its table {tuple(table)}")
    return table


@functools.cache
def _shapes(family: ModelFamily) -> tuple[tuple[str, tuple[int, ...]], ...]:
    with torch.device("meta"):
        model = family.build()
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())
