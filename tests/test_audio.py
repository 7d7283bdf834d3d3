"""Tests for lowmem_aasist.audio: every file is generated into tmp_path with soundfile."""

from __future__ import annotations

import os
import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from lowmem_aasist import audio
from lowmem_aasist.audio import (
    EVAL_SAMPLES,
    SAMPLE_RATE,
    AudioError,
    AudioInfo,
    audio_info,
    eval_input,
    iter_windows,
    list_audio_files,
    read_audio,
    read_segment,
    tile,
)

# ----------------------------------------------------------------------------------------------------
# helpers


def sine(freq: float, n: int, sr: int, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(n) / sr)).astype(np.float32)


def noise(n: int, seed: int = 0, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (0.2 * rng.standard_normal((n, channels))).astype(np.float32)
    return x[:, 0] if channels == 1 else x


def write(path: Path, data: np.ndarray, sr: int = SAMPLE_RATE, subtype: str | None = None) -> Path:
    sf.write(path, data, sr, subtype=subtype)
    return path


def dominant_freq(x: np.ndarray, sr: int = SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spectrum)])


def expected_starts(length: int, window: int, hop: int) -> list[int]:
    """Window starts per the documented rule, written independently of the implementation."""
    if length < window:
        return [0]
    starts = list(range(0, length - window + 1, hop))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


