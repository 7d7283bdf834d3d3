"""``run_eval``: whole-split scoring with a budget-chosen batch, bad audio, resume after an interruption, keys.

Short inputs (4,000 samples) keep AASIST-L on the CPU fast; the input length does not change any of the logic.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

import lowmem_aasist.data.dataset as dataset
import lowmem_aasist.evaluation as evaluation
import lowmem_aasist.memory.inference as inference
from lowmem_aasist.audio import AudioError
from lowmem_aasist.data.demo import make_demo_corpus
from lowmem_aasist.evaluation import EvalResumeError, run_eval
from lowmem_aasist.memory.plan import NoPlanError
from lowmem_aasist.metrics import read_cm_scores
from lowmem_aasist.models.aasist import AASIST

SAMPLES = 4_000
N_EVAL = 12
FAST = {"samples": SAMPLES, "precision": "fp32", "device": "cpu", "workers": 0}


def _protocol(root: Path) -> list[list[str]]:
    text = (root / "ASVspoof2019_LA_cm_protocols" / "ASVspoof2019.LA.cm.eval.trl.txt").read_text()
    return [line.split() for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_demo_corpus(tmp_path_factory.mktemp("data") / "la", n_train=2, n_dev=2, n_eval=N_EVAL, seed=1, workers=1)


def _save_weights(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    torch.save(AASIST("AASIST-L").state_dict(), path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return _save_weights(tmp_path_factory.mktemp("w") / "aasist-l.pth", 0)


@pytest.fixture(scope="module")
def reference(corpus, weights, tmp_path_factory):
    """An uninterrupted run with batch 4: the file every resumed run must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("ref") / "scores.txt"
    result = run_eval(corpus, weights, out=out, batch=4, **FAST)
    return result, out.read_bytes()


def test_full_run_scores_every_utterance_in_split_order(corpus, reference):
    result, data = reference
    assert (result.scored, result.skipped, result.resumed, result.batch) == (N_EVAL, 0, 0, 4)
    lines = [line.split() for line in data.decode().splitlines()]
    protocol = _protocol(corpus)
    assert [f[0] for f in lines] == [p[1] for p in protocol]  # split order
    assert [f[1] for f in lines] == [p[3] for p in protocol]
    assert [f[2] for f in lines] == [p[4] for p in protocol]
    assert np.isfinite([float(f[3]) for f in lines]).all()
    assert len({f[3] for f in lines}) > 1  # real per-utterance scores, not a constant
    assert set(result.metrics) >= {"eer", "eer_threshold", "min_tdcf", "per_attack", "counts"}
    assert result.metrics["counts"]["bonafide"] + result.metrics["counts"]["spoof"] == N_EVAL
    assert result.metrics["min_tdcf"] is None  # no ASV scores given
    # The file is the reference CM layout the evaluate command reads.
    cm = read_cm_scores(result.scores_path)
    assert len(cm.utt) == N_EVAL
    # Nothing of the resumable machinery is left behind.
    folder = result.scores_path.parent
    assert sorted(p.name for p in folder.iterdir()) == ["scores.txt"]


