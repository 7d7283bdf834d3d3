"""benchmarks/loader.py in short: the rows it reports, both reading methods yielding the same crops, the training
input's peak memory staying flat as the corpus grows, and --augment measuring the augmented loader fit builds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import psutil
import pytest
import soundfile as sf
from conftest import load_benchmark

from lowmem_aasist.augment.base import parse_spec
from lowmem_aasist.data.dataset import TrainCrops
from lowmem_aasist.data.load import load_split

MiB = 2**20
FIELDS = {"device", "method", "workers", "files", "crop", "samples", "samples_per_s", "peak_rss_bytes", "torch"}


bench = load_benchmark("loader", "loader_bench")  # DataLoader workers unpickle its Dataset by module name


def write_la2019(root: Path, lengths: list[int], seed: int = 0) -> Path:
    """A minimal ASVspoof 2019 LA tree of noise FLACs: writing the demo corpus's synthetic speech would take
    ~30 ms a file, these take ~1 ms."""
    rng = np.random.default_rng(seed)
    proto = root / "ASVspoof2019_LA_cm_protocols"
    proto.mkdir(parents=True)
    for split, name, n_files in (("train", "train.trn", len(lengths)), ("dev", "dev.trl", 2)):
        audio = root / f"ASVspoof2019_LA_{split}" / "flac"
        audio.mkdir(parents=True)
        lines = []
        for i in range(n_files):
            utt = f"LA_{split[0].upper()}_{1_000_000 + i}"
            n = lengths[i] if split == "train" else 8_000
            sf.write(audio / f"{utt}.flac", (rng.standard_normal(n) * 2_000).astype(np.int16), 16_000)
            lines.append(f"LA_0079 {utt} - - bonafide\n" if i % 5 == 0 else f"LA_0079 {utt} - A01 spoof\n")
        (proto / f"ASVspoof2019.LA.cm.{name}.txt").write_text("".join(lines))
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Two clips shorter than the crop, so both methods' tiling is exercised too.
    return write_la2019(tmp_path_factory.mktemp("tiny"), [3_000, 2_500] + [8_000 + 500 * i for i in range(10)])


@pytest.mark.parametrize("method", bench.METHODS)
@pytest.mark.parametrize("workers", [0, 1])
def test_rows_have_fields_and_sane_values(tiny: Path, method: str, workers: int) -> None:
    # 12 files, batch 4: whole batches, so the count after the warm-up batch is exactly what was asked for,
    # across an epoch boundary.
    row = bench.measure(tiny, method, workers, crop=4_000, samples=16, batch=4)
    assert FIELDS <= row.keys()
    assert (row["method"], row["workers"], row["files"], row["crop"], row["samples"]) == (method, workers, 12, 4_000, 16)
    assert row["samples_per_s"] > 0
    assert row["peak_rss_bytes"] >= row["peak_pss_bytes"] > 0
    assert row["index_s"] >= 0
    assert row["clips_shorter_than_crop"] == pytest.approx(2 / 12, abs=1e-3)


def test_counts_the_ragged_last_batch_of_an_epoch(tiny: Path) -> None:
    # Batches of 5 over 12 files: 5, 5, 2 per epoch; warm-up 5, then 5 + 2 + 5 = 12 >= 9.
    assert bench.measure(tiny, "lowmem", 0, crop=4_000, samples=9, batch=5)["samples"] == 12


def test_both_methods_read_the_same_crops(tiny: Path) -> None:
    # The comparison is fair only if the methods differ in how they read, not in what they return.
    split = load_split(tiny, "train").split
    lowmem = bench.make_dataset("lowmem", split, 4_000, 7)
    whole = bench.make_dataset("whole-file", split, 4_000, 7)
    for key in [(i, epoch) for i in range(len(split)) for epoch in (0, 3)]:
        a, b = lowmem[key], whole[key]
        assert a[0] == b[0] and a[1].dtype == b[1].dtype == np.float32
        np.testing.assert_array_equal(a[1], b[1])


def test_markdown_reports_growth_per_method_and_workers() -> None:
    rows = [{"device": "cpu x", "method": m, "workers": w, "files": f, "crop": 64_600, "batch": 24, "samples": 600,
             "samples_per_s": 100.0, "peak_rss_bytes": (200 + f // 100) * MiB, "peak_pss_bytes": 150 * MiB,
             "index_s": 0.01, "clips_shorter_than_crop": 1.0, "torch": "t", "command": f"python loader.py {f}"}
            for m in bench.METHODS for w in (0, 2) for f in (100, 1_500)]
    text = bench.markdown(rows)
    assert "| lowmem | 2 | 64,600 | 100 -> 1,500 | +14.0 | +0.0 |" in text
    assert text.count(" -> 1,500 |") == 4
    assert "python loader.py 1500" in text


def test_augment_option_measures_the_augmented_loader(tiny: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # The whole command line, fresh measuring process included (~4 s): the spec must reach the dataset that is read,
    # whose own spec is what the row records.
    out, md = tmp_path / "aug.jsonl", tmp_path / "aug.md"
    bench.main(["--data", str(tiny), "--crop", "4000", "--samples", "8", "--batch", "4", "--workers", "0",
                "--augment", "rawboost:5", "--json", "--out", str(out), "--markdown", str(md)])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["augment"] for r in printed] == [r["augment"] for r in bench.read_jsonl(out)] == ["rawboost:5"]
    row = printed[0]
    assert (row["method"], row["workers"], row["samples"]) == ("lowmem", 0, 8)
    assert row["samples_per_s"] > 0 and row["peak_rss_bytes"] > 0
    assert "| lowmem | `rawboost:5` | 0 | 12 | 4,000 |" in md.read_text()


def test_augmented_dataset_is_what_fit_builds(tiny: Path) -> None:
    split = load_split(tiny, "train").split
    chain = parse_spec("rawboost:5")
    measured = bench.make_dataset("lowmem", split, 4_000, 7, chain)
    fit_built, plain = TrainCrops(split, 4_000, 7, augment=chain), bench.make_dataset("lowmem", split, 4_000, 7)
    for key in [(0, 0), (5, 2)]:
        np.testing.assert_array_equal(measured[key][1], fit_built[key][1])
        assert not np.array_equal(measured[key][1], plain[key][1])
    with pytest.raises(ValueError, match="lowmem"):
        bench.make_dataset("whole-file", split, 4_000, 7, chain)


def test_markdown_adds_the_augment_column_only_for_augmented_rows() -> None:
    def row(spec: str | None, workers: int = 0, folder: int = 0) -> dict:
        r = {"device": "cpu x", "method": "lowmem", "workers": workers, "files": 100, "crop": 16_000, "batch": 24,
             "samples": 600, "samples_per_s": 50.0, "peak_rss_bytes": (300 + folder // 100) * MiB,
             "peak_pss_bytes": 200 * MiB, "index_s": 0.01, "clips_shorter_than_crop": 0.0, "torch": "t",
             "command": "python loader.py"}
        if folder:
            r["augment_folders"] = [{"step": "noise", "dir": f"/n{folder}", "files": folder, "synthetic": None}]
        return r if spec is None else {**r, "augment": spec}

    old = bench.markdown([row(None), row(None, 2)])  # lines written before --augment existed
    assert "| method | workers |" in old and "augment" not in old
    assert old == bench.markdown([row(""), row("", 2)])
    text = bench.markdown([row(None), row("rawboost:5"), row("noise:dir=/n200,snr=5", 2, 200),
                           row("noise:dir=/n2000,snr=5", 2, 2_000)])
    assert "| method | augment | workers |" in text
    assert "| lowmem | none | 0 | 100 | 16,000 |" in text and "| lowmem | `rawboost:5` | 0 | 100 |" in text
    assert "| lowmem | `noise:dir=*,snr=5` | 2 | 16,000 | 100 | 200 -> 2,000 | 302.0 -> 320.0 (+18.0) |" in text


def _write_sized(root: Path, n: int) -> Path:
    # 1 s clips: a loader that kept every file it decoded (400 samples read: every one of the 400) would hold
    # 400 x 16,000 x 4 bytes = 24 MiB more than for 40 files, past the bound below (checked: +49 MiB as float64).
    return write_la2019(root, [16_000] * n, seed=n)


def test_peak_memory_flat_from_40_to_400_files(tmp_path: Path) -> None:
    small, large = _write_sized(tmp_path / "s", 40), _write_sized(tmp_path / "l", 400)
    # Warm-up: imports, allocator pools and the index machinery's first use are not the corpus's cost.
    bench.measure(small, "lowmem", 0, crop=4_000, samples=400, batch=8)
    base = psutil.Process().memory_info().rss
    peaks = {n: bench.measure(root, "lowmem", 0, crop=4_000, samples=400, batch=8)["peak_rss_bytes"] - base
             for n, root in ((40, small), (400, large))}
    growth = (peaks[400] - peaks[40]) / MiB
    assert growth <= 16, f"peak RSS over baseline: {peaks[40] / MiB:.1f} MiB for 40 files, {peaks[400] / MiB:.1f} for 400"
