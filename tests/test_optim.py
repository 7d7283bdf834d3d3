"""Optimizers by name: Adam and bitsandbytes' 8-bit Adam both step on CPU; the saving is measured, and small."""

from __future__ import annotations

import pytest
import torch

from lowmem_aasist.memory.optim import OptimizerError, make_optimizer, optimizer_state_bytes
from lowmem_aasist.models.aasist import AASIST


def _one_step(model, optimizer):
    loss = model(torch.randn(2, 4000)).square().mean()
    loss.backward()
    optimizer.step()


def test_adam_is_the_papers():
    opt = make_optimizer("adam", AASIST("AASIST-L").parameters(), 1e-4, (0.9, 0.999), 1e-4)
    assert isinstance(opt, torch.optim.Adam)
    assert opt.defaults["weight_decay"] == 1e-4 and opt.defaults["betas"] == (0.9, 0.999)


def test_adam8bit_steps_on_cpu_and_saves_state():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed")
    torch.manual_seed(0)
    sizes = {}
    for name in ("adam", "adam8bit"):
        model = AASIST("AASIST").train()
        opt = make_optimizer(name, model.parameters(), 1e-4, (0.9, 0.999), 1e-4)
        before = [p.detach().clone() for p in model.parameters()]
        _one_step(model, opt)
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
        sizes[name] = optimizer_state_bytes(opt)
        trained = sum(p.numel() for p in model.parameters() if p.grad is not None)  # unused bn1 gets no state
    # Adam keeps two fp32 moments per trained parameter plus a step counter each.
    assert 2 * 4 * trained <= sizes["adam"] <= 2 * 4 * trained + 8 * 200
    assert sizes["adam8bit"] < 0.6 * sizes["adam"]


def test_unknown_optimizer():
    with pytest.raises(OptimizerError, match="choose one of adam"):
        make_optimizer("sgdx", AASIST("AASIST-L").parameters(), 1e-4, (0.9, 0.999), 0.0)
