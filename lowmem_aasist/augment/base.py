"""What every augmentation shares: the interface, the spec language, and where the random numbers come from.

An augmentation is a small object called as ``aug(x, sr, rng) -> y``: ``x`` is a 1-D float32 waveform at ``sr`` Hz,
``y`` a float32 waveform of the same length, and every random draw comes from ``rng`` (a numpy Generator), so the
output is a pure function of the input and the generator's seed. Each kind registers a builder under its spec name
with :func:`augmentation`; :func:`parse_spec` turns a spec string into a :class:`Chain`.

Spec language (``fit --augment``, ``[data] augment`` in a profile)::

    rawboost:5                         one augmentation, a positional argument
    codec:p=0.5                        keyword arguments, ``p`` being the chance it is applied (default 1)
    noise:dir=~/musan,snr=5-20,p=0.6   a range is ``lo-hi``; parts are separated by commas
    rawboost:5+codec:p=0.5             augmentations applied in order, joined with ``+``
    none                               no augmentation (as is an empty spec)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

AUGMENT_STREAM = 0xA06
"""Mixed into the item's seed so augmentation draws never share a stream with the crop position's."""


class SpecError(ValueError):
    """A bad augmentation spec: the message names the part and what to do (one line)."""


class Augmentation(Protocol):
    def __call__(self, x: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray: ...


Builder = Callable[["Params"], Augmentation]
REGISTRY: dict[str, tuple[Builder, str]] = {}
"""Spec name -> (builder, one-line help)."""


def augmentation(name: str, help: str) -> Callable[[Builder], Builder]:
    """Register ``builder`` under ``name`` in the spec language."""

    def register(builder: Builder) -> Builder:
        REGISTRY[name] = (builder, help)
        return builder

    return register


class Params:
    """The arguments of one spec part, read with validation; :meth:`done` rejects keys nobody read."""

    def __init__(self, part: str, name: str, positional: str | None, keywords: dict[str, str]) -> None:
        self.part, self.name, self.positional, self.keywords = part, name, positional, keywords
        self.read: set[str] = set()
        self.positional_used = False

    def fail(self, why: str) -> SpecError:
        return SpecError(f"--augment part {self.part!r}: {why}")

    def _raw(self, key: str, positional: bool) -> str | None:
        self.read.add(key)
        if positional and self.positional is not None:
            if key in self.keywords:
                raise self.fail(f"{key} given twice")
            self.positional_used = True
            return self.positional
        return self.keywords.get(key)

    def number(self, key: str, default: float, lo: float, hi: float, positional: bool = False) -> float:
        raw = self._raw(key, positional)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise self.fail(f"{key}={raw!r} is not a number") from None
        if not (math.isfinite(value) and lo <= value <= hi):
            raise self.fail(f"{key}={raw} must lie in [{lo:g}, {hi:g}]")
        return value

    def integer(self, key: str, default: int, lo: int, hi: int, positional: bool = False) -> int:
        raw = self._raw(key, positional)
        if raw is None:
            return default
        if not raw.strip().lstrip("-").isdigit():
            raise self.fail(f"{key}={raw!r} is not a whole number")
        value = int(raw)
        if not lo <= value <= hi:
            raise self.fail(f"{key}={raw} must lie in [{lo}, {hi}]")
        return value

    def range(self, key: str, default: tuple[float, float], lo: float, hi: float) -> tuple[float, float]:
        """``a-b`` (or one value ``a``, meaning ``a-a``); negative ends are written ``-5--1``."""
        raw = self._raw(key, False)
        if raw is None:
            return default
        text = raw.strip()
        cut = text.find("-", 1)  # a leading minus belongs to the first number
        ends = (text, text) if cut < 0 else (text[:cut], text[cut + 1:])
        try:
            a, b = float(ends[0]), float(ends[1])
        except ValueError:
            raise self.fail(f"{key}={raw!r} is not a range like 5-20") from None
        if not (math.isfinite(a) and math.isfinite(b) and lo <= a <= b <= hi):
            raise self.fail(f"{key}={raw} must be lo-hi with {lo:g} <= lo <= hi <= {hi:g}")
        return a, b

    def choices(self, key: str, default: tuple[str, ...], allowed: tuple[str, ...]) -> tuple[str, ...]:
        """A ``/``-separated subset of ``allowed`` (commas separate a part's arguments)."""
        raw = self._raw(key, False)
        if raw is None:
            return default
        picked = tuple(c.strip().lower() for c in raw.split("/") if c.strip())
        unknown = [c for c in picked if c not in allowed]
        if not picked or unknown:
            raise self.fail(f"{key}={raw!r}: choose from {'/'.join(allowed)}")
        return picked

    def folder(self, key: str) -> Path:
        raw = self._raw(key, False)
        if raw is None:
            raise self.fail(f"needs {key}=FOLDER")
        path = Path(raw).expanduser()
        if not path.is_dir():
            raise self.fail(f"{key}={raw}: no such folder")
        return path

    def done(self) -> None:
        if self.positional is not None and not self.positional_used:
            raise self.fail(f"takes no positional argument (got {self.positional!r})")
        unknown = sorted(set(self.keywords) - self.read)
        if unknown:
            raise self.fail(f"unknown argument {unknown[0]!r}; accepted: {', '.join(sorted(self.read)) or 'none'}")


@dataclass(frozen=True)
class Step:
    name: str
    augment: Augmentation
    p: float = 1.0


@dataclass(frozen=True)
class Chain:
    """Augmentations applied in order, each with its own chance. Every step draws its coin and its own child
    generator whether or not it applies, so one step's draws never shift another's."""

    steps: tuple[Step, ...] = ()
    spec: str = ""

    def __bool__(self) -> bool:
        return bool(self.steps)

    def __call__(self, x: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
        for step in self.steps:
            coin = rng.random()
            child = np.random.default_rng(rng.integers(2**63))
            if coin < step.p:
                y = step.augment(x, sr, child)
                if y.shape != x.shape or not np.all(np.isfinite(y)):  # a bug, never train on it silently
                    raise RuntimeError(f"augmentation {step.name} returned {y.shape} (non-finite or resized) for "
                                       f"{x.shape}")
                x = y.astype(np.float32, copy=False)
        return x


NO_AUGMENTATION = Chain()


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation generator of one training item: the same in any worker, after any resume."""
    return np.random.default_rng([seed, epoch, index, AUGMENT_STREAM])


def _split_part(part: str) -> tuple[str, str | None, dict[str, str]]:
    name, _, args = part.partition(":")
    positional, keywords = None, {}
    for i, arg in enumerate(a.strip() for a in args.split(",") if a.strip()):
        key, eq, value = arg.partition("=")
        if not eq:
            if i or positional is not None:
                raise SpecError(f"--augment part {part!r}: {arg!r} needs a name (key=value)")
            positional = arg
            continue
        key = key.strip().lower()
        if key in keywords:
            raise SpecError(f"--augment part {part!r}: {key} given twice")
        keywords[key] = value.strip()
    return name.strip().lower(), positional, keywords


@functools.lru_cache(maxsize=8)
def parse_spec(spec: str) -> Chain:
    """A spec string (see the module's docstring) as a :class:`Chain`; raises SpecError naming the bad part.
    Cached: validating a config and building its run index a noise folder once."""
    from . import codecs, folders, rawboost, warp  # noqa: F401  (each registers its augmentations)

    text = (spec or "").strip()
    if text.lower() in ("", "none", "off"):
        return Chain()
    steps = []
    for part in (p.strip() for p in text.split("+")):
        if not part:
            raise SpecError(f"--augment {spec!r}: an empty part (two '+' in a row, or one at an end)")
        steps.append(build_step(part))
    return Chain(tuple(steps), text)


def build_step(part: str) -> Step:
    """One part of a spec (``name:arguments``) as a chain step; the registering modules must be imported."""
    name, positional, keywords = _split_part(part)
    if name not in REGISTRY:
        raise SpecError(f"--augment part {part!r}: unknown augmentation {name!r}; choose from "
                        f"{', '.join(sorted(REGISTRY))}")
    params = Params(part, name, positional, keywords)
    p = params.number("p", 1.0, 0.0, 1.0)
    built = REGISTRY[name][0](params)
    params.done()
    return Step(name, built, p)
