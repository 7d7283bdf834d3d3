"""Gradient accumulation is exact: micro-batches give the full batch's gradient (BatchNorm in eval mode)."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from lowmem_aasist.models.aasist import AASIST
from lowmem_aasist.step import forward_backward


@pytest.mark.parametrize("micro", [1, 2, 4])
def test_accumulated_gradient_equals_full_batch(micro):
    torch.manual_seed(0)
    model = AASIST("AASIST-L").eval()  # eval: BN uses running stats, dropout off, so the split cannot matter
    x = torch.randn(6, 5000)
    y = torch.tensor([1, 0, 0, 1, 0, 0])
    w = torch.tensor([0.1, 0.9])

    loss_full = forward_backward(model, x, y, w, 6, nullcontext)
    full = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    loss_acc = forward_backward(model, x, y, w, micro, nullcontext)

    reference = torch.nn.functional.cross_entropy(model(x), y, weight=w)
    assert loss_full.item() == pytest.approx(reference.item(), rel=1e-6)
    assert loss_acc.item() == pytest.approx(loss_full.item(), rel=1e-6)
    for name, g in full.items():
        got = dict(model.named_parameters())[name].grad
        torch.testing.assert_close(got, g, rtol=1e-4, atol=1e-7, msg=name)


def test_a_lone_last_utterance_joins_the_previous_micro_batch():
    # 5 utterances in micro-batches of 2 would leave one alone, which BatchNorm cannot train on: it must join.
    torch.manual_seed(0)
    model = AASIST("AASIST-L").train()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    forward_backward(model, torch.randn(5, 4000), torch.tensor([1, 0, 0, 1, 0]), torch.tensor([0.1, 0.9]), 2, nullcontext)
    assert seen == [2, 3]
