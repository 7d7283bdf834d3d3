"""Tests for lowmem_aasist.augment.codecs: lengths, determinism, band limits, alignment and spec errors, on generated
one-second signals (the file runs in a few seconds)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import soxr

from lowmem_aasist.augment import codecs
from lowmem_aasist.augment.base import REGISTRY, Params, SpecError
from lowmem_aasist.augment.codecs import CODECS, Codec, align, round_trip

SR = 16000


def build(spec: str) -> Codec:
    """One spec part built through the registry as parse_spec would, without needing the sibling modules."""
    name, _, args = spec.partition(":")
    keywords = dict(a.split("=", 1) for a in args.split(",") if a)
    params = Params(spec, name, None, keywords)
    aug = REGISTRY[name][0](params)
    params.done()
    return aug


def white(n: int = SR, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


def voiced(n: int = SR) -> np.ndarray:
    """Harmonics 2-16 of a wobbling 200 Hz pitch, amplitude-modulated: speech-like and inside 300-3400 Hz."""
    t = np.arange(n) / SR
    phase = 2 * np.pi * np.cumsum(200 + 15 * np.sin(2 * np.pi * 0.8 * t)) / SR
    x = sum(np.sin(k * phase + k) / k for k in range(2, 17)) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    return (0.4 * x / np.abs(x).max()).astype(np.float32)


def band_db(x: np.ndarray, y: np.ndarray, lo: float, hi: float) -> float:
    """Energy of y relative to x in [lo, hi) Hz, in dB."""
    f = np.fft.rfftfreq(len(x), 1 / SR)
    band = (f >= lo) & (f < hi)
    return float(10 * np.log10(np.sum(np.abs(np.fft.rfft(y)[band]) ** 2) / np.sum(np.abs(np.fft.rfft(x)[band]) ** 2)))


# ----------------------------------------------------------------------------------------------------
# shape, range, determinism


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("n", [16001, 333])
def test_same_length_finite_clipped(codec: str, n: int) -> None:
    # compression 0.9: MP3 is then constant 25 kbps without its LAME tag and decodes 1105 + padding samples too many.
    x = 3.0 * white(n)  # peaks far above full scale
    y = round_trip(x, SR, codec, 0.9)
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.all(np.isfinite(y)) and np.abs(y).max() <= 1.0
    assert np.abs(y).max() > 0.5  # loud in, loud out: not silenced


@pytest.mark.parametrize("codec,sr", [("opus", 22050), ("mp3", 8000), ("telephone", 8000), ("alaw", 44100)])
def test_other_sample_rates(codec: str, sr: int) -> None:
    x = white(sr // 2)
    y = round_trip(x, sr, codec, 0.5)
    assert y.shape == x.shape and y.dtype == np.float32 and np.all(np.isfinite(y))


def test_empty_input() -> None:
    for codec in CODECS:
        assert round_trip(np.zeros(0, np.float32), SR, codec, 0.5).shape == (0,)


def test_same_seed_same_output_and_draws_vary() -> None:
    aug = build("codec")
    x = voiced(SR // 2)
    outputs = []
    for seed in range(8):
        a = aug(x, SR, np.random.default_rng(seed))
        b = aug(x, SR, np.random.default_rng(seed))
        np.testing.assert_array_equal(a, b)
        outputs.append(a)
    # Eight seeds over six codecs and a compression range: the draws must reach several distinct outputs.
    assert len({o.tobytes() for o in outputs}) >= 4


def test_compression_drawn_per_item() -> None:
    aug = build("mp3:compression=0-0.99")
    x = white(SR // 2)
    errors = {round(float(np.mean((aug(x, SR, np.random.default_rng(s)) - x) ** 2)), 8) for s in range(4)}
    assert len(errors) >= 3  # different bit-rates, different losses


# ----------------------------------------------------------------------------------------------------
# what each codec does to the spectrum (measured: see the module's docstring and the numbers below)


@pytest.mark.parametrize("codec", ["mulaw", "alaw", "telephone"])
def test_narrowband_removes_energy_above_4khz(codec: str) -> None:
    x = white()
    y = round_trip(x, SR, codec)
    assert band_db(x, y, 4200, 8000) < -40  # measured -53 to -65 dB
    assert abs(band_db(x, y, 400, 3300)) < 0.5  # the voice band passes


def test_telephone_removes_energy_below_300hz() -> None:
    x = white()
    y = round_trip(x, SR, "telephone")
    assert band_db(x, y, 20, 200) < -30  # measured -43 dB
    assert band_db(x, y, 200, 300) < -6  # the lower edge's -6 dB point is 300 Hz
    assert abs(band_db(x, y, 400, 3300)) < 0.5


def test_mulaw_alaw_quantise_to_255_levels() -> None:
    ramp = np.linspace(-1, 1, 100001).astype(np.float32)
    for quantise in (codecs.mulaw_quantise, codecs.alaw_quantise):
        levels = np.unique(quantise(ramp))
        assert len(levels) == 255 and levels.min() == -1 and levels.max() == 1 and 0 in levels
        q = quantise(ramp)  # companding: fine steps near zero, coarse near full scale
        assert np.abs(q - ramp)[np.abs(ramp) < 0.01].max() < 0.001 < np.abs(q - ramp)[np.abs(ramp) > 0.9].max()


def test_companding_curves() -> None:
    ramp = np.linspace(0, 1, 200001).astype(np.float32)
    # µ-law: level k of 127 expands to ((1 + 255)^(k/127) - 1) / 255, so steps grow by 256^(1/127) each.
    mu = np.unique(codecs.mulaw_quantise(ramp))
    np.testing.assert_allclose(mu[1:6], np.expm1(np.log(256) * np.arange(1, 6) / 127) / 255, rtol=1e-5)
    # A-law: linear below 1/A (equal steps of (1 + ln A) / (127 A)), logarithmic above.
    alaw = np.unique(codecs.alaw_quantise(ramp))
    norm = 1 + np.log(87.6)
    np.testing.assert_allclose(alaw[1:21], np.arange(1, 21) * norm / (127 * 87.6), rtol=1e-5)
    np.testing.assert_allclose(alaw[-2], np.exp(126 / 127 * norm - 1) / 87.6, rtol=1e-5)


@pytest.mark.parametrize("codec", ["mulaw", "alaw"])
def test_g711_adds_8_bit_companding_noise(codec: str) -> None:
    x = voiced()
    plain = soxr.resample(soxr.resample(x, SR, 8000), 8000, SR)[:len(x)]  # the 8 kHz round trip alone
    y = round_trip(x, SR, codec)
    snr = 10 * np.log10(np.sum(plain**2) / np.sum((y - plain) ** 2))
    assert 30 < snr < 45  # measured 38 dB, the textbook figure for 8-bit G.711 on speech-level signals
    quantise = {"mulaw": codecs.mulaw_quantise, "alaw": codecs.alaw_quantise}[codec]
    expected = soxr.resample(quantise(soxr.resample(x, SR, 8000)), 8000, SR)[:len(x)]
    np.testing.assert_array_equal(y, np.clip(expected, -1, 1))


def test_mp3_low_bitrate_removes_high_band() -> None:
    x = white()
    assert band_db(x, round_trip(x, SR, "mp3", 0.99), 4000, 8000) < -40  # 8 kbps: measured below -55 dB
    assert band_db(x, round_trip(x, SR, "mp3", 0.9), 6500, 8000) < -30  # 25 kbps: measured about -52 dB
    assert band_db(x, round_trip(x, SR, "mp3", 0.2), 1000, 6000) > -1  # 132 kbps keeps it


def test_opus_low_bitrate_removes_high_band() -> None:
    x = white()
    assert band_db(x, round_trip(x, SR, "opus", 0.99), 5500, 8000) < -40  # 9 kbps: measured about -68 dB
    assert abs(band_db(x, round_trip(x, SR, "opus", 0.2), 300, 7000)) < 1


@pytest.mark.parametrize("codec", ["mp3", "ogg", "opus"])
def test_lossy_codecs_lose_more_at_higher_level(codec: str) -> None:
    x = white()
    loss = [float(np.mean((round_trip(x, SR, codec, q) - x) ** 2)) for q in (0.1, 0.99)]
    assert loss[1] > 2 * loss[0]


# ----------------------------------------------------------------------------------------------------
# alignment


@pytest.mark.parametrize("codec,compression", [("mp3", 0.2), ("mp3", 0.9), ("mp3", 0.95), ("ogg", 0.2), ("ogg", 0.9),
                                           ("opus", 0.2), ("opus", 0.9), ("mulaw", 0), ("alaw", 0), ("telephone", 0)])
def test_output_lines_up_with_input(codec: str, compression: float) -> None:
    x = voiced()
    y = round_trip(x, SR, codec, compression)
    assert np.corrcoef(x, y)[0, 1] > 0.9  # measured >= 0.99; unaligned MP3 at 0.9-0.95 gives about 0.05


def test_align_undoes_a_delay_and_an_advance() -> None:
    x = white(4000)
    delayed = np.r_[np.zeros(1105, np.float32), x, np.zeros(559, np.float32)]
    np.testing.assert_array_equal(align(delayed, x), x)
    advanced = x[100:]
    np.testing.assert_array_equal(align(advanced, x), np.r_[np.zeros(100, np.float32), x[100:]])
    np.testing.assert_array_equal(align(np.zeros(5000, np.float32), x), np.zeros(4000, np.float32))


# ----------------------------------------------------------------------------------------------------
# spec


def test_spec_defaults_and_choices() -> None:
    assert build("codec") == Codec(codecs.available_codecs(), (0.2, 0.9))
    assert build("codec:codecs=mulaw/MP3,compression=0.5-0.95") == Codec(("mulaw", "mp3"), (0.5, 0.95))
    assert build("telephone") == Codec(("telephone",))
    assert build("opus:compression=0.7") == Codec(("opus",), (0.7, 0.7))
    assert build("codec:codecs=mp3/mp3/ogg").codecs == ("mp3", "mp3", "ogg")  # a repeated name weighs more


@pytest.mark.parametrize("spec,message", [
    ("codec:codecs=flac", r"'codec:codecs=flac'.*codecs='flac': choose from mp3/ogg/opus/mulaw/alaw/telephone"),
    ("codec:compression=0.5-1.5", r"'codec:compression=0.5-1.5'.*compression=0.5-1.5 must be lo-hi with 0 <= lo <= hi <= 1"),
    ("codec:compression=-0.1", r"compression=-0.1 must be"),
    ("codec:compression=0.9-0.2", r"compression=0.9-0.2 must be"),
    ("codec:compression=good", r"compression='good' is not a range"),
    ("codec:bitrate=32", r"unknown argument 'bitrate'"),
    ("mulaw:compression=0.5", r"'mulaw:compression=0.5'.*unknown argument 'compression'"),
])
def test_bad_specs_name_the_part(spec: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        build(spec)


def test_unavailable_codec_is_a_spec_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codecs, "codec_available", lambda c: c != "opus")
    with pytest.raises(SpecError, match=r"'codec:codecs=opus/mp3'.*opus: this libsndfile .* cannot encode OGG/OPUS"):
        build("codec:codecs=opus/mp3")
    with pytest.raises(SpecError, match="cannot encode OGG/OPUS"):
        build("opus")
    assert "opus" not in build("codec").codecs  # the default takes what is there


def test_installed_libsndfile_has_every_codec() -> None:
    # soundfile 0.14's wheel bundles libsndfile 1.2.2 with MP3, Vorbis and Opus; a system library may lack some.
    assert codecs.available_codecs() == CODECS


@pytest.mark.skipif(any(importlib.util.find_spec(f"lowmem_aasist.augment.{m}") is None
                        for m in ("folders", "rawboost", "warp")), reason="sibling augmentation modules not written yet")
def test_through_parse_spec() -> None:
    from lowmem_aasist.augment.base import parse_spec

    chain = parse_spec("codec:codecs=mulaw,p=1+telephone")
    x = white()
    y = chain(x, SR, np.random.default_rng(0))
    assert y.shape == x.shape and band_db(x, y, 4200, 8000) < -40
    with pytest.raises(SpecError, match=r"'codec:codecs=gsm'"):
        parse_spec("codec:codecs=gsm")
