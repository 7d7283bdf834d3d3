"""Runs that survive anything: exact resume at any step, refusals, signals, atomic saves, out-of-memory backoff."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal

import pytest
import torch

from lowmem_aasist.checkpoint import ResumeError
from lowmem_aasist.cli import main
from lowmem_aasist.config import PROFILES_DIR, load_config
from lowmem_aasist.data.dataset import EpochSampler
from lowmem_aasist.data.demo import make_demo_corpus
from lowmem_aasist.interrupt import Interrupted
from lowmem_aasist.memory.plan import NoPlanError
from lowmem_aasist.models.aasist import AASIST
from lowmem_aasist.train import RunFolderError, fit, smaller_micro_batch
from lowmem_aasist.train import loop as train_module
from lowmem_aasist.train import state as state_module


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_demo_corpus(tmp_path_factory.mktemp("demo") / "la", n_train=16, n_dev=6, n_eval=2, seed=4, workers=1)


def _cfg(root, **train):
    # fp32 and micro-batch 2 of 4: accumulation on, and the bit-exactness claim made where it is meant to hold.
    overrides = {"data.root": str(root), "train.crop": 3000, "train.batch": 4, "train.workers": 0, "train.epochs": 2,
                 "train.log_every": 1, "train.precision": "fp32", "data.eval_samples": 3000, "data.dev_batch": 8,
                 "memory.micro_batch": 2}
    overrides.update({("data.augment" if k == "augment" else f"train.{k}"): v for k, v in train.items()})
    return load_config("demo", overrides)


def _weights(out):
    return torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]


def _max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    result = fit(_cfg(corpus), out)
    assert result.steps == 8 and result.epochs == 2  # 16 utterances / 4 per step, two epochs
    return out


@pytest.mark.parametrize("k", [1, 4, 6])  # within epoch 1, at its end, within epoch 2
def test_stopped_after_k_steps_and_resumed_is_bit_identical(corpus, reference, tmp_path, k):
    out = tmp_path / "run"
    assert fit(_cfg(corpus, max_steps=k), out).steps == k
    result = fit(_cfg(corpus, max_steps=0), out, resume=True)
    assert result.resumed_from == k and result.steps == 8
    assert _max_difference(_weights(out), _weights(reference)) == 0.0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == list(range(1, 9))  # each step logged once, none lost or repeated


def test_a_run_with_augmentation_stopped_and_resumed_is_bit_identical(corpus, tmp_path):
    spec = "rawboost:5+codec"
    whole, out = tmp_path / "whole", tmp_path / "run"
    fit(_cfg(corpus, max_steps=6, workers=2, augment=spec), whole)
    assert fit(_cfg(corpus, max_steps=3, workers=2, augment=spec), out).steps == 3
    result = fit(_cfg(corpus, max_steps=6, workers=1, augment=spec), out, resume=True)  # another worker count too
    assert result.resumed_from == 3 and result.steps == 6
    assert _max_difference(_weights(out), _weights(whole)) == 0.0
    plain = tmp_path / "plain"
    fit(_cfg(corpus, max_steps=6), plain)
    assert _max_difference(_weights(plain), _weights(whole)) > 0  # the augmentation was applied


@pytest.mark.parametrize("lost", ["random state", "data position"])
def test_a_resume_that_loses_the_random_state_or_the_data_position_differs(corpus, reference, tmp_path, monkeypatch,
                                                                          lost):
    # The control for the bit-identity above: it is evidence only if resumes that get one thing wrong differ.
    # Dropout is what draws from the random state the checkpoint restores; the batch order and the crops are
    # functions of (seed, epoch, position in the epoch), so they hang on the data position instead.
    out = tmp_path / "run"
    fit(_cfg(corpus, max_steps=1), out)
    if lost == "random state":
        monkeypatch.setattr(state_module, "set_rng_state", lambda saved: None)
    else:
        real_set_epoch = EpochSampler.set_epoch
        monkeypatch.setattr(EpochSampler, "set_epoch", lambda self, epoch, skip=0: real_set_epoch(self, epoch))
    real = train_module.forward_backward
    drew = []

    def watching(*args, **kwargs):
        before = torch.get_rng_state()
        loss = real(*args, **kwargs)
        drew.append(not torch.equal(before, torch.get_rng_state()))
        return loss

    monkeypatch.setattr(train_module, "forward_backward", watching)
    fit(_cfg(corpus, max_steps=0), out, resume=True)
    assert drew == [True] * 7  # every resumed step drew dropout masks
    assert _max_difference(_weights(out), _weights(reference)) > 0.0


def test_refuses_a_used_folder_without_resume_and_a_changed_recipe_with_it(corpus, reference, tmp_path):
    with pytest.raises(RunFolderError, match="--resume"):
        fit(_cfg(corpus), reference)
    with pytest.raises(ResumeError, match=r"train\.lr: 0\.001 -> 0\.002.*train\.seed: 1234 -> 7"):
        fit(_cfg(corpus, lr=2e-3, seed=7), reference, resume=True)
    with pytest.raises(ResumeError, match="no checkpoint to resume from"):
        fit(_cfg(corpus), tmp_path / "never", resume=True)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_and_the_resumed_run_is_identical(corpus, reference, tmp_path, monkeypatch, signum, code):
    real = train_module.forward_backward
    calls = {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the signal arrives during step 3: it finishes, saves, and stops
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "forward_backward", interrupting)
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)  # the default handler, or SIG_IGN under nohup
    with pytest.raises(Interrupted, match="interrupted at step 3.*--resume") as info:
        fit(_cfg(corpus), out)
    assert info.value.exit_code == code
    monkeypatch.setattr(train_module, "forward_backward", real)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    fit(_cfg(corpus), out, resume=True)
    assert _max_difference(_weights(out), _weights(reference)) == 0.0


def test_a_crash_between_write_and_rename_leaves_the_previous_checkpoint(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    fit(_cfg(corpus, max_steps=2), out)
    before = (out / "checkpoints" / "last.pt").read_bytes()

    def crash(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        fit(_cfg(corpus, max_steps=3, save_every=1), out, resume=True)
    monkeypatch.undo()
    assert (out / "checkpoints" / "last.pt").read_bytes() == before
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert fit(_cfg(corpus, max_steps=3), out, resume=True).steps == 3  # and the run goes on from it


def _oom_above_two(real):
    """forward_backward on a card where micro-batches above 2 run out of memory part-way through the forward, as a
    real out-of-memory error does: dropout masks drawn and BatchNorm's running statistics updated before it."""

    def small_card(model, x, y, weights, micro_batch, *rest, **kwargs):
        if micro_batch > 2:
            model(x[:micro_batch])
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(model, x, y, weights, micro_batch, *rest, **kwargs)

    return small_card


