"""The ASVspoof 2019 LA layout (also the demo corpus's): protocol files and where each split's audio lives.

ROOT/ASVspoof2019_LA_cm_protocols/ASVspoof2019.LA.cm.{train.trn,dev.trl,eval.trl}.txt, lines
``SPEAKER UTT - ATTACK KEY`` (ATTACK ``-`` for bona fide, KEY ``bonafide``/``spoof``), and audio at
ROOT/ASVspoof2019_LA_{split}/flac/UTT.flac. Labels: bona fide = 1, spoof = 0, as the published weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROTOCOL_DIR = "ASVspoof2019_LA_cm_protocols"
PROTOCOL_FILES = {
    "train": "ASVspoof2019.LA.cm.train.trn.txt",
    "dev": "ASVspoof2019.LA.cm.dev.trl.txt",
    "eval": "ASVspoof2019.LA.cm.eval.trl.txt",
}
KEYS = {"bonafide": 1, "spoof": 0}


class ProtocolError(Exception):
    """A missing or malformed protocol; one line naming the file (and line)."""


@dataclass(frozen=True)
class Split:
    """One split as flat arrays (no per-utterance Python objects, so DataLoader workers share them cheaply)."""

    name: str
    utt: np.ndarray  # str, [N]
    path: np.ndarray  # str, [N]
    label: np.ndarray  # int8, [N]: 1 bona fide, 0 spoof
    attack: np.ndarray  # str, [N]: "-" for bona fide

    def __len__(self) -> int:
        return len(self.utt)

    def counts(self) -> dict[str, int]:
        return {"bonafide": int((self.label == 1).sum()), "spoof": int((self.label == 0).sum())}


def protocol_path(root: Path, split: str) -> Path:
    return Path(root) / PROTOCOL_DIR / PROTOCOL_FILES[split]


def is_la2019(root: Path) -> bool:
    return (Path(root) / PROTOCOL_DIR).is_dir()


def read_split(root: str | Path, split: str) -> Split:
    """Parse one split's protocol; raise ProtocolError naming the file and line for anything malformed."""
    root = Path(root)
    if split not in PROTOCOL_FILES:
        raise ProtocolError(f"unknown split {split!r}; choose one of {', '.join(PROTOCOL_FILES)}")
    proto = protocol_path(root, split)
    if not proto.is_file():
        raise ProtocolError(
            f"{proto}: protocol not found; --data must be the folder holding {PROTOCOL_DIR}/ (ASVspoof 2019 LA layout)"
        )
    audio_dir = root / f"ASVspoof2019_LA_{split}" / "flac"
    utts, attacks, labels = [], [], []
    try:
        text = proto.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"{proto}: cannot read protocol ({exc})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 5 or fields[4] not in KEYS:
            raise ProtocolError(
                f"{proto}:{number}: expected 'SPEAKER UTT - ATTACK bonafide|spoof', got {line.strip()[:80]!r}"
            )
        utts.append(fields[1])
        attacks.append(fields[3])
        labels.append(KEYS[fields[4]])
    if not utts:
        raise ProtocolError(f"{proto}: protocol is empty")
    utt = np.array(utts)
    return Split(
        name=split,
        utt=utt,
        path=np.char.add(np.char.add(str(audio_dir) + "/", utt), ".flac"),
        label=np.array(labels, dtype=np.int8),
        attack=np.array(attacks),
    )
