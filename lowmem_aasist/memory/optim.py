"""Optimizers by name; the 8-bit ones come from bitsandbytes, imported only when asked for.

AASIST's optimizer state is small (Adam: ~2.3 MiB for 297,866 parameters), so 8-bit Adam saves ~1.4 MiB: offered
because users ask for it, reported honestly by ``probe --explain``, never needed to fit a budget.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .fused_step import OptimizerInBackward
from .plan import OPTIMIZERS


class OptimizerError(Exception):
    """An optimizer that cannot be built here; one line saying what to do."""


def make_optimizer(
    name: str, params: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, float], weight_decay: float,
    in_backward: bool = False,
) -> torch.optim.Optimizer:
    """``adam`` (the paper's: Adam with L2 weight decay), ``adam8bit`` or ``adamw8bit`` (bitsandbytes).

    ``in_backward``: the same optimizer, one per parameter, stepped inside backward as each gradient is complete
    (:class:`~.fused_step.OptimizerInBackward`; bit-identical updates, every gradient never held at once).
    """
    if in_backward:
        return OptimizerInBackward(params, lambda groups: make_optimizer(name, groups, lr, betas, weight_decay))
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name not in OPTIMIZERS:
        raise OptimizerError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    try:
        import bitsandbytes as bnb  # noqa: PLC0415 - heavy, and noisy on CPU machines: import on demand
    except Exception as exc:  # ImportError, or a broken native library
        raise OptimizerError(
            f"optimizer {name} needs bitsandbytes ({type(exc).__name__}: {str(exc)[:80]}); "
            "pip install 'bitsandbytes>=0.50', or use optimizer adam"
        ) from None
    cls = bnb.optim.Adam8bit if name == "adam8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=lr, betas=betas, weight_decay=weight_decay)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (unique storages)."""
    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                key = (value.device, value.untyped_storage().data_ptr())
                if key not in seen:
                    seen.add(key)
                    total += value.untyped_storage().nbytes()
    return total
