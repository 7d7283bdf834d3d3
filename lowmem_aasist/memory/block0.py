"""Block 0 of AASIST as one autograd Function that keeps almost nothing for backward (the ``block0`` policy).

Block 0 runs at the encoder's full time resolution (21,490 frames for a 64,600-sample crop), so each of its maps
[B, 32, 24, T] is the largest tensor of a training step, and its backward sets the step's peak. Plain autograd
keeps several of those maps; checkpointing in segments (``block0-segments``) keeps one between forward and
backward and holds three at once in backward. :class:`Block0Function` keeps, between forward and backward, only
the block input, a uint8 offset per pooled element (the winner of each max-pool window), BatchNorm's batch mean
and inverse std (fp32, per channel) and the parameters. Neither its forward nor its backward holds more than one
full map at a time (h, SELU's output, or the pool's gradient before h exists) plus slices of others:

1. the pool's gradient ``g`` from the offsets, whole, for the shortcut conv's gradients;
2. h recomputed: conv1 -> BatchNorm a few channels at a time, then SELU on the whole map;
3. conv2's weight and bias gradients a few output channels at a time, each group's share of ``g`` rebuilt;
4. conv2's input gradient a time chunk at a time (that chunk of ``g`` rebuilt, with one window on either side),
   SELU's backward applied to it at once and written over that chunk of h;
5. BatchNorm's backward a few channels at a time (conv1's output recomputed for them), written over h;
6. conv1's backward on that map.

Exactness: every step runs the ATen kernel the stock block runs (convolution, native_batch_norm, SELU and its
backward, the max-pool kernels), split only where the split leaves every element's arithmetic unchanged: conv
outputs and conv2's weight gradient by output channel, conv2's input gradient and SELU's backward by time chunk,
BatchNorm by channel. What a split would change stays whole: SELU (the CPU kernel computes the last few elements
of each thread's range with scalar code, so its fp32 results depend on the map's size), the shortcut's
gradients (oneDNN sums a one-channel input's weight gradient in an order that depends on the output channels)
and conv1's backward (x's gradient sums over all 32 channels). On the CPU, in the default layout, loss,
gradients and running statistics are bit-identical to the stock block in fp32, bf16 and fp16 (tests/
test_block0.py). Channels-last (BatchNorm's channels-last kernel sums in an order that depends on the channel
count) agrees to rounding in fp32; CUDA (cuDNN's BatchNorm against the native kernel used here) is untested.
Eval mode and ``no_grad`` run the stock forward.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..models.aasist import ResidualBlock
from .techniques import (
    SELU_ALPHA,
    SELU_SCALE,
    LeanMaxPool,
    _CheckpointedForward,
    _is_time_pool_by_3,
    is_channels_last,
)

__all__ = ["Block0Function", "apply_block0"]

aten = torch.ops.aten

# Group sizes: each trades kernel efficiency and the number of ops (on a busy machine every op can wait for a
# preempted thread) against the slices alive at once (1/32 of a map per channel and slice). Results do not depend
# on them (module docstring); these give the lowest peak found, at the speed of block0-segments.
# conv1 -> BatchNorm, building h: two slices (conv1's output, BatchNorm's).
_HEAD_CHANNELS = 4
# conv2 forward, with the shortcut and the pool: two slices (conv2's output, the shortcut); every call reads h.
_OUT_CHANNELS = 4
# conv2's weight gradient, by output channels: the group's pool gradient; every call reads h.
_WEIGHT_GRAD_CHANNELS = 8
# BatchNorm's backward: three slices (SELU's input gradient for B > 1, conv1's output, BatchNorm's input gradient).
_NORM_GRAD_CHANNELS = 2
# conv2's input gradient, by time chunks: ~1/4 of a map for 8 (the chunk's pool gradient and input gradient).
_TIME_CHUNKS = 8


class _Weights(NamedTuple):
    """The block's parameters in the dtype the block computes in (the casts autocast would make)."""

    w1: Tensor
    b1: Tensor
    bn_w: Tensor  # BatchNorm's affine parameters stay fp32 under autocast, as in the stock block
    bn_b: Tensor
    w2: Tensor
    b2: Tensor | None
    wd: Tensor
    bd: Tensor | None


