"""One optimizer step's forward and backward, split into micro-batches: shared by the trainer and the memory probes.

Gradient accumulation is exact: each micro-batch's loss is its *sum* of weighted per-utterance losses divided by
the whole batch's total weight, so the accumulated gradient is the gradient of the full batch's weighted-mean
cross-entropy (the loss the paper's recipe uses), whatever the split. BatchNorm still sees micro-batch statistics,
which is the one thing accumulation cannot keep (the planner prefers large micro-batches for that reason).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def forward_backward(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    class_weights: Tensor,
    micro_batch: int,
    autocast: Callable[[], AbstractContextManager],
    scale: Callable[[Tensor], Tensor] = lambda loss: loss,
    total_weight: Tensor | None = None,
    no_sync: Callable[[], AbstractContextManager] = nullcontext,
    last: Callable[[], AbstractContextManager] = nullcontext,
) -> Tensor:
    """Accumulate gradients of the weighted-mean loss of (x, y) over micro-batches; return the loss (detached).

    ``x`` may live on the CPU: each micro-batch moves to the weights' device only when it is used, so device memory
    holds one micro-batch of audio, never the whole batch. ``scale`` is the GradScaler's ``scale`` under fp16.
    Under DistributedDataParallel, ``total_weight`` is the whole global batch's weight divided by the world size (so
    DDP's averaging of the ranks' gradients gives the global batch's gradient) and ``no_sync`` the wrapper's
    context that skips the gradient all-reduce on all but the last micro-batch. ``last`` wraps the last micro-batch
    instead: with the optimizer step in backward (:func:`~.memory.fused_step.stepping`) its backward applies the
    update, once, to the gradient summed over every micro-batch.
    """
    device = class_weights.device
    y = y.to(device)
    if total_weight is None:
        total_weight = class_weights[y].sum()
    loss_sum = torch.zeros((), device=device)
    sizes = [micro_batch] * (len(x) // micro_batch) + ([len(x) % micro_batch] if len(x) % micro_batch else [])
    if len(sizes) > 1 and sizes[-1] == 1:  # a batch that lost an utterance: one alone could not pass BatchNorm
        sizes[-2:] = [sizes[-2] + 1]
    for n, (xs, ys) in enumerate(zip(x.split(sizes), y.split(sizes), strict=True)):
        with no_sync() if n < len(sizes) - 1 else last():
            with autocast():
                logits = model(xs.to(device, non_blocking=True))
            loss = F.cross_entropy(logits.float(), ys, weight=class_weights, reduction="sum") / total_weight
            scale(loss).backward()
        loss_sum += loss.detach()
        del logits, loss  # free this micro-batch's graph outputs before the next forward
    return loss_sum