class ReadSpy:
    """Wraps SoundFile.read to record how many frames each call asked for."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.requests: list[int] = []
        original = sf.SoundFile.read

        def spy(f, frames=-1, *args, **kwargs):
            self.requests.append(frames if frames >= 0 else f.frames - f.tell())
            return original(f, frames, *args, **kwargs)

        monkeypatch.setattr(sf.SoundFile, "read", spy)


# ----------------------------------------------------------------------------------------------------
# reading whole files


def test_read_wav_float_is_exact(tmp_path):
    x = noise(12_345)
    p = write(tmp_path / "a.wav", x, subtype="FLOAT")
    y = read_audio(p)
    assert y.dtype == np.float32 and y.ndim == 1
    np.testing.assert_array_equal(y, x)
    assert audio_info(p) == AudioInfo(frames=12_345, samplerate=SAMPLE_RATE, channels=1)


def test_read_accepts_str_and_path(tmp_path):
    p = write(tmp_path / "a.wav", noise(1000))
    np.testing.assert_array_equal(read_audio(str(p)), read_audio(p))


@pytest.mark.parametrize("ext", ["wav", "flac"])
def test_read_pcm16_matches_soundfile(tmp_path, ext):
    x = sine(440, 20_000, SAMPLE_RATE)
    p = write(tmp_path / f"a.{ext}", x, subtype="PCM_16")
    y = read_audio(p)
    assert y.dtype == np.float32 and y.shape == (20_000,)
    # What the reference pipeline computes: a plain float32 decode.
    np.testing.assert_array_equal(y, sf.read(p, dtype="float32")[0])
    np.testing.assert_allclose(y, x, atol=1e-4)


def test_read_ogg(tmp_path):
    x = sine(1000, 32_000, SAMPLE_RATE)
    p = write(tmp_path / "a.ogg", x)
    y = read_audio(p)
    assert y.dtype == np.float32 and y.shape == (32_000,)
    assert abs(dominant_freq(y) - 1000) < 5


@pytest.mark.parametrize("sr", [44_100, 8_000, 22_050, 48_000])
def test_resampled_to_16k(tmp_path, sr):
    n = sr + 123  # an awkward length, to exercise the rounding of the output length
    p = write(tmp_path / "a.wav", sine(1000, n, sr), sr=sr, subtype="FLOAT")
    y = read_audio(p)
    assert y.dtype == np.float32
    assert len(y) == audio_info(p).frames_16k == round(n * SAMPLE_RATE / sr)
    assert abs(dominant_freq(y) - 1000) < 5
    # Amplitude survives resampling (away from the filter's edge effects).
    assert abs(np.abs(y[1000:-1000]).max() - 0.5) < 0.01


@pytest.mark.parametrize("sr", [8_000, 11_025, 22_050, 32_000, 44_100, 48_000, 96_000, 12_345])
def test_frames_16k_matches_soxr_output_length(sr):
    for n in (1, 2, 3, 7, 99, 1000, 44_101, 160_003):
        expected = len(soxr.resample(np.zeros(n, dtype=np.float32), sr, SAMPLE_RATE))
        assert AudioInfo(frames=n, samplerate=sr, channels=1).frames_16k == expected, (sr, n)


def test_stereo_is_mixed_to_mono(tmp_path):
    x = noise(5000, channels=2)
    p = write(tmp_path / "s.wav", x, subtype="FLOAT")
    y = read_audio(p)
    assert y.shape == (5000,) and y.dtype == np.float32
    np.testing.assert_allclose(y, (x[:, 0] + x[:, 1]) / 2, rtol=1e-6, atol=1e-7)
    assert audio_info(p).channels == 2


def test_stereo_resampled(tmp_path):
    n = 44_100
    x = np.stack([sine(500, n, 44_100), sine(500, n, 44_100)], axis=1)
    p = write(tmp_path / "s.flac", x, sr=44_100)
    y = read_audio(p)
    assert y.ndim == 1 and len(y) == 16_000
    assert abs(dominant_freq(y) - 500) < 5


# ----------------------------------------------------------------------------------------------------
# read_segment


@pytest.mark.parametrize("ext,subtype", [("wav", "FLOAT"), ("wav", "PCM_16"), ("flac", "PCM_24")])
def test_read_segment_equals_slice_for_16k(tmp_path, ext, subtype):
    n = 50_001
    p = write(tmp_path / f"a.{ext}", noise(n), subtype=subtype)
    full = read_audio(p)
    info = audio_info(p)
    for start, frames in [(0, 1), (0, n), (17, 4096), (25_000, 12_345), (n - 300, 300), (n, 0)]:
        seg = read_segment(p, start, frames)
        assert seg.dtype == np.float32
        np.testing.assert_array_equal(seg, full[start : start + frames])
        np.testing.assert_array_equal(read_segment(p, start, frames, info=info), seg)


@pytest.mark.parametrize("sr", [44_100, 8_000, 22_050, 48_000])
def test_read_segment_close_to_slice_when_resampled(tmp_path, sr):
    n = 3 * sr + 77
    p = write(tmp_path / "a.wav", noise(n), sr=sr, subtype="FLOAT")
    full = read_audio(p)
    total = len(full)
    for start, frames in [(0, 3000), (5, 16_000), (20_001, 8000), (total - 4000, 4000), (0, total)]:
        seg = read_segment(p, start, frames)
        assert seg.dtype == np.float32 and seg.shape == (frames,)
        # The covering source range carries enough resampler context that even the window's own edges
        # match the whole-file resampling to float32 rounding.
        np.testing.assert_allclose(seg, full[start : start + frames], rtol=0, atol=1e-5)


def test_read_segment_decodes_only_the_window(tmp_path, monkeypatch):
    p = write(tmp_path / "long.wav", noise(160_000))
    spy = ReadSpy(monkeypatch)
    read_segment(p, 100_000, 1000)
    assert spy.requests == [1000]


def test_read_segment_bounds(tmp_path):
    p = write(tmp_path / "a.wav", noise(1000))
    with pytest.raises(ValueError, match="past the end"):
        read_segment(p, 900, 101)
    with pytest.raises(ValueError):
        read_segment(p, -1, 10)
    with pytest.raises(ValueError):
        read_segment(p, 0, -1)
    assert read_segment(p, 1000, 0).shape == (0,)


def test_read_segment_past_end_when_resampled(tmp_path):
    p = write(tmp_path / "a.wav", noise(44_100), sr=44_100)
    assert audio_info(p).frames_16k == 16_000
    assert read_segment(p, 15_000, 1000).shape == (1000,)
    with pytest.raises(ValueError, match="past the end"):
        read_segment(p, 15_000, 1001)


def test_read_segment_stale_info(tmp_path):
    p = write(tmp_path / "a.wav", noise(1000))
    stale = AudioInfo(frames=2000, samplerate=SAMPLE_RATE, channels=1)
    with pytest.raises(AudioError, match="changed"):
        read_segment(p, 0, 10, info=stale)


# ----------------------------------------------------------------------------------------------------
# tile and eval_input


def reference_pad(x: np.ndarray, max_len: int) -> np.ndarray:
    """The reference AASIST repository's pad(), restated for comparison."""
    if x.shape[0] >= max_len:
        return x[:max_len]
    num_repeats = int(max_len / x.shape[0]) + 1
    return np.tile(x, (1, num_repeats))[:, :max_len][0]


