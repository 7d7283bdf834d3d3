"""Memory and speed techniques, each a small function applied to a model once at setup.

The machinery here is generic; which modules a policy picks is the model family's business (AASIST's policies are
in :mod:`lowmem_aasist.models.aasist_memory`). Every technique is exact unless its policy says otherwise: the loss,
the gradients and the BatchNorm running statistics of a training step are those of the unmodified model
(bit-identical in fp32 on CPU, see tests/test_techniques.py); only what autograd keeps between forward and backward
changes. None of them renames a parameter or buffer, so state dicts stay compatible.

* :func:`apply_lean_pooling` swaps each time pool by 3 for :class:`LeanMaxPool`, which keeps a uint8 window offset
  per output element for backward instead of the stock pool's whole input plus int64 indices.
* :func:`apply_checkpointing` applies a :class:`Policy`: modules recomputed during backward, whole or in segments,
  after any hand-scheduled autograd Functions the policy installs (:mod:`.block0`, :mod:`.tiled`).
* :func:`apply_channels_last` runs the convolution trunk in channels-last layout.

They compose in any order on the same model.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from ..models import family_of

__all__ = [
    "LeanMaxPool",
    "LeanMaxPoolTime",
    "Policy",
    "apply_channels_last",
    "apply_checkpointing",
    "apply_lean_pooling",
]


# SELU's constants as ATen's selu kernel uses them; its backward is elu_backward on the result with these. Shared by
# the hand-scheduled Functions (.block0, .tiled), which run SELU's kernels directly.
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


# --------------------------------------------------------------------------------------------------------------------
# Lean max-pool over time


# Output elements handled per call of the stock pooling kernels. Unchunked, their int64 indices would be 8 bytes per
# output element, more than the bf16 map being pooled; chunks of at least 2^19 elements (4 MiB of indices) and at
# most 1/16 of the tensor keep that temporary small while keeping the number of kernel calls (GPU launches) low.
_MIN_CHUNK = 1 << 19
_MAX_CHUNKS = 16


def is_channels_last(x: Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _rows(t: Tensor, channels_last: bool) -> Tensor:
    """A dense [B, C, H, W] tensor viewed, without copying, as independent rows [R, C', 1, W] in the same layout.

    A (1, 3) pool never mixes rows, so pooling rows equals pooling the tensor, any prefix of rows is a dense chunk,
    and each row's pooling indices are plain time positions w (the kernel numbers them h * W + w with h = 0).
    """
    b, c, h, w = t.shape
    if channels_last:  # memory order B, H, W, C: rows are (b, h), each a dense W x C block
        return t.permute(0, 2, 3, 1).view(b * h, 1, w, c).permute(0, 3, 1, 2)
    return t.view(b * c * h, 1, 1, w)


def _chunks(rows: Tensor) -> list[slice]:
    per_row = max(1, rows.size(1) * (rows.size(-1) // 3))
    n_rows = rows.size(0)
    step = max(1, _MIN_CHUNK // per_row, -(-n_rows // _MAX_CHUNKS))
    return [slice(r, r + step) for r in range(0, rows.size(0), step)]


class LeanMaxPoolTime(torch.autograd.Function):
    """``F.max_pool2d(x, (1, 3))`` whose backward needs only a uint8 offset per output element.

    The stock pool saves its whole input and int64 indices (for block 0 of AASIST: the full map plus 8 bytes per
    output element). The winner of each window of 3 is one of 3 positions, so one byte per output element is all
    backward needs; the input shape and layout are kept as metadata.

    Both directions run PyTorch's own max-pool kernels, a chunk of rows at a time, converting indices to offsets
    and back on the fly. So values, tie-breaking (first maximum), NaN handling (a NaN wins) and gradients (signed
    zeros included) are the stock pool's bit for bit, in every floating dtype and either memory layout.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        squeeze = x.dim() == 3  # [C, H, W], as nn.MaxPool2d accepts
        if squeeze:
            x = x.unsqueeze(0)
        channels_last = is_channels_last(x)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = x.contiguous(memory_format=fmt)  # a no-op for conv and add outputs; the stock kernel would copy too
        b, c, h, w = x.shape
        w_out = w // 3
        out = torch.empty((b, c, h, w_out), dtype=x.dtype, device=x.device, memory_format=fmt)
        offsets = torch.empty((b, c, h, w_out), dtype=torch.uint8, device=x.device, memory_format=fmt)
        x_rows, out_rows, off_rows = (_rows(t, channels_last) for t in (x, out, offsets))
        starts = torch.arange(0, 3 * w_out, 3, device=x.device)  # first position of each window
        for rows in _chunks(x_rows):
            values, indices = F.max_pool2d(x_rows[rows], (1, 3), return_indices=True)
            out_rows[rows].copy_(values)
            off_rows[rows].copy_(indices.sub_(starts))  # 0, 1 or 2 once the window start is taken off
        ctx.save_for_backward(offsets)
        ctx.squeeze, ctx.channels_last, ctx.width = squeeze, channels_last, w
        return out.squeeze(0) if squeeze else out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> Tensor:  # type: ignore[override]
        (offsets,) = ctx.saved_tensors
        channels_last = ctx.channels_last
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        if ctx.squeeze:
            grad_out = grad_out.unsqueeze(0)
        grad_out = grad_out.contiguous(memory_format=fmt)
        b, c, h, w_out = offsets.shape
        grad_in = torch.empty((b, c, h, ctx.width), dtype=grad_out.dtype, device=grad_out.device, memory_format=fmt)
        g_rows, in_rows, off_rows = (_rows(t, channels_last) for t in (grad_out, grad_in, offsets))
        starts = torch.arange(0, 3 * w_out, 3, device=offsets.device)
        for rows in _chunks(in_rows):
            indices = off_rows[rows] + starts  # int64 time positions, for this chunk only
            # The stock backward reads only the shape and layout of its ``self`` argument, never its values, so
            # the (not yet written) destination rows stand in for the input we did not keep.
            grad = torch.ops.aten.max_pool2d_with_indices_backward(
                g_rows[rows], in_rows[rows], [1, 3], [1, 3], [0, 0], [1, 1], False, indices
            )
            in_rows[rows].copy_(grad)
        return grad_in.squeeze(0) if ctx.squeeze else grad_in


class LeanMaxPool(nn.Module):
    """Drop-in for ``nn.MaxPool2d((1, 3))`` (floor mode) that saves uint8 offsets instead of its input for backward.

    Works on [B, C, H, W] (or [C, H, W]) in any floating dtype and either memory layout. Without autograd
    (eval, ``torch.no_grad``, or an input that needs no gradient) it is the stock pool, which is faster.
    """

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return LeanMaxPoolTime.apply(x)
        return F.max_pool2d(x, (1, 3))

    def extra_repr(self) -> str:
        return "kernel_size=(1, 3), stride=(1, 3), saves uint8 offsets"


def _is_time_pool_by_3(module: nn.Module) -> bool:
    # Only the exact configuration LeanMaxPool reproduces; anything else is left alone rather than changed.
    if not isinstance(module, nn.MaxPool2d) or module.return_indices or module.ceil_mode:
        return False
    pair = nn.modules.utils._pair
    stride = module.stride if module.stride is not None else module.kernel_size
    return (
        pair(module.kernel_size) == (1, 3)
        and pair(stride) == (1, 3)
        and pair(module.padding) == (0, 0)
        and pair(module.dilation) == (1, 1)
    )


def apply_lean_pooling(model: nn.Module) -> list[str]:
    """Replace every ``nn.MaxPool2d((1, 3))`` submodule (the time pools of AASIST's residual blocks) with
    :class:`LeanMaxPool`, which is exact for exactly that configuration.

    Returns the qualified names of the replaced pools (e.g. ``encoder.0.0.pool``); pools have no parameters or
    buffers, so state-dict keys do not change. Applying it twice replaces nothing the second time.
    """
    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if _is_time_pool_by_3(child):
                setattr(module, child_name, LeanMaxPool())
                replaced.append(f"{name}.{child_name}" if name else child_name)
    return replaced


# --------------------------------------------------------------------------------------------------------------------
# Activation checkpointing


class _RestoreNormStats:
    """Recompute context: running statistics touched during a checkpoint's recompute are put back when it ends.

    Plain checkpointing re-runs BatchNorm in train mode during backward, which applies the momentum update a second
    time and adds 1 to num_batches_tracked. Restoring a snapshot taken when the recompute starts is exact, whatever
    happened to the buffers between forward and backward (another forward, an optimizer step), and it also covers
    a recompute that checkpoint stops early (the exception passes through ``__exit__``).
    """

    def __init__(self, module: nn.Module) -> None:
        # _NormBase: every BatchNorm variant (and InstanceNorm with running stats), the modules whose train-mode
        # forward writes buffers.
        self._buffers = [
            buf
            for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase)
            for buf in m.buffers(recurse=False)
        ]
        self._saved: list[Tensor] = []

    def __enter__(self) -> None:
        self._saved = [buf.detach().clone() for buf in self._buffers]

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for buf, saved in zip(self._buffers, self._saved, strict=True):
                buf.copy_(saved)
        self._saved = []


