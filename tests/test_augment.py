"""Augmentation: the spec language, the chain's random streams, RawBoost's algorithms, and the data path."""

from __future__ import annotations

import numpy as np
import pytest

from lowmem_aasist.augment.base import Chain, SpecError, item_rng, parse_spec
from lowmem_aasist.augment.rawboost import RawBoost, RawBoostParams, band_stop, notch_filter
from lowmem_aasist.cli import main

SR = 16_000


def _speech_like(n: int = 16_000, seed: int = 0) -> np.ndarray:
    """A few harmonics under a slow envelope, peak 0.3: loud enough to matter, quiet enough that nothing clips."""
    t = np.arange(n) / SR
    rng = np.random.default_rng(seed)
    x = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) / k for k, f in enumerate((180, 360, 540, 1100), 1))
    x *= 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


@pytest.mark.parametrize("spec, why", [
    ("bogus", "unknown augmentation 'bogus'"),
    ("rawboost:9", "algo=9 must lie in [1, 8]"),
    ("rawboost:five", "is not a whole number"),
    ("rawboost:5,p=1.5", "p=1.5 must lie in [0, 1]"),
    ("rawboost:5,colour=red", "unknown argument 'colour'"),
    ("rawboost:5,snr=20-10", "snr=20-10 must be lo-hi"),
    ("rawboost:5++rawboost:3", "an empty part"),
    ("rawboost:5,algo=3", "algo given twice"),
])
def test_a_bad_spec_names_its_part_in_one_line(spec, why):
    with pytest.raises(SpecError) as err:
        parse_spec(spec)
    message = str(err.value)
    assert why in message and "\n" not in message and message.startswith("--augment")


def test_fit_refuses_a_bad_spec_with_exit_2_and_one_line(capsys, tmp_path):
    assert main(["fit", "--demo", "--demo-dir", str(tmp_path / "d"), "--augment", "rawboost:0", "--out",
                 str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'rawboost:0'" in err and "[1, 8]" in err
    assert not (tmp_path / "d").exists()  # refused before generating or indexing anything


def test_none_and_empty_specs_are_off_and_parts_keep_their_order():
    assert not parse_spec("none") and not parse_spec("") and not parse_spec(" off ")
    chain = parse_spec("rawboost:3,p=0.25 + rawboost:algo=1,snr=5-15")
    assert [(s.name, s.p) for s in chain.steps] == [("rawboost", 0.25), ("rawboost", 1.0)]
    assert [s.augment.algo for s in chain.steps] == [3, 1] and chain.steps[1].augment.params.snr == (5.0, 15.0)


def test_a_step_that_does_not_apply_leaves_the_input_and_the_later_draws_alone():
    x = _speech_like()
    assert np.array_equal(parse_spec("rawboost:4,p=0")(x, SR, item_rng(1, 0, 0)), x)
    # Whether the first step applies or not, the second draws the same numbers: its output is the same function of
    # its input. With the first step off, both chains see the clean input, so they must agree exactly.
    a = parse_spec("rawboost:2,p=0+rawboost:3")(x, SR, item_rng(1, 0, 0))
    b = parse_spec("rawboost:1,p=0+rawboost:3")(x, SR, item_rng(1, 0, 0))
    assert np.array_equal(a, b) and not np.array_equal(a, x)
    # A first step that applies as the identity (0 dB) must not shift the second's draws either.
    applied = parse_spec("gain:db=0-0+rawboost:3")(x, SR, item_rng(1, 0, 0))
    skipped = parse_spec("gain:db=0-0,p=0+rawboost:3")(x, SR, item_rng(1, 0, 0))
    assert np.array_equal(applied, skipped)


@pytest.mark.parametrize("algo", range(1, 9))
def test_every_algorithm_keeps_length_and_finiteness_and_is_a_function_of_its_seed(algo):
    x = _speech_like()
    aug = RawBoost(algo)
    y = aug(x, SR, np.random.default_rng(5))
    assert y.shape == x.shape and y.dtype == np.float32 and np.all(np.isfinite(y))
    assert np.array_equal(y, aug(x, SR, np.random.default_rng(5)))
    assert not np.array_equal(y, aug(x, SR, np.random.default_rng(6)))
    assert not np.allclose(y, x, atol=1e-3)


def test_band_stop_passes_both_ends_and_stops_its_band():
    h = band_stop(51, 1000.0, 2000.0, SR)
    response = np.abs(np.fft.rfft(h, SR))  # 1 Hz bins
    assert response[0] == pytest.approx(1.0, abs=1e-9)  # unit gain at 0 Hz by construction
    assert response[1500] < 0.05 and response[7999] > 0.95 and response[4000] > 0.95
    assert np.allclose(h, h[::-1])  # linear phase


def test_notch_filter_peak_gain_is_the_drawn_gain():
    params = RawBoostParams()
    b = notch_filter(np.random.default_rng(0), params.bands, -7.0, -7.0, SR)
    peak = np.abs(np.fft.rfft(b, 1024)[:512]).max()
    assert 20 * np.log10(peak) == pytest.approx(-7.0, abs=1e-9)
    assert len(b) % 2 == 1 and 5 * 11 - 4 <= len(b) <= 5 * 99 - 4  # five odd filters of 11-99 taps in cascade


@pytest.mark.parametrize("snr", [(10.0, 40.0), (3.0, 6.0)])
def test_ssi_adds_noise_at_an_snr_within_its_range(snr):
    x = _speech_like()
    aug = RawBoost(3, RawBoostParams(snr=snr))
    measured = []
    for seed in range(20):
        y = aug(x, SR, np.random.default_rng(seed)).astype(np.float64)
        noise = y - x
        measured.append(10 * np.log10(np.sum(x.astype(np.float64) ** 2) / np.sum(noise**2)))
    # float32 output rounding moves the measured SNR by far less than 0.01 dB at these levels.
    assert snr[0] - 0.01 <= min(measured) and max(measured) <= snr[1] + 0.01
    assert max(measured) - min(measured) > 0.3 * (snr[1] - snr[0])  # drawn across the range, not stuck


def test_isd_touches_at_most_its_share_of_samples():
    x = _speech_like()  # peak 0.3: ISD's gain of up to 3x cannot push it past 1, so nothing is renormalised
    for seed in range(10):
        y = RawBoost(2)(x, SR, np.random.default_rng(seed))
        changed = np.count_nonzero(y != x)
        assert changed <= 0.10 * len(x)
    assert changed > 0


def test_train_items_are_augmented_the_same_in_any_order_and_by_epoch(tmp_path):
    import dataclasses

    import soundfile as sf

    from lowmem_aasist.data.dataset import TrainCrops
    from lowmem_aasist.data.split import make_split

    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"u{i}.flac"))
        sf.write(paths[-1], _speech_like(6000, seed=i), SR, subtype="PCM_16")
    split = make_split("train", "t", ["a", "b", "c"], paths, [1, 0, 0], ["-", "A01", "A02"])
    split = dataclasses.replace(split, frames=np.full(3, 6000, np.int32), samplerate=np.full(3, SR, np.int32))
    plain = TrainCrops(split, 4000, seed=3)
    augmented = TrainCrops(split, 4000, seed=3, augment=parse_spec("rawboost:5"))
    off = TrainCrops(split, 4000, seed=3, augment=parse_spec("rawboost:5,p=0"))
    for key in [(2, 1), (0, 1), (2, 1), (1, 0)]:
        _, clean, _ = plain[key]
        _, wave, _ = augmented[key]
        assert np.array_equal(wave, augmented[key][1])  # any order, any worker: the same draws
        assert np.array_equal(off[key][1], clean)  # augmentation moves no crop
        assert not np.array_equal(wave, clean)
    # A new epoch, new draws: with the crop the whole clip, only the augmentation can tell epochs apart.
    whole = TrainCrops(split, 6000, seed=3, augment=parse_spec("rawboost:5"))
    assert np.array_equal(TrainCrops(split, 6000, seed=3)[(0, 1)][1], TrainCrops(split, 6000, seed=3)[(0, 2)][1])
    assert not np.array_equal(whole[(0, 1)][1], whole[(0, 2)][1])
    assert not np.array_equal(whole[(0, 1)][1], whole[(1, 1)][1])  # and another item, other draws
    assert isinstance(augmented.augment, Chain)