@pytest.mark.parametrize("length", [1, 3, 7, 10, 11, 25])
def test_tile_matches_reference(length):
    x = np.arange(length, dtype=np.float32)
    y = tile(x, 10)
    assert y.shape == (10,) and y.dtype == np.float32
    np.testing.assert_array_equal(y, reference_pad(x, 10))


def test_tile_values():
    x = np.array([1, 2, 3], dtype=np.float32)
    np.testing.assert_array_equal(tile(x, 7), [1, 2, 3, 1, 2, 3, 1])
    np.testing.assert_array_equal(tile(x, 3), [1, 2, 3])
    np.testing.assert_array_equal(tile(x, 2), [1, 2])
    assert tile(x, 0).shape == (0,)


def test_tile_is_pure():
    x = np.arange(5, dtype=np.float32)
    for n in (3, 5, 12):
        y = tile(x, n)
        y[:] = -1
    np.testing.assert_array_equal(x, np.arange(5, dtype=np.float32))


def test_tile_rejects_bad_input():
    with pytest.raises(ValueError):
        tile(np.zeros(0, dtype=np.float32), 5)
    with pytest.raises(ValueError):
        tile(np.zeros((2, 3), dtype=np.float32), 5)
    with pytest.raises(ValueError):
        tile(np.zeros(3, dtype=np.float32), -1)


def test_eval_input_long_16k_reads_only_the_start(tmp_path, monkeypatch):
    p = write(tmp_path / "long.flac", noise(5 * EVAL_SAMPLES))
    full = read_audio(p)
    spy = ReadSpy(monkeypatch)
    y = eval_input(p)
    assert y.dtype == np.float32 and y.shape == (EVAL_SAMPLES,)
    np.testing.assert_array_equal(y, full[:EVAL_SAMPLES])
    assert sum(spy.requests) == EVAL_SAMPLES


def test_eval_input_long_resampled(tmp_path, monkeypatch):
    n = 5 * 44_100
    p = write(tmp_path / "long.wav", noise(n), sr=44_100, subtype="FLOAT")
    full = read_audio(p)
    spy = ReadSpy(monkeypatch)
    y = eval_input(p)
    assert y.shape == (EVAL_SAMPLES,)
    np.testing.assert_allclose(y, full[:EVAL_SAMPLES], rtol=0, atol=1e-5)
    # The first EVAL_SAMPLES plus a little resampler context, not the whole file.
    assert sum(spy.requests) < EVAL_SAMPLES * 44_100 / SAMPLE_RATE + 10_000 < n


@pytest.mark.parametrize("n", [1, 1000, EVAL_SAMPLES - 1, EVAL_SAMPLES])
def test_eval_input_short_is_tiled(tmp_path, n):
    p = write(tmp_path / "short.wav", noise(n), subtype="FLOAT")
    y = eval_input(p)
    assert y.dtype == np.float32 and y.shape == (EVAL_SAMPLES,)
    np.testing.assert_array_equal(y, tile(read_audio(p), EVAL_SAMPLES))


def test_eval_input_short_resampled(tmp_path):
    p = write(tmp_path / "short.wav", noise(8000), sr=8000)
    y = eval_input(p)
    assert y.shape == (EVAL_SAMPLES,)
    np.testing.assert_array_equal(y, tile(read_audio(p), EVAL_SAMPLES))


# ----------------------------------------------------------------------------------------------------
# iter_windows


@pytest.mark.parametrize(
    "length,window,hop,chunk",
    [
        (300, 1000, 500, 700),  # shorter than the window: one tiled window
        (1000, 1000, 500, 700),  # exactly one window
        (1001, 1000, 500, 700),  # one sample over: a final window ending at the end
        (5000, 1000, 500, 700),  # regular windows reach the end exactly
        (5321, 1000, 500, 700),  # many hops plus a final window
        (2100, 1000, 500, 700),  # the file ends exactly on a chunk boundary
        (5200, 1000, 1500, 700),  # hop > window
        (4000, 1000, 1000, 3000),  # hop == window, chunk > window
        (4001, 1000, 300, 50),  # chunk much smaller than window
    ],
)
def test_iter_windows_positions_16k(tmp_path, length, window, hop, chunk):
    p = write(tmp_path / "a.wav", noise(length), subtype="FLOAT")
    full = read_audio(p)
    wins = list(iter_windows(p, window=window, hop=hop, chunk=chunk))
    starts = expected_starts(length, window, hop)
    assert len(wins) == len(starts)
    for w, s in zip(wins, starts, strict=True):
        assert w.dtype == np.float32 and w.shape == (window,)
        if length < window:
            np.testing.assert_array_equal(w, tile(full, window))
        else:
            np.testing.assert_array_equal(w, full[s : s + window])


