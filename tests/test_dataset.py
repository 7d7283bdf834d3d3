"""Streaming datasets: uniform crops, tiling, bad items refilled, the same batches for any number of workers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import soundfile as sf

from lowmem_aasist.audio import read_audio
from lowmem_aasist.augment.base import parse_spec
from lowmem_aasist.data.dataset import (
    EpochSampler,
    EvalInputs,
    TrainCrops,
    crop_start,
    make_loader,
    read_window,
)
from lowmem_aasist.data.split import make_split


def _write(path, n, sr=16000, seed=0):
    x = np.random.default_rng(seed).uniform(-0.5, 0.5, n).astype(np.float32)
    sf.write(path, x, sr, subtype="PCM_16")
    return str(path)


@pytest.fixture
def split(tmp_path):
    lengths = [3000, 500, 4000, 2500, 3200, 1800]
    paths = [_write(tmp_path / f"u{i}.flac", n, seed=i) for i, n in enumerate(lengths)]
    s = make_split("train", "test", [f"u{i}" for i in range(6)], paths, [1, 0, 0, 1, 0, 0], ["-", "A01", "A02", "-", "A01", "A03"])
    return dataclasses.replace(s, frames=np.array(lengths, dtype=np.int32), samplerate=np.full(6, 16000, np.int32))


def test_crop_start_reaches_first_and_last_and_is_uniform():
    rng = np.random.default_rng(0)
    n_frames, crop, draws = 1009, 1000, 20_000  # 10 valid starts: 0..9
    starts = np.array([crop_start(n_frames, crop, rng) for _ in range(draws)])
    counts = np.bincount(starts, minlength=10)
    assert starts.min() == 0 and starts.max() == 9 and len(counts) == 10
    expected = draws / 10
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 27.9  # 9 degrees of freedom, p = 0.001
    assert crop_start(500, 1000, rng) == 0 and crop_start(1000, 1000, rng) == 0


def test_short_clips_are_tiled_end_to_end(split):
    whole = read_audio(split.path[1])  # 500 samples
    x = read_window(split.path[1], 0, 1600, 500)
    assert np.array_equal(x, np.concatenate([whole, whole, whole, whole[:100]]))


def test_train_items_are_windows_of_the_file(split):
    ds = TrainCrops(split, crop=1000, seed=3)
    index, x, problems = ds[(2, 0)]
    whole = read_audio(split.path[2])
    assert index == 2 and problems == () and x.shape == (1000,)
    assert any(np.array_equal(whole[s : s + 1000], x) for s in range(len(whole) - 999))
    assert ds[(2, 0)][1] is not None and np.array_equal(ds[(2, 0)][1], x)  # a pure function of the key
    assert not np.array_equal(ds[(2, 1)][1], x)  # another epoch draws another start (1 chance in 3,001 to repeat)


def test_crops_from_the_start_are_the_first_samples_in_every_epoch(split):
    # SSL_Anti-spoofing's rule (train.crop_from = "start"): the first crop samples, short clips tiled.
    ds = TrainCrops(split, crop=1000, seed=3, crop_from="start")
    for epoch in (0, 1, 5):
        _, x, _ = ds[(2, epoch)]
        assert np.array_equal(x, read_audio(split.path[2])[:1000])
        _, short, _ = ds[(1, epoch)]  # 500 samples, tiled twice
        assert np.array_equal(short, np.tile(read_audio(split.path[1]), 2))
    with pytest.raises(ValueError, match="crop_from must be one of random, start"):
        TrainCrops(split, crop=1000, seed=3, crop_from="end")


def test_bad_item_is_refilled_reported_and_deterministic(split, tmp_path):
    with open(split.path[0], "r+b") as f:  # corrupt u0 after indexing: its header still says 3000 samples
        f.seek(40)
        f.write(b"\xff" * 400)
    ds = TrainCrops(split, crop=1000, seed=1)
    index, x, problems = ds[(0, 0)]
    assert problems and problems[0][0] == 0 and split.path[0] in problems[0][1]
    assert index != 0 and x is not None and x.shape == (1000,)
    assert ds[(0, 0)][0] == index and np.array_equal(ds[(0, 0)][1], x)


def test_unreadable_at_index_time_never_sampled(split):
    frames = split.frames.copy()
    frames[3] = -1
    s = dataclasses.replace(split, frames=frames)
    ds = TrainCrops(s, crop=1000, seed=1)
    assert 3 not in ds.readable
    sampler = EpochSampler(ds.readable, seed=5)
    assert sorted(i for i, _ in sampler) == [0, 1, 2, 4, 5]


def test_file_shrunk_after_indexing_is_a_problem_not_a_crash(split):
    _write(split.path[2], 200, seed=9)  # the index still says 4000
    ds = TrainCrops(split, crop=1000, seed=2)
    index, x, problems = ds[(2, 0)]
    assert x is not None and index != 2 and "changed since it was indexed" in problems[0][1]


def test_sampler_permutes_per_epoch_and_skips_to_resume():
    s = EpochSampler(np.arange(10), seed=1)
    s.set_epoch(0)
    first = [i for i, _ in s]
    s.set_epoch(1)
    second = [i for i, _ in s]
    assert sorted(first) == list(range(10)) and first != second
    s.set_epoch(0, skip=4)
    assert [i for i, _ in s] == first[4:] and len(s) == 6


@pytest.mark.parametrize("augment", ["", "rawboost:4"])
@pytest.mark.parametrize("workers", [1, 2])
def test_batches_identical_for_any_worker_count(split, workers, augment):
    def batches(w):
        sampler = EpochSampler(np.arange(len(split)), seed=7)
        sampler.set_epoch(2)
        loader = make_loader(TrainCrops(split, 1000, seed=7, augment=parse_spec(augment)), 4, w, sampler)
        return [(b.index.tolist(), b.wave.numpy().copy(), b.label.tolist()) for b in loader]

    ref, other = batches(0), batches(workers)
    assert len(ref) == len(other) == 2
    for (i0, w0, l0), (i1, w1, l1) in zip(ref, other, strict=True):
        assert i0 == i1 and l0 == l1 and np.array_equal(w0, w1)


def test_eval_inputs_report_bad_files_without_substitutes(split, tmp_path):
    frames = split.frames.copy()
    frames[4] = -1
    ds = EvalInputs(dataclasses.replace(split, frames=frames), 2000)
    index, x, problems = ds[4]
    assert index == 4 and x is None and problems[0][0] == 4
    index, x, problems = ds[1]
    assert x.shape == (2000,) and problems == ()
