"""`fit` on a tiny demo corpus: every run file is written, bad audio is skipped, and the loss falls."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from lowmem_aasist.cli import main
from lowmem_aasist.config import load_config
from lowmem_aasist.data.corpora import LayoutError, read_split
from lowmem_aasist.data.demo import make_demo_corpus
from lowmem_aasist.data.index import TooManyBadFiles
from lowmem_aasist.metrics import CmScores, evaluate, read_cm_scores
from lowmem_aasist.models import load_model
from lowmem_aasist.train import Feature, RunFolderError, fit
from lowmem_aasist.train import loop as train_loop


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_demo_corpus(tmp_path_factory.mktemp("demo") / "la", n_train=24, n_dev=10, n_eval=4, seed=3)


def _quick_cfg(root, **train):
    overrides = {"data.root": str(root), "train.crop": 4000, "train.batch": 4, "train.workers": 0,
                 "train.log_every": 1, "data.eval_samples": 4000, "data.dev_batch": 8}
    overrides.update({f"train.{k}": v for k, v in train.items()})
    return load_config("demo", overrides)


def test_demo_layout_parses(corpus):
    for name, n in (("train", 24), ("dev", 10), ("eval", 4)):
        split = read_split(corpus, name)
        assert len(split) == n
        assert set(np.unique(split.label)) == {0, 1}
        assert all(a == "-" for a, y in zip(split.attack, split.label, strict=True) if y == 1)
        assert all(p.endswith(".flac") and f"ASVspoof2019_LA_{name}/flac/" in p for p in split.path)


def _first_samples_tiled(path: str, samples: int) -> np.ndarray:
    x, rate = sf.read(path, dtype="float32")
    assert rate == 16_000 and x.ndim == 1
    return np.tile(x, -(-samples // len(x)))[:samples]


def test_fit_writes_every_run_file(corpus, tmp_path, monkeypatch):
    dev_scores = []
    real_score_split = train_loop.score_split

    def keeping(*args, **kwargs):
        scores = real_score_split(*args, **kwargs)
        dev_scores.append(scores.copy())
        return scores

    monkeypatch.setattr(train_loop, "score_split", keeping)
    out = tmp_path / "run"
    # fp32, so that the dev scores can be held to an fp32 forward below; seed 1 gives a dev EER that is not 50%
    # (after 3 steps the scores lie within 6e-4 of each other), so the EER also tells the classes apart.
    result = fit(_quick_cfg(corpus, max_steps=3, epochs=2, precision="fp32", seed=1), out, device="cpu")
    assert result.steps == 3 and result.epochs == 0  # stopped within epoch 1 (of 6 steps)
    assert json.loads((out / "config.json").read_text())["train"]["max_steps"] == 3
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert all({"step", "epoch", "loss", "lr", "samples_per_s"} <= m.keys() for m in steps)
    assert steps[0]["lr"] > steps[-1]["lr"]  # cosine decay per step
    scores = (out / "scores" / "dev.txt").read_text().splitlines()
    assert len(scores) == 10
    utt, attack, key, score = scores[0].split()
    assert utt.startswith("LA_D_") and key in ("bonafide", "spoof") and np.isfinite(float(score))
    # Dev was scored by the model saved after step 3, in eval mode, on each utterance's first 4,000 samples
    # (measured within 1e-7 of this batch-1, default-layout forward) ...
    dev = read_split(corpus, "dev")
    model = load_model(out / "checkpoints" / "last.pt")
    with torch.no_grad():
        expected = [model(torch.from_numpy(_first_samples_tiled(p, 4000))[None])[0, 1].item() for p in dev.path]
    [scored] = dev_scores
    np.testing.assert_allclose(scored, expected, rtol=0, atol=1e-6)
    # ... the file holds those scores to 6 decimals, and the EER logged is theirs against dev's keys.
    written = read_cm_scores(out / "scores" / "dev.txt")
    assert written.utt == list(dev.utt)
    np.testing.assert_allclose(written.score, scored, rtol=0, atol=5e-7 + 1e-12)
    eer = evaluate(CmScores(list(dev.utt), list(dev.attack), dev.label.astype(np.int8), scored))["eer"]
    epochs = [m for m in lines if "dev_eer" in m]
    assert len(epochs) == 1 and epochs[0]["dev_eer"] == result.dev_eers[0] == eer
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(out / "checkpoints" / name, map_location="cpu", weights_only=True)
        assert ckpt["position"]["step"] == 3 and ckpt["config"]["model"]["name"] == "AASIST-L"
        assert load_model(out / "checkpoints" / name).arch.name == "AASIST-L"  # strict load


@pytest.mark.parametrize("policy", ["block0", "tiled"])
def test_fit_with_each_hand_scheduled_policy_in_the_demo_layout(corpus, tmp_path, policy):
    # The demo profile trains channels-last in bf16 where native; the custom blocks must take that layout.
    assert load_config("demo", {}).train.channels_last
    cfg = _quick_cfg(corpus, max_steps=2, epochs=1)
    cfg = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, checkpoint=policy))
    result = fit(cfg, tmp_path / "run")
    assert result.steps == 2
    assert json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]["checkpoint"] == policy


def _policy_fit(root, out, policy: str, precision: str, steps: int) -> tuple[dict, list[float]]:
    """(last.pt, the logged losses) of a fit on the CPU in the default layout: there block0 promises
    bit-identity (channels-last, or CUDA, only agreement to rounding)."""
    cfg = _quick_cfg(root, max_steps=steps, epochs=1, precision=precision, channels_last=False)
    fit(dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, checkpoint=policy)), out, device="cpu")
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    return torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True), losses


@pytest.fixture(scope="module")
def stock_fit(corpus, tmp_path_factory):
    """The ``none`` policy's fit at (precision, steps), each made once."""
    made = {}

    def get(precision: str, steps: int) -> tuple[dict, list[float]]:
        if (precision, steps) not in made:
            out = tmp_path_factory.mktemp(f"none-{precision}-{steps}") / "run"
            made[precision, steps] = _policy_fit(corpus, out, "none", precision, steps)
        return made[precision, steps]

    return get


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_block0_fit_is_bit_identical_to_the_stock_fit(corpus, stock_fit, tmp_path, precision):
    stock, stock_losses = stock_fit(precision, 2)
    block0, losses = _policy_fit(corpus, tmp_path / "run", "block0", precision, 2)
    assert losses == stock_losses
    assert stock["model"].keys() == block0["model"].keys()
    assert [k for k, v in stock["model"].items() if not torch.equal(v, block0["model"][k])] == []
    for a, b in zip(stock["optimizer"]["state"].values(), block0["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def _first_gradient(ckpt: dict) -> torch.Tensor:
    """The whole first step's gradient, read back from Adam's state after one step: exp_avg = (1 - beta1) g."""
    beta1 = ckpt["optimizer"]["param_groups"][0]["betas"][0]
    return torch.cat([s["exp_avg"].double().flatten() for s in ckpt["optimizer"]["state"].values()]) / (1 - beta1)


def test_tiled_fit_takes_the_stock_first_step(corpus, stock_fit, tmp_path):
    # After one step, not two: Adam's first update is about lr * sign(g), so rounding in a near-zero gradient
    # flips whole steps of lr and no bound on later weights would be tight. One step's loss and gradient are:
    # tiles only change the order of sums (measured 5e-7 of the loss, 6e-5 of the gradient's norm in fp32).
    stock, [stock_loss] = stock_fit("fp32", 1)
    tiled, [loss] = _policy_fit(corpus, tmp_path / "run", "tiled", "fp32", 1)
    assert loss == pytest.approx(stock_loss, rel=1e-5)
    g_stock, g_tiled = _first_gradient(stock), _first_gradient(tiled)
    assert g_stock.shape == g_tiled.shape
    assert ((g_tiled - g_stock).norm() / g_stock.norm()).item() < 5e-4


def test_refuses_non_empty_out_and_missing_data(corpus, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(RunFolderError, match="not empty"):
        fit(_quick_cfg(corpus, max_steps=1), out)
    with pytest.raises(LayoutError, match="no such folder"):
        fit(_quick_cfg(tmp_path / "nowhere", max_steps=1), tmp_path / "run2")


def test_bad_audio_is_skipped_and_reported(corpus, tmp_path):
    import shutil

    root = tmp_path / "la"
    shutil.copytree(corpus, root)
    train = read_split(root, "train")
    broken = [train.path[0], train.path[5]]
    open(broken[0], "wb").close()  # empty
    with open(broken[1], "wb") as f:
        f.write(b"fLaC not really")
    with pytest.raises(TooManyBadFiles, match=r"train: 2 of 24 files \(8.3%\) are missing or unreadable.*check-data"):
        fit(_quick_cfg(root, epochs=1), tmp_path / "refused")  # 2 of 24 is over the default --max-bad 5%
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "run"
    cfg = dataclasses.replace(_quick_cfg(root, epochs=1), data=dataclasses.replace(_quick_cfg(root).data, max_bad="2"))
    result = fit(cfg, out)
    assert result.steps == 5  # the 22 readable utterances in whole batches of 4, as the reference (drop_last)
    problems = [json.loads(line) for line in (out / "data_problems.jsonl").read_text().splitlines()]
    assert sorted(p["path"] for p in problems) == sorted(broken)
    assert all(p["split"] == "train" and p["error"] for p in problems)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == 5


def test_short_demo_fit_makes_loss_fall(tmp_path):
    # Eight balanced demo utterances cut to the crop length, so every step sees the same whole set: 30 updates at
    # lr 1e-3 must bring the logged training loss (dropout on) well down. Random crops of full-length clips need
    # ~100+ steps to learn the artefact; the README's demo job measures that (dev EER), too slow for a unit test.
    root = make_demo_corpus(tmp_path / "la", n_train=8, n_dev=4, n_eval=2, bonafide_fraction=0.5, seed=5, workers=1)
    for path in read_split(root, "train").path:
        x, sr = sf.read(path, dtype="float32")
        sf.write(path, x[:4000], sr)
    result = fit(_quick_cfg(root, epochs=30, batch=8, lr=1e-3), tmp_path / "run")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert result.steps == 30 and len(losses) == 30
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.7 * first, (first, last)


def test_cli_fit_demo_end_to_end(tmp_path, capsys):
    profile = tmp_path / "tiny.toml"
    profile.write_text(
        '[model]\nname = "AASIST-L"\n[train]\nepochs = 1\nbatch = 4\ncrop = 4000\nlr = 1e-3\nworkers = 0\n'
        "[data]\neval_samples = 4000\n[demo]\nn_train = 8\nn_dev = 6\nn_eval = 2\n"
    )
    out = tmp_path / "run"
    argv = ["fit", "--demo", "--demo-dir", str(tmp_path / "cache"), "--out", str(out), "--profile", str(profile)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "demo corpus: 16 utterances written" in text
    assert "dev EER" in text and "next:" in text and "best.pt" in text
    assert (out / "checkpoints" / "best.pt").is_file()
    if importlib.util.find_spec("matplotlib"):  # the dev DET curve beside training.png, named in the summary
        assert (out / "dev_det.png").read_bytes()[:4] == b"\x89PNG" and "dev_det.png" in text
    assert main([*argv[:4], "--out", str(tmp_path / "run2"), "--profile", str(profile)]) == 0
    assert "demo corpus: using" in capsys.readouterr().out  # generated once, then reused


def test_cli_usage_errors(tmp_path, capsys):
    assert main(["fit"]) == 2
    assert "exactly one of --data" in capsys.readouterr().err
    assert main(["fit", "--data", str(tmp_path), "--batch", "0", "--out", str(tmp_path / "r")]) == 2
    assert "train.batch must be >= 1" in capsys.readouterr().err


def test_demo_data_refuses_a_foreign_folder(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    assert main(["demo-data", str(tmp_path / "mine"), "--n-train", "2", "--n-dev", "2", "--n-eval", "2"]) == 2
    assert "not a demo corpus" in capsys.readouterr().err
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    assert main(["demo-data", str(tmp_path / "d"), "--n-train", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err


def test_micro_batch_must_divide_the_batch(corpus, tmp_path, capsys):
    argv = ["fit", "--data", str(corpus), "--batch", "4", "--micro-batch", "3", "--crop", "4000", "--workers", "0",
            "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    assert "--micro-batch 3 must divide the batch 4" in capsys.readouterr().err


def test_fit_trains_on_an_asvspoof5_layout(corpus, tmp_path):
    # The demo audio rearranged as ASVspoof 5 distributes it: protocols with its ten columns, flac_T/ and flac_D/.
    import shutil

    root = tmp_path / "as5"
    for split, folder, name in (("train", "flac_T", "ASVspoof5.train.tsv"), ("dev", "flac_D", "ASVspoof5.dev.track_1.tsv")):
        (root / folder).mkdir(parents=True)
        src = read_split(corpus, split)
        lines = ["SPEAKER_ID FLAC_FILE_NAME SPEAKER_GENDER CODEC CODEC_Q CODEC_SEED ATTACK_TAG ATTACK_LABEL KEY TMP"]
        for utt, path, label, attack in zip(src.utt, src.path, src.label, src.attack, strict=True):
            shutil.copy(path, root / folder / f"{utt}.flac")
            key = "bonafide" if label == 1 else "spoof"
            lines.append(f"S001 {utt} F - - - {'-' if label == 1 else 'AC1'} {attack} {key} -")
        (root / name).write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    result = fit(_quick_cfg(root, max_steps=2), out)
    assert result.steps == 2 and json.loads((out / "config.json").read_text())["data"]["root"] == str(root)
    assert len((out / "scores" / "dev.txt").read_text().splitlines()) == 10


class Counting(Feature):
    """A feature as later ones (weight averaging, early stopping) will be: hooks, state, and a stop rule."""

    name = "counting"

    def __init__(self, stop_after_evals: int = 0) -> None:
        self.steps, self.evals, self.stop_after = 0, [], stop_after_evals

    def after_step(self, state):
        self.steps += 1
        assert state.position.step == self.steps  # called once per step, its count restored on resume

    def after_eval(self, state, dev_eer):
        self.evals.append(dev_eer)

    def should_stop(self, state):
        return bool(self.stop_after) and len(self.evals) >= self.stop_after

    def state_dict(self):
        return {"steps": self.steps, "evals": list(self.evals)}

    def load_state_dict(self, state):
        self.steps, self.evals = state["steps"], list(state["evals"])


class Recording:
    def __init__(self) -> None:
        self.records = []

    def log(self, record):
        self.records.append(record)


def test_features_and_loggers_enter_as_objects_and_resume_with_the_run(corpus, tmp_path):
    out = tmp_path / "run"
    counting, logger = Counting(stop_after_evals=1), Recording()
    result = fit(_quick_cfg(corpus, epochs=3), out, features=[counting], logger=logger)
    assert result.epochs == 1 and result.steps == 6  # stopped by the feature after the first evaluation
    assert counting.steps == 6 and len(counting.evals) == 1 and counting.evals[0] == result.dev_eers[0]
    assert [r["step"] for r in logger.records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert not (out / "metrics.jsonl").exists()  # the logger given replaces the default one
    saved = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["features"]
    assert saved == {"counting": {"steps": 6, "evals": counting.evals}}
    resumed = Counting(stop_after_evals=2)
    assert fit(_quick_cfg(corpus, epochs=3), out, resume=True, features=[resumed]).epochs == 2
    assert resumed.steps == 12 and len(resumed.evals) == 2 and resumed.evals[0] == counting.evals[0]


def test_a_cpu_budget_measures_and_counts_the_augmented_data_path(corpus, tmp_path):
    # Under a CPU budget fit reads and augments in the training process: the plan measures one batch of it and
    # counts it, and says so in plan.json and the plan's notes.
    cfg = load_config("demo", {"data.root": str(corpus), "train.crop": 4000, "train.batch": 4, "train.workers": 0,
                               "train.max_steps": 1, "train.precision": "fp32", "data.eval_samples": 4000,
                               "data.dev_batch": 8, "data.augment": "gain:db=-3-3", "memory.budget": "1.5GB",
                               "memory.checkpoint": "none"})
    result = fit(cfg, tmp_path / "run", device="cpu")
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    data_path = plan["overheads"]["data_path"]
    assert data_path["augment"] == "gain:db=-3-3" and data_path["bytes"] >= 0 and data_path["seconds_per_item"] > 0
    assert any(n.startswith("data path in the training process (gain:db=-3-3)") for n in plan["plan"]["notes"])
    assert result.peak_bytes <= 1.5 * 2**30
