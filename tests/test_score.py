"""`lowmem-aasist score`: formats, rates, channels, folders, bad files, --full and --json."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from lowmem_aasist.audio import EVAL_SAMPLES, read_audio, tile
from lowmem_aasist.cli import main
from lowmem_aasist.models.aasist import AASIST

FULL_HOP = 32_300  # --full: windows every 32,300 samples, as the README says


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = AASIST("AASIST-L").eval()
    path = tmp_path_factory.mktemp("w") / "aasist-l-random.pth"
    torch.save(model.state_dict(), path)
    return path, model


def _tone(seconds: float, sr: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def _score_json(capsys, argv):
    code = main(argv)
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines() if line.strip()]
    return code, rows, out.err


def _direct(model, wave):
    with torch.no_grad():
        return model(torch.from_numpy(wave)[None])[0, 1].item()


def test_formats_rates_stereo_and_folder(tmp_path, weights, capsys):
    path, model = weights
    audio = tmp_path / "audio"
    (audio / "sub").mkdir(parents=True)
    sf.write(audio / "a.wav", _tone(2.0, 16_000), 16_000)
    sf.write(audio / "b.flac", _tone(5.0, 16_000, seed=1), 16_000)
    sf.write(audio / "sub" / "c.ogg", _tone(1.5, 16_000, seed=2), 16_000)
    sf.write(audio / "d_44k.wav", _tone(1.0, 44_100, seed=3), 44_100)
    sf.write(audio / "e_stereo.flac", _tone(1.0, 16_000, channels=2, seed=4), 16_000)
    (audio / "notes.txt").write_text("not audio")
    code, rows, err = _score_json(capsys, ["score", str(audio), "--weights", str(path), "--json", "--device", "cpu"])
    assert code == 0, err
    names = [r["path"].split("/")[-1] for r in rows]
    assert names == ["a.wav", "b.flac", "d_44k.wav", "e_stereo.flac", "c.ogg"]
    for row in rows:
        expected = _direct(model, tile(read_audio(row["path"]), EVAL_SAMPLES))
        assert row["score"] == pytest.approx(expected, abs=1e-4)
        assert row["windows"] == 1


def test_bad_files_reported_and_others_scored(tmp_path, weights, capsys):
    path, _ = weights
    good = tmp_path / "good.wav"
    sf.write(good, _tone(1.0, 16_000), 16_000)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.flac"
    corrupt.write_bytes(b"fLaC" + b"\x00garbage" * 50)
    missing = tmp_path / "missing.wav"
    code, rows, err = _score_json(
        capsys, ["score", str(empty), str(good), str(corrupt), str(missing), "--weights", str(path), "--json"]
    )
    assert code == 1
    assert [r["path"] for r in rows] == [str(good)]
    lines = err.strip().splitlines()
    assert len(lines) == 3, err
    for bad in (empty, corrupt, missing):
        assert any(str(bad) in line for line in lines)
    assert "Traceback" not in err


def test_table_output(tmp_path, weights, capsys):
    path, _ = weights
    sf.write(tmp_path / "a.wav", _tone(1.0, 16_000), 16_000)
    assert main(["score", str(tmp_path / "a.wav"), "--weights", str(path)]) == 0
    out = capsys.readouterr().out
    assert "a.wav" in out and "AASIST-L" in out


def test_full_scores_long_file_in_overlapping_windows(tmp_path, weights, capsys):
    path, model = weights
    seconds = 10.0
    sf.write(tmp_path / "long.flac", _tone(seconds, 16_000), 16_000)
    code, rows, err = _score_json(
        capsys, ["score", str(tmp_path / "long.flac"), "--weights", str(path), "--json", "--full"]
    )
    assert code == 0, err
    n = int(seconds * 16_000)
    starts = list(range(0, n - EVAL_SAMPLES + 1, FULL_HOP))
    if starts[-1] + EVAL_SAMPLES < n:
        starts.append(n - EVAL_SAMPLES)
    assert rows[0]["windows"] == len(starts) == 4
    x = read_audio(tmp_path / "long.flac")
    expected = np.mean([_direct(model, x[s : s + EVAL_SAMPLES]) for s in starts])
    assert rows[0]["score"] == pytest.approx(expected, abs=1e-4)


def test_bad_weights_and_device_get_one_line(tmp_path, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_text("nope")
    sf.write(tmp_path / "a.wav", _tone(1.0, 16_000), 16_000)
    assert main(["score", str(tmp_path / "a.wav"), "--weights", str(junk)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "junk.pth" in err
    if not torch.cuda.is_available():
        assert main(["score", str(tmp_path / "a.wav"), "--weights", str(junk), "--device", "cuda"]) == 2
        assert "--device cuda" in capsys.readouterr().err


def test_published_weights_through_the_cli(shared_dir, capsys):
    rows_ref = [json.loads(line) for line in (shared_dir / "reference" / "scores.jsonl").read_text().splitlines()]
    clips = sorted({r["file"] for r in rows_ref})
    for name in ("AASIST", "AASIST-L"):
        argv = ["score", *[str(shared_dir / "reference" / c) for c in clips], "--json",
                "--weights", str(shared_dir / "weights" / f"{name}.pth")]
        code, rows, err = _score_json(capsys, argv)
        assert code == 0, err
        got = {r["path"].split("reference/")[-1]: r["score"] for r in rows}
        for ref in rows_ref:
            if ref["model"] == name:
                # 3.0e-6 measured: the model is 2.6e-6 off, and both sides round to 6 decimals.
                assert abs(got[ref["file"]] - ref["score"]) < 1e-5, (name, ref, got[ref["file"]])


def test_asvspoof5_format_and_calibrated_llrs(tmp_path, weights, capsys):
    path, model = weights
    sf.write(tmp_path / "a.wav", _tone(2.0, 16_000), 16_000)
    assert main(["score", str(tmp_path / "a.wav"), "--weights", str(path), "--device", "cpu", "--format", "asvspoof5"]) == 0
    header, line = capsys.readouterr().out.splitlines()
    raw = float(line.split("\t")[1])
    assert header == "filename\tcm-score" and line.startswith(str(tmp_path / "a.wav") + "\t")
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({"a": 2.0, "b": 0.5, "p_spoof": 0.05, "fitted_on": "dev"}))
    code, rows, _ = _score_json(capsys, ["score", str(tmp_path / "a.wav"), "--weights", str(path), "--device", "cpu",
                                         "--json", "--calibration", str(cal)])
    assert code == 0 and rows[0]["calibrated"] and rows[0]["score"] == pytest.approx(2.0 * raw + 0.5, abs=1e-5)
