"""Augmentations that warp time, pitch or level: speed perturbation, pitch shift, gain.

Spec syntax::

    speed:range=0.9-1.1      speed factor uniform in [0.9, 1.1]; tempo and pitch change together (one value,
                             range=1.1, fixes the factor)
    pitch:semitones=-2-2     pitch shift uniform in [-2, +2] semitones, duration kept
    gain:db=-6-6             level change uniform in [-6, +6] dB

Every output has the input's length. ``speed`` plays the item ``f`` times faster by resampling it with soxr
(as Kaldi's speed perturbation: a 1 kHz tone becomes ``f`` kHz and the item ``len/f`` samples long), then crops a
random window (``f < 1``) or tiles it from its start (``f > 1``, the reference convention for short clips) to
``len(x)``. ``pitch`` resamples by ``2^(s/12)`` the same way, which moves the pitch and changes the duration, then
stretches the result back to exactly ``len(x)`` samples with WSOLA (:func:`time_stretch`), which changes the
duration without moving the pitch. ``gain`` multiplies and does not clip: the model reads float waveforms, and a
clip would add distortion that only loud gains produce, a cue unrelated to spoofing; the gain is capped at
40 dB, so audio-range input stays far from float32 overflow.
"""

from __future__ import annotations

import numpy as np
import soxr

from ..audio import tile
from .base import Params, augmentation

__all__ = ["Gain", "Pitch", "Speed", "time_stretch"]

_QUALITY = "HQ"  # audio.py resamples with the same quality, so warped and plain items share the filter

# WSOLA at any rate uses the same durations: 32 ms frames are long enough to hold two periods of a 70 Hz voice
# and short enough that a frame is quasi-stationary. Half-frame hops with a periodic Hann window sum to exactly
# one, so overlap-adding needs no normalisation. The +-8 ms search spans 16 ms, one period of the lowest pitch
# (62.5 Hz) it can keep phase-continuous.
_FRAME_S = 0.032
_SEARCH_S = 0.008


def _speed_up(x: np.ndarray, sr: int, factor: float) -> np.ndarray:
    """``x`` played ``factor`` times faster: read as if sampled at ``sr * factor`` and resampled to ``sr``, so its
    frequencies are multiplied by ``factor`` and its length divided by it."""
    return np.asarray(soxr.resample(x, sr * factor, sr, quality=_QUALITY), dtype=np.float32)


def time_stretch(z: np.ndarray, n: int, sr: int) -> np.ndarray:
    """``z`` stretched or compressed in time to exactly ``n`` samples, its pitch kept (WSOLA).

    Output frame k (hop H, frame 2H, periodic Hann) is copied from the input near ``k*H * len(z)/n``: within
    +-:data:`_SEARCH_S` of that position, at the offset whose frame correlates best with the natural continuation
    of the previously copied frame, so successive frames overlap in phase and periodic sounds stay periodic
    instead of beating. Returns float64.
    """
    z = np.asarray(z, dtype=np.float64)
    if n == 0:
        return np.zeros(0)
    if z.size == 0:
        raise ValueError("cannot stretch an empty signal")
    hop = max(1, round(_FRAME_S * sr / 2))
    frame, tol = 2 * hop, max(1, round(_SEARCH_S * sr))
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(frame) / frame)  # periodic Hann
    ratio = z.size / n  # input samples per output sample
    # Frames start one hop before the output so that its first sample is already covered by two windows.
    count = -(-n // hop) + 1
    nominal = np.round((np.arange(count) * hop - hop) * ratio).astype(np.int64)
    left = max(0, tol - int(nominal.min()))
    right = max(0, int(nominal.max()) + tol + 2 * frame - z.size)
    # Reflection keeps the edges' spectrum (zeros would fade the first and last hop in and out).
    padded = np.pad(z, (left, right), mode="reflect" if z.size > 1 else "edge")
    out = np.zeros(count * hop + frame)
    previous = None
    for k in range(count):
        start = int(nominal[k]) + left
        if previous is not None:
            target = padded[previous + hop:previous + hop + frame]
            region = padded[start - tol:start + tol + frame]
            start += int(np.argmax(np.correlate(region, target, mode="valid"))) - tol
        out[k * hop:k * hop + frame] += window * padded[start:start + frame]
        previous = start
    return out[hop:hop + n]


class Speed:
    """Speed perturbation by a factor uniform in ``[low, high]``; length kept by a random crop or a tile."""

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high

    def __call__(self, x: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
        factor = rng.uniform(self.low, self.high)
        n = x.size
        y = _speed_up(x, sr, factor) if n else x
        if y.size == 0:  # a few samples sped up to none
            return x.copy()
        if y.size >= n:
            start = int(rng.integers(0, y.size - n + 1))
            return np.ascontiguousarray(y[start:start + n], dtype=np.float32)
        return tile(y, n).astype(np.float32, copy=False)


class Pitch:
    """Pitch shift by a uniform number of semitones in ``[low, high]``, duration kept."""

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high

    def __call__(self, x: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
        semitones = rng.uniform(self.low, self.high)
        if x.size == 0 or semitones == 0.0:
            return x.copy()
        z = _speed_up(x, sr, 2.0 ** (semitones / 12.0))
        if z.size == 0:
            return x.copy()
        return time_stretch(z, x.size, sr).astype(np.float32)


class Gain:
    """A level change uniform in ``[low, high]`` dB, unclipped."""

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high

    def __call__(self, x: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
        db = rng.uniform(self.low, self.high)
        return (x * np.float32(10.0 ** (db / 20.0))).astype(np.float32, copy=False)


@augmentation("speed", "speed perturbation, tempo and pitch together (Kaldi-style): range=0.9-1.1")
def _build_speed(params: Params) -> Speed:
    low, high = params.range("range", (0.9, 1.1), 0.5, 2.0)
    return Speed(low, high)


@augmentation("pitch", "pitch shift keeping the duration: semitones=-2-2")
def _build_pitch(params: Params) -> Pitch:
    low, high = params.range("semitones", (-2.0, 2.0), -12.0, 12.0)
    return Pitch(low, high)


@augmentation("gain", "random gain, unclipped: db=-6-6")
def _build_gain(params: Params) -> Gain:
    low, high = params.range("db", (-6.0, 6.0), -40.0, 40.0)
    return Gain(low, high)
