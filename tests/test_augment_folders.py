"""noise and reverb: folder indexing, exact SNR, RIR alignment and decay, bad folders, bad files mid-run."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lowmem_aasist.augment import folders
from lowmem_aasist.augment.base import SpecError, build_step, item_rng, parse_spec

SR = 16_000


def build(part: str):
    """One spec part built as parse_spec builds it (without importing the other augmentation modules)."""
    return build_step(part).augment


def tone(hz: float, seconds: float, sr: int = SR, amp: float = 0.3) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * hz * np.arange(round(seconds * sr)) / sr)).astype(np.float32)


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = round(seconds * SR)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * np.arange(n) / SR)
    return (0.1 * envelope * rng.standard_normal(n)).astype(np.float32)


def snr_db(x: np.ndarray, y: np.ndarray) -> float:
    x64, n64 = x.astype(np.float64), y.astype(np.float64) - x.astype(np.float64)
    return 10 * math.log10(np.mean(x64**2) / np.mean(n64**2))


def peaks_hz(y: np.ndarray, sr: int = SR, floor: float = 0.05) -> set[int]:
    """Frequencies (rounded to 10 Hz) whose spectral peak is within 26 dB of the strongest."""
    s = np.abs(np.fft.rfft(y * np.hanning(y.size)))
    bins = np.flatnonzero((s > floor * s.max()) & (s >= np.roll(s, 1)) & (s >= np.roll(s, -1)))
    return {int(round(b * sr / y.size, -1)) for b in bins}


@pytest.fixture
def noise_dir(tmp_path: Path) -> Path:
    """Noise files of every awkward kind: longer and shorter than an item, FLAC, stereo, 8 kHz, nested."""
    root = tmp_path / "noises"
    (root / "a" / "b").mkdir(parents=True)
    rng = np.random.default_rng(1)
    sf.write(root / "long.wav", 0.05 * rng.standard_normal(6 * SR).astype(np.float32), SR)
    sf.write(root / "a" / "short.flac", 0.2 * rng.standard_normal(SR // 3).astype(np.float32), SR)
    sf.write(root / "a" / "b" / "stereo.wav", 0.1 * rng.standard_normal((2 * SR, 2)).astype(np.float32), SR)
    sf.write(root / "a" / "narrow.wav", 0.1 * rng.standard_normal(8000 * 3).astype(np.float32), 8000)
    return root


@pytest.fixture
def musan(tmp_path: Path) -> Path:
    """The MUSAN layout, each kind a tone of its own frequency so the added noise shows where it came from."""
    root = tmp_path / "musan"
    for kind, freqs in (("noise", (300,)), ("music", (1300,)), ("speech", (2100, 2700, 3300))):
        for i, hz in enumerate(freqs):
            (root / kind / "src").mkdir(parents=True, exist_ok=True)
            sf.write(root / kind / "src" / f"{kind}{i}.wav", tone(hz, 5.0, amp=0.1 * (i + 1)), SR)
    return root


# ------------------------------------------------------------------------------------------------- noise


def test_noise_keeps_length_and_is_a_pure_function_of_the_seed(noise_dir: Path) -> None:
    aug = build(f"noise:dir={noise_dir},snr=0-20")
    assert len(aug.index) == 4 and aug.index.skipped == 0
    x = speech_like(4.0)
    outs = []
    for seed in range(12):  # enough draws to pick every file, the short (tiled) one included
        y = aug(x, SR, np.random.default_rng(seed))
        assert y.shape == x.shape and y.dtype == np.float32 and np.all(np.isfinite(y))
        assert not np.array_equal(y, x)
        outs.append(y)
    for seed, y in enumerate(outs):  # every seed: a file drawn outside rng would match by chance 1 time in 4
        assert np.array_equal(y, aug(x, SR, np.random.default_rng(seed)))
    assert not np.array_equal(outs[3], outs[4])


def test_noise_is_added_at_the_requested_snr(noise_dir: Path) -> None:
    aug = build(f"noise:dir={noise_dir},snr=10-10")
    x = speech_like(4.0)
    for seed in range(10):
        assert abs(snr_db(x, aug(x, SR, np.random.default_rng(seed))) - 10.0) < 0.5
    # A range draws across it, not at one end.
    spread = build(f"noise:dir={noise_dir},snr=0-30")
    measured = [snr_db(x, spread(x, SR, np.random.default_rng(seed))) for seed in range(20)]
    assert min(measured) >= -0.5 and max(measured) <= 30.5 and np.ptp(measured) > 10


def test_noise_at_another_rate_and_on_tiny_items(noise_dir: Path, musan: Path) -> None:
    aug = build(f"noise:dir={noise_dir},snr=10-10")
    x = speech_like(2.0)[::2].copy()  # 2 s at 8 kHz
    y = aug(x, 8000, np.random.default_rng(0))
    assert y.shape == x.shape and abs(snr_db(x, y) - 10.0) < 0.5
    # The 16 kHz noise file is resampled to the item's rate: its 1300 Hz tone stays at 1300 Hz.
    music = build(f"noise:dir={musan},kind=music,snr=0-0")
    assert peaks_hz(music(x, 8000, np.random.default_rng(0)) - x, sr=8000) == {1300}
    for n in (1, 7):
        tiny = np.full(n, 0.1, dtype=np.float32)
        assert aug(tiny, SR, np.random.default_rng(0)).shape == (n,)
    silent = np.zeros(SR, dtype=np.float32)
    assert np.array_equal(aug(silent, SR, np.random.default_rng(0)), silent)  # no signal power, no noise


def test_kind_picks_musan_subfolders_and_babble_mixes_talkers(musan: Path) -> None:
    x = tone(700, 4.0)
    music = build(f"noise:dir={musan},kind=music,snr=0-0")
    assert len(music.index) == 1
    for seed in range(3):
        residual = music(x, SR, np.random.default_rng(seed)) - x
        assert peaks_hz(residual) == {1300}
    assert len(build(f"noise:dir={musan},kind=noise/speech").index) == 4

    babble = build(f"noise:dir={musan},kind=speech,babble=3-3,snr=5-5")
    talkers = []
    for seed in range(6):
        y = babble(x, SR, np.random.default_rng(seed))
        assert abs(snr_db(x, y) - 5.0) < 0.5
        found = peaks_hz(y - x)
        assert found <= {2100, 2700, 3300}
        talkers.append(len(found))
    assert max(talkers) >= 2  # one talker per item would be noise, not babble


def test_silent_windows_are_redrawn_and_an_all_silent_folder_leaves_items_alone(tmp_path: Path) -> None:
    root = tmp_path / "n"
    root.mkdir()
    sf.write(root / "silence.wav", np.zeros(2 * SR, dtype=np.float32), SR)
    only_silence = build(f"noise:dir={root}")
    x = speech_like(1.0)
    assert np.array_equal(only_silence(x, SR, np.random.default_rng(0)), x)
    sf.write(root / "hum.wav", tone(100, 2.0), SR)
    aug = build(f"noise:dir={root},snr=10-10")
    for seed in range(8):
        assert abs(snr_db(x, aug(x, SR, np.random.default_rng(seed))) - 10.0) < 0.5


def test_unreadable_files_are_skipped_at_index_time_and_redrawn_at_read_time(noise_dir: Path) -> None:
    (noise_dir / "broken.wav").write_bytes(b"RIFF but not really audio")
    (noise_dir / "notes.txt").write_text("not audio, not indexed")
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable audio file"):
        aug = build(f"noise:dir={noise_dir},snr=10-10")
    assert len(aug.index) == 4 and aug.index.skipped == 1

    # Files that go bad after indexing: one overwritten with garbage, one truncated below the item length.
    (noise_dir / "long.wav").write_bytes(b"garbage")
    sf.write(noise_dir / "a" / "b" / "stereo.wav", np.zeros((100, 2), dtype=np.float32), SR)
    x = speech_like(1.0)
    with pytest.warns(RuntimeWarning, match="noise: skipping"):
        for seed in range(10):
            y = aug(x, SR, np.random.default_rng(seed))
            assert abs(snr_db(x, y) - 10.0) < 0.5
    assert aug._drawer.read_failures > 0


def test_the_index_holds_paths_and_lengths_not_audio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "many"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(50):
        sf.write(root / f"n{i:02d}.wav", (0.1 * rng.standard_normal(SR)).astype(np.float32), SR, subtype="FLOAT")
    audio_bytes = 50 * SR * 4

    def no_decoding(*args, **kwargs):
        raise AssertionError("indexing decoded audio")

    monkeypatch.setattr(folders, "read_segment", no_decoding)
    monkeypatch.setattr(folders, "read_audio", no_decoding, raising=False)
    aug = build(f"noise:dir={root}")
    monkeypatch.undo()
    assert len(aug.index) == 50
    assert sorted(aug.index.lengths.tolist()) == [SR] * 50
    assert {Path(aug.index.path(i)).name for i in range(50)} == {f"n{i:02d}.wav" for i in range(50)}
    # Everything the object keeps, as a worker would receive it: ~30 bytes a file, against 64 KB of audio a file.
    kept = len(pickle.dumps(aug))
    assert kept < 50 * 64 + 4096 < audio_bytes // 100
    arrays = [v for v in vars(aug.index).values() if isinstance(v, np.ndarray)]
    assert arrays and all(a.dtype != np.float32 and a.dtype != np.float64 for a in arrays)
    # Built once: calls read only a window, never re-list the folder.
    monkeypatch.setattr(folders, "list_audio_files", no_decoding)
    assert aug(speech_like(0.5), SR, np.random.default_rng(0)).shape == (SR // 2,)


# ------------------------------------------------------------------------------------------------ reverb


def synthetic_rir(seconds: float, sr: int, delay: int, rt60: float, sign: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = round(seconds * sr)
    t = np.arange(n) / sr
    h = 0.05 * rng.standard_normal(n) * np.exp(-6.9 * t / rt60)  # -60 dB at rt60; direct-to-reverberant ~0 dB
    h[:delay + 1] = 0.0
    h[delay] = sign
    return (0.5 * h).astype(np.float32)


@pytest.fixture
def rir_dir(tmp_path: Path) -> Path:
    root = tmp_path / "RIRS_NOISES" / "simulated_rirs"
    (root / "room1").mkdir(parents=True)
    (root / "room2").mkdir(parents=True)
    sf.write(root / "room1" / "a.wav", synthetic_rir(0.8, SR, 300, 0.4, 1.0, 0), SR, subtype="FLOAT")
    sf.write(root / "room1" / "b.flac", synthetic_rir(1.8, SR, 120, 0.6, -1.0, 1), SR)  # inverted, > 1 s kept
    sf.write(root / "room2" / "c.wav", synthetic_rir(0.5, 8000, 80, 0.3, 1.0, 2), 8000, subtype="FLOAT")
    return root


def burst_then_silence() -> np.ndarray:
    """1 s of noise, then 1 s of silence: the silence is where a reverb tail must show."""
    x = np.zeros(2 * SR, dtype=np.float32)
    x[:SR] = speech_like(1.0, seed=5) * 3
    return x


def test_reverb_keeps_length_level_and_timing_and_adds_a_decaying_tail(rir_dir: Path) -> None:
    aug = build(f"reverb:dir={rir_dir}")
    assert len(aug.index) == 3
    x = burst_then_silence()
    x64 = x.astype(np.float64)
    chosen = set()
    for seed in range(12):
        y = aug(x, SR, np.random.default_rng(seed))
        assert y.shape == x.shape and y.dtype == np.float32 and np.all(np.isfinite(y))
        y64 = y.astype(np.float64)
        # Level: RMS matched to the input's.
        assert abs(math.sqrt(np.mean(y64**2)) / math.sqrt(np.mean(x64**2)) - 1) < 1e-4
        # Timing: aligned on the direct path, so the cross-correlation peaks at lag 0, positively.
        spectrum = np.fft.rfft(y64, 4 * SR) * np.conj(np.fft.rfft(x64, 4 * SR))
        xcorr = np.fft.irfft(spectrum, 4 * SR)
        lags = np.concatenate((xcorr[-1000:], xcorr[:1001]))
        assert int(np.argmax(lags)) - 1000 == 0
        assert np.corrcoef(x64[:SR], y64[:SR])[0, 1] > 0.3
        # Decay: the input is silent after 1 s; the output carries a tail there, and it dies away.
        tail = [np.sum(y64[SR + i * 2400:SR + (i + 1) * 2400] ** 2) for i in range(3)]
        assert tail[0] > 1e-3 * np.sum(y64**2)
        assert tail[0] > 2 * tail[1] > 4 * tail[2]
        chosen.add(round(float(tail[0] / np.sum(y64**2)), 6))
    assert len(chosen) == 3  # seeds 0-11 draw each of the three RIRs
    assert np.array_equal(aug(x, SR, np.random.default_rng(2)), aug(x, SR, np.random.default_rng(2)))


def decay_db(y: np.ndarray, sr: int, end: int) -> float:
    """How far the energy falls between the first and second 100 ms after the input stops at ``end``."""
    w = sr // 10
    return 10 * math.log10(np.sum(y[end:end + w] ** 2.0) / np.sum(y[end + w:end + 2 * w] ** 2.0))


def test_reverb_is_causal_and_its_decay_does_not_depend_on_the_rate(tmp_path: Path) -> None:
    root = tmp_path / "one"
    root.mkdir()
    sf.write(root / "r.wav", synthetic_rir(1.0, SR, 200, 0.4, 1.0, 3), SR, subtype="FLOAT")
    aug = build(f"reverb:dir={root}")
    # Silence, then noise: nothing may come out before the input starts (no delay, no circular wrap-around).
    x = burst_then_silence()[::-1].copy()
    y = aug(x, SR, np.random.default_rng(0)).astype(np.float64)
    assert np.sum(y[:SR - 20] ** 2) < 1e-9 * np.sum(y**2)
    # RT60 0.4 s: -60 dB in 0.4 s is about -15 dB per 100 ms, at 16 kHz and at 8 kHz (the RIR is resampled).
    burst = burst_then_silence()
    at_16k = decay_db(aug(burst, SR, np.random.default_rng(0)), SR, SR)
    at_8k = decay_db(aug(burst[::2].copy(), 8000, np.random.default_rng(0)), 8000, 8000)
    assert 10 < at_16k < 20 and abs(at_8k - at_16k) < 3


def test_reverb_on_silence_and_tiny_items(rir_dir: Path, tmp_path: Path) -> None:
    aug = build(f"reverb:dir={rir_dir}")
    silent = np.zeros(500, dtype=np.float32)
    assert np.array_equal(aug(silent, SR, np.random.default_rng(0)), silent)
    for n in (1, 33):
        assert aug(np.ones(n, dtype=np.float32), SR, np.random.default_rng(0)).shape == (n,)
    # Sound only after the 0.5 s where the direct path is looked for: no impulse response, the item is left alone.
    late = tmp_path / "late"
    late.mkdir()
    h = np.zeros(SR, dtype=np.float32)
    h[SR - 100] = 0.5
    sf.write(late / "late.wav", h, SR)
    x = speech_like(1.0)
    assert np.array_equal(build(f"reverb:dir={late}")(x, SR, np.random.default_rng(0)), x)


def test_through_parse_spec_and_pickled_like_a_worker_receives_it(noise_dir: Path, rir_dir: Path) -> None:
    chain = parse_spec(f"reverb:dir={rir_dir},p=0.5+noise:dir={noise_dir},snr=5-20")
    assert [s.name for s in chain.steps] == ["reverb", "noise"]
    x = speech_like(4.0)
    y = chain(x, SR, item_rng(1, 0, 5))
    assert y.shape == x.shape and np.array_equal(y, pickle.loads(pickle.dumps(chain))(x, SR, item_rng(1, 0, 5)))


# --------------------------------------------------------------------------------------------- bad specs


@pytest.mark.parametrize("part, why", [
    ("noise:dir={missing}", "no such folder"),
    ("noise:snr=5-20", "needs dir=FOLDER"),
    ("noise:dir={empty}", "no readable audio file"),
    ("noise:dir={junk}", "1 unreadable file(s) skipped"),
    ("noise:dir={good},kind=music", "no readable audio file below a subfolder named music"),
    ("noise:dir={good},kind=crowd", "choose from noise/music/speech"),
    ("noise:dir={good},snr=20-5", "snr=20-5 must be lo-hi"),
    ("noise:dir={good},snr=loud", "not a range"),
    ("noise:dir={good},babble=2.5-4", "whole numbers of talkers"),
    ("reverb:dir={missing}", "no such folder"),
    ("reverb:dir={empty}", "no readable audio file"),
    ("reverb:dir={good},snr=5", "unknown argument 'snr'"),
])
def test_bad_specs_raise_one_line_naming_the_part(tmp_path: Path, part: str, why: str) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no audio here")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.wav").write_bytes(b"not a wav")
    (tmp_path / "good").mkdir()
    sf.write(tmp_path / "good" / "n.wav", tone(200, 0.5), SR)
    part = part.format(**{k: tmp_path / k for k in ("missing", "empty", "junk", "good")})
    with pytest.raises(SpecError) as caught:
        build(part)
    message = str(caught.value)
    assert f"part {part!r}" in message and why in message and "\n" not in message