@pytest.fixture(scope="module")
def backed_off(corpus, tmp_path_factory):
    """(a run planned at micro-batch 4 that runs out of memory and backs off to 2, a run planned at 2), on the CPU
    where kernels are deterministic."""
    real = train_module.forward_backward
    out = tmp_path_factory.mktemp("oom") / "run"
    base = _cfg(corpus, max_steps=3)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(train_module, "forward_backward", _oom_above_two(real))
        planned_at_4 = dataclasses.replace(base, memory=dataclasses.replace(base.memory, micro_batch=4))
        assert fit(planned_at_4, out, device="cpu").steps == 3
    direct = tmp_path_factory.mktemp("direct") / "run"
    fit(base, direct, device="cpu")
    load = functools.partial(torch.load, map_location="cpu", weights_only=True)
    return out, load(out / "checkpoints" / "last.pt"), load(direct / "checkpoints" / "last.pt")


def test_out_of_memory_halves_the_micro_batch_and_redoes_the_step(corpus, backed_off, tmp_path, monkeypatch):
    out, after_oom, direct = backed_off
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in lines if r.get("event") == "oom_backoff"]
    assert events == [{"event": "oom_backoff", "step": 1, "micro_batch": 2, "grad_accum": 2, "previous_micro_batch": 4}]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3]  # the failed step was redone, not lost
    # Redone from the same data and random state: the training is that of a run planned at micro-batch 2.
    params = {n for n, _ in AASIST("AASIST-L").named_parameters()}
    assert _max_difference({k: after_oom["model"][k] for k in params}, {k: direct["model"][k] for k in params}) == 0.0
    for a, b in zip(after_oom["optimizer"]["state"].values(), direct["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)

    monkeypatch.setattr(train_module, "forward_backward", lambda *a, **k: (_ for _ in ()).throw(
        torch.OutOfMemoryError("injected")))
    with pytest.raises(NoPlanError, match="out of memory at micro-batch 2 x crop 3,000, the smallest that trains"):
        fit(_cfg(corpus, max_steps=1), tmp_path / "hopeless")


def test_out_of_memory_leaves_no_trace_in_the_running_statistics(backed_off):
    _, after_oom, direct = backed_off
    assert _max_difference(after_oom["model"], direct["model"]) == 0.0


def test_smaller_micro_batch_keeps_dividing_the_batch():
    assert [smaller_micro_batch(24, m, 2) for m in (24, 12, 6, 3, 2)] == [12, 6, 3, 0, 0]  # never below 2
    assert smaller_micro_batch(24, 8, 2) == 4 and smaller_micro_batch(20, 5, 2) == 2


def test_cli_resume_reads_the_run_config_and_refuses_recipe_changes(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["fit", "--data", str(corpus), "--profile", "demo", "--crop", "3000", "--batch", "4", "--epochs", "1",
            "--workers", "0", "--precision", "fp32", "--out", str(out)]
    assert main([*base, "--max-steps", "1"]) == 0
    assert main([*base, "--max-steps", "2"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["fit", "--out", str(out), "--resume", "--max-steps", "2"]) == 0
    assert "resumed at step 1" in capsys.readouterr().out
    assert main(["fit", "--out", str(out), "--resume", "--lr", "0.5"]) == 2
    assert "train.lr: 0.001 -> 0.5" in capsys.readouterr().err


def test_config_differences_ignore_what_a_resume_may_change():
    from lowmem_aasist.checkpoint import config_differences

    a = load_config("demo").to_dict()
    b = dataclasses.replace(load_config("demo", {"memory.budget": "2GB", "train.workers": 0, "train.max_steps": 9}))
    assert config_differences(a, b.to_dict()) == []
    assert config_differences(a, load_config("demo", {"train.crop": 8000}).to_dict()) == ["train.crop: 16000 -> 8000"]


def test_a_second_ctrl_c_stops_at_once():
    from lowmem_aasist.interrupt import StopRequests

    before = signal.getsignal(signal.SIGINT)  # the default handler, or SIG_IGN under nohup
    with StopRequests() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.exit_code == 130
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_the_first_command_plus_resume_continues_and_only_a_changed_result_is_refused(tmp_path, capsys):
    # How people resume: the command that started the run, with --resume added (issue 14: --demo was refused).
    profile = tmp_path / "tiny-demo.toml"
    profile.write_text((PROFILES_DIR / "demo.toml").read_text().replace("n_train = 800", "n_train = 16")
                       .replace("n_dev = 200", "n_dev = 4").replace("n_eval = 200", "n_eval = 2"))
    out = tmp_path / "run"
    first = ["fit", "--demo", "--demo-dir", str(tmp_path / "demo"), "--profile", str(profile), "--crop", "3000",
             "--batch", "4", "--seed", "3", "--epochs", "1", "--workers", "0", "--precision", "fp32", "--out", str(out)]
    assert main([*first, "--max-steps", "2"]) == 0
    assert main([*first, "--max-steps", "3", "--resume"]) == 0
    assert "resumed at step 2" in capsys.readouterr().out
    # An option left out keeps the run's value (the run's config is the base, not the profile's defaults) ...
    assert main(["fit", "--out", str(out), "--resume", "--max-steps", "4"]) == 0
    assert "resumed at step 3" in capsys.readouterr().out
    # ... and one that differs and changes the result is refused, naming it and both values.
    assert main([*[a if a != "3" else "5" for a in first], "--resume"]) == 2
    assert "train.seed: 3 -> 5" in capsys.readouterr().err
