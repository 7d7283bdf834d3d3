"""The audio index: header facts, bad-file reasons, the on-disk cache and the --max-bad rule."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lowmem_aasist.data.demo import make_demo_corpus
from lowmem_aasist.data.index import (
    CACHE_VERSION,
    IndexResult,
    Problem,
    TooManyBadFiles,
    check_max_bad,
    default_index_dir,
    index_split,
    parse_max_bad,
    sample_rates,
)
from lowmem_aasist.data.split import Split, make_split

OLD = 1_600_000_000  # a fixed mtime (2020), so a later os.utime is a change whatever the clock granularity


def _frames_16k(frames: int, rate: int) -> int:
    return frames if rate == 16_000 else (2 * frames * 16_000 + rate) // (2 * rate)


def _write(path: Path, frames: int, rate: int = 16_000, channels: int = 1) -> None:
    rng = np.random.default_rng(frames)
    shape = (frames,) if channels == 1 else (frames, channels)
    sf.write(path, (0.1 * rng.standard_normal(shape)).astype(np.float32), rate)


def _split(paths: list[str]) -> Split:
    n = len(paths)
    return make_split("train", "test", [f"u{i}" for i in range(n)], paths, [1] * n, ["-"] * n)


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Split, dict[str, object]]:
    """Good files at 16 and 22.05 kHz, mono and stereo, plus one of each kind of bad file."""
    audio = tmp_path / "audio"
    audio.mkdir()
    good = {
        "a.flac": (8_000, 16_000, 1),
        "b.wav": (11_025, 22_050, 2),
        "c.flac": (5_000, 22_050, 1),
        "d.wav": (3_000, 16_000, 2),
    }
    for name, (frames, rate, channels) in good.items():
        _write(audio / name, frames, rate, channels)
    (audio / "empty.wav").write_bytes(b"")
    (audio / "garbage.flac").write_bytes(os.urandom(3000))
    sf.write(audio / "zero.wav", np.zeros(0, dtype=np.float32), 16_000)
    for p in audio.iterdir():
        os.utime(p, ns=(OLD * 10**9, OLD * 10**9))
    names = ["a.flac", "empty.wav", "b.wav", "missing.flac", "c.flac", "garbage.flac", "zero.wav", "d.wav"]
    split = _split([str(audio / n) for n in names])
    return split, {"audio": audio, "names": names, "good": good, "cache": tmp_path / "cache"}


def _expected_reasons() -> dict[str, str]:
    return {
        "empty.wav": "empty file (0 bytes)",
        "missing.flac": "file not found",
        "garbage.flac": "not a readable audio file",  # followed by libsndfile's words
        "zero.wav": "empty file (0 samples)",
    }


def test_frames_rates_and_problems(tree) -> None:
    split, t = tree
    r = index_split(split, cache_dir=t["cache"], threads=3)
    assert isinstance(r, IndexResult)
    assert r.split.frames.dtype == np.int32 and r.split.samplerate.dtype == np.int32
    assert r.scanned == 7  # every file except the missing one, which is never opened
    for i, name in enumerate(t["names"]):
        if name in t["good"]:
            frames, rate, _ = t["good"][name]
            assert r.split.frames[i] == _frames_16k(frames, rate), name
            assert r.split.samplerate[i] == rate, name
        else:
            assert r.split.frames[i] == -1 and r.split.samplerate[i] == -1, name
    # the resampled length rule agrees with what soundfile reports
    assert r.split.frames[2] == 8_000 and r.split.frames[4] == _frames_16k(5_000, 22_050)

    want = _expected_reasons()
    assert [p.index for p in r.problems] == [1, 3, 5, 6]
    for p in r.problems:
        name = t["names"][p.index]
        assert p.path == str(t["audio"] / name)
        assert p.reason.startswith(want[name]), (name, p.reason)
    # everything else of the split is carried over untouched
    assert list(r.split.utt) == list(split.utt) and r.split.name == split.name
    assert sample_rates(r.split) == {16_000: 2, 22_050: 2}
    assert r.cache_file is not None and r.cache_file.parent == t["cache"]


def test_second_call_reads_no_headers(tree) -> None:
    split, t = tree
    first = index_split(split, cache_dir=t["cache"])
    second = index_split(split, cache_dir=t["cache"])
    assert second.scanned == 0
    np.testing.assert_array_equal(first.split.frames, second.split.frames)
    np.testing.assert_array_equal(first.split.samplerate, second.split.samplerate)
    assert first.problems == second.problems
    assert len(list(t["cache"].glob("*.npz"))) == 1


def test_changed_file_is_reread(tree) -> None:
    split, t = tree
    index_split(split, cache_dir=t["cache"])
    _write(t["audio"] / "c.flac", 7_000, 22_050)
    os.utime(t["audio"] / "c.flac", (OLD + 10, OLD + 10))
    r = index_split(split, cache_dir=t["cache"])
    assert r.scanned == 1
    assert r.split.frames[4] == _frames_16k(7_000, 22_050)
    assert index_split(split, cache_dir=t["cache"]).scanned == 0


def test_touched_file_is_reread(tree) -> None:
    split, t = tree
    index_split(split, cache_dir=t["cache"])
    os.utime(t["audio"] / "a.flac", (OLD + 5, OLD + 5))  # same size, new mtime
    assert index_split(split, cache_dir=t["cache"]).scanned == 1


def test_fixed_file_is_no_longer_a_problem(tree) -> None:
    split, t = tree
    assert 5 in [p.index for p in index_split(split, cache_dir=t["cache"]).problems]
    _write(t["audio"] / "garbage.flac", 4_000)
    r = index_split(split, cache_dir=t["cache"])
    assert r.scanned == 1
    assert r.split.frames[5] == 4_000 and 5 not in [p.index for p in r.problems]


def test_deleted_file_becomes_not_found_without_a_read(tree) -> None:
    split, t = tree
    index_split(split, cache_dir=t["cache"])
    (t["audio"] / "b.wav").unlink()
    r = index_split(split, cache_dir=t["cache"])
    assert r.scanned == 0
    assert Problem(2, str(t["audio"] / "b.wav"), "file not found") in r.problems
    assert r.split.frames[2] == -1
    # and back again: a file that reappears is read
    _write(t["audio"] / "b.wav", 2_205, 22_050, 2)
    r = index_split(split, cache_dir=t["cache"])
    assert r.scanned == 1 and r.split.frames[2] == 1_600


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "other_version"])
def test_bad_cache_is_ignored_and_rebuilt(tree, damage: str) -> None:
    split, t = tree
    good = index_split(split, cache_dir=t["cache"])
    cache_file = good.cache_file
    assert cache_file is not None
    blob = cache_file.read_bytes()
    if damage == "garbage":
        cache_file.write_bytes(b"not a zip file at all")
    elif damage == "truncated":
        cache_file.write_bytes(blob[: len(blob) // 2])
    elif damage == "empty":
        cache_file.write_bytes(b"")
    else:
        with np.load(cache_file) as z:
            arrays = dict(z)
        arrays["version"] = np.int64(CACHE_VERSION + 1)
        with open(cache_file, "wb") as f:
            np.savez(f, **arrays)
    r = index_split(split, cache_dir=t["cache"])
    assert r.scanned == 7
    np.testing.assert_array_equal(r.split.frames, good.split.frames)
    assert r.problems == good.problems
    assert index_split(split, cache_dir=t["cache"]).scanned == 0  # rewritten whole


def test_unwritable_cache_dir_is_not_an_error(tree, tmp_path: Path) -> None:
    split, _ = tree
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    # A path below a regular file can be neither created nor written, even by root.
    r = index_split(split, cache_dir=blocker / "cache")
    assert r.cache_file is None and r.scanned == 7
    assert index_split(split, cache_dir=blocker / "cache").scanned == 7
    assert len(r.problems) == 4


def test_progress_adds_up_from_the_calling_thread(tree) -> None:
    split, t = tree
    for _ in range(2):  # fresh, then cached
        calls: list[tuple[int, int]] = []

        def record(k: int, calls: list[tuple[int, int]] = calls) -> None:
            calls.append((k, threading.get_ident()))

        index_split(split, cache_dir=t["cache"], threads=4, progress=record)
        assert sum(k for k, _ in calls) == len(split)
        assert all(k > 0 for k, _ in calls)
        assert {tid for _, tid in calls} == {threading.get_ident()}


def test_error_in_progress_callback_propagates(tree) -> None:
    split, t = tree

    def fail(k: int) -> None:
        raise KeyboardInterrupt  # what a Ctrl-C during the scan looks like to index_split

    with pytest.raises(KeyboardInterrupt):
        index_split(split, cache_dir=t["cache"], progress=fail)
    assert not [th for th in threading.enumerate() if th.name.startswith("index")]


def test_many_files_keep_input_order_and_are_read_once(tmp_path: Path) -> None:
    paths = []
    for i in range(60):
        p = tmp_path / f"{i:02d}.wav"
        _write(p, 500 + 7 * i, 16_000 if i % 2 else 22_050)
        paths.append(str(p))
    listed = paths + paths[::-1]  # every path twice
    r = index_split(_split(listed), cache_dir=tmp_path / "cache", threads=8)
    assert r.scanned == 60
    want = [_frames_16k(500 + 7 * i, 22_050 if i % 2 == 0 else 16_000) for i in range(60)]
    assert r.split.frames.tolist() == want + want[::-1]
    assert not r.problems


def test_demo_corpus_split(tmp_path: Path) -> None:
    root = make_demo_corpus(tmp_path / "demo", n_train=6, n_dev=2, n_eval=2, seed=1, workers=1)
    files = sorted(str(p) for p in Path(root).rglob("*.flac"))
    r = index_split(_split(files), cache_dir=tmp_path / "cache")
    assert not r.problems and r.scanned == len(files) == 10
    assert r.split.frames.tolist() == [sf.info(f).frames for f in files]
    assert sample_rates(r.split) == {16_000: 10}


def test_empty_split(tmp_path: Path) -> None:
    r = index_split(_split([]), cache_dir=tmp_path / "cache")
    assert len(r.split.frames) == 0 and r.problems == () and r.scanned == 0


def test_cached_index_of_many_entries_is_fast(tmp_path: Path) -> None:
    files = []
    for i in range(200):
        p = tmp_path / f"{i:03d}.flac"
        _write(p, 400 + i)
        files.append(str(p))
    split = _split([files[i % 200] for i in range(20_000)])
    index_split(split, cache_dir=tmp_path / "cache")
    t0 = time.perf_counter()
    r = index_split(split, cache_dir=tmp_path / "cache")
    assert r.scanned == 0
    assert time.perf_counter() - t0 < 5.0  # ~0.03 s on a laptop; generous for loaded CI machines


def test_default_index_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_index_dir() == tmp_path / "lowmem-aasist" / "index"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # invalid per the XDG spec
    assert default_index_dir() == Path.home() / ".cache" / "lowmem-aasist" / "index"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_index_dir() == Path.home() / ".cache" / "lowmem-aasist" / "index"


def test_sample_rates_needs_an_index(tree) -> None:
    split, _ = tree
    with pytest.raises(ValueError, match="not been indexed"):
        sample_rates(split)


@pytest.mark.parametrize(
    "spec, want",
    [
        ("5%", ("fraction", 0.05)),
        ("2.5%", ("fraction", 0.025)),
        (" 0% ", ("fraction", 0.0)),
        ("100%", ("fraction", 1.0)),
        ("12", ("count", 12)),
        ("0", ("count", 0)),
    ],
)
def test_parse_max_bad(spec: str, want: tuple[str, float]) -> None:
    assert parse_max_bad(spec) == want


@pytest.mark.parametrize("spec", ["abc", "-1", "150%", "-1%", "1.5", "", "%", "nan%", "1/2%", "5 files"])
def test_parse_max_bad_rejects(spec: str) -> None:
    with pytest.raises(ValueError, match="a percentage like 5% .*or a count like 20") as e:
        parse_max_bad(spec)
    assert "\n" not in str(e.value)


def test_check_max_bad_counts() -> None:
    check_max_bad(20, 1000, "20", "train")  # equal is allowed
    check_max_bad(0, 0, "0", "train")
    with pytest.raises(TooManyBadFiles, match="check-data"):
        check_max_bad(21, 1000, "20", "train")


def test_check_max_bad_percentages() -> None:
    check_max_bad(50, 1000, "5%", "train")  # exactly 5%
    check_max_bad(29, 100, "29%", "train")  # 0.29 * 100 is 28.999... in floating point
    check_max_bad(23, 1000, "2.3%", "train")
    with pytest.raises(TooManyBadFiles):
        check_max_bad(51, 1000, "5%", "train")
    with pytest.raises(TooManyBadFiles):
        check_max_bad(1, 10, "0%", "dev")


def test_check_max_bad_message() -> None:
    with pytest.raises(TooManyBadFiles) as e:
        check_max_bad(812, 25_380, "2%", "train")
    msg = str(e.value)
    assert msg.startswith("train: 812 of 25,380 files (3.2%) are ")
    assert "--max-bad 2%" in msg and "lowmem-aasist check-data --data ROOT" in msg and "\n" not in msg
    with pytest.raises(TooManyBadFiles, match=r"check-data --data /data/LA\b"):
        check_max_bad(3, 10, "1", "dev", data_root="/data/LA")
    with pytest.raises(ValueError, match="percentage"):
        check_max_bad(1, 10, "lots", "dev")