def _checkpointed(module: nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` under non-reentrant checkpointing with ``module``'s norm statistics protected.

    Non-reentrant checkpointing stashes and restores the RNG state (so dropout replays the same mask on recompute)
    and the autocast state, supports keyword arguments and nesting, and stops recomputing as soon as the tensors
    backward needs exist again.
    """

    def contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), _RestoreNormStats(module)

    return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts, **kwargs)


class _CheckpointedForward:
    """Instance-level ``forward`` that checkpoints ``body(module, ...)`` while training with gradients enabled.

    A small picklable object (not a closure) so that ``copy.deepcopy(model)`` makes the copy checkpoint its own
    module, not the original's. Parameters and buffers stay where they were: state-dict keys do not change.
    """

    def __init__(self, module: nn.Module, body: Callable[..., Any]) -> None:
        self.module = module
        self.body = body

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        if not (module.training and torch.is_grad_enabled()):
            return self.body(module, *args, **kwargs)  # eval and no_grad forwards are plain
        return _checkpointed(module, functools.partial(self.body, module), *args, **kwargs)


class _SegmentedForward(_CheckpointedForward):
    """Instance-level ``forward`` whose body checkpoints its own pieces (it is not checkpointed as a whole)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        if not (module.training and torch.is_grad_enabled()):
            return type(module).forward(module, *args, **kwargs)
        return self.body(module, *args, **kwargs)


def _plain_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    # The class's own forward, looked up on the class so that it cannot find our instance-level wrapper.
    return type(module).forward(module, *args, **kwargs)


@dataclass(frozen=True)
class Policy:
    """An activation-checkpointing policy: which modules recompute in backward, and how.

    A model family lists the policies that apply to it (``ModelFamily.policies``). Applying one
    (:func:`apply_checkpointing`) first runs ``custom``, which installs hand-scheduled autograd Functions and returns
    the names of the modules it took over; then each other module that ``recompute`` picks gets an instance-level
    forward that recomputes it, in the segments ``segmented`` returns a body for, or whole.
    """

    name: str
    recompute: Callable[[str, nn.Module], bool] = lambda name, module: False
    """(qualified name, module) -> whether to recompute it during backward. Stateless: same answer every call."""
    segmented: Callable[[str, nn.Module], Callable[..., Any] | None] = lambda name, module: None
    """A body ``fn(module, *inputs)`` that checkpoints its own pieces, for modules run in segments; None: whole."""
    custom: Callable[[nn.Module], list[str]] | None = None
    """Installs hand-scheduled Functions on some modules; returns their names (skipped by the loop afterwards)."""
    relative_time: float = 1.0
    """Step time per sample against no checkpointing, measured; the planner ranks plans by it."""
    exact: bool = True
    """Whether a step's loss, gradients and statistics are bit-identical to the unmodified model's."""


def apply_checkpointing(model: nn.Module, policy: Policy | str) -> list[str]:
    """Checkpoint the modules of ``model`` that ``policy`` picks; return their names.

    ``policy`` is a :class:`Policy`, or the name of one of the model family's policies. Each chosen module gets an
    instance-level ``forward`` that recomputes it during backward, only while it is in train mode with gradients
    enabled (eval and ``no_grad`` forwards are plain). Parameters, buffers and state-dict keys are untouched.
    Losses, gradients, dropout masks and BatchNorm running statistics are exactly those of the unmodified model
    (for the policies marked exact). Modules inside a chosen one, and modules checkpointed by an earlier call, are
    skipped; ``"none"`` changes nothing.
    """
    if isinstance(policy, str):
        policy = family_of(model).policy(policy)
    wrapped: list[str] = policy.custom(model) if policy.custom else []  # _CheckpointedForwards: skipped below
    for name, module in model.named_modules():
        if any(p == "" or name.startswith(p + ".") for p in wrapped):
            continue  # inside a module that is already recomputed (whole or in segments)
        if not policy.recompute(name, module) or isinstance(module.__dict__.get("forward"), _CheckpointedForward):
            continue
        body = policy.segmented(name, module)
        module.forward = _SegmentedForward(module, body) if body else _CheckpointedForward(module, _plain_forward)
        wrapped.append(name)
    return wrapped


# --------------------------------------------------------------------------------------------------------------------
# Layout


def _to_channels_last(_module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(memory_format=torch.channels_last),)


def apply_channels_last(model: nn.Module, module: str | None = None) -> nn.Module:
    """Run the model's 2-D convolution trunk (``module``, by default its family's ``channels_last_module``: AASIST's
    encoder) in channels-last layout (measured 1.6-1.8x faster steps on CPU, fp32 and bf16).

    The same operations, but different kernels: in fp32 results agree to rounding; in bf16 the different rounding
    can flip GraphPool's top-k choices, so one step's loss and gradient may differ noticeably from the default
    layout's (seen: gradient cosine 0.80 on a tiny AASIST-L batch). Training converges the same (the demo).

    The trunk's weights are converted once and its input on every call, by a forward pre-hook, so the model's own
    code does not know about layouts.
    """
    name = module if module is not None else family_of(model).channels_last_module
    if name is None:
        raise ValueError(f"{family_of(model).name} has no 2-D convolution trunk to run in channels-last layout")
    trunk = model.get_submodule(name)
    trunk.to(memory_format=torch.channels_last)
    trunk.register_forward_pre_hook(_to_channels_last)
    return model

