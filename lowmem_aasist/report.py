"""Pictures: a run's training loss and dev EER (from ``metrics.jsonl``), and a score file's DET curve and score
histograms. Each returns False, writing nothing, without matplotlib (an optional extra)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from statistics import NormalDist

import numpy as np

from .storage import atomic_write_bytes


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed, and never a window popping up mid-run
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig, plt, png_path: Path) -> None:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(png_path, buffer.getvalue())


def plot_run(metrics_path: Path, png_path: Path) -> bool:
    """Write the PNG; False (and nothing written) without matplotlib or without anything to plot."""
    plt = _pyplot()
    if plt is None or not metrics_path.is_file():
        return False
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["dev_eer"]) for r in rows if "dev_eer" in r]
    if not losses and not evals:
        return False
    fig, (ax_loss, ax_eer) = plt.subplots(1, 2, figsize=(8, 3), dpi=100)
    if losses:
        ax_loss.plot(*zip(*losses, strict=True), lw=1)
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
    if evals:
        ax_eer.plot(*zip(*evals, strict=True), marker="o")
    ax_eer.set(xlabel="step", ylabel="dev EER (%)", title="dev EER", ylim=(0, None))
    _save(fig, plt, png_path)
    return True


# The probit axis's ticks (percent), as DET plots in the field label them.
_DET_TICKS = (0.1, 0.5, 1, 2, 5, 10, 20, 40)


def _probit(rates: np.ndarray) -> np.ndarray:
    """Normal deviates of rates, clipped off 0 and 1 (a DET curve's ends lie at infinity)."""
    inv = NormalDist().inv_cdf
    return np.array([inv(min(max(r, 1e-4), 1 - 1e-4)) for r in rates])


def plot_det(bonafide: np.ndarray, spoof: np.ndarray, png_path: Path, title: str = "DET") -> bool:
    """A DET curve on probit axes (miss rate of bona fide against false-alarm rate of spoofs) with the EER point."""
    from .metrics import compute_eer, det_curve

    plt = _pyplot()
    if plt is None:
        return False
    miss, fa, _ = det_curve(bonafide, spoof)
    eer, _ = compute_eer(bonafide, spoof)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot(_probit(fa), _probit(miss), lw=1.5)
    ax.plot(_probit(np.array([eer])), _probit(np.array([eer])), "o", label=f"EER {100 * eer:.2f}%")
    ticks = _probit(np.array(_DET_TICKS) / 100)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_ticks(ticks, [f"{t:g}" for t in _DET_TICKS])
    lim = (_probit(np.array([0.0005]))[0], _probit(np.array([0.5]))[0])
    ax.set(xlim=lim, ylim=lim, xlabel="spoofs accepted (%)", ylabel="bona fide rejected (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    _save(fig, plt, png_path)
    return True


def plot_histograms(bonafide: np.ndarray, spoof: np.ndarray, png_path: Path, title: str = "scores") -> bool:
    """Score histograms per class on shared bins."""
    plt = _pyplot()
    if plt is None:
        return False
    bins = np.histogram_bin_edges(np.concatenate([bonafide, spoof]), bins=50)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.hist(spoof, bins=bins, alpha=0.6, label=f"spoof ({len(spoof):,})", density=True)
    ax.hist(bonafide, bins=bins, alpha=0.6, label=f"bona fide ({len(bonafide):,})", density=True)
    ax.set(xlabel="score (higher = bona fide)", ylabel="density", title=title)
    ax.legend()
    _save(fig, plt, png_path)
    return True


def plot_score_file_det(scores_path: Path, png_path: Path, title: str) -> bool:
    """The DET curve of a 2019-layout score file (a run's scores/dev.txt); False when it lacks a class or is absent."""
    from .metrics import ScoreFileError, read_cm_scores

    try:
        cm = read_cm_scores(scores_path)
    except ScoreFileError:
        return False
    bona, spoof = cm.by_class()
    return bool(bona.size and spoof.size) and plot_det(bona, spoof, png_path, title)
