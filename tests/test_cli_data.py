"""The data and metrics commands end to end: check-data, evaluate, eval (exit codes, JSON, one-line errors)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lowmem_aasist.cli import main
from lowmem_aasist.data.corpora import read_split
from lowmem_aasist.data.demo import make_demo_corpus
from lowmem_aasist.models.aasist import AASIST


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


@pytest.fixture
def as5_train_dev(corpus, tmp_path):
    """The demo audio laid out as an ASVspoof 5 copy from before the eval release: train and dev protocols only,
    in ASVspoof5_protocols/ as the tarball unpacks."""
    root = tmp_path / "as5"
    for split, folder, name in (("train", "flac_T", "ASVspoof5.train.tsv"), ("dev", "flac_D", "ASVspoof5.dev.track_1.tsv")):
        (root / folder).mkdir(parents=True)
        src = read_split(corpus, split)
        lines = []
        for utt, path, label, attack in zip(src.utt, src.path, src.label, src.attack, strict=True):
            shutil.copy(path, root / folder / f"{utt}.flac")
            key = "bonafide" if label == 1 else "spoof"
            lines.append(f"S001 {utt} F - - - {'-' if label == 1 else 'AC1'} {attack} {key} -")
        (root / "ASVspoof5_protocols").mkdir(exist_ok=True)
        (root / "ASVspoof5_protocols" / name).write_text("\n".join(lines) + "\n")
    return root


def test_check_data_on_asvspoof5_without_eval_protocol(as5_train_dev, capsys):
    root = as5_train_dev
    missing = root / "ASVspoof5_protocols" / "ASVspoof5.eval.track_1.tsv"
    assert main(["check-data", "--data", str(root)]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[1] for line in out.splitlines() if line.startswith("│")]
    assert rows == ["train", "dev"]
    about = [line for line in out.splitlines() if "eval" in line]
    assert about == [f"eval split absent: protocol {missing} not found; checked train, dev only"]
    assert "no problems found" in out
    assert main(["check-data", "--data", str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layout"] == "asvspoof5" and list(report["splits"]) == ["train", "dev"]
    assert report["splits"]["train"]["files"] == 6 and report["splits"]["dev"]["files"] == 4
    assert report["absent"] == {"eval": str(missing)} and report["problems"] == []


def test_check_data_on_a_partial_copy_still_fails_on_a_bad_file(as5_train_dev, capsys):
    victim = next((as5_train_dev / "flac_D").glob("*.flac"))
    victim.write_bytes(b"")
    assert main(["check-data", "--data", str(as5_train_dev), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [(p["split"], p["path"]) for p in report["problems"]] == [("dev", str(victim))]
    assert list(report["absent"]) == ["eval"] and list(report["splits"]) == ["train", "dev"]
    assert main(["check-data", "--data", str(as5_train_dev)]) == 1
    out = capsys.readouterr().out
    assert "eval split absent" in out and f"dev: {victim}: " in out


def test_eval_on_a_split_whose_protocol_is_absent_is_one_line(as5_train_dev, tmp_path, capsys):
    weights = tmp_path / "w.pth"
    torch.save(AASIST("AASIST-L").state_dict(), weights)
    argv = ["eval", "--data", str(as5_train_dev), "--split", "eval", "--weights", str(weights), "--workers", "0",
            "--out", str(tmp_path / "eval.txt")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: {as5_train_dev}/ASVspoof5_protocols/ASVspoof5.eval.track_1.tsv: protocol not found; "
                          "this copy holds the train, dev protocols only")


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
