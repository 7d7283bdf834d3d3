"""Score and key files of ASVspoof 2019, 2021 and 5 read into one form; evaluate's new metrics, breakdowns,
calibration and plots from the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lowmem_aasist.cli import main
from lowmem_aasist.metrics import ScoreFileError, read_cm_scores
from lowmem_aasist.scorefiles import read_keys, read_scores

# Six trials: three bona fide, three spoofs of two attacks, two codecs. Scores as the reference's test vector
# would have them read (higher = bona fide).
ROWS = [  # file, codec, attack, key, score
    ("D_01", "-", "bonafide", "bonafide", 2.0),
    ("D_02", "C01", "bonafide", "bonafide", 1.0),
    ("D_03", "-", "A17", "spoof", -2.0),
    ("D_04", "C01", "A18", "spoof", 1.5),
    ("D_05", "C01", "A17", "spoof", -1.0),
    ("D_06", "-", "bonafide", "bonafide", -0.5),
]


def _asvspoof5(tmp_path, rows=ROWS, header="filename\tcm-score"):
    protocol = tmp_path / "ASVspoof5.dev.track_1.tsv"
    protocol.write_text("".join(f"D_0001 {f} F {c} - - - {a} {k} -\n" for f, c, a, k, _ in rows))
    scores = tmp_path / "scores.tsv"
    scores.write_text(header + "\n" + "".join(f"{f}\t{s}\n" for f, *_, s in rows))
    return scores, protocol


def test_an_asvspoof5_score_file_reads_as_the_2019_layout_with_the_same_trials(tmp_path):
    scores, protocol = _asvspoof5(tmp_path)
    cm = read_scores(scores, protocol)
    legacy = tmp_path / "legacy.txt"
    legacy.write_text("".join(f"{f} {a if k == 'spoof' else '-'} {k} {s}\n" for f, c, a, k, s in ROWS))
    old = read_cm_scores(legacy)
    assert cm.utt == old.utt and np.array_equal(cm.key, old.key) and np.array_equal(cm.score, old.score)
    assert [a for a, k in zip(cm.attack, cm.key, strict=True) if k == 0] == ["A17", "A18", "A17"]
    assert cm.conditions["codec"] == ["-", "C01", "-", "C01", "C01", "-"]


def test_a_key_file_with_a_header_and_a_2021_trial_metadata_are_keys(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("filename cm-label codec\n" + "".join(f"{f} {k} {c}\n" for f, c, a, k, _ in ROWS))
    assert read_keys(keys).columns["codec"]["D_04"] == "C01"
    meta = tmp_path / "trial_metadata.txt"
    meta.write_text("LA_0009 LA_E_1 alaw ita_tx A07 spoof notrim eval\nLA_0009 LA_E_2 none loc_tx - bonafide notrim eval\n")
    k = read_keys(meta)
    assert k.key == {"LA_E_1": 0, "LA_E_2": 1}
    assert k.columns["condition"] == {"LA_E_1": "C2", "LA_E_2": "C1"}
    assert k.columns["transmission"]["LA_E_1"] == "ita_tx" and k.columns["attack"]["LA_E_1"] == "A07"


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s + "D_99\t0.5\n", "scores.tsv:8: trial 'D_99' is not in the keys"),
    (lambda s: s.replace("D_06\t-0.5\n", ""), "ASVspoof5.dev.track_1.tsv:6: trial 'D_06' has no score"),
    (lambda s: s + "D_02\t0.1\n", "scores.tsv:8: trial 'D_02' already scored on line 3"),
    (lambda s: s.replace("D_03\t-2.0", "D_03\tnan"), "scores.tsv:4: expected"),
    (lambda s: s.replace("D_03\t-2.0", "D_03\tinf"), "scores.tsv:4: expected"),
])
def test_mismatched_duplicate_or_non_finite_trials_name_file_and_line(tmp_path, change, message):
    scores, protocol = _asvspoof5(tmp_path)
    scores.write_text(change(scores.read_text()))
    with pytest.raises(ScoreFileError, match=message):
        read_scores(scores, protocol)


def test_a_file_without_labels_needs_keys_and_one_with_them_refuses_keys(tmp_path, capsys):
    scores, protocol = _asvspoof5(tmp_path)
    assert main(["evaluate", "--scores", str(scores)]) == 1
    assert "holds no labels; give --keys" in capsys.readouterr().err
    legacy = tmp_path / "legacy.txt"
    legacy.write_text("D_01 - bonafide 1.0\nD_02 A01 spoof 0.0\n")
    assert main(["evaluate", "--scores", str(legacy), "--keys", str(protocol)]) == 1
    assert "drop --keys" in capsys.readouterr().err


def test_evaluate_reports_track1_metrics_and_pools_breakdowns_as_the_packages_do(tmp_path, capsys):
    scores, protocol = _asvspoof5(tmp_path)
    assert main(["evaluate", "--scores", str(scores), "--keys", str(protocol), "--by", "codec", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"eer", "min_dcf", "act_dcf", "cllr", "min_cllr"} <= set(r)
    # A codec restricts both classes: C01 holds bona fide 1.0 and spoofs -1.0, 1.5. Thresholds below -1 / at -1 /
    # at 1 give (miss, fa) = (0, 1) / (0, 1/2) / (1, 1/2); the closest pair is (0, 1/2): EER 25%. Pooled with the
    # other codec's trials it would not be (bona fide 2.0 and -0.5 join).
    assert r["by"]["codec"]["C01"]["bonafide"] == 1 and r["by"]["codec"]["C01"]["spoof"] == 2
    assert r["by"]["codec"]["C01"]["eer"] == pytest.approx(25.0)
    assert main(["evaluate", "--scores", str(scores), "--keys", str(protocol), "--by", "attack", "--json"]) == 0
    by_attack = json.loads(capsys.readouterr().out)["by"]["attack"]
    # An attack restricts only the spoofs: A17 (-2, -1) against all three bona fide (2, 1, -0.5): separated.
    assert by_attack["A17"]["bonafide"] == 3 and by_attack["A17"]["eer"] == 0.0
    assert main(["evaluate", "--scores", str(scores), "--keys", str(protocol), "--by", "vocoder"]) == 2
    assert "no vocoder column" in capsys.readouterr().err


def test_calibration_fits_on_dev_and_lowers_cllr_and_actdcf(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rows = [(f"D_{i:04d}", "-", "bonafide" if i % 2 else "A17", "bonafide" if i % 2 else "spoof",
             float(rng.normal(8 if i % 2 else 2, 2))) for i in range(2000)]  # raw scores far from LLRs
    scores, protocol = _asvspoof5(tmp_path, rows)
    cal = tmp_path / "cal.json"
    assert main(["calibrate", "--scores", str(scores), "--keys", str(protocol), "--out", str(cal)]) == 0
    assert "wrote" in capsys.readouterr().out
    saved = json.loads(cal.read_text())
    assert saved["p_spoof"] == 0.05 and saved["cllr_after"] < saved["cllr_before"]
    args = ["evaluate", "--scores", str(scores), "--keys", str(protocol), "--json"]
    assert main(args) == 0
    raw = json.loads(capsys.readouterr().out)
    assert main([*args, "--calibration", str(cal)]) == 0
    calibrated = json.loads(capsys.readouterr().out)
    assert calibrated["eer"] == raw["eer"] and calibrated["min_dcf"] == pytest.approx(raw["min_dcf"])
    assert calibrated["cllr"] < 0.5 * raw["cllr"] and calibrated["act_dcf"] < raw["act_dcf"]
    assert calibrated["act_dcf"] < calibrated["min_dcf"] * 1.2
    cal.write_text("{}")
    assert main([*args, "--calibration", str(cal)]) == 1
    assert "not a calibration file" in capsys.readouterr().err


def test_evaluate_plot_writes_a_det_curve_and_histograms(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="plots need matplotlib (the bench extra)")
    scores, protocol = _asvspoof5(tmp_path)
    assert main(["evaluate", "--scores", str(scores), "--keys", str(protocol), "--plot", str(tmp_path / "p")]) == 0
    for name in ("det.png", "scores.png"):
        assert (tmp_path / "p" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_track2_file_gives_a_dcf_of_its_sasv_scores_and_t_eer_of_its_cm_and_asv_scores(tmp_path, capsys):
    from lowmem_aasist.detection import a_dcf, t_eer

    rng = np.random.default_rng(1)
    labels = ["target", "nontarget", "spoof"] * 20
    rows = [(f"S{i % 3}", f"E_{i:04d}", lab, *rng.normal([2, 3, 1] if lab == "target" else
                                                       [2, -1, 0] if lab == "nontarget" else [-1, 2, 0.5], 1))
            for i, lab in enumerate(labels)]
    keys = tmp_path / "keys.tsv"
    keys.write_text("spk filename cm-label asv-label\n" + "".join(
        f"{s} {f} {'spoof' if lab == 'spoof' else 'bonafide'} {lab}\n" for s, f, lab, *_ in rows))
    sasv = tmp_path / "sasv.tsv"
    sasv.write_text("spk\tfilename\tcm-score\tasv-score\tsasv-score\n" + "".join(
        f"{s}\t{f}\t{c}\t{a}\t{v}\n" for s, f, _, c, a, v in reversed(rows)))  # order must not matter
    assert main(["evaluate", "--sasv", str(sasv), "--keys", str(keys), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    col = {k: np.array([r[3:] for r in rows if r[2] == k]) for k in ("target", "nontarget", "spoof")}
    assert result["a_dcf"] == pytest.approx(a_dcf(col["target"][:, 2], col["nontarget"][:, 2], col["spoof"][:, 2]))
    bona = np.concatenate([col["target"][:, 0], col["nontarget"][:, 0]])
    assert result["t_eer"] == pytest.approx(t_eer(bona, col["spoof"][:, 0], *(col[k][:, 1] for k in col)))
    assert result["counts"] == {"target": 20, "nontarget": 20, "spoof": 20}
    sasv.write_text(sasv.read_text() + "S0\tE_0000\t1\t1\t1\n")
    assert main(["evaluate", "--sasv", str(sasv), "--keys", str(keys)]) == 1
    assert "E_0000 is scored twice" in capsys.readouterr().err
