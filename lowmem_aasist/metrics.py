"""Countermeasure metrics as the ASVspoof 2019 evaluation defines them.

EER: sort all scores (stable), sweep the threshold over every score (plus one below all), take the point where
the miss rate of bona fide and the false-alarm rate of spoofs are closest, and report their mean.
"""

from __future__ import annotations

import numpy as np


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
