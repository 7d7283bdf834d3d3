"""One split of a corpus as flat arrays: what every reader produces and every dataset consumes.

DataLoader workers are forked from the main process; any Python object they touch gets its reference count
written, so its memory page is copied into the worker. A split held as lists of strings or dicts is therefore
copied into every worker, and resident memory grows with corpus size x workers. Here each column is one NumPy
buffer (strings packed as UTF-8 bytes with offsets, repeated tags as small integer codes), which workers share.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

CROP_FROM = ("random", "start")
"""Where a training crop starts (``train.crop_from``): a uniform random window, or the recording's first samples."""

BONAFIDE, SPOOF, UNLABELED = 1, 0, -1
"""Labels as the published weights use them; ``UNLABELED`` for evaluation sets without keys."""


class PackedStrings(Sequence[str]):
    """Strings as one UTF-8 byte buffer and int64 offsets (tens of bytes per entry, no Python objects)."""

    __slots__ = ("data", "offsets")

    def __init__(self, data: np.ndarray, offsets: np.ndarray) -> None:
        self.data, self.offsets = data, offsets

    @classmethod
    def from_strings(cls, strings: Iterable[str]) -> PackedStrings:
        encoded = [s.encode("utf-8") for s in strings]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):  # int -> str; a slice or index array -> PackedStrings
        if isinstance(index, (int, np.integer)):
            n = len(self)
            i = int(index) + n if index < 0 else int(index)
            if not 0 <= i < n:
                raise IndexError(index)
            return self.data[self.offsets[i] : self.offsets[i + 1]].tobytes().decode("utf-8")
        picked = np.arange(len(self))[index]
        return PackedStrings.from_strings(self[int(i)] for i in picked)

    def __iter__(self) -> Iterator[str]:
        raw = self.data.tobytes()
        for a, b in zip(self.offsets[:-1].tolist(), self.offsets[1:].tolist(), strict=True):
            yield raw[a:b].decode("utf-8")

    def nbytes(self) -> int:
        return self.data.nbytes + self.offsets.nbytes


@dataclass(frozen=True)
class Categorical(Sequence[str]):
    """A column of few distinct values (attack, codec, phase): int16 codes into ``names``."""

    codes: np.ndarray
    names: tuple[str, ...]

    @classmethod
    def from_strings(cls, values: Iterable[str]) -> Categorical:
        names, codes = np.unique(np.asarray(list(values), dtype=object).astype(str), return_inverse=True)
        return cls(codes.astype(np.int16).reshape(-1), tuple(str(n) for n in names))

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return self.names[int(self.codes[index])]
        return Categorical(self.codes[index], self.names)

    def __iter__(self) -> Iterator[str]:
        for c in self.codes.tolist():
            yield self.names[c]

    def counts(self, mask: np.ndarray | None = None) -> dict[str, int]:
        codes = self.codes if mask is None else self.codes[mask]
        n = np.bincount(codes, minlength=len(self.names))
        return {name: int(k) for name, k in zip(self.names, n, strict=True) if k}


@dataclass(frozen=True)
class Split:
    """One split: per utterance its id, audio path, label (1 bona fide, 0 spoof, -1 unknown), attack or source
    tag (``-`` for bona fide) and any further protocol columns; ``frames`` and ``samplerate`` come from the audio
    index (file headers), -1 until it has been built or where a file is unreadable."""

    name: str
    layout: str
    utt: PackedStrings
    path: PackedStrings
    label: np.ndarray  # int8 [N]
    attack: Categorical
    meta: dict[str, Categorical] = field(default_factory=dict)
    frames: np.ndarray | None = None  # int32 [N], samples at 16 kHz
    samplerate: np.ndarray | None = None  # int32 [N], as stored

    def __len__(self) -> int:
        return len(self.label)

    @property
    def labeled(self) -> bool:
        return bool(len(self.label)) and bool((self.label != UNLABELED).all())

    def counts(self) -> dict[str, int]:
        return {"bonafide": int((self.label == BONAFIDE).sum()), "spoof": int((self.label == SPOOF).sum())}

    def subset(self, keep: np.ndarray) -> Split:
        """The utterances where ``keep`` (a boolean mask or index array) holds, in order."""
        idx = np.arange(len(self))[keep]
        return Split(
            name=self.name,
            layout=self.layout,
            utt=self.utt[idx],
            path=self.path[idx],
            label=self.label[idx],
            attack=self.attack[idx],
            meta={k: v[idx] for k, v in self.meta.items()},
            frames=None if self.frames is None else self.frames[idx],
            samplerate=None if self.samplerate is None else self.samplerate[idx],
        )


def make_split(
    name: str,
    layout: str,
    utts: Sequence[str],
    paths: Sequence[str],
    labels: Sequence[int],
    attacks: Sequence[str],
    meta: dict[str, Sequence[str]] | None = None,
) -> Split:
    """Build a split from parsed protocol columns (the readers' one way in)."""
    return Split(
        name=name,
        layout=layout,
        utt=PackedStrings.from_strings(utts),
        path=PackedStrings.from_strings(paths),
        label=np.asarray(labels, dtype=np.int8).reshape(-1),
        attack=Categorical.from_strings(attacks),
        meta={k: Categorical.from_strings(v) for k, v in (meta or {}).items()},
    )
