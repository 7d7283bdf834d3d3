"""Countermeasure metrics as the ASVspoof 2019 evaluation defines them.

EER: sort all scores (stable), sweep the threshold over every score (plus one below all), take the point where
the miss rate of bona fide and the false-alarm rate of spoofs are closest, and report their mean.
min t-DCF: the 2019 tandem detection cost of the CM in front of a fixed ASV system (see min_tdcf).
Score files: the reference's CM layout `UTT ATTACK KEY SCORE` and ASV layout `SPEAKER KEY SCORE`, read with
one-line, line-numbered errors.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

if TYPE_CHECKING:
    from .scorefiles import SasvScores


def det_curve(bonafide: np.ndarray, spoof: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(miss rate of bona fide, false-alarm rate of spoofs, thresholds) for thresholds at every score.

    Accepting "score > threshold" as bona fide; the first point is a threshold just below every score.
    """
    bonafide = np.asarray(bonafide, dtype=np.float64).ravel()
    spoof = np.asarray(spoof, dtype=np.float64).ravel()
    if bonafide.size == 0 or spoof.size == 0:
        raise ValueError("EER needs at least one bona fide and one spoof score")
    scores = np.concatenate([bonafide, spoof])
    is_bonafide = np.concatenate([np.ones(bonafide.size), np.zeros(spoof.size)])
    order = np.argsort(scores, kind="mergesort")
    is_bonafide = is_bonafide[order]
    bonafide_below = np.cumsum(is_bonafide)
    spoof_above = spoof.size - (np.arange(1, scores.size + 1) - bonafide_below)
    miss = np.concatenate([[0.0], bonafide_below / bonafide.size])
    false_alarm = np.concatenate([[1.0], spoof_above / spoof.size])
    thresholds = np.concatenate([[scores[order[0]] - 0.001], scores[order]])
    return miss, false_alarm, thresholds


def compute_eer(bonafide: np.ndarray, spoof: np.ndarray) -> tuple[float, float]:
    """(EER as a fraction, threshold at the EER point)."""
    miss, false_alarm, thresholds = det_curve(bonafide, spoof)
    i = int(np.argmin(np.abs(miss - false_alarm)))
    return float((miss[i] + false_alarm[i]) / 2), float(thresholds[i])