def test_budget_chooses_the_batch_and_says_so(corpus, weights, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    console = Console(record=True, width=400)
    cost = inference.inference_cost("AASIST-L", SAMPLES, "fp32", torch.device("cpu"))
    budget = cost.peak(9) + cost.per_sample // 2  # room for 9 utterances, not 10
    result = run_eval(corpus, weights, budget=f"{budget}B", console=console, **FAST)
    assert result.batch == 9
    assert result.scored == N_EVAL
    # Default output: scores-<layout>-<split>.txt in the current folder.
    assert result.scores_path == Path("scores-asvspoof2019-la-eval.txt")
    assert (tmp_path / result.scores_path).is_file()
    out = console.export_text()
    assert "batch 9: predicted peak" in out and "per utterance" in out

    # A budget that cannot hold one utterance is refused before any scoring.
    with pytest.raises(NoPlanError, match="at batch 1"):
        run_eval(corpus, weights, budget=f"{cost.peak(1) - 1}B", **FAST)


def test_inference_cost_is_linear_in_the_batch():
    cpu = torch.device("cpu")
    cost = inference.inference_cost("AASIST-L", SAMPLES, "fp32", cpu)
    live = inference.forward_live_peak("AASIST-L", 5, SAMPLES, "fp32", cpu)
    assert cost.fixed + 5 * cost.per_sample == live
    assert cost.largest_batch(cost.peak(64) * 10) == inference.MAX_BATCH
    assert cost.largest_batch(cost.peak(1) - 1) == 0


def test_bad_audio_is_reported_once_and_left_out(corpus, weights, tmp_path, monkeypatch):
    root = Path(shutil.copytree(corpus, tmp_path / "la"))
    protocol = _protocol(root)
    flac = root / "ASVspoof2019_LA_eval" / "flac"
    garbage, undecodable = protocol[2][1], protocol[7][1]
    (flac / f"{garbage}.flac").write_bytes(b"not audio at all" * 10)  # found bad by the index
    real_read = dataset.read_window

    def read_window(path, start, length, available=None):  # a file that breaks after indexing, while decoding
        if path.endswith(f"{undecodable}.flac"):
            raise AudioError(path, "decoder error (simulated)")
        return real_read(path, start, length, available)

    monkeypatch.setattr(dataset, "read_window", read_window)
    console = Console(record=True, width=400)
    out = tmp_path / "s.txt"
    result = run_eval(root, weights, out=out, batch=4, console=console, **FAST)
    assert (result.scored, result.skipped) == (N_EVAL - 2, 2)
    utts = [line.split()[0] for line in out.read_text().splitlines()]
    assert utts == [p[1] for p in protocol if p[1] not in (garbage, undecodable)]
    text = console.export_text()
    for utt in (garbage, undecodable):
        assert text.count(f"skipped {flac / utt}.flac: ") == 1
    rows = [json.loads(line) for line in out.with_name("s.txt.problems.jsonl").read_text().splitlines()]
    assert [r["utt"] for r in rows] == [garbage, undecodable]
    assert "decoder error (simulated)" in rows[1]["error"]
    assert result.metrics is not None  # still both classes among the rest


class _Interrupt:
    """Stands in for the model call: the first ``allow`` batches are scored, then Ctrl-C."""

    def __init__(self, allow: int) -> None:
        self.allow, self.calls = allow, 0
        self.real = evaluation.bona_fide_logits

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls > self.allow:
            raise KeyboardInterrupt
        return self.real(*args, **kwargs)


def test_resume_after_interruption_gives_the_same_file(corpus, weights, reference, tmp_path, monkeypatch):
    _, expected = reference
    out = tmp_path / "scores.txt"
    partial, sidecar = tmp_path / "scores.txt.partial", tmp_path / "scores.txt.partial.json"
    with monkeypatch.context() as m:
        m.setattr(evaluation, "bona_fide_logits", _Interrupt(allow=1))
        with pytest.raises(KeyboardInterrupt):
            run_eval(corpus, weights, out=out, batch=4, **FAST)
    assert not out.exists()
    assert len(partial.read_text().splitlines()) == 4 and sidecar.is_file()
    with open(partial, "a") as f:
        f.write("4\t0.123")  # a line torn by the crash: not trusted, scored again

    console = Console(record=True, width=400)
    counting = _Interrupt(allow=99)
    monkeypatch.setattr(evaluation, "bona_fide_logits", counting)
    result = run_eval(corpus, weights, out=out, batch=4, console=console, **FAST)
    assert counting.calls == 2  # only the 8 utterances left were scored
    assert result.resumed == 4
    assert result.scored == N_EVAL
    assert out.read_bytes() == expected
    assert "resuming: 4 of 12 already scored" in console.export_text()
    assert not partial.exists() and not sidecar.exists()


def test_resume_refuses_a_partial_from_other_weights(corpus, weights, tmp_path, monkeypatch):
    out = tmp_path / "scores.txt"
    with monkeypatch.context() as m:
        m.setattr(evaluation, "bona_fide_logits", _Interrupt(allow=1))
        with pytest.raises(KeyboardInterrupt):
            run_eval(corpus, weights, out=out, batch=4, **FAST)
    other = _save_weights(tmp_path / "other.pth", 1)
    with pytest.raises(EvalResumeError) as err:
        run_eval(corpus, other, out=out, batch=4, **FAST)
    message = str(err.value)
    assert "\n" not in message
    assert "weights" in message and "delete scores.txt.partial" in message and "--out" in message
    # Other settings are refused the same way; the same ones resume.
    with pytest.raises(EvalResumeError, match="precision"):
        run_eval(corpus, weights, out=out, batch=4, **{**FAST, "precision": "bf16"})


def test_unlabeled_list_has_no_metrics_and_dash_keys(corpus, weights, tmp_path):
    flac = corpus / "ASVspoof2019_LA_eval" / "flac"
    names = sorted(p.name for p in flac.glob("*.flac"))[:3]
    folder = tmp_path / "list"
    folder.mkdir()
    for name in names:
        shutil.copy(flac / name, folder / name)
    (folder / "list.csv").write_text("path,label\n" + "".join(f"{n},\n" for n in names))
    out = tmp_path / "u.txt"
    result = run_eval(folder, weights, out=out, **FAST)
    assert result.metrics is None
    lines = [line.split() for line in out.read_text().splitlines()]
    assert [f[0] for f in lines] == [n[:-5] for n in names]
    assert {f[2] for f in lines} == {"-"}


def test_a_partial_without_scores_is_started_afresh(corpus, weights, tmp_path, monkeypatch):
    out = tmp_path / "scores.txt"
    with monkeypatch.context() as m:
        m.setattr(evaluation, "bona_fide_logits", _Interrupt(allow=0))
        with pytest.raises(KeyboardInterrupt):
            run_eval(corpus, weights, out=out, batch=4, **FAST)
    (tmp_path / "scores.txt.partial").write_text("0\t0.5")  # only a torn line: nothing was really kept
    other = _save_weights(tmp_path / "other.pth", 1)
    monkeypatch.setattr(evaluation, "bona_fide_logits", _Interrupt(allow=0))  # stop again, at once
    with pytest.raises(KeyboardInterrupt):
        run_eval(corpus, other, out=out, batch=4, **FAST)
    stored = json.loads((tmp_path / "scores.txt.partial.json").read_text())
    assert stored["weights"] == str(other.resolve())
    assert (tmp_path / "scores.txt.partial").read_text() == ""
