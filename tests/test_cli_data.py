"""The data and metrics commands end to end: check-data, evaluate, eval (exit codes, JSON, one-line errors)."""

from __future__ import annotations

import json

import pytest
import torch

from lowmem_aasist.cli import main
from lowmem_aasist.data.demo import make_demo_corpus
from lowmem_aasist.model import AASIST


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_demo_corpus(tmp_path_factory.mktemp("demo") / "la", n_train=6, n_dev=4, n_eval=6, seed=2, workers=1)


def test_check_data_counts_a_clean_corpus(corpus, capsys):
    assert main(["check-data", "--data", str(corpus), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layout"] == "asvspoof2019-la" and report["problems"] == []
    train = report["splits"]["train"]
    assert train["bonafide"] + train["spoof"] == train["files"] == 6
    assert sum(train["attacks"].values()) == train["spoof"] and train["hours"] > 0
    assert train["sample_rates"] == {"16000": 6}
    assert main(["check-data", "--data", str(corpus), "--deep"]) == 0
    assert "no problems found" in capsys.readouterr().out


def test_check_data_finds_bad_files_and_rejects_unknown_folders(tmp_path, capsys):
    root = make_demo_corpus(tmp_path / "la", n_train=4, n_dev=2, n_eval=2, seed=3, workers=1)
    victim = next((root / "ASVspoof2019_LA_dev" / "flac").glob("*.flac"))
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # truncated: the header still promises every sample
    assert main(["check-data", "--data", str(root)]) == 0  # headers alone cannot see it
    capsys.readouterr()
    assert main(["check-data", "--data", str(root), "--deep", "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert [(p["split"], p["path"]) for p in problems] == [("dev", str(victim))]
    (tmp_path / "empty").mkdir()
    assert main(["check-data", "--data", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "not a corpus" in err and "asvspoof5" in err and err.count("\n") == 1


def test_evaluate_prints_json_and_names_bad_lines(tmp_path, capsys):
    scores = tmp_path / "cm.txt"
    scores.write_text("a - bonafide 2.0\nb A01 spoof -1.0\nc A02 spoof 3.0\nd - bonafide 1.0\n")
    assert main(["evaluate", "--scores", str(scores), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["eer"] == pytest.approx(50.0) and result["min_tdcf"] is None
    assert result["per_attack"] == {"A01": 0.0, "A02": 100.0} and result["counts"]["spoof"] == 2
    assert main(["evaluate", "--scores", str(scores)]) == 0
    assert "min t-DCF: not computed" in capsys.readouterr().out
    scores.write_text("a - bonafide 2.0\nb A01 maybe 1\n")
    assert main(["evaluate", "--scores", str(scores)]) == 1
    assert f"{scores}:2:" in capsys.readouterr().err


def test_eval_scores_a_split_and_reports_eer(corpus, tmp_path, capsys):
    weights = tmp_path / "w.pth"
    torch.manual_seed(0)
    torch.save(AASIST("AASIST-L").state_dict(), weights)
    out = tmp_path / "eval.txt"
    assert main(["eval", "--data", str(corpus), "--weights", str(weights), "--out", str(out), "--batch", "3",
                 "--workers", "0", "--precision", "fp32"]) == 0
    text = capsys.readouterr().out
    assert "scored 6 utterances" in text and "EER" in text
    assert len(out.read_text().splitlines()) == 6
