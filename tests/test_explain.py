"""``probe --explain``: saved-for-backward bytes charged to the right sections, and the estimator's peak per sample.

Everything runs on fake tensors (AASIST-L, crop 16,000), so sizes cost nothing and the whole file takes seconds.
"""

from __future__ import annotations

import functools

import pytest
import torch
from rich.console import Console
from torch._subclasses.fake_tensor import FakeTensorMode

import lowmem_aasist.memory.explain as explain_mod
from lowmem_aasist.memory.device import autocast_ctx
from lowmem_aasist.memory.engine import prepare_model
from lowmem_aasist.memory.estimate import estimate_step_peak, fake_module
from lowmem_aasist.memory.explain import (
    OPTIMIZER,
    WEIGHTS,
    Breakdown,
    SavedBySection,
    breakdown,
    explain,
    fixed_bytes,
    sections,
)
from lowmem_aasist.memory.measure import LiveTensorTracker
from lowmem_aasist.memory.techniques import apply_checkpointing, apply_lean_pooling
from lowmem_aasist.models.aasist import AASIST

MODEL, CROP = "AASIST-L", 16_000
FRONT_END, GRAPH = "front end", "graph"  # AASIST's first and last sections


@functools.cache
def cached(precision: str, policy: str, lean: bool) -> Breakdown:
    # Several tests look at the same configurations; each costs two fake steps.
    return breakdown(MODEL, CROP, precision, policy, lean)


def activation_sections(b: Breakdown) -> dict[str, int]:
    return {k: v for k, v in b.per_module.items() if k not in (OPTIMIZER, WEIGHTS)}


@pytest.mark.parametrize(("precision", "policy", "lean"), [("fp32", "none", False), ("bf16", "block0-segments", True)])
def test_sections_add_up_to_what_the_forward_leaves_alive(precision, policy, lean):
    """After a forward, the tensors still alive beyond the model are what autograd saved (plus the logits): the
    sections must account for all of them, each once, whether checkpointing is on or not."""
    model = AASIST(MODEL).train()
    if lean:
        apply_lean_pooling(model)
    apply_checkpointing(model, policy)
    saved = SavedBySection(model).install()
    mode = FakeTensorMode()
    fake_module(model, mode)
    with mode:
        x = torch.randn(2, CROP)
        tracker = LiveTensorTracker()
        with tracker, autocast_ctx(torch.device("cpu"), precision):
            logits = model(x)
        alive = tracker.current_bytes - logits.untyped_storage().nbytes()
    assert set(saved.last) == set(sections(model))
    assert all(v >= 0 for v in saved.last.values())
    assert sum(saved.last.values()) == pytest.approx(alive, rel=1e-3)  # exactly equal today
    assert saved.last["encoder.0"] > 0 and saved.last[GRAPH] > 0


def test_encoder0_dominates_the_stock_recipe():
    b = cached("fp32", "none", False)
    acts = activation_sections(b)
    assert max(acts, key=acts.__getitem__) == "encoder.0"
    assert acts["encoder.0"] >= 0.5 * b.saved_per_sample
    # Without checkpointing nearly everything saved is live at the peak (fp32 stock: saved ~ peak).
    assert b.saved_per_sample == pytest.approx(b.peak_per_sample, rel=0.05)


def test_lean_pooling_shrinks_encoder0():
    stock, lean = cached("fp32", "none", False), cached("fp32", "none", True)
    assert lean.per_module["encoder.0"] < 0.75 * stock.per_module["encoder.0"]
    assert lean.per_module[FRONT_END] == stock.per_module[FRONT_END]  # the front end has no time pool to swap
    assert lean.peak_per_sample < stock.peak_per_sample


def test_gat_policy_shrinks_what_the_graph_saves():
    plain, gat = cached("fp32", "none", True), cached("fp32", "gat", True)
    assert gat.per_module[GRAPH] < 0.5 * plain.per_module[GRAPH]
    for name in (FRONT_END, "encoder.0", "encoder.5"):
        assert gat.per_module[name] == plain.per_module[name]  # the encoder is not checkpointed


def test_peak_per_sample_is_the_estimators():
    """The breakdown's step skips the estimator's warm-up step and Adam; per sample, that must change nothing."""
    b = cached("bf16", "block0-segments", True)

    def prepare(m):
        prepare_model(m, "block0-segments")  # lean pooling, then the policy

    p1, p2 = (estimate_step_peak(MODEL, mb, CROP, mb, "bf16", prepare=prepare) for mb in (1, 2))
    assert b.peak_per_sample == p2 - p1


def test_fixed_bytes_are_computed_from_the_parameters():
    fixed = fixed_bytes(MODEL)
    n = sum(p.numel() for p in AASIST(MODEL).parameters())
    assert fixed["adam"] == 8 * n
    assert fixed["adam"] / 4 < fixed["adam8bit"] < fixed["adam"]  # small tensors keep 32-bit state
    assert fixed[WEIGHTS] >= 8 * n
    assert cached("fp32", "none", False).per_module[OPTIMIZER] == fixed["adam"]


def test_explain_prints_a_table(monkeypatch):
    monkeypatch.setattr(explain_mod, "ROWS", (("fp32", "none", False), ("fp32", "none", True)))
    console = Console(record=True, width=240)
    rows = explain(MODEL, CROP, console)
    text = console.export_text()
    assert [(r.precision, r.policy, r.lean) for r in rows] == list(explain_mod.ROWS)
    for heading in ("encoder.0", "front end", "graph", "peak/sample", "adam8bit", "not measured"):
        assert heading in text
    assert f"{rows[1].peak_per_sample / 2**20:.1f}" in text
