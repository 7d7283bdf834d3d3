"""Scale-out with torchrun: shards that add up to the single-process batches, the same gradient with 2 gloo
processes as with one (BatchNorm in eval mode), an end-to-end 2-process fit that rank 0 alone writes and a
single process resumes, and a 2-process fit stopped and resumed on 2 processes, bit-identical to one never stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from lowmem_aasist.data.dataset import EpochSampler
from lowmem_aasist.data.demo import make_demo_corpus
from lowmem_aasist.models.aasist import AASIST
from lowmem_aasist.step import forward_backward


def _torchrun(args: list[str], cwd, timeout: int = 900) -> subprocess.CompletedProcess:
    # A generous limit: on a loaded 2-core machine two processes importing torch and joining a gloo group can take
    # minutes; the limit is there only so that a hung rendezvous fails instead of hanging the suite.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_rank_shards_make_up_the_single_process_batches():
    single = EpochSampler(np.arange(50), seed=3, batch=8)
    ranks = [EpochSampler(np.arange(50), seed=3, batch=8, rank=r, world=2) for r in (0, 1)]
    for s in (single, *ranks):
        s.set_epoch(2, skip=16)
    whole = [i for i, _ in single]
    parts = [[i for i, _ in r] for r in ranks]
    assert len(whole) == 32 and all(len(p) == 16 for p in parts)  # 50 -> 6 whole batches, 2 skipped
    for b in range(4):
        assert sorted(whole[8 * b : 8 * b + 8]) == sorted(parts[0][4 * b : 4 * b + 4] + parts[1][4 * b : 4 * b + 4])
    with pytest.raises(ValueError, match="multiple of the world size"):
        EpochSampler(np.arange(10), seed=0, batch=5, world=2)


WORKER = textwrap.dedent('''
    import os, sys, torch
    from contextlib import nullcontext
    from lowmem_aasist.distributed import join_world, leave_world, wrap_for_ranks
    from lowmem_aasist.models.aasist import AASIST
    from lowmem_aasist.step import forward_backward

    world, _ = join_world("cpu")
    torch.manual_seed(0)
    model = AASIST("AASIST-L").eval()  # eval: BatchNorm uses running statistics, dropout off
    net = wrap_for_ranks(model, world, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4000, generator=g), torch.tensor([1, 0, 0, 1, 0, 0, 1, 0])
    w = torch.tensor([0.1, 0.9])
    mine = slice(4 * world.rank, 4 * world.rank + 4)
    total = world.sum(w[y[mine]].sum()) / world.size
    loss = forward_backward(net, x[mine], y[mine], w, 2, nullcontext, total_weight=total, no_sync=net.no_sync)
    if world.rank == 0:
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        torch.save({"grads": grads, "loss": world.sum(loss) / world.size}, sys.argv[1])
    else:
        world.sum(loss)
    leave_world(world)
''')


def test_two_gloo_processes_give_the_single_process_gradient(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    result = _torchrun([str(script), str(tmp_path / "ddp.pt")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)

    torch.manual_seed(0)
    model = AASIST("AASIST-L").eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4000, generator=g), torch.tensor([1, 0, 0, 1, 0, 0, 1, 0])
    from contextlib import nullcontext

    # One thread, as each worker runs (OMP_NUM_THREADS=1): the kernels then sum in the same order whatever the load.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loss = forward_backward(model, x, y, torch.tensor([0.1, 0.9]), 2, nullcontext)
    finally:
        torch.set_num_threads(threads)
    assert ddp["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
    single = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert single.keys() == ddp["grads"].keys()
    for name, grad in single.items():
        torch.testing.assert_close(ddp["grads"][name], grad, rtol=1e-5, atol=1e-8, msg=name)


def test_torchrun_fit_writes_once_and_resumes_on_one_process(tmp_path):
    root = make_demo_corpus(tmp_path / "la", n_train=16, n_dev=4, n_eval=2, seed=6, workers=1)
    out = tmp_path / "run"
    args = ["-m", "lowmem_aasist", "fit", "--data", str(root), "--profile", "demo", "--crop", "3000", "--batch", "8",
            "--epochs", "2", "--max-steps", "2", "--workers", "0", "--precision", "fp32", "--out", str(out)]
    result = _torchrun(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done: 2 steps") == 1  # rank 0 alone speaks
    config = json.loads((out / "config.json").read_text())
    assert config["resolved"]["world_size"] == 2 and config["resolved"]["micro_batch"] == 4  # 8 shared by 2
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [s["step"] for s in steps] == [2]  # logged every 10 steps and at the last
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert len(ckpt["rng_ranks"]) == 2 and ckpt["position"]["step"] == 2
    AASIST("AASIST-L").load_state_dict(ckpt["model"])  # a plain state dict, no DDP "module." prefix
    from lowmem_aasist.cli import main

    assert main(["fit", "--out", str(out), "--resume", "--max-steps", "3"]) == 0  # a world of one continues
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [s["step"] for s in steps] == [2, 3]


def test_torchrun_fit_stopped_and_resumed_on_two_processes_is_bit_identical(tmp_path):
    # The README's claim: a checkpoint resumes exactly with the same number of processes. Stopped after step 1 of
    # 4, so the resumed run starts inside an epoch (each rank's share of the rest of the batch order) and crosses
    # into the next; each rank's dropout stream must continue where it stopped.
    root = make_demo_corpus(tmp_path / "la", n_train=16, n_dev=4, n_eval=2, seed=7, workers=1)

    def fit_on_two(out, *more):
        args = ["-m", "lowmem_aasist", "fit", "--data", str(root), "--profile", "demo", "--crop", "3000", "--batch", "8",
                "--epochs", "2", "--workers", "0", "--precision", "fp32", "--device", "cpu", "--out", str(out), *more]
        result = _torchrun(args, tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        return torch.load(out / "checkpoints" / "last.pt", weights_only=True)

    whole = fit_on_two(tmp_path / "whole")
    assert fit_on_two(tmp_path / "run", "--max-steps", "1")["position"]["step"] == 1
    resumed = fit_on_two(tmp_path / "run", "--resume", "--max-steps", "4")
    assert whole["position"] == resumed["position"] and resumed["position"]["step"] == 4
    assert len(resumed["rng_ranks"]) == 2
    assert whole["model"].keys() == resumed["model"].keys()
    differ = [k for k, v in whole["model"].items() if not torch.equal(v, resumed["model"][k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
