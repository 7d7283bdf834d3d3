"""Tests for the synthetic demo corpus (lowmem_aasist.data.demo)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lowmem_aasist.data import demo
from lowmem_aasist.data.demo import demo_corpus_ready, ensure_demo_corpus, make_demo_corpus

SMALL = {"n_train": 12, "n_dev": 10, "n_eval": 10, "seed": 3}
SPLIT_FILES = {
    "train": ("ASVspoof2019.LA.cm.train.trn.txt", "LA_T_"),
    "dev": ("ASVspoof2019.LA.cm.dev.trl.txt", "LA_D_"),
    "eval": ("ASVspoof2019.LA.cm.eval.trl.txt", "LA_E_"),
}


def _protocol(root: Path, split: str) -> list[list[str]]:
    path = root / "ASVspoof2019_LA_cm_protocols" / SPLIT_FILES[split][0]
    return [line.split() for line in path.read_text().splitlines()]


def _audio(root: Path, split: str, utt: str) -> tuple[np.ndarray, int]:
    return sf.read(root / f"ASVspoof2019_LA_{split}" / "flac" / f"{utt}.flac", dtype="float64")


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _band_share_db(x: np.ndarray, lo: float, hi: float) -> float:
    power = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(x.size, 1.0 / 16_000)
    return float(10 * np.log10(power[(freqs >= lo) & (freqs < hi)].sum() / power.sum() + 1e-30))


def _db(x: np.ndarray) -> float:
    return float(20 * np.log10(np.sqrt(np.mean(np.square(x)))))


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_corpus(tmp_path_factory.mktemp("small") / "corpus", workers=1, **SMALL)


@pytest.fixture(scope="module")
def balanced_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough utterances of each class for distribution checks, still fast."""
    root = tmp_path_factory.mktemp("balanced") / "corpus"
    return make_demo_corpus(root, n_train=120, n_dev=2, n_eval=2, bonafide_fraction=0.5, seed=11, workers=2)


def _class_audio(root: Path) -> dict[str, list[np.ndarray]]:
    out: dict[str, list[np.ndarray]] = {"bonafide": [], "spoof": []}
    for _, utt, _, _, key in _protocol(root, "train"):
        out[key].append(_audio(root, "train", utt)[0])
    return out


def test_layout_and_protocols(small_corpus: Path) -> None:
    for split, (_, prefix) in SPLIT_FILES.items():
        rows = _protocol(small_corpus, split)
        assert len(rows) == SMALL[f"n_{split}"]
        assert {row[4] for row in rows} == {"bonafide", "spoof"}
        assert len({row[1] for row in rows}) == len(rows)
        for row in rows:
            assert len(row) == 5
            speaker, utt, dash, attack, key = row
            assert re.fullmatch(r"LA_\d{4}", speaker)
            assert re.fullmatch(re.escape(prefix) + r"\d{7}", utt)
            assert dash == "-"
            assert key in ("bonafide", "spoof")
            assert (attack == "-") == (key == "bonafide")
            if key == "spoof":
                assert re.fullmatch(r"A\d\d", attack)
            info = sf.info(small_corpus / f"ASVspoof2019_LA_{split}" / "flac" / f"{utt}.flac")
            assert (info.format, info.subtype, info.samplerate, info.channels) == (
                "FLAC",
                "PCM_16",
                16_000,
                1,
            )
            assert 1.0 <= info.duration <= 4.0
        flacs = list((small_corpus / f"ASVspoof2019_LA_{split}" / "flac").iterdir())
        assert len(flacs) == len(rows)
    marker = json.loads((small_corpus / ".complete").read_text())
    assert marker["params"]["seed"] == SMALL["seed"]
    assert demo_corpus_ready(small_corpus, **SMALL)
    assert not list(small_corpus.parent.glob(".corpus.partial-*"))


def test_both_classes_even_when_tiny(tmp_path: Path) -> None:
    root = make_demo_corpus(tmp_path / "c", n_train=2, n_dev=2, n_eval=3, bonafide_fraction=0.9, workers=1)
    for split in SPLIT_FILES:
        assert {row[4] for row in _protocol(root, split)} == {"bonafide", "spoof"}
    with pytest.raises(ValueError):
        make_demo_corpus(tmp_path / "d", n_train=1, workers=1)


def test_deterministic_and_independent_of_workers(tmp_path: Path, small_corpus: Path) -> None:
    serial = make_demo_corpus(tmp_path / "serial", workers=1, **SMALL)
    parallel = make_demo_corpus(tmp_path / "parallel", workers=2, **SMALL)
    reference = _tree_bytes(small_corpus)
    assert _tree_bytes(serial) == reference
    assert _tree_bytes(parallel) == reference
    other = make_demo_corpus(tmp_path / "other", workers=1, **{**SMALL, "seed": 4})
    assert _tree_bytes(other) != reference


