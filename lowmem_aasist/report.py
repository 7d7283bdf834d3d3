"""A small picture of a run: training loss per logged step and dev EER per evaluation, from ``metrics.jsonl``."""

from __future__ import annotations

import io
import json
from pathlib import Path

from .storage import atomic_write_bytes


def plot_run(metrics_path: Path, png_path: Path) -> bool:
    """Write the PNG; False (and nothing written) without matplotlib or without anything to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed, and never a window popping up mid-run
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not metrics_path.is_file():
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
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(png_path, buffer.getvalue())
    return True
