"""Real-GPU checks (issue 9): the cap holds, NVML and torch agree, and a real out-of-memory error is recovered from.

Marked ``gpu``: skipped with a reason where no CUDA device is visible (CI and the project's CPU machines).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lowmem_aasist.config import load_config
from lowmem_aasist.data.demo import make_demo_corpus
from lowmem_aasist.memory.device import device_facts, process_gpu_bytes
from lowmem_aasist.memory.enforce import enforce_budget
from lowmem_aasist.train import fit

pytestmark = pytest.mark.gpu
MiB = 2**20


@pytest.fixture
def cuda():
    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.empty_cache()
    yield device
    torch.cuda.set_per_process_memory_fraction(1.0, device)  # other tests get the whole card back
    torch.cuda.empty_cache()


def test_budget_cap_raises_out_of_memory_before_the_budget(cuda):
    facts = device_facts(cuda)
    budget = facts.context_bytes + 512 * MiB  # the allocator may hold 512 MiB, whatever the card's size
    enforce_budget(cuda, budget, facts.context_bytes)
    kept = torch.empty(256 * MiB, dtype=torch.uint8, device=cuda)  # well under the cap
    with pytest.raises(torch.OutOfMemoryError):
        torch.empty(384 * MiB, dtype=torch.uint8, device=cuda)  # 640 MiB in all: past the cap
    used = process_gpu_bytes(cuda)
    assert used is None or used <= budget
    del kept


def test_nvml_and_torch_agree_on_the_process_within_the_context(cuda):
    facts = device_facts(cuda)
    block = torch.empty(256 * MiB, dtype=torch.uint8, device=cuda)
    used = process_gpu_bytes(cuda)
    if used is None:
        pytest.skip("NVML does not list this process (e.g. inside some containers)")
    reserved = torch.cuda.memory_reserved(cuda)
    # NVML counts the CUDA context and cuBLAS/cuDNN handles on top of what the allocator reserved.
    assert reserved <= used <= reserved + facts.context_bytes + 256 * MiB, (used, reserved, facts.context_bytes)
    del block


def test_real_out_of_memory_halves_the_micro_batch(cuda, tmp_path):
    # No planning: micro-batch 8 of AASIST at the paper's crop (~3.3 GiB of fp32 activations) under a 1.5 GiB
    # allocator cap set by hand, so the first step fails for real and the trainer must back off and finish.
    corpus = make_demo_corpus(tmp_path / "demo", n_train=16, n_dev=4, n_eval=2, seed=5, workers=1)
    cfg = load_config("demo", {"data.root": str(corpus), "model.name": "AASIST", "train.crop": 64_600,
                               "train.batch": 8, "train.workers": 0, "train.precision": "fp32", "train.epochs": 1,
                               "train.max_steps": 1, "train.channels_last": False, "data.eval_samples": 16_000,
                               "data.dev_batch": 2, "memory.checkpoint": "none"})
    cfg = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, micro_batch=8))
    total = torch.cuda.get_device_properties(cuda).total_memory
    torch.cuda.set_per_process_memory_fraction(1.5 * 2**30 / total, cuda)
    result = fit(cfg, tmp_path / "run", device="cuda")
    assert result.steps == 1
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    backoffs = [r for r in lines if r.get("event") == "oom_backoff"]
    assert backoffs and backoffs[0]["previous_micro_batch"] == 8 and backoffs[-1]["micro_batch"] >= 2
    assert [r["step"] for r in lines if "loss" in r] == [1]