@pytest.mark.parametrize("workers", [1, 2])
def test_progress_reports_every_file(tmp_path: Path, workers: int) -> None:
    calls: list[tuple[int, int]] = []
    make_demo_corpus(
        tmp_path / "c",
        n_train=6,
        n_dev=2,
        n_eval=2,
        workers=workers,
        progress=lambda d, t: calls.append((d, t)),
    )
    # One call per file written, so a bar may also just advance by one.
    assert calls == [(k, 10) for k in range(1, 11)]


def test_no_level_or_length_leak(balanced_corpus: Path) -> None:
    audio = _class_audio(balanced_corpus)
    assert len(audio["bonafide"]) == len(audio["spoof"]) == 60
    rms = {k: np.mean([_db(x) for x in v]) for k, v in audio.items()}
    length = {k: np.mean([x.size / 16_000 for x in v]) for k, v in audio.items()}
    # Per-file spreads are ~3 dB and ~0.9 s; these bounds are a few standard
    # errors of the class-mean difference at 60 files per class.
    assert abs(rms["bonafide"] - rms["spoof"]) < 1.5
    assert abs(length["bonafide"] - length["spoof"]) < 0.4
    for clips in audio.values():
        assert max(np.abs(x).max() for x in clips) < 0.95  # nothing near clipping
        assert max(abs(x.mean()) for x in clips) < 1e-3  # no DC offset


def test_spoofing_only_changes_the_artefact() -> None:
    """Rendering the same utterance as bona fide and as spoof: same length,
    silences and loudness; only the band above ~4 kHz differs."""
    plan = demo._plan_split(demo.SPLITS[0], 24, 0.5, seed=5)
    for utt in plan:
        bona = demo._render(5, dataclasses.replace(utt, attack=None)).astype(float) / 32768
        spoof = demo._render(5, dataclasses.replace(utt, attack=utt.attack or "A03")).astype(float) / 32768
        assert bona.size == spoof.size
        assert abs(_db(bona) - _db(spoof)) < 1.0
        assert abs(_db(bona[:800]) - _db(spoof[:800])) < 6.0  # leading silence alike
        assert abs(_band_share_db(bona, 100, 3500) - _band_share_db(spoof, 100, 3500)) < 1.5


def test_spoofs_are_band_limited(balanced_corpus: Path) -> None:
    audio = _class_audio(balanced_corpus)
    high = {k: np.median([_band_share_db(x, 5500, 7500) for x in v]) for k, v in audio.items()}
    assert high["bonafide"] > -35.0  # bona fide has real energy up there
    assert high["bonafide"] - high["spoof"] > 30.0
    # The faint image just below Nyquist is present in spoofs.
    image = np.median([_band_share_db(x, 7600, 7950) - _band_share_db(x, 5500, 7000) for x in audio["spoof"]])
    assert image > 10.0
    # No gross difference below 4 kHz, where a shortcut would be too easy.
    low = {k: np.median([_band_share_db(x, 0, 4000) for x in v]) for k, v in audio.items()}
    assert abs(low["bonafide"] - low["spoof"]) < 1.0


def test_ensure_reuses_and_regenerates(tmp_path: Path) -> None:
    params = {"n_train": 4, "n_dev": 2, "n_eval": 2, "seed": 1, "workers": 1}
    root = tmp_path / "corpus"
    assert not demo_corpus_ready(root, **params)
    ensure_demo_corpus(root, **params)
    marker_mtime = (root / ".complete").stat().st_mtime_ns
    (root / "sentinel").write_text("from the first build")

    ensure_demo_corpus(root, **params)
    assert (root / "sentinel").exists()
    assert (root / ".complete").stat().st_mtime_ns == marker_mtime

    (root / ".complete").unlink()  # as after a crash before the marker
    assert not demo_corpus_ready(root, **params)
    ensure_demo_corpus(root, **params)
    assert not (root / "sentinel").exists()
    assert demo_corpus_ready(root, **params)

    (root / "sentinel").write_text("second build")
    changed = {**params, "seed": 2}
    assert not demo_corpus_ready(root, **changed)
    ensure_demo_corpus(root, **changed)
    assert not (root / "sentinel").exists()
    assert demo_corpus_ready(root, **changed)
    assert not demo_corpus_ready(root, **params)


def test_ensure_refuses_foreign_folder(tmp_path: Path) -> None:
    root = tmp_path / "real_corpus"
    root.mkdir()
    (root / "README.txt").write_text("not made by the generator")
    with pytest.raises(FileExistsError):
        ensure_demo_corpus(root, n_train=2, n_dev=2, n_eval=2, workers=1)
    assert (root / "README.txt").exists()
    assert not list(tmp_path.glob(".real_corpus.partial-*"))