def _groups(chans: slice, size: int) -> list[slice]:
    return [slice(i, min(i + size, chans.stop)) for i in range(chans.start, chans.stop, size)]


def _dense(t: Tensor, fmt: torch.memory_format) -> Tensor:
    return t.contiguous(memory_format=fmt)


def _empty(shape: tuple[int, ...], like: Tensor, fmt: torch.memory_format, dtype: torch.dtype | None = None) -> Tensor:
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=fmt)


def _conv(x: Tensor, w: Tensor, b: Tensor | None, padding: tuple[int, int]) -> Tensor:
    return F.conv2d(x, w, b, padding=padding)


def _conv_backward(
    grad: Tensor, inp: Tensor, w: Tensor, padding: tuple[int, int], mask: tuple[bool, bool, bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    return aten.convolution_backward(grad, inp, w, [w.size(0)], [1, 1], list(padding), [1, 1], False, [0, 0], 1, list(mask))


def _head(
    xc: Tensor,
    w: _Weights,
    eps: float,
    fmt: torch.memory_format,
    running: tuple[Tensor | None, Tensor | None] = (None, None),
    momentum: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """h = SELU(BatchNorm(conv1(x))) with batch statistics; returns h, the batch mean and the inverse std.

    conv1 and BatchNorm run a few channels at a time into h (their results do not depend on the split), so only
    h is ever whole. Forward and backward both come here: the recomputed h is the forward's bit for bit.
    ``running`` (forward only) gets the momentum update, as in nn.BatchNorm2d.
    """
    rm, rv = running
    h: Tensor | None = None
    means, invstds = [], []
    for s in _groups(slice(0, w.w1.size(0)), _HEAD_CHANNELS):
        c1 = _dense(_conv(xc, w.w1[s], w.b1[s], (1, 1)), fmt)
        y, mean, invstd = aten.native_batch_norm(
            c1, w.bn_w[s], w.bn_b[s], None if rm is None else rm[s], None if rv is None else rv[s], True, momentum, eps
        )
        del c1
        if h is None:
            h = _empty((y.size(0), w.w1.size(0), *y.shape[2:]), y, fmt)
        h[:, s].copy_(y)
        del y
        means.append(mean)
        invstds.append(invstd)
    assert h is not None
    F.selu(h, inplace=True)  # on the whole map, as the stock block: see the module docstring
    return h, torch.cat(means), torch.cat(invstds)


def _window_starts(height: int, windows: int, width: int, device: torch.device) -> Tensor:
    """[height, windows] int64: where each window of 3 starts, numbered as max_pool2d numbers the elements of a
    [.., height, width] map (row * width + column)."""
    rows = torch.arange(height, device=device).unsqueeze(1) * width
    return rows + torch.arange(0, 3 * windows, 3, device=device)


def _pool(z: Tensor) -> tuple[Tensor, Tensor]:
    """Max-pool over time by 3 with the stock kernel; returns the values and each window's winner (0, 1 or 2)."""
    values, idx = F.max_pool2d(z, (1, 3), return_indices=True)
    return values, idx.sub_(_window_starts(z.size(2), values.size(-1), z.size(-1), z.device))


def _unpool(grad: Tensor, offsets: Tensor, p0: int, p1: int, width: int, fmt: torch.memory_format) -> Tensor:
    """The pool's input gradient for windows [p0, p1): time steps [3 p0, 3 p1), or to ``width`` when p1 is the
    last window. Dense, in layout ``fmt``.

    The stock backward zero-fills its result and adds each window's gradient at the winner: every step gets
    0 + g or 0 (steps past the last whole window too). Placing each window's gradient at its offset by three
    strided selects, then adding zero once, gives those values bit for bit (0 + g turns -0.0 into +0.0) without
    int64 indices, a handful of whole-tensor ops where index chunks would take hundreds.
    """
    go, off = grad[..., p0:p1], offsets[..., p0:p1]
    b, c, h, n = go.shape
    steps = width - 3 * p0 if p1 == grad.size(-1) else 3 * n
    out = _empty((b, c, h, steps), go, fmt)
    out[..., 3 * n :].zero_()
    zero = go.new_zeros(())
    for k in range(3):
        torch.where(off == k, go, zero, out=out[..., k : 3 * n : 3])
    return out.add_(0.0)


class Block0Function(torch.autograd.Function):
    """``ResidualBlock.forward`` (conv1 -> BatchNorm -> SELU -> conv2, plus conv_downsample(x), then max-pool over
    time by 3) in train mode, saving only x, the pool's uint8 offsets and BatchNorm's batch statistics.

    Inputs: x, conv1's weight and bias, BatchNorm's weight and bias, conv2's weight and bias, conv_downsample's
    weight and bias, BatchNorm's (running_mean, running_var) (updated in place, or Nones), the running-average
    factor, BatchNorm's eps, the dtype to compute in (autocast's, or the parameters') and whether autocast shares
    one cast of x between the two convolutions that read it (it caches casts of leaves that require grad).
    Convolutions run in that dtype; BatchNorm takes its input in that dtype with fp32 parameters and statistics,
    as under autocast.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        w1: Tensor,
        b1: Tensor,
        bn_w: Tensor,
        bn_b: Tensor,
        w2: Tensor,
        b2: Tensor | None,
        wd: Tensor,
        bd: Tensor | None,
        running: tuple[Tensor | None, Tensor | None],
        momentum: float,
        eps: float,
        dtype: torch.dtype,
        shared_cast: bool,
    ) -> Tensor:
        # Channels-last weights (apply_channels_last) make the stock convolutions run channels-last; follow them.
        channels_last = is_channels_last(w2)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        with torch.autocast(x.device.type, enabled=False):  # every cast below is explicit
            xc = _dense(x.to(dtype), fmt)
            w = _cast_weights(dtype, w1, b1, bn_w, bn_b, w2, b2, wd, bd)
            h, mean, invstd = _head(xc, w, eps, fmt, running, momentum)
            # conv2 a few output channels at a time, each group pooled at once: conv2's output, the shortcut and
            # the pool's input are never whole.
            out = offsets = None
            for o in _groups(slice(0, w.w2.size(0)), _OUT_CHANNELS):
                z = _conv(h, w.w2[o], None if w.b2 is None else w.b2[o], (0, 1))
                z.add_(_conv(xc, w.wd[o], None if w.bd is None else w.bd[o], (0, 1)))  # conv2 keeps no output
                values, offs = _pool(_dense(z, fmt))
                del z
                if out is None:
                    shape = (values.size(0), w.w2.size(0), *values.shape[2:])
                    out, offsets = _empty(shape, values, fmt), _empty(shape, values, fmt, torch.uint8)
                out[:, o].copy_(values)
                offsets[:, o].copy_(offs)
                del values, offs
            del h
        ctx.save_for_backward(x, w1, b1, bn_w, bn_b, w2, wd, mean, invstd, offsets)
        ctx.dtype, ctx.eps, ctx.channels_last, ctx.shared_cast = dtype, eps, channels_last, shared_cast
        ctx.has_bias = (b2 is not None, bd is not None)
        ctx.param_dtypes = tuple(None if t is None else t.dtype for t in (w1, b1, bn_w, bn_b, w2, b2, wd, bd))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, w1, b1, bn_w, bn_b, w2, wd, mean, invstd, offsets = ctx.saved_tensors
        dtype, eps, channels_last = ctx.dtype, ctx.eps, ctx.channels_last
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        need = ctx.needs_input_grad
        has_b2, has_bd = ctx.has_bias
        chans = slice(0, w2.size(0))
        width = x.size(-1)
        g_x = g_w1 = g_b1 = g_bn_w = g_bn_b = g_w2 = g_b2 = None
        with torch.autocast(x.device.type, enabled=False):
            xc = _dense(x.to(dtype), fmt)
            w = _cast_weights(dtype, w1, b1, bn_w, bn_b, w2, None, wd, None)
            grad = _dense(grad.to(dtype), fmt)

            # 1. The shortcut's gradients need the pool's gradient whole (split, its sums would round differently).
            g = _unpool(grad, offsets, 0, grad.size(-1), width, fmt)
            g_x_sc, g_wd, g_bd = _conv_backward(g, xc, w.wd, (0, 1), (need[0], need[7], need[8] and has_bd))
            del g
            if not any(need[:7]):
                return _grads(ctx, None, None, None, None, None, None, None, g_wd, g_bd)

            # 2. h, bit for bit the forward's.
            h, _, _ = _head(xc, w, eps, fmt)

            # 3. conv2's weight and bias gradients by output channels.
            if need[5] or need[6]:
                g_w2_parts, g_b2_parts = [], []
                for o in _groups(chans, _WEIGHT_GRAD_CHANNELS):
                    g_o = _unpool(grad[:, o], offsets[:, o], 0, grad.size(-1), width, fmt)
                    _, g_w, g_b = _conv_backward(g_o, h, _dense(w.w2[o], fmt), (0, 1), (False, need[5], need[6] and has_b2))
                    del g_o
                    g_w2_parts.append(g_w)
                    g_b2_parts.append(g_b)
                g_w2 = torch.cat(g_w2_parts) if need[5] else None
                g_b2 = torch.cat(g_b2_parts) if need[6] and has_b2 else None

            if any(need[:5]):
                # 4. conv2's input gradient a time chunk at a time (each chunk needs the pool's gradient one
                # step beyond it on either side: one more window, unless at the map's ends, conv2's zero padding),
                # and SELU's backward on it at once, written over h: h's values there are not needed again.
                windows = grad.size(-1)
                step = -(-windows // _TIME_CHUNKS)
                for q0 in range(0, windows, step):
                    q1 = min(windows, q0 + step)
                    lo, hi = max(0, q0 - 1), min(windows, q1 + 1)
                    g_chunk = _unpool(grad, offsets, lo, hi, width, fmt)
                    # Only the input's shape and layout matter for the input gradient (as torch.nn.grad does).
                    shape = (g_chunk.size(0), h.size(1), h.size(2), g_chunk.size(-1))
                    g_in, _, _ = _conv_backward(g_chunk, g_chunk.new_empty(1).expand(shape), w.w2, (0, 1), (True, False, False))
                    del g_chunk
                    t0, t1 = 3 * q0, (3 * q1 if q1 < windows else width)
                    h_t = h[..., t0:t1]
                    aten.elu_backward.grad_input(
                        g_in[..., t0 - 3 * lo : t1 - 3 * lo], SELU_ALPHA, SELU_SCALE, 1.0, True, h_t, grad_input=h_t
                    )
                    del g_in, h_t

                # 5. BatchNorm's backward a few channels at a time (it needs whole channels), conv1's output
                # recomputed for them, written over h.
                g_bn_w_parts, g_bn_b_parts = [], []
                for i in _groups(chans, _NORM_GRAD_CHANNELS):
                    c1 = _dense(_conv(xc, w.w1[i], w.b1[i], (1, 1)), fmt)
                    g_c1, g_bw, g_bb = aten.native_batch_norm_backward(
                        _dense(h[:, i], fmt), c1, w.bn_w[i], None, None, mean[i], invstd[i], True, eps,
                        [True, need[3], need[4]],
                    )
                    del c1
                    h[:, i].copy_(g_c1)
                    del g_c1
                    g_bn_w_parts.append(g_bw)
                    g_bn_b_parts.append(g_bb)
                g_bn_w = torch.cat(g_bn_w_parts) if need[3] else None
                g_bn_b = torch.cat(g_bn_b_parts) if need[4] else None

                # 6. conv1's backward on the whole map (h now holds conv1's output gradient).
                g_x1, g_w1, g_b1 = _conv_backward(h, xc, w.w1, (1, 1), (need[0], need[1], need[2]))
                del h
                if need[0]:
                    if ctx.shared_cast:  # one cast of x under autocast: its gradients meet before the cast back
                        g_x = (g_x1 + g_x_sc).to(x.dtype)
                    else:  # each in x's dtype, summed as autograd sums them
                        g_x = g_x1.to(x.dtype) + g_x_sc.to(x.dtype)
        return _grads(ctx, g_x, g_w1, g_b1, g_bn_w, g_bn_b, g_w2, g_b2, g_wd, g_bd)


def _cast_weights(dtype: torch.dtype, w1: Tensor, b1: Tensor, bn_w: Tensor, bn_b: Tensor, w2: Tensor,
                  b2: Tensor | None, wd: Tensor, bd: Tensor | None) -> _Weights:
    def cast(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(dtype)

    return _Weights(cast(w1), cast(b1), bn_w, bn_b, cast(w2), cast(b2), cast(wd), cast(bd))


def _grads(ctx: Any, g_x: Tensor | None, *param_grads: Tensor | None) -> tuple[Tensor | None, ...]:
    """backward's return value: parameter gradients in their parameters' dtypes (autocast's casts back)."""
    cast = tuple(None if g is None else g.to(d) for g, d in zip(param_grads, ctx.param_dtypes, strict=True))
    return (g_x, *cast, None, None, None, None, None)


def _compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device) and weight.dtype == torch.float32:
        return torch.get_autocast_dtype(device)
    return weight.dtype


class _Block0Forward(_CheckpointedForward):
    """Instance-level ``forward`` of block 0: :class:`Block0Function` while training with gradients enabled.

    A :class:`_CheckpointedForward` so that checkpoint policies see the block as taken care of; picklable and
    copied with its module like one.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module, type(module).forward)

    def __call__(self, x: Tensor) -> Tensor:
        block = self.module
        bn = block.bn2
        if not (block.training and bn.training and torch.is_grad_enabled()):
            return type(block).forward(block, x)  # eval and no_grad forwards are plain
        # nn.BatchNorm2d's train-mode bookkeeping, done where the module would do it.
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # cumulative moving average
                factor = 1.0 / float(bn.num_batches_tracked)
        running = (bn.running_mean, bn.running_var) if bn.track_running_stats else (None, None)
        down = block.conv_downsample
        dtype = _compute_dtype(x, block.conv1.weight)
        # Autocast casts a leaf that requires grad once and reuses the cast (conv1 and the shortcut both read x).
        shared_cast = (
            dtype != x.dtype
            and x.dtype == torch.float32
            and x.requires_grad
            and x.is_leaf
            and not x._is_view()
            and torch.is_autocast_cache_enabled()
        )
        return Block0Function.apply(
            x,
            block.conv1.weight,
            block.conv1.bias,
            bn.weight,
            bn.bias,
            block.conv2.weight,
            block.conv2.bias,
            down.weight,
            down.bias,
            running,
            factor,
            bn.eps,
            dtype,
            shared_cast,
        )


def _unsupported(block: ResidualBlock) -> str | None:
    """Why :class:`Block0Function` cannot stand in for ``block`` (None when it can)."""
    convs = {
        "conv1": (block.conv1, (2, 3), (1, 1)),
        "conv2": (block.conv2, (2, 3), (0, 1)),
        "conv_downsample": (block.conv_downsample, (1, 3), (0, 1)),
    }
    for name, (conv, kernel, padding) in convs.items():
        if not isinstance(conv, nn.Conv2d):
            return f"{name} is not a Conv2d (an identity shortcut is not supported)"
        if (conv.kernel_size, conv.padding, conv.stride, conv.dilation, conv.groups) != (kernel, padding, (1, 1), (1, 1), 1):
            return f"{name} is not the {kernel} convolution the block is built with"
        if conv.padding_mode != "zeros":
            return f"{name} pads with {conv.padding_mode}"
    if block.conv1.bias is None:
        return "conv1 has no bias"
    if not isinstance(block.bn2, nn.BatchNorm2d) or not block.bn2.affine:
        return "bn2 is not an affine BatchNorm2d"
    if not (isinstance(block.pool, LeanMaxPool) or _is_time_pool_by_3(block.pool)):
        return "its pool is not a max-pool over time by 3"
    return None


def apply_block0(model: nn.Module) -> list[str]:
    """Run the first :class:`ResidualBlock` of ``model`` (AASIST's block 0) through :class:`Block0Function`.

    Installs an instance-level ``forward`` on that block, used only while it is in train mode with gradients
    enabled; parameters, buffers and state-dict keys are untouched, and the block's own pool (stock or
    :class:`LeanMaxPool`) serves eval forwards. Returns the block's qualified name, or ``[]`` when its forward was
    already replaced (by this or a checkpoint policy). Raises ValueError for a block it cannot reproduce.
    """
    for name, module in model.named_modules():
        if isinstance(module, ResidualBlock):
            if "forward" in vars(module):
                return []
            reason = _unsupported(module)
            if reason is not None:
                raise ValueError(f"block0 policy: {name or 'the block'} cannot run as one Function: {reason}")
            module.forward = _Block0Forward(module)
            return [name]
    return []
