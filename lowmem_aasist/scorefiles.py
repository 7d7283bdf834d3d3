"""Score and key files of the three challenge generations, read into one :class:`~.metrics.CmScores`.

- ASVspoof 2019: `UTT ATTACK bonafide|spoof SCORE`, the keys inside the score file (``metrics.read_cm_scores``).
- ASVspoof 5: tab-separated with the header `filename  cm-score`; keys from the public protocol
  (`ASVspoof5.*.tsv`: space-separated, no header, ten columns) or a `filename  cm-label` file with a header (the
  evaluation package's; `attack_anon` and `codec` columns are read when present).
- ASVspoof 2021: `TRIAL SCORE` per line, keys from `trial_metadata.txt` (LA: eight columns, DF: thirteen).

The layout is recognised from the file itself. Keys carry per-trial conditions (attack, codec, ...) that
``evaluate --by`` breaks results down by. Every trial of the keys must be scored exactly once, and nothing else:
an error names the file and line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .metrics import CmScores, ScoreFileError, _numbered_lines, _parse_score, _shorten, read_cm_scores

PathLike = str | os.PathLike[str]

# 2021 codec / compression -> the challenge's condition names (evaluation plan, trial_metadata.txt).
LA21_CONDITIONS = {"none": "C1", "alaw": "C2", "pstn": "C3", "g722": "C4", "ulaw": "C5", "gsm": "C6", "opus": "C7"}
DF21_CONDITIONS = {"nocodec": "C1", "low_mp3": "C2", "high_mp3": "C3", "low_m4a": "C4", "high_m4a": "C5",
                   "low_ogg": "C6", "high_ogg": "C7", "mp3m4a": "C8", "oggm4a": "C9"}

SCORE_LAYOUTS = ("2019", "asvspoof5")
"""What ``eval --format`` writes: the 2019 reference's ``utt attack key score`` lines, or ASVspoof 5's submission
layout (a header, then ``utt<tab>score``), whose keys come from the protocol."""
ASVSPOOF5_HEADER = "filename\tcm-score"

# The evaluation package's anonymised column names, read as their plain ones.
_RENAMED = {"trial_anon": "filename", "tar_spk_anon": "spk", "attack_anon": "attack"}


@dataclass(frozen=True)
class Keys:
    """Labels of a key file: trial -> (key, line), the attack per trial, and condition columns by name."""

    path: str
    lines: dict[str, int]
    key: dict[str, int]
    columns: dict[str, dict[str, str]]
    """Column name -> trial -> value; always "attack", then what the layout has (codec, transmission, ...)."""


def _label(value: str) -> int | None:
    return {"bonafide": 1, "spoof": 0}.get(value)


def _keys_with_header(path: PathLike, lines: list[tuple[int, str]]) -> Keys:
    names = _header(path, lines, ("filename", "cm-label"))
    wanted = {n: names.index(n) for n in ("attack", "codec") if n in names}
    rows = [(n, line.split()) for n, line in lines[1:]]
    return _collect(path, rows, len(names), names.index("filename"), names.index("cm-label"), wanted)


def _collect(path: PathLike, rows: list[tuple[int, list[str]]], width: int, f: int, k: int,
             wanted: dict[str, int], rename: dict[str, dict[str, str]] | None = None) -> Keys:
    line_of: dict[str, int] = {}
    key: dict[str, int] = {}
    columns: dict[str, dict[str, str]] = {"attack": {}, **{name: {} for name in wanted}}
    for lineno, fields in rows:
        label = _label(fields[k]) if len(fields) == width else None
        if label is None:
            raise ScoreFileError(f"{path}:{lineno}: expected {width} fields with bonafide|spoof in field {k + 1}, "
                                 f"got '{_shorten(' '.join(fields))}'")
        trial = fields[f]
        if trial in line_of:
            raise ScoreFileError(f"{path}:{lineno}: trial '{_shorten(trial)}' already listed on line {line_of[trial]}")
        line_of[trial], key[trial] = lineno, label
        columns["attack"][trial] = "-" if label == 1 else "unknown"
        for name, i in wanted.items():
            value = fields[i]
            columns[name][trial] = (rename or {}).get(name, {}).get(value, value)
    return Keys(str(path), line_of, key, columns)


def read_keys(path: PathLike) -> Keys:
    """Keys from an ASVspoof 5 protocol or key file, or a 2021 LA / DF `trial_metadata.txt`."""
    lines = _numbered_lines(path)
    first = lines[0][1].split()
    if "cm-label" in first:
        return _keys_with_header(path, lines)
    rows = [(n, line.split()) for n, line in lines]
    width = len(first)
    if width == 10:  # ASVspoof 5: speaker, file, gender, codec, codec_q, codec_seed, attack_tag, attack, key, tmp
        return _collect(path, rows, 10, 1, 8, {"attack": 7, "codec": 3, "condition": 3})
    if width == 8:  # 2021 LA: speaker, trial, codec, transmission, attack, label, trim, subset
        return _collect(path, rows, 8, 1, 5, {"attack": 4, "codec": 2, "transmission": 3, "condition": 2},
                        {"condition": LA21_CONDITIONS})
    if width == 13:  # 2021 DF: speaker, trial, compression, source, attack, label, trim, subset, vocoder, ...
        return _collect(path, rows, 13, 1, 5, {"attack": 4, "codec": 2, "source": 3, "vocoder": 8, "condition": 2},
                        {"condition": DF21_CONDITIONS})
    raise ScoreFileError(f"{path}:{lines[0][0]}: not a key file this tool reads (an ASVspoof 5 protocol or "
                         "'filename cm-label' file, or a 2021 trial_metadata.txt); got {width} fields")


def _scored(path: PathLike, lines: list[tuple[int, str]], column: int, width: int, layout: str) -> dict[str, tuple[float, int]]:
    scores: dict[str, tuple[float, int]] = {}
    for lineno, line in lines:
        fields = line.split()
        score = _parse_score(fields[column]) if len(fields) == width else None
        if score is None:
            raise ScoreFileError(f"{path}:{lineno}: expected '{layout}' with a finite score, got '{_shorten(line)}'")
        trial = fields[0]
        if trial in scores:
            raise ScoreFileError(f"{path}:{lineno}: trial '{_shorten(trial)}' already scored on line {scores[trial][1]}")
        scores[trial] = (score, lineno)
    return scores


def _matched(path: PathLike, scores: dict[str, tuple[float, int]], keys: Keys) -> CmScores:
    extra = next((t for t in scores if t not in keys.key), None)
    if extra is not None:
        raise ScoreFileError(f"{path}:{scores[extra][1]}: trial '{_shorten(extra)}' is not in the keys {keys.path}")
    missing = next((t for t in keys.key if t not in scores), None)
    if missing is not None:
        n = sum(t not in scores for t in keys.key)
        raise ScoreFileError(f"{keys.path}:{keys.lines[missing]}: trial '{_shorten(missing)}' has no score in {path} "
                             f"({n:,} keyed trials unscored)")
    trials = list(keys.key)
    conditions = {name: [col[t] for t in trials] for name, col in keys.columns.items() if name != "attack"}
    return CmScores(trials, [keys.columns["attack"][t] for t in trials],
                    np.array([keys.key[t] for t in trials], dtype=np.int8),
                    np.array([scores[t][0] for t in trials], dtype=np.float64), conditions)


def read_scores(path: PathLike, keys: PathLike | None = None) -> CmScores:
    """A CM score file in any layout above, joined with ``keys`` where the layout holds no labels."""
    lines = _numbered_lines(path)
    first = lines[0][1].split()
    if first == ASVSPOOF5_HEADER.split("\t"):
        scores = _scored(path, lines[1:], 1, 2, "FILENAME<tab>SCORE")
        layout = "an ASVspoof 5 score file"
    elif len(first) == 2:
        scores = _scored(path, lines, 1, 2, "TRIAL SCORE")
        layout = "a 'TRIAL SCORE' file"
    else:
        if keys is not None:
            raise ScoreFileError(f"{path}: holds its own keys (the 2019 layout); drop --keys")
        return read_cm_scores(path)
    if keys is None:
        raise ScoreFileError(f"{path}: {layout} holds no labels; give --keys (an ASVspoof 5 protocol or key file, "
                             "or a 2021 trial_metadata.txt)")
    return _matched(path, scores, read_keys(keys))


@dataclass(frozen=True)
class SasvScores:
    """ASVspoof 5 Track 2 trials: the ASV label per trial and its SASV score; CM and ASV scores where given."""

    asv_label: np.ndarray
    """target, nontarget or spoof per trial."""
    sasv: np.ndarray
    cm: np.ndarray | None
    asv: np.ndarray | None


def _header(path: PathLike, lines: list[tuple[int, str]], needed: tuple[str, ...]) -> list[str]:
    names = [_RENAMED.get(n, n) for n in lines[0][1].split()]
    missing = [n for n in needed if n not in names]
    if missing:
        raise ScoreFileError(f"{path}:{lines[0][0]}: the header lacks {', '.join(missing)} (needs {' '.join(needed)})")
    return names


def read_sasv(path: PathLike, keys: PathLike) -> SasvScores:
    """A Track 2 score file (header `spk filename cm-score asv-score sasv-score`, `-` allowed in the first two) and
    its keys (header `spk filename cm-label asv-label`), trials matched by (speaker, file)."""
    key_lines = _numbered_lines(keys)
    names = _header(keys, key_lines, ("spk", "filename", "asv-label"))
    label_at: dict[tuple[str, str], tuple[str, int]] = {}
    for lineno, line in key_lines[1:]:
        f = dict(zip(names, line.split(), strict=False))
        if f.get("asv-label") not in ("target", "nontarget", "spoof"):
            raise ScoreFileError(f"{keys}:{lineno}: asv-label must be target, nontarget or spoof: '{_shorten(line)}'")
        label_at[(f["spk"], f["filename"])] = (f["asv-label"], lineno)
    lines = _numbered_lines(path)
    names = _header(path, lines, ("spk", "filename", "cm-score", "asv-score", "sasv-score"))
    rows: dict[tuple[str, str], tuple[float | None, float | None, float]] = {}
    for lineno, line in lines[1:]:
        f = dict(zip(names, line.split(), strict=False))
        trial = (f.get("spk", ""), f.get("filename", ""))
        sasv = _parse_score(f.get("sasv-score", ""))
        cm, asv = (None if f.get(c) == "-" else _parse_score(f.get(c, "")) for c in ("cm-score", "asv-score"))
        if sasv is None or (cm is None and f.get("cm-score") != "-") or (asv is None and f.get("asv-score") != "-"):
            raise ScoreFileError(f"{path}:{lineno}: expected finite scores (or '-' for cm/asv), got '{_shorten(line)}'")
        if trial not in label_at:
            raise ScoreFileError(f"{path}:{lineno}: trial {' '.join(trial)} is not in the keys {keys}")
        if trial in rows:
            raise ScoreFileError(f"{path}:{lineno}: trial {' '.join(trial)} is scored twice")
        rows[trial] = (cm, asv, sasv)
    unscored = next((t for t in label_at if t not in rows), None)
    if unscored is not None:
        raise ScoreFileError(f"{keys}:{label_at[unscored][1]}: trial {' '.join(unscored)} has no score in {path}")
    trials = list(label_at)
    cm = [rows[t][0] for t in trials]
    asv = [rows[t][1] for t in trials]
    return SasvScores(np.array([label_at[t][0] for t in trials], dtype=object),
                      np.array([rows[t][2] for t in trials]),
                      None if None in cm else np.array(cm, dtype=np.float64),
                      None if None in asv else np.array(asv, dtype=np.float64))


@dataclass(frozen=True)
class Calibration:
    """An affine map from a system's scores to natural-log LLRs, fitted on dev scores (``calibrate``)."""

    a: float
    b: float
    p_spoof: float
    """The spoof prior of the cost model it was fitted for; the fit weighs the classes at its effective prior."""
    fitted_on: str

    def llr(self, scores: np.ndarray | float) -> np.ndarray:
        from .detection import apply_calibration

        return apply_calibration(scores, self.a, self.b)

    def apply(self, cm: CmScores) -> CmScores:
        return replace(cm, score=self.llr(cm.score))


def write_calibration(path: Path, calibration: Calibration, extra: dict) -> None:
    from .storage import atomic_write_json

    atomic_write_json(path, {"a": calibration.a, "b": calibration.b, "p_spoof": calibration.p_spoof,
                             "fitted_on": calibration.fitted_on, **extra})


def read_calibration(path: PathLike) -> Calibration:
    """A calibration file; ScoreFileError naming it when it is missing or not one."""
    import json
    import math

    try:
        d = json.loads(Path(path).read_text())
        cal = Calibration(float(d["a"]), float(d["b"]), float(d["p_spoof"]), str(d["fitted_on"]))
    except FileNotFoundError:
        raise ScoreFileError(f"{path}: no such file (write one with lowmem-aasist calibrate)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ScoreFileError(f"{path}: not a calibration file written by lowmem-aasist calibrate ({e})") from None
    if not (math.isfinite(cal.a) and math.isfinite(cal.b)):
        raise ScoreFileError(f"{path}: the calibration's a and b must be finite numbers")
    return cal
