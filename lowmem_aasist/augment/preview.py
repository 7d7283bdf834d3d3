"""``augment-preview``: hear and see what a spec does to one recording before training with it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from ..audio import SAMPLE_RATE, read_audio
from ..storage import atomic_write_bytes
from .base import Chain

PREVIEW_STREAM = 0x9E7
"""Seeds the previews' draws apart from any training item's."""


@dataclass(frozen=True)
class Preview:
    flacs: tuple[Path, ...]
    png: Path | None
    clipped: tuple[int, ...]
    """Samples clipped to [-1, 1] when written as 16-bit FLAC, per version (training sees them unclipped)."""


def _flac_bytes(x: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    sf.write(buf, np.clip(x, -1.0, 1.0), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def log_spectrogram(x: np.ndarray, frame: int = 512, hop: int = 128) -> np.ndarray:
    """dB magnitude (frequency x time) with a Hann window; silence floors at -100 dB."""
    if len(x) < frame:
        x = np.pad(x, (0, frame - len(x)))
    starts = np.arange(0, len(x) - frame + 1, hop)
    frames = x[starts[:, None] + np.arange(frame)] * np.hanning(frame)
    return 20 * np.log10(np.abs(np.fft.rfft(frames, axis=1)).T + 1e-5)


def _png(path: Path, clean: np.ndarray, versions: list[np.ndarray], spec: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [("clean", clean), *((f"{spec} #{k}", v) for k, v in enumerate(versions))]
    fig, axes = plt.subplots(len(rows), 1, figsize=(9, 1.9 * len(rows)), sharex=True, squeeze=False)
    for ax, (title, x) in zip(axes[:, 0], rows, strict=True):
        ax.imshow(log_spectrogram(x), origin="lower", aspect="auto", vmin=-80, vmax=20, cmap="magma",
                  extent=(0, len(x) / SAMPLE_RATE, 0, SAMPLE_RATE / 2000))
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_ylabel("kHz")
    axes[-1, 0].set_xlabel("s")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)
    return True


def preview(audio: Path, chain: Chain, n: int, out: Path, seed: int = 0) -> Preview:
    """Write ``n`` augmented versions of ``audio`` (16 kHz mono FLAC) and, with matplotlib, one PNG of their
    spectrograms under the clean one's. Version k is drawn from (seed, k): the same command writes the same files."""
    clean = read_audio(audio)
    out.mkdir(parents=True, exist_ok=True)
    versions, flacs, clipped = [], [], []
    for k in range(n):
        y = chain(clean, SAMPLE_RATE, np.random.default_rng([seed, k, PREVIEW_STREAM]))
        path = out / f"{audio.stem}.aug{k}.flac"
        atomic_write_bytes(path, _flac_bytes(y))
        versions.append(y)
        flacs.append(path)
        clipped.append(int(np.count_nonzero(np.abs(y) > 1.0)))
    png = out / f"{audio.stem}.augment.png"
    return Preview(tuple(flacs), png if _png(png, clean, versions, chain.spec) else None, tuple(clipped))
