"""speed, pitch and gain: length kept, frequencies and levels measured on tones, determinism, bad specs."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from lowmem_aasist.augment import warp
from lowmem_aasist.augment.base import SpecError, build_step, item_rng, parse_spec

SR = 16_000


def build(part: str):
    """One spec part built as parse_spec builds it (without importing the other augmentation modules)."""
    return build_step(part).augment


def tone(hz: float, seconds: float, sr: int = SR) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * hz * np.arange(round(seconds * sr)) / sr)).astype(np.float32)


def frequency(y: np.ndarray, sr: int = SR) -> float:
    """The strongest frequency, interpolated between FFT bins (a parabola through the log magnitudes)."""
    s = np.abs(np.fft.rfft(y.astype(np.float64) * np.hanning(y.size)))
    k = int(np.argmax(s[1:-1])) + 1
    a, b, c = np.log(s[k - 1:k + 2])
    return (k + 0.5 * (a - c) / (a - 2 * b + c)) * sr / y.size


def rms(y: np.ndarray) -> float:
    return math.sqrt(np.mean(np.square(y.astype(np.float64))))


@pytest.mark.parametrize("part", ["speed:range=0.9-1.1", "speed:range=0.5-2", "pitch:semitones=-2-2",
                                  "pitch:semitones=-12-12", "gain:db=-6-6"])
def test_length_dtype_finiteness_and_determinism(part: str) -> None:
    aug = build(part)
    rng = np.random.default_rng(0)
    x = (0.3 * rng.standard_normal(4 * SR)).astype(np.float32)
    a, b = aug(x, SR, np.random.default_rng(7)), aug(x, SR, np.random.default_rng(7))
    assert a.shape == x.shape and a.dtype == np.float32 and np.all(np.isfinite(a))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, aug(x, SR, np.random.default_rng(8)))
    for n, sr in ((0, SR), (1, SR), (10, SR), (700, SR), (3000, 8000), (SR, 44_100)):
        y = aug(x[:n].copy(), sr, np.random.default_rng(1))
        assert y.shape == (n,) and y.dtype == np.float32 and np.all(np.isfinite(y)), (n, sr)


@pytest.mark.parametrize("factor", [1.1, 0.9])
def test_speed_scales_frequency_by_the_factor(factor: float) -> None:
    aug = build(f"speed:range={factor}")
    x = tone(1000, 4.0)
    for seed in range(3):
        y = aug(x, SR, np.random.default_rng(seed))
        assert y.shape == x.shape
        assert abs(frequency(y) / (1000 * factor) - 1) < 0.01
    # Slowed down, the item is longer than x: the crop start is a random draw.
    if factor < 1:
        assert not np.array_equal(aug(x, SR, np.random.default_rng(0)), aug(x, SR, np.random.default_rng(1)))


@pytest.mark.parametrize("semitones, hz", [(12, 1000.0), (-12, 250.0), (7, 500 * 2 ** (7 / 12)),
                                            (-3, 500 * 2 ** -0.25)])
def test_pitch_moves_a_tone_and_keeps_its_timing(semitones: float, hz: float) -> None:
    aug = build(f"pitch:semitones={semitones}")
    x = tone(500, 4.0)
    y = aug(x, SR, np.random.default_rng(0))
    assert y.shape == x.shape
    assert abs(frequency(y) / hz - 1) < 0.02
    assert abs(rms(y) / rms(x) - 1) < 0.05  # WSOLA copies in phase: no beating, no level change
    # The duration is stretched back, not cropped or tiled: a tone for 1 s then silence stays so.
    gated = x.copy()
    gated[SR:] = 0
    z = aug(gated, SR, np.random.default_rng(0))
    assert abs(frequency(z[:SR - 800]) / hz - 1) < 0.02
    assert rms(z[200:SR - 800]) > 0.3 and rms(z[SR + 800:]) < 1e-3


def test_gain_in_db() -> None:
    x = (0.3 * np.random.default_rng(0).standard_normal(4 * SR)).astype(np.float32)
    assert abs(rms(build("gain:db=6")(x, SR, np.random.default_rng(0))) / rms(x) - 10 ** (6 / 20)) < 1e-4
    assert abs(rms(build("gain:db=-6")(x, SR, np.random.default_rng(0))) / rms(x) - 10 ** (-6 / 20)) < 1e-4
    loud = build("gain:db=20")(x, SR, np.random.default_rng(0))
    assert np.max(np.abs(loud)) > 1  # not clipped
    spread = [rms(build("gain:db=-6-6")(x, SR, np.random.default_rng(s))) / rms(x) for s in range(20)]
    assert 0.5 - 1e-3 < min(spread) < 0.8 and 1.25 < max(spread) < 2 + 1e-3


def test_time_stretch_keeps_pitch_at_any_ratio() -> None:
    z = tone(440, 1.0).astype(np.float64)
    for n in (SR // 3, SR // 2, SR, 2 * SR, 3 * SR):
        y = warp.time_stretch(z, n, SR)
        assert y.shape == (n,)
        assert abs(frequency(y) / 440 - 1) < 0.01


@pytest.mark.parametrize("part, why", [
    ("speed:range=1.2-1.1", "range=1.2-1.1 must be lo-hi"),
    ("speed:range=0.1-1", "must be lo-hi with 0.5 <= lo"),
    ("speed:factor=1.1", "unknown argument 'factor'"),
    ("pitch:semitones=13", "hi <= 12"),
    ("pitch:semitones=up", "not a range"),
    ("gain:db=-6-6,clip=1", "unknown argument 'clip'"),
    ("gain:6", "takes no positional argument"),
])
def test_bad_specs_raise_one_line_naming_the_part(part: str, why: str) -> None:
    with pytest.raises(SpecError) as caught:
        build(part)
    message = str(caught.value)
    assert f"part {part!r}" in message and why in message and "\n" not in message


def test_through_parse_spec_and_pickled_like_a_worker_receives_it() -> None:
    chain = parse_spec("speed:range=0.9-1.1,p=0.5+pitch:semitones=-2-2+gain:db=-3-3")
    assert [s.name for s in chain.steps] == ["speed", "pitch", "gain"] and chain.steps[0].p == 0.5
    x = (0.1 * np.random.default_rng(0).standard_normal(64_600)).astype(np.float32)
    y = chain(x, SR, item_rng(1, 0, 5))
    assert y.shape == x.shape and np.array_equal(y, pickle.loads(pickle.dumps(chain))(x, SR, item_rng(1, 0, 5)))