def eer_percent(scores: np.ndarray, labels: np.ndarray) -> float:
    """EER in percent of scores (higher = bona fide) against labels (1 bona fide, 0 spoof)."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    return 100.0 * compute_eer(scores[labels == 1], scores[labels == 0])[0]


# --- t-DCF ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TdcfCost:
    """The t-DCF cost model (priors and costs) of the ASVspoof 2019 evaluation plan.

    c_miss and c_fa are the ASV-only costs the reference carries alongside the others; the 2019 t-DCF reads only
    the _asv and _cm costs, so they do not enter the value.
    """

    p_spoof: float = 0.05
    p_tar: float = (1 - 0.05) * 0.99
    p_non: float = (1 - 0.05) * 0.01
    c_miss: float = 1.0
    c_fa: float = 10.0
    c_miss_asv: float = 1.0
    c_fa_asv: float = 10.0
    c_miss_cm: float = 1.0
    c_fa_cm: float = 10.0


ASVSPOOF2019_COST = TdcfCost()


@dataclass(frozen=True)
class AsvErrorRates:
    """ASV error rates at a fixed ASV threshold; pmiss_spoof is None when there were no spoof trials."""

    pfa: float
    pmiss: float
    pmiss_spoof: float | None
    threshold: float


def asv_error_rates(target: ArrayLike, nontarget: ArrayLike, spoof: ArrayLike) -> AsvErrorRates:
    """ASV error rates at the ASV's own EER threshold, as the ASVspoof 2019 reference evaluation fixes it.

    threshold = compute_eer(target, nontarget)[1]; then
      pfa         = fraction of nontarget scores >= threshold (accepted impostors),
      pmiss       = fraction of target scores < threshold (rejected targets),
      pmiss_spoof = fraction of spoof scores < threshold (spoofs the ASV alone already rejects).
    These inequalities are the reference's: a score equal to the threshold counts as accepted here, although the
    EER sweep in det_curve counts it as rejected, so pmiss can differ from the miss rate at the EER point.
    """
    target = np.asarray(target, dtype=np.float64).ravel()
    nontarget = np.asarray(nontarget, dtype=np.float64).ravel()
    spoof = np.asarray(spoof, dtype=np.float64).ravel()
    if target.size == 0 or nontarget.size == 0:
        raise ValueError("ASV error rates need at least one target and one nontarget score")
    threshold = compute_eer(target, nontarget)[1]
    return AsvErrorRates(
        pfa=float(np.mean(nontarget >= threshold)),
        pmiss=float(np.mean(target < threshold)),
        pmiss_spoof=float(np.mean(spoof < threshold)) if spoof.size else None,
        threshold=threshold,
    )


def tdcf_weights(asv: AsvErrorRates, cost: TdcfCost = ASVSPOOF2019_COST) -> tuple[float, float]:
    """(C1, C2) of the 2019 t-DCF: C1 weighs the CM miss rate, C2 the CM false-alarm rate.

    C1 = Ptar * (Cmiss_cm - Cmiss_asv * Pmiss_asv) - Pnon * Cfa_asv * Pfa_asv
    C2 = Cfa_cm * Pspoof * (1 - Pmiss_spoof_asv)
    """
    if asv.pmiss_spoof is None:
        raise ValueError(
            "t-DCF needs the ASV miss rate of spoof trials, but the ASV scores have no spoof trials"
        )
    c1 = cost.p_tar * (cost.c_miss_cm - cost.c_miss_asv * asv.pmiss) - cost.p_non * cost.c_fa_asv * asv.pfa
    c2 = cost.c_fa_cm * cost.p_spoof * (1 - asv.pmiss_spoof)
    return float(c1), float(c2)


def min_tdcf(
    bonafide_cm: ArrayLike, spoof_cm: ArrayLike, asv: AsvErrorRates, cost: TdcfCost = ASVSPOOF2019_COST
) -> tuple[float, float]:
    """(normalised minimum t-DCF, CM threshold where it is reached), as the ASVspoof 2019 evaluation computes it.

    The 2019 t-DCF (Kinnunen et al., Odyssey 2018; ASVspoof 2019 evaluation plan) with the ASV fixed at the
    operating point `asv` and the CM threshold s swept like det_curve (higher CM score = bona fide):

        t-DCF(s)      = C1 * Pmiss_cm(s) + C2 * Pfa_cm(s)        (C1, C2 from tdcf_weights)
        t-DCF_norm(s) = t-DCF(s) / min(C1, C2)
        min t-DCF     = min over s of t-DCF_norm(s), first minimum on ties (numpy argmin)

    min(C1, C2) is the cost of the better of the two CMs that accept everything (Pmiss_cm 0, Pfa_cm 1) or reject
    everything (1, 0); the sweep contains both points, so the result is at most 1. Because the sweep walks the
    sorted scores one at a time, tied scores yield intermediate points no real threshold reaches (as the reference).

    Raises ValueError (one line) where the reference stops: priors negative or not summing to one, no spoof ASV
    trials, NaN/inf CM scores, fewer than 3 distinct CM scores (decisions, not scores), C1 or C2 negative; and also
    when min(C1, C2) is 0, where the normalisation is undefined. Negative costs only warn, as in the reference.
    """
    bonafide_cm = np.asarray(bonafide_cm, dtype=np.float64).ravel()
    spoof_cm = np.asarray(spoof_cm, dtype=np.float64).ravel()
    costs = (cost.c_fa_asv, cost.c_miss_asv, cost.c_fa_cm, cost.c_miss_cm)
    if min(costs) < 0:
        warnings.warn("t-DCF costs are usually non-negative; got a negative one", stacklevel=2)
    priors = (cost.p_tar, cost.p_non, cost.p_spoof)
    if min(priors) < 0 or abs(sum(priors) - 1) > 1e-10:
        raise ValueError(
            f"t-DCF priors must be non-negative and sum to 1, got Ptar+Pnon+Pspoof = {sum(priors)!r}"
        )
    c1, c2 = tdcf_weights(asv, cost)
    both = np.concatenate([bonafide_cm, spoof_cm])
    if not np.isfinite(both).all():
        raise ValueError("CM scores contain NaN or infinite values")
    if np.unique(both).size < 3:
        raise ValueError("t-DCF needs soft CM scores (at least 3 distinct values), not hard decisions")
    if c1 < 0 or c2 < 0:
        raise ValueError(
            f"t-DCF weights must be non-negative, got C1 = {c1:.6g}, C2 = {c2:.6g}: check the ASV error rates {asv}"
        )
    if min(c1, c2) == 0:
        raise ValueError(f"t-DCF cannot be normalised: min(C1, C2) is 0 (C1 = {c1:.6g}, C2 = {c2:.6g})")
    miss, false_alarm, thresholds = det_curve(bonafide_cm, spoof_cm)
    normalised = (c1 * miss + c2 * false_alarm) / min(c1, c2)
    i = int(np.argmin(normalised))
    return float(normalised[i]), float(thresholds[i])


# --- score files ---------------------------------------------------------------------------------------------


class ScoreFileError(ValueError):
    """A score file that cannot be read or parsed; the message is one line naming the file (and line)."""


@dataclass(frozen=True, eq=False)
class CmScores:
    """A CM score file: one trial per entry; key is 1 for bona fide, 0 for spoof; higher score = bona fide."""

    utt: list[str]
    attack: list[str]
    key: np.ndarray
    score: np.ndarray
    conditions: dict[str, list[str]] = field(default_factory=dict)
    """Per-trial condition columns from the keys (codec, transmission, ...), by name; see ``scorefiles``."""

    def __post_init__(self) -> None:
        sizes = {len(self.utt), len(self.attack), len(self.key), len(self.score), *map(len, self.conditions.values())}
        if len(sizes) != 1:
            raise ValueError(f"CmScores fields differ in length: {sorted(sizes)}")

    def by_class(self) -> tuple[np.ndarray, np.ndarray]:
        """(bona fide scores, spoof scores)."""
        score, key = np.asarray(self.score, dtype=np.float64), np.asarray(self.key)
        return score[key == 1], score[key == 0]


@dataclass(frozen=True, eq=False)
class AsvScores:
    """ASV scores split by trial type (higher score = same speaker)."""

    target: np.ndarray
    nontarget: np.ndarray
    spoof: np.ndarray


_CM_FORMAT = "UTT ATTACK bonafide|spoof SCORE"
_ASV_FORMAT = "SPEAKER target|nontarget|spoof SCORE"


def _shorten(line: str, limit: int = 80) -> str:
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _numbered_lines(path: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """(1-based line number, stripped text) of every non-blank line; ScoreFileError if unreadable or empty.

    Only '\\n' ends a line (with an optional '\\r' before it), so the numbers match what an editor shows even if a
    line holds a stray form feed or other character str.splitlines would also break on.
    """
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ScoreFileError(f"{path}: no such file") from None
    except OSError as e:
        raise ScoreFileError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        raise ScoreFileError(f"{path}:{lineno}: not UTF-8 text") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
    if not lines:
        raise ScoreFileError(f"{path}: no scores (the file is empty)")
    return lines


def _parse_score(field: str) -> float | None:
    """The float in field, or None if it is not a finite number (a NaN or inf score cannot be ranked)."""
    try:
        value = float(field)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_cm_scores(path: str | os.PathLike[str]) -> CmScores:
    """Read a CM score file in the ASVspoof 2019 reference layout: `UTT ATTACK KEY SCORE` per line.

    KEY is bonafide or spoof; ATTACK is the attack id (A01..A19) for spoofs and anything (usually '-') for bona
    fide; fields are separated by any whitespace and blank lines are skipped. Errors are ScoreFileError with one
    line '<path>:<line>: ...': a wrong field count, a bad key, a score that is not a finite number, an utterance
    scored twice (a concatenated or duplicated file would otherwise silently double-count trials).
    """
    utts: list[str] = []
    attacks: list[str] = []
    keys: list[int] = []
    scores: list[float] = []
    first_seen: dict[str, int] = {}
    for lineno, line in _numbered_lines(path):
        fields = line.split()
        score = _parse_score(fields[3]) if len(fields) == 4 else None
        if score is None or fields[2] not in ("bonafide", "spoof"):
            raise ScoreFileError(f"{path}:{lineno}: expected '{_CM_FORMAT}', got '{_shorten(line)}'")
        utt = fields[0]
        if utt in first_seen:
            raise ScoreFileError(
                f"{path}:{lineno}: utterance '{_shorten(utt)}' already scored on line {first_seen[utt]}"
            )
        first_seen[utt] = lineno
        utts.append(utt)
        attacks.append(fields[1])
        keys.append(1 if fields[2] == "bonafide" else 0)
        scores.append(score)
    return CmScores(utts, attacks, np.array(keys, dtype=np.int8), np.array(scores, dtype=np.float64))


def read_asv_scores(path: str | os.PathLike[str]) -> AsvScores:
    """Read an ASVspoof 2019 ASV score file (e.g. ASVspoof2019.LA.asv.eval.gi.trl.scores.txt).

    Layout as the 2019 reference reads it: `SPEAKER KEY SCORE` per line, KEY target, nontarget or spoof. Errors
    are ScoreFileError, one line, '<path>:<line>: ...' for a malformed line, and '<path>: ...' when the file lacks
    any one of the three trial types, since the t-DCF needs all three.
    """
    by_key: dict[str, list[float]] = {"target": [], "nontarget": [], "spoof": []}
    for lineno, line in _numbered_lines(path):
        fields = line.split()
        score = _parse_score(fields[2]) if len(fields) == 3 else None
        if score is None or fields[1] not in by_key:
            raise ScoreFileError(f"{path}:{lineno}: expected '{_ASV_FORMAT}', got '{_shorten(line)}'")
        by_key[fields[1]].append(score)
    missing = [key for key, values in by_key.items() if not values]
    if missing:
        raise ScoreFileError(
            f"{path}: no {' or '.join(missing)} trials (an ASV score file needs target, nontarget and spoof)"
        )
    return AsvScores(*(np.array(by_key[k], dtype=np.float64) for k in ("target", "nontarget", "spoof")))


# --- evaluation ----------------------------------------------------------------------------------------------


def _cell(bonafide: np.ndarray, spoof: np.ndarray) -> dict[str, Any]:
    """Track 1 metrics of one breakdown cell; None for each where a class is absent (the reference's NaN)."""
    from .detection import track1

    counts = {"bonafide": int(bonafide.size), "spoof": int(spoof.size)}
    if not (bonafide.size and spoof.size):
        return {"eer": None, "min_dcf": None, "act_dcf": None, "cllr": None, **counts}
    m = track1(bonafide, spoof)
    return {k: m[k] for k in ("eer", "min_dcf", "act_dcf", "cllr")} | counts


def breakdown(cm: CmScores, by: str) -> dict[str, dict[str, Any]]:
    """Metrics per value of a condition, pooled as the challenges' packages pool them: an attack restricts the spoofs
    only and keeps every bona fide trial; any other condition (codec, transmission, ...) restricts both classes."""
    key, score = np.asarray(cm.key), np.asarray(cm.score, dtype=np.float64)
    if by == "attack":
        values = np.asarray(cm.attack, dtype=object)
        spoof_values = sorted(set(values[key == 0].tolist()))
        return {v: _cell(score[key == 1], score[(key == 0) & (values == v)]) for v in spoof_values}
    if by not in cm.conditions:
        have = ", ".join(["attack", *cm.conditions]) or "attack"
        raise ValueError(f"--by {by}: these scores' keys have no {by} column (they have: {have})")
    values = np.asarray(cm.conditions[by], dtype=object)
    return {v: _cell(score[(key == 1) & (values == v)], score[(key == 0) & (values == v)])
            for v in sorted(set(values.tolist()))}


def evaluate(
    cm: CmScores, asv: AsvScores | None = None, cost: TdcfCost = ASVSPOOF2019_COST, by: str | None = None
) -> dict[str, Any]:
    """The 2019 metrics (EER, min t-DCF with ASV scores, per-attack EER) and the ASVspoof 5 ones, JSON-ready.

    Returns {"eer": percent, "eer_threshold": CM threshold at the EER, "min_dcf", "act_dcf", "cllr", "min_cllr"
    (Track 1; actDCF and Cllr read the scores as natural-log LLRs), "min_tdcf" and "t_eer" (percent; None without
    ASV scores), "per_attack": {attack: EER percent of that attack's spoofs against all bona fide, attacks sorted},
    "counts": {"bonafide": n, "spoof": n, attack: n, ...}} and, with ``by``, "by": {by: {value: cell}} (see
    :func:`breakdown`). ValueError (one line) if the CM scores lack bona fide or spoof trials, hold a non-finite
    score, or an attack is named like a count key.
    """
    from .detection import t_eer, track1

    key = np.asarray(cm.key)
    score = np.asarray(cm.score, dtype=np.float64)
    if not np.isfinite(score).all():
        raise ValueError("CM scores contain NaN or infinite values")
    bonafide, spoof = score[key == 1], score[key == 0]
    if bonafide.size == 0 or spoof.size == 0:
        missing = "bona fide" if bonafide.size == 0 else "spoof"
        raise ValueError(
            f"CM scores have no {missing} trials; EER and t-DCF need both bona fide and spoof trials"
        )
    spoof_attacks = np.asarray(cm.attack, dtype=object)[key == 0]
    attacks = sorted(set(spoof_attacks.tolist()))
    clash = {"bonafide", "spoof"} & set(attacks)
    if clash:
        raise ValueError(f"attack named {sorted(clash)[0]!r} clashes with the class counts; rename it")
    per_attack: dict[str, float] = {}
    counts: dict[str, int] = {"bonafide": int(bonafide.size), "spoof": int(spoof.size)}
    for attack in attacks:
        of_attack = spoof[spoof_attacks == attack]
        per_attack[attack] = 100.0 * compute_eer(bonafide, of_attack)[0]
        counts[attack] = int(of_attack.size)
    tdcf = teer = None
    if asv is not None:
        tdcf = min_tdcf(bonafide, spoof, asv_error_rates(asv.target, asv.nontarget, asv.spoof), cost)[0]
        teer = t_eer(bonafide, spoof, asv.target, asv.nontarget, asv.spoof)
    result = {
        **track1(bonafide, spoof),
        "min_tdcf": tdcf,
        "t_eer": teer,
        "per_attack": per_attack,
        "counts": counts,
    }
    if by is not None:
        result["by"] = {by: breakdown(cm, by)}
    return result


def format_evaluation(result: dict[str, Any]) -> str:
    """A plain-text report of evaluate()'s result: the pooled metrics, then one row per attack (or per value of the
    breakdown asked for)."""
    counts = result["counts"]
    eer_line = f"EER: {result['eer']:.4f} %"
    if result.get("eer_threshold") is not None:
        eer_line += f" (CM threshold {result['eer_threshold']:.6g})"
    if result["min_tdcf"] is None:
        tdcf_line = "min t-DCF: not computed (give --asv-scores ASV_SCORE_FILE)"
    else:
        tdcf_line = f"min t-DCF: {result['min_tdcf']:.6f}\nt-EER: {result['t_eer']:.4f} %"
    lines = [eer_line,
             f"minDCF: {result['min_dcf']:.5f}   actDCF: {result['act_dcf']:.5f}   Cllr: {result['cllr']:.5f} bits   "
             f"minCllr: {result['min_cllr']:.5f} bits",
             tdcf_line, f"trials: {counts['bonafide']} bona fide, {counts['spoof']} spoof", ""]
    if "by" in result:
        (name, cells), = result["by"].items()
        rows = [(v, f"{c['bonafide']}/{c['spoof']}", *(_fmt(c[k]) for k in ("eer", "min_dcf", "act_dcf", "cllr")))
                for v, c in cells.items()]
        return "\n".join(lines + _table([name, "bona/spoof", "EER %", "minDCF", "actDCF", "Cllr"], rows))
    rows = [(a, str(counts.get(a, 0)), f"{eer:.4f}") for a, eer in result["per_attack"].items()]
    return "\n".join(lines + _table(["attack", "trials", "EER %"], rows))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _table(header: list[str], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return [f"{r[0]:<{widths[0]}}" + "".join(f"  {str(c):>{w}}" for c, w in zip(r[1:], widths[1:], strict=True))
            for r in [header, *rows]]


def evaluate_sasv(trials: SasvScores) -> dict[str, Any]:
    """ASVspoof 5 Track 2: min a-DCF of the SASV scores, and the t-EER (percent) of the CM and ASV scores when the
    file gives both (else None). JSON-ready, with the trial counts."""
    from .detection import a_dcf, t_eer

    label = trials.asv_label
    by = {k: label == k for k in ("target", "nontarget", "spoof")}
    teer = None
    if trials.cm is not None and trials.asv is not None:
        teer = t_eer(trials.cm[~by["spoof"]], trials.cm[by["spoof"]],
                     *(trials.asv[by[k]] for k in ("target", "nontarget", "spoof")))
    return {"a_dcf": a_dcf(*(trials.sasv[by[k]] for k in ("target", "nontarget", "spoof"))), "t_eer": teer,
            "counts": {k: int(m.sum()) for k, m in by.items()}}
