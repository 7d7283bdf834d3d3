"""``run_eval``: whole-split scoring with a budget-chosen batch, bad audio, resume after an interruption, keys.

Short inputs (4,000 samples) keep AASIST-L on the CPU fast; the input length does not change any of the logic.
Scores are held to the model's own output on the documented input (the first samples, short clips tiled), read
and tiled here with soundfile and NumPy rather than with the package's audio code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from rich.console import Console
from torch.profiler import ProfilerActivity, profile

import lowmem_aasist.data.dataset as dataset
import lowmem_aasist.evaluation as evaluation
import lowmem_aasist.memory.inference as inference
from lowmem_aasist.audio import AudioError
from lowmem_aasist.data.demo import make_demo_corpus
from lowmem_aasist.evaluation import EvalResumeError, run_eval
from lowmem_aasist.memory.plan import NoPlanError
from lowmem_aasist.metrics import evaluate, read_asv_scores, read_cm_scores
from lowmem_aasist.models.aasist import AASIST

SAMPLES = 4_000
N_EVAL = 12
FAST = {"samples": SAMPLES, "precision": "fp32", "device": "cpu", "workers": 0}
SHORTENED = {4: 1_500, 9: SAMPLES - 1}
"""Eval utterances (protocol line: samples kept) cut below the input length, so the tiling rule is exercised: one
repeated almost three times, one a sample short."""
SCORE_TOLERANCE = 1e-5
"""The file prints 6 decimals (5e-7); the rest is float32 kernel noise between batch sizes."""


def _protocol(root: Path) -> list[list[str]]:
    text = (root / "ASVspoof2019_LA_cm_protocols" / "ASVspoof2019.LA.cm.eval.trl.txt").read_text()
    return [line.split() for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = make_demo_corpus(tmp_path_factory.mktemp("data") / "la", n_train=2, n_dev=2, n_eval=N_EVAL, seed=1,
                            workers=1)
    # Every demo clip is longer than the input; without short ones a wrong tiling rule could not show.
    protocol = _protocol(root)
    for line, keep in SHORTENED.items():
        path = _flac(root, protocol[line][1])
        x, rate = sf.read(path, dtype="float32")
        assert len(x) > SAMPLES
        sf.write(path, x[:keep], rate, subtype="PCM_16")
    return root


def _flac(root: Path, utt: str) -> Path:
    return root / "ASVspoof2019_LA_eval" / "flac" / f"{utt}.flac"


def _reference_input(path: Path, samples: int) -> np.ndarray:
    """The published evaluation input: the clip's first ``samples`` samples, a shorter one repeated end to end."""
    x, rate = sf.read(path, dtype="float32")
    assert rate == 16_000 and x.ndim == 1
    return np.tile(x, -(-samples // len(x)))[:samples]


@torch.no_grad()
def _model_scores(weights: Path, paths: list[Path]) -> np.ndarray:
    """The bona fide logit (class 1) of each clip's reference input, one utterance per forward."""
    model = AASIST("AASIST-L")
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    return np.array([model(torch.from_numpy(_reference_input(p, SAMPLES))[None])[0, 1].item() for p in paths])


def _score_lines(path: Path) -> tuple[list[list[str]], np.ndarray]:
    lines = [line.split() for line in path.read_text().splitlines()]
    return [f[:3] for f in lines], np.array([float(f[3]) for f in lines])


def _metrics_of_the_file(result, asv: Path | None = None) -> None:
    """The metrics reported are those of the score file written: evaluate() over read_cm_scores() of it."""
    expected = evaluate(read_cm_scores(result.scores_path), read_asv_scores(asv) if asv is not None else None)
    assert result.metrics == expected  # threshold included: it is one of the file's scores


def _save_weights(path: Path, seed: int) -> Path:
    """AASIST-L weights whose scores spread over a few units. A fresh model's lie within about 2e-4 of each other
    (with BatchNorm's initial statistics the quiet demo audio hardly reaches the output), too close for a score
    tolerance to tell utterances apart, and 6 decimals tie some: BatchNorm's statistics are taken from noise at
    the demo's loudness instead, and the output layer is scaled up."""
    torch.manual_seed(seed)
    model = AASIST("AASIST-L")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.momentum = None  # the batch's own statistics, not 10% of them
        model.train()(0.02 * torch.randn(8, SAMPLES))
        model.out_layer.weight.mul_(10)
    torch.save(model.state_dict(), path)
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


def test_full_run_scores_every_utterance_in_split_order(corpus, weights, reference):
    result, data = reference
    assert (result.scored, result.skipped, result.resumed, result.batch) == (N_EVAL, 0, 0, 4)
    lines = [line.split() for line in data.decode().splitlines()]
    protocol = _protocol(corpus)
    assert [f[0] for f in lines] == [p[1] for p in protocol]  # split order
    assert [f[1] for f in lines] == [p[3] for p in protocol]
    assert [f[2] for f in lines] == [p[4] for p in protocol]
    # Each score is the model's bona fide logit of that utterance's reference input.
    expected = _model_scores(weights, [_flac(corpus, p[1]) for p in protocol])
    # Far enough apart that the tolerance cannot hide swapped utterances and 6 decimals tie none.
    assert np.diff(np.sort(expected)).min() > 10 * SCORE_TOLERANCE
    np.testing.assert_allclose([float(f[3]) for f in lines], expected, rtol=0, atol=SCORE_TOLERANCE)
    _metrics_of_the_file(result)
    assert result.metrics["counts"]["bonafide"] + result.metrics["counts"]["spoof"] == N_EVAL
    assert result.metrics["min_tdcf"] is None  # no ASV scores given
    # The file is the reference CM layout the evaluate command reads.
    cm = read_cm_scores(result.scores_path)
    assert len(cm.utt) == N_EVAL
    # Nothing of the resumable machinery is left behind.
    folder = result.scores_path.parent
    assert sorted(p.name for p in folder.iterdir()) == ["scores.txt"]


class _BatchSizes:
    """Stands in for the model call and records how many utterances each forward took."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.real = evaluation.bona_fide_logits

    def __call__(self, model, wave, *args, **kwargs):
        self.sizes.append(len(wave))
        return self.real(model, wave, *args, **kwargs)


def test_batch_one_scores_as_batch_four_and_metrics_follow_the_file(corpus, weights, reference, tmp_path,
                                                                     monkeypatch):
    asv = tmp_path / "asv.txt"
    asv.write_text("S1 target 2.0\nS1 target 0.4\nS1 nontarget -1.0\nS1 nontarget 0.6\nS1 spoof -0.5\nS1 spoof 1.1\n")
    calls = _BatchSizes()
    monkeypatch.setattr(evaluation, "bona_fide_logits", calls)
    result = run_eval(corpus, weights, out=tmp_path / "one.txt", batch=1, asv_scores=asv, **FAST)
    assert result.batch == 1 and calls.sizes == [1] * N_EVAL  # really one utterance per forward
    columns, scores = _score_lines(result.scores_path)
    four_columns, four_scores = _score_lines(reference[0].scores_path)
    assert columns == four_columns
    np.testing.assert_allclose(scores, four_scores, rtol=0, atol=SCORE_TOLERANCE)
    expected = _model_scores(weights, [_flac(corpus, c[0]) for c in columns])
    np.testing.assert_allclose(scores, expected, rtol=0, atol=SCORE_TOLERANCE)
    assert result.metrics["min_tdcf"] is not None
    _metrics_of_the_file(result, asv)


def _allocator_peak(model: torch.nn.Module, batch: int) -> int:
    """Bytes the CPU allocator holds at the peak of one no-grad forward, weights and input included, from the
    profiler's allocation events: what memory really held, not what the code's tensor tracker counts."""
    x = torch.zeros(batch, SAMPLES)
    held = sum(t.untyped_storage().nbytes() for t in (*model.parameters(), *model.buffers(), x))
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(x)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert events, "the profiler recorded no allocations"
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):  # frees are negative
        live += e.nbytes()
        peak = max(peak, live)
    return held + peak


@pytest.fixture(scope="module")
def allocator_cost() -> tuple[int, int]:
    """(fixed, per utterance) bytes of a real scoring forward, from the allocator at batch 1 and 2."""
    model = AASIST("AASIST-L").eval()
    one, two = _allocator_peak(model, 1), _allocator_peak(model, 2)
    return one - (two - one), two - one


def test_budget_chooses_the_batch_and_says_so(corpus, weights, allocator_cost, tmp_path, monkeypatch):
    # The budget comes from what the allocator really held, with the planner's stated process overhead and slack:
    # room for 9.5 utterances. A prediction more than ~5% off the allocator's bytes would choose 8 or 10.
    fixed, per = allocator_cost
    overhead, slack = inference.CPU_PROCESS_BYTES, inference.CPU_SLACK["fp32"]
    budget = int(overhead + (fixed + 9.5 * per) * (1 + slack))
    monkeypatch.chdir(tmp_path)
    console = Console(record=True, width=400)
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
        run_eval(corpus, weights, budget=f"{overhead + (fixed + per) // 2}B", **FAST)


def test_inference_cost_is_linear_in_the_batch(allocator_cost):
    cpu = torch.device("cpu")
    cost = inference.inference_cost("AASIST-L", SAMPLES, "fp32", cpu)
    live = inference.forward_live_peak("AASIST-L", 5, SAMPLES, "fp32", cpu)
    assert cost.fixed + 5 * cost.per_sample == live
    # Against the allocator: the live tensors are a lower bound of what it holds, and the slack covers the rest
    # (oneDNN's scratch; about 3% here).
    fixed, per = allocator_cost
    real = fixed + 5 * per
    assert live <= real <= live * (1 + inference.CPU_SLACK["fp32"])
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


def test_asvspoof5_layout_and_calibration_write_llrs_that_evaluate_reads_back(corpus, weights, reference, tmp_path):
    from lowmem_aasist.scorefiles import Calibration, read_scores

    _, data = reference
    rows = [line.split() for line in data.decode().splitlines()]
    cal = Calibration(0.5, -1.0, 0.05, "dev.txt")
    out = tmp_path / "as5.tsv"
    result = run_eval(corpus, weights, out=out, batch=4, score_layout="asvspoof5", calibration=cal, **FAST)
    lines = out.read_text().splitlines()
    assert lines[0] == "filename\tcm-score" and len(lines) == len(rows) + 1
    for (utt, _, _, raw), line in zip(rows, lines[1:], strict=True):
        name, llr = line.split("\t")
        assert name == utt and float(llr) == pytest.approx(0.5 * float(raw) - 1.0, abs=2e-6)
    keys = tmp_path / "keys.txt"
    keys.write_text("filename cm-label\n" + "".join(f"{u} {k}\n" for u, _, k, _ in rows))
    back = read_scores(out, keys)
    assert result.metrics["cllr"] == pytest.approx(evaluate(back)["cllr"], abs=1e-5)