@pytest.mark.parametrize("length", [EVAL_SAMPLES - 1, EVAL_SAMPLES, EVAL_SAMPLES + 1, 4 * EVAL_SAMPLES + 5])
def test_iter_windows_defaults(tmp_path, length):
    p = write(tmp_path / "a.flac", noise(length))
    full = read_audio(p)
    wins = list(iter_windows(p))
    starts = expected_starts(length, EVAL_SAMPLES, EVAL_SAMPLES // 2)
    assert len(wins) == len(starts)
    if length < EVAL_SAMPLES:
        np.testing.assert_array_equal(wins[0], eval_input(p))
    else:
        np.testing.assert_array_equal(wins[0], eval_input(p))
        for w, s in zip(wins, starts, strict=True):
            np.testing.assert_array_equal(w, full[s : s + EVAL_SAMPLES])


@pytest.mark.parametrize("sr", [44_100, 8_000])
def test_iter_windows_resampled(tmp_path, sr):
    n = 2 * sr + 333
    p = write(tmp_path / "a.wav", noise(n), sr=sr, subtype="FLOAT")
    full = read_audio(p)
    window, hop = 5000, 2000
    wins = list(iter_windows(p, window=window, hop=hop, chunk=3000))
    starts = expected_starts(len(full), window, hop)
    assert len(wins) == len(starts)
    for w, s in zip(wins, starts, strict=True):
        assert w.shape == (window,) and w.dtype == np.float32
        np.testing.assert_allclose(w, full[s : s + window], rtol=0, atol=1e-5)


def test_iter_windows_stereo(tmp_path):
    x = noise(3000, channels=2)
    p = write(tmp_path / "s.wav", x, subtype="FLOAT")
    wins = list(iter_windows(p, window=1000, hop=1000, chunk=512))
    np.testing.assert_array_equal(np.concatenate(wins), read_audio(p))


def test_iter_windows_bad_arguments(tmp_path):
    p = write(tmp_path / "a.wav", noise(100))
    for kwargs in ({"window": 0}, {"hop": 0}, {"chunk": 0}, {"hop": -5}):
        with pytest.raises(ValueError):
            iter_windows(p, **kwargs)


def write_long_file(path: Path, seconds: int, sr: int = SAMPLE_RATE) -> int:
    """Silence with a tone burst every 10 s, written block by block so the test never holds it all."""
    block = np.zeros(10 * sr, dtype=np.float32)
    block[:sr] = sine(440, sr, sr)
    with sf.SoundFile(path, "w", samplerate=sr, channels=1, subtype="PCM_16") as f:
        for _ in range(seconds // 10):
            f.write(block)
    return (seconds // 10) * len(block)


def test_iter_windows_reads_in_chunks_with_bounded_memory(tmp_path, monkeypatch):
    p = tmp_path / "ten_minutes.wav"
    n = write_long_file(p, 600)
    whole_file_bytes = n * 4  # what read_audio would hold: 38.4 MB of float32
    chunk = 16_000 * 10

    spy = ReadSpy(monkeypatch)
    count = 0
    tracemalloc.start()
    try:
        for w in iter_windows(p, chunk=chunk):
            assert w.shape == (EVAL_SAMPLES,)
            count += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert count == len(expected_starts(n, EVAL_SAMPLES, EVAL_SAMPLES // 2))
    assert len(spy.requests) >= n // chunk
    assert max(spy.requests) <= chunk
    # A few chunks and windows at most (the float32 chunk, its mono copy, the window buffer).
    assert peak < 12 * chunk * 4 < whole_file_bytes / 3


def test_iter_windows_resampled_reads_in_chunks(tmp_path, monkeypatch):
    p = tmp_path / "long44k.wav"
    n = write_long_file(p, 60, sr=44_100)
    chunk = 20_000
    spy = ReadSpy(monkeypatch)
    wins = iter_windows(p, chunk=chunk)
    count = sum(1 for _ in wins)
    n16 = audio_info(p).frames_16k
    assert count == len(expected_starts(n16, EVAL_SAMPLES, EVAL_SAMPLES // 2))
    assert max(spy.requests) <= chunk
    assert sum(spy.requests) >= n


# ----------------------------------------------------------------------------------------------------
# bad files


def make_missing(tmp_path: Path) -> Path:
    return tmp_path / "nope.wav"


def make_empty_wav(tmp_path: Path) -> Path:
    return write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32))


def make_zero_bytes(tmp_path: Path) -> Path:
    p = tmp_path / "zero.wav"
    p.write_bytes(b"")
    return p


def make_garbage(tmp_path: Path) -> Path:
    p = tmp_path / "garbage.wav"
    p.write_bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    return p


def make_text_as_wav(tmp_path: Path) -> Path:
    p = tmp_path / "text.wav"
    p.write_text("RIFF but not really\n" * 20)
    return p


def make_nan(tmp_path: Path) -> Path:
    x = noise(EVAL_SAMPLES * 2)
    x[EVAL_SAMPLES // 2] = np.nan
    return write(tmp_path / "nan.wav", x, subtype="FLOAT")


def make_inf(tmp_path: Path) -> Path:
    x = noise(1000)
    x[500] = np.inf  # outside the first 100 samples that the read_segment case reads
    return write(tmp_path / "inf.wav", x, subtype="FLOAT")


def make_directory(tmp_path: Path) -> Path:
    p = tmp_path / "dir.wav"
    p.mkdir()
    return p


BAD_FILES = {
    "missing": (make_missing, "file not found"),
    "empty wav": (make_empty_wav, "empty file (0 samples)"),
    "zero bytes": (make_zero_bytes, "empty file (0 bytes)"),
    "garbage": (make_garbage, "not a readable audio file"),
    "text": (make_text_as_wav, "not a readable audio file"),
    "nan": (make_nan, "contains NaN or Inf samples"),
    "inf": (make_inf, "contains NaN or Inf samples"),
    "directory": (make_directory, "is a directory"),
}

READERS = {
    "read_audio": read_audio,
    "audio_info": audio_info,
    "read_segment": lambda p: read_segment(p, 0, 100),
    "eval_input": eval_input,
    "iter_windows": lambda p: list(iter_windows(p)),
}


def check_audio_error(exc: AudioError, path: Path, reason: str) -> None:
    msg = str(exc)
    assert msg.startswith(f"{path}: "), msg
    assert reason in msg
    assert "\n" not in msg
    assert exc.path == str(path)
    assert reason in exc.reason


@pytest.mark.parametrize("kind", list(BAD_FILES))
@pytest.mark.parametrize("reader", list(READERS))
def test_bad_files_raise_audio_error(tmp_path, kind, reader):
    make, reason = BAD_FILES[kind]
    p = make(tmp_path)
    if kind in ("nan", "inf") and reader in ("audio_info", "read_segment"):
        # The header is fine and the NaN is outside the window read: nothing to complain about.
        READERS[reader](p)
        return
    with pytest.raises(AudioError) as e:
        READERS[reader](p)
    check_audio_error(e.value, p, reason)


def test_nan_inside_segment(tmp_path):
    p = make_nan(tmp_path)
    with pytest.raises(AudioError, match="NaN"):
        read_segment(p, EVAL_SAMPLES // 2 - 10, 20)
    # Resampling must not hide it either.
    x = noise(3000)
    x[1500] = np.nan
    q = write(tmp_path / "nan44k.wav", x, sr=44_100, subtype="FLOAT")
    for fn in (read_audio, eval_input, lambda p: list(iter_windows(p, window=500, hop=250, chunk=700))):
        with pytest.raises(AudioError, match="NaN"):
            fn(q)


def test_iter_windows_open_errors_are_raised_at_the_call(tmp_path):
    with pytest.raises(AudioError, match="file not found"):
        iter_windows(tmp_path / "missing.wav")  # no next() needed


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read anything")
def test_permission_denied(tmp_path):
    p = write(tmp_path / "secret.wav", noise(100))
    p.chmod(0)
    try:
        with pytest.raises(AudioError) as e:
            read_audio(p)
        check_audio_error(e.value, p, "permission denied")
    finally:
        p.chmod(0o644)


def test_permission_checks_without_root(tmp_path, monkeypatch):
    # Root (as in CI) reads anything, so simulate what the OS says to an ordinary user.
    p = write(tmp_path / "secret.wav", noise(100))
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    with pytest.raises(AudioError) as e:
        audio_info(p)
    check_audio_error(e.value, p, "permission denied")
    monkeypatch.undo()

    real_stat = os.stat

    def stat_denied(path, *args, **kwargs):
        if os.fspath(path) == str(p):
            raise PermissionError(13, "Permission denied")
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat_denied)
    with pytest.raises(AudioError) as e:
        read_audio(p)
    check_audio_error(e.value, p, "permission denied")


def test_truncated_flac(tmp_path):
    x = noise(10 * SAMPLE_RATE)  # long enough that the intact half holds more than EVAL_SAMPLES
    good = write(tmp_path / "good.flac", x, subtype="PCM_16")
    original = read_audio(good)
    data = good.read_bytes()
    p = tmp_path / "truncated.flac"
    p.write_bytes(data[: len(data) // 2])

    # libsndfile (1.2.x) still reports the header's full length, decodes the intact part correctly and
    # fails with "flac decoder lost sync" past the cut. Whatever the version does, each reader must
    # return data agreeing with the intact file, or raise AudioError; never another exception.
    assert audio_info(p).frames == len(x)
    outcomes = {}
    for name, fn in READERS.items():
        try:
            result = fn(p)
        except AudioError as e:
            check_audio_error(e, p, "")
            outcomes[name] = "error"
            continue
        outcomes[name] = "ok"
        if name in ("read_audio", "read_segment", "eval_input"):
            np.testing.assert_array_equal(result, original[: len(result)])
        elif name == "iter_windows":
            np.testing.assert_array_equal(result[0], original[:EVAL_SAMPLES])
    # The start of the file is intact, so a window there must be readable.
    assert outcomes["read_segment"] == "ok" and outcomes["eval_input"] == "ok"
    np.testing.assert_array_equal(read_segment(p, 10_000, 5000), original[10_000:15_000])


def test_truncated_wav_reads_shorter(tmp_path):
    good = write(tmp_path / "good.wav", noise(20_000), subtype="PCM_16")
    data = good.read_bytes()
    p = tmp_path / "truncated.wav"
    p.write_bytes(data[: len(data) // 2])
    y = read_audio(p)
    assert 0 < len(y) < 20_000
    np.testing.assert_array_equal(y, read_audio(good)[: len(y)])


def test_audio_error_pickles_and_formats(tmp_path):
    e = AudioError(tmp_path / "x.wav", "not a readable audio file (Format\nnot recognised)")
    assert str(e) == f"{tmp_path / 'x.wav'}: not a readable audio file (Format not recognised)"
    e2 = pickle.loads(pickle.dumps(e))
    assert isinstance(e2, AudioError)
    assert (e2.path, e2.reason, str(e2)) == (e.path, e.reason, str(e))


# ----------------------------------------------------------------------------------------------------
# list_audio_files


def test_list_audio_files(tmp_path):
    root = tmp_path / "data"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "other").mkdir()
    expected = [
        write(root / "a.wav", noise(10)),
        write(root / "sub" / "b.FLAC", noise(10), subtype="PCM_16"),
        write(root / "sub" / "deeper" / "c.ogg", noise(1000)),
        write(root / "other" / "d.aiff", noise(10)),
    ]
    (root / "notes.txt").write_text("hi")
    (root / "sub" / "README.TXT").write_text("hi")
    (root / "sub" / "._b.FLAC").write_bytes(b"\x00\x05\x16\x07 mac metadata")
    (root / "sub" / "empty_dir.wav").mkdir()  # a directory named like audio is not a file

    found = list_audio_files(root)
    assert found == sorted(expected)
    assert all(isinstance(f, Path) for f in found)
    assert list_audio_files(str(root)) == found


def test_list_audio_files_single_file(tmp_path):
    p = write(tmp_path / "x.wav", noise(10))
    assert list_audio_files(p) == [p]
    with pytest.raises(AudioError, match="file not found"):
        list_audio_files(tmp_path / "missing")


def test_list_audio_files_follows_links_without_looping(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    a = write(root / "a.wav", noise(10))
    write(elsewhere / "b.flac", noise(10))
    try:
        (root / "linked").symlink_to(elsewhere, target_is_directory=True)
        (root / "loop").symlink_to(root, target_is_directory=True)
    except OSError:
        pytest.skip("symlinks not supported here")
    found = list_audio_files(root)
    assert a in found and root / "linked" / "b.flac" in found
    assert len(found) == 2


def test_audio_extensions_derived_from_soundfile():
    exts = audio._audio_extensions()
    for e in (".wav", ".flac", ".ogg", ".aiff", ".aif"):
        assert e in exts
    assert ".txt" not in exts and ".mat" not in exts and ".raw" not in exts
    assert all(e == e.lower() and e.startswith(".") for e in exts)