def test_augment_preview_writes_versions_and_spectrograms(tmp_path, capsys):
    import soundfile as sf

    audio = tmp_path / "clip.wav"
    sf.write(audio, np.stack([_speech_like(8000), _speech_like(8000, 1)], axis=1), 22_050)  # stereo, another rate
    out = tmp_path / "preview"
    assert main(["augment-preview", str(audio), "--augment", "rawboost:4", "--n", "3", "--out", str(out)]) == 0
    flacs = sorted(out.glob("clip.aug*.flac"))
    assert [p.name for p in flacs] == ["clip.aug0.flac", "clip.aug1.flac", "clip.aug2.flac"]
    first = [sf.read(p, dtype="float32")[0] for p in flacs]
    assert all(x.ndim == 1 and len(x) == len(first[0]) for x in first)  # 16 kHz mono, the clip's length
    assert not np.array_equal(first[0], first[1])
    png = out / "clip.augment.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "wrote" in capsys.readouterr().out
    # The same command writes the same versions.
    assert main(["augment-preview", str(audio), "--augment", "rawboost:4", "--n", "3", "--out", str(out)]) == 0
    assert all(np.array_equal(sf.read(p, dtype="float32")[0], x) for p, x in zip(flacs, first, strict=True))


@pytest.mark.parametrize("argv, why", [
    (["--augment", "nope"], "unknown augmentation 'nope'"),
    (["--augment", "none"], "nothing to preview"),
    (["--augment", "rawboost:5", "--n", "0"], "--n 0"),
])
def test_augment_preview_refuses_bad_input_in_one_line(tmp_path, capsys, argv, why):
    import soundfile as sf

    audio = tmp_path / "clip.flac"
    sf.write(audio, _speech_like(4000), SR)
    assert main(["augment-preview", str(audio), *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert why in err and err.count("\n") == 0
    assert main(["augment-preview", str(tmp_path / "missing.flac"), "--augment", "rawboost:5", "--out",
                 str(tmp_path / "o")]) == 2
    assert "missing.flac: no such audio file" in capsys.readouterr().err


def test_a_profile_sets_the_spec_and_a_bad_one_is_refused_naming_the_part(tmp_path):
    from lowmem_aasist.config import ConfigError, load_config

    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text('[data]\naugment = "rawboost:5+codec:codecs=mulaw/alaw,p=0.5"\n')
    bad.write_text('[data]\naugment = "rawboost:5+codec:codecs=wma"\n')
    assert load_config(good).data.augment == "rawboost:5+codec:codecs=mulaw/alaw,p=0.5"
    assert load_config(good, {"data.augment": ""}).data.augment == ""  # --augment none
    with pytest.raises(ConfigError, match="'codec:codecs=wma'"):
        load_config(bad)
