"""Residual blocks run over the time axis in tiles, with a two-pass BatchNorm: the ``tiled`` policy.

Block 0 of AASIST turns a one-channel map into 32 channels at full time resolution (21,490 frames at a 64,600-sample
crop), so every map inside it is 32x its input. Even segmented checkpointing keeps one such map between forward and
backward and holds about three at once during backward. :class:`TiledBlock0Function` never holds one: it keeps only
the block input, the batch statistics and the pool's 2-bit window offsets, and recomputes everything else a tile of
``tile`` frames at a time, so what is live besides the block's input, output and their gradients is a few
tile-sized maps.

BatchNorm couples all frames (batch statistics in forward, two batch sums in backward), so each direction makes two
passes over the tiles: forward gathers the statistics (merged per tile, Chan et al.) and then normalises; backward
gathers BatchNorm's two sums and then forms the input gradient. Every tile owns the frames [s, e) of the block's
output and of its input gradient and reads whatever halo it needs (1 frame per (2, 3) or (1, 3) convolution), so no
frame is written twice and nothing overlapping has to be added up: tile order only changes floating-point rounding.

Tiles are multiples of 3 frames so the time pool's windows never straddle two tiles. Frames past the last whole
window (W % 3 of them) are not pooled, so they get no gradient, but they still count in BatchNorm's statistics.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake
from torch.autograd.function import once_differentiable
from torch.nn.grad import conv2d_input, conv2d_weight

from ..malloc import heap_reuse
from ..models.aasist import ResidualBlock
from .techniques import SELU_ALPHA, SELU_SCALE, _CheckpointedForward

__all__ = ["DEFAULT_TILE", "TiledBlock0Function", "apply_tiled"]

DEFAULT_TILE = 3 * 512
"""Frames per tile. 1,536 frames keep each tile map of block 0 to ~2.3 MiB per bf16 sample while leaving few enough
tiles (14 at the reference crop) that the per-call overhead stays small."""

HEAP_REUSE_BELOW = 512 << 20
"""CPU: tile temporaries below this many bytes come from the heap inside the tile loops (the largest, block 2's
float32 maps at micro-batch 24, are ~57 MB); the loops' end hands the freed heap back."""


def _frames(t: Tensor, lo: int, hi: int, width: int) -> Tensor:
    """Frames [lo, hi) of ``t`` along time, zeros where they fall outside [0, width): a convolution's zero padding."""
    a, b = max(lo, 0), min(hi, width)
    piece = t[..., a:b]
    return F.pad(piece, (a - lo, hi - b)) if (a - lo or hi - b) else piece


def _unpool(grad_out: Tensor, offsets: Tensor, lo: int, hi: int, width: int) -> Tensor:
    """The time pool's input gradient on frames [lo, hi), zeros outside [0, width) and past the last whole window.

    Each output gradient goes to the one frame of its window the offsets name, as the stock pool's backward does.
    """
    a, b = max(lo, 0), min(hi, width)
    j0, j1 = a // 3, min(-(-b // 3), grad_out.size(-1))
    if j1 > j0:
        go = grad_out[..., j0:j1]
        windows = go.new_zeros((*go.shape, 3))
        windows.scatter_(-1, _unpack(offsets[..., j0:j1], go.size(1)).unsqueeze(-1), go.unsqueeze(-1))
        piece = windows.flatten(-2)[..., a - 3 * j0 : b - 3 * j0]
    else:
        piece = grad_out.new_zeros((*grad_out.shape[:-1], 0))
    return F.pad(piece, (a - lo, hi - a - piece.size(-1)))


def _pack(offsets: Tensor) -> Tensor:
    """Four 2-bit window offsets (0, 1 or 2) per byte, grouped along channels: (B, C, H, n) -> (B, ceil(C/4), H, n).

    Channels, not time, so that every tile packs and unpacks only its own windows whatever its length.
    """
    b, c, h, n = offsets.shape
    quads = F.pad(offsets, (0, 0, 0, 0, 0, -c % 4)).view(b, -1, 4, h, n)
    packed = quads[:, :, 0].clone()
    for k in (1, 2, 3):
        packed |= quads[:, :, k] << (2 * k)
    return packed


def _unpack(packed: Tensor, channels: int) -> Tensor:
    """The inverse of :func:`_pack` for ``channels`` channels, as int64 (what ``scatter_`` takes)."""
    shifts = torch.arange(0, 8, 2, device=packed.device, dtype=torch.uint8).view(1, 1, 4, 1, 1)
    quads = (packed.unsqueeze(2) >> shifts) & 3
    return quads.flatten(1, 2)[:, :channels].long()


def _tiles(width: int, tile: int, like: Tensor) -> list[tuple[int, int]]:
    """The tiles [s, e) over ``width`` frames; under FakeTensorMode (``like`` fake) only those that differ in shape.

    A fake step only counts memory, and every tile but the first and last two repeats the allocations of the
    second one exactly (same shapes, all freed before the next tile; the per-channel statistics and gradient
    accumulators are the same small size after every tile), so running the first two and the last two gives the
    same peak as running all of them. It more than halves the estimator's time for this policy (56 tiles in block
    0 at the reference crop).
    """
    tiles = [(s, min(s + tile, width)) for s in range(0, width, tile)]
    return tiles[:2] + tiles[-2:] if is_fake(like) and len(tiles) > 4 else tiles


def _heap_reuse(like: Tensor) -> contextlib.AbstractContextManager:
    """CPU: let the tile loop reuse heap blocks for its temporaries (see :func:`..malloc.heap_reuse`)."""
    if like.device.type != "cpu" or is_fake(like):
        return contextlib.nullcontext()
    return heap_reuse(HEAP_REUSE_BELOW)


def _channel_view(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


class TiledBlock0Function(torch.autograd.Function):
    """A :class:`~lowmem_aasist.models.aasist.ResidualBlock` forward (train-mode BatchNorm) computed in time tiles.

    ``apply(x, w1, b1, gamma, beta, w2, b2, wd, bd, bn, tile, dtype)``: the block's convolution weights and biases
    (``wd``/``bd`` are the shortcut projection's, or None for an identity shortcut), BatchNorm's affine parameters,
    the ``bn`` module whose running statistics are updated once (as ``nn.BatchNorm2d`` does in train mode), the tile
    length in frames (a positive multiple of 3) and the dtype the convolutions run in (autocast's, or the input's).
    BatchNorm statistics and every reduction run in float32 or wider, as under autocast.

    Saved for backward: the input, the per-channel mean and inverse std, and the pool's window offsets, 2 bits per
    output element (a quarter of the uint8 offsets the lean pool keeps: 1.3 instead of 5 MiB per AASIST sample in
    block 0, where they are live from block 0's forward to its backward). Both passes need only shapes known before
    running, so it runs under FakeTensorMode as well.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, *args: Any) -> Tensor:  # type: ignore[override]
        # The arguments are those of the class docstring, typed on _forward.
        with torch.autocast(x.device.type, enabled=False):  # dtypes are chosen explicitly below
            return _forward(ctx, x, *args)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        with torch.autocast(grad_out.device.type, enabled=False):
            return _backward(ctx, grad_out)


def _forward(
    ctx: Any,
    x: Tensor,
    w1: Tensor,
    b1: Tensor,
    gamma: Tensor,
    beta: Tensor,
    w2: Tensor,
    b2: Tensor,
    wd: Tensor | None,
    bd: Tensor | None,
    bn: nn.BatchNorm2d,
    tile: int,
    dtype: torch.dtype,
) -> Tensor:
    if tile <= 0 or tile % 3:
        raise ValueError(f"tile must be a positive multiple of 3 frames, got {tile}")
    batch, _, height, width = x.shape
    c_out = w1.size(0)
    xc = x.to(dtype)
    w1c, b1c, w2c, b2c = (t.to(dtype) for t in (w1, b1, w2, b2))
    wdc = wd.to(dtype) if wd is not None else None
    bdc = bd.to(dtype) if bd is not None else None
    tiles = _tiles(width, tile, x)

    # Pass 1: BatchNorm statistics of conv1's output, merged tile by tile (Chan, Golub & LeVeque) in float64, the
    # precision the CPU kernel accumulates float32 statistics in; a plain sum of squares would cancel badly.
    count = 0
    mean = m2 = torch.zeros(c_out, dtype=torch.float64, device=x.device)
    with _heap_reuse(x):  # the tiles allocate and free the same temporaries over and over
        for s, e in tiles:
            h = _conv1(xc, w1c, b1c, s, e, width).float()
            var_t, mean_t = torch.var_mean(h, dim=(0, 2, 3), correction=0)
            n_t = h.numel() // c_out
            del h
            delta = mean_t.double() - mean
            total = count + n_t
            mean = mean + delta * (n_t / total)
            m2 = m2 + var_t.double() * n_t + delta * delta * (count * n_t / total)
            count = total
    invstd = (m2 / count + bn.eps).rsqrt().float()
    _update_running_stats(bn, mean, m2 / max(count - 1, 1))
    mean32 = mean.float()
    scale, shift = _affine(gamma, beta, mean32, invstd)

    # Pass 2: normalise, SELU, conv2 + shortcut, pool; each tile writes its own windows of the output.
    w_out = width // 3
    out = torch.empty((batch, c_out, height, w_out), dtype=dtype, device=x.device)
    offsets = torch.empty((batch, -(-c_out // 4), height, w_out), dtype=torch.uint8, device=x.device)
    with _heap_reuse(x):  # the tiles allocate and free the same temporaries over and over
        for s, e in tiles:
            n = (e - s) // 3
            if not n:
                continue  # a last tile of only the 1-2 frames the pool drops: no output (they did count in the stats)
            a = _padded_selu(xc, w1c, b1c, scale, shift, s, e, width, dtype)
            o = F.conv2d(a, w2c, b2c)
            del a
            o += F.conv2d(_frames(xc, s - 1, e + 1, width), wdc, bdc) if wdc is not None else xc[..., s:e]
            # Each (b, c, h) row pooled alone, so indices are plain time positions; a copy only when o is channels-last.
            rows = o.reshape(-1, 1, 1, e - s)
            values, idx = F.max_pool2d(rows, (1, 3), return_indices=True)
            del o, rows
            j = s // 3
            out[..., j : j + n].copy_(values.view(batch, c_out, height, n))
            starts = torch.arange(0, 3 * n, 3, device=x.device)
            offsets[..., j : j + n].copy_(_pack(idx.sub_(starts).to(torch.uint8).view(batch, c_out, height, n)))
            del values, idx

    ctx.save_for_backward(x, w1, b1, gamma, beta, w2, b2, wd, bd, mean32, invstd, offsets)
    ctx.tile, ctx.dtype, ctx.count = tile, dtype, count
    return out


def _update_running_stats(bn: nn.BatchNorm2d, mean: Tensor, unbiased_var: Tensor) -> None:
    """What ``nn.BatchNorm2d.forward`` does to its buffers in train mode, once per call."""
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return
    with torch.no_grad():
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
        factor: Tensor | float
        if bn.momentum is None:  # cumulative average; kept a tensor so no data-dependent Python value is needed
            assert bn.num_batches_tracked is not None
            factor = 1.0 / bn.num_batches_tracked.double()
        else:
            factor = bn.momentum
        rm, rv = bn.running_mean, bn.running_var
        rm.copy_(rm.double() * (1 - factor) + mean * factor)
        rv.copy_(rv.double() * (1 - factor) + unbiased_var * factor)


def _affine(gamma: Tensor, beta: Tensor, mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:
    # y = h * scale + shift, the form the CPU BatchNorm kernel applies; forward and backward both call this, so the
    # recomputed activations are bit-identical to the forward's.
    scale = gamma.float() * invstd
    return scale, beta.float() - mean * scale


def _conv1(xc: Tensor, w1c: Tensor, b1c: Tensor, lo: int, hi: int, width: int) -> Tensor:
    """conv1's output on frames [lo, hi), a range inside [0, width)."""
    return F.conv2d(_frames(xc, lo - 1, hi + 1, width), w1c, b1c, padding=(1, 0))


def _bn_selu(h: Tensor, scale: Tensor, shift: Tensor, dtype: torch.dtype) -> Tensor:
    y = torch.addcmul(_channel_view(shift), h.float(), _channel_view(scale)).to(dtype)
    return F.selu(y, inplace=True)


def _padded_selu(
    xc: Tensor, w1c: Tensor, b1c: Tensor, scale: Tensor, shift: Tensor, s: int, e: int, width: int, dtype: torch.dtype
) -> Tensor:
    """SELU(BN(conv1(x))) on frames [s - 1, e + 1): the input conv2 needs for its outputs [s, e).

    Outside [0, width) it is zero, conv2's own padding (not SELU(BN(conv1)) of zeros).
    """
    lo, hi = max(s - 1, 0), min(e + 1, width)
    a = _bn_selu(_conv1(xc, w1c, b1c, lo, hi, width), scale, shift, dtype)
    return F.pad(a, (lo - s + 1, e + 1 - hi)) if (lo != s - 1 or hi != e + 1) else a


def _selu_backward(grad: Tensor, result: Tensor) -> Tensor:
    # What in-place F.selu's backward computes: ELU's backward evaluated on the result it kept.
    return torch.ops.aten.elu_backward(grad, SELU_ALPHA, SELU_SCALE, 1.0, True, result)


def _backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
    x, w1, b1, gamma, beta, w2, b2, wd, bd, mean, invstd, offsets = ctx.saved_tensors
    tile, dtype, count = ctx.tile, ctx.dtype, ctx.count
    batch, c_in, height, width = x.shape
    c_out, h_mid = w1.size(0), height + 1  # conv1 pads the height by 1 with a kernel of height 2
    xc = x.to(dtype)
    w1c, b1c, w2c = w1.to(dtype), b1.to(dtype), w2.to(dtype)
    wdc = wd.to(dtype) if wd is not None else None
    grad_out = grad_out.to(dtype)
    scale, shift = _affine(gamma, beta, mean, invstd)
    tiles = _tiles(width, tile, x)
    dims = (0, 2, 3)

    def zeros(t: Tensor) -> Tensor:
        return torch.zeros(t.shape, dtype=torch.float32, device=x.device)

    gw1, gb1, gw2, gb2 = zeros(w1), zeros(b1), zeros(w2), zeros(b2)
    gwd = zeros(wd) if wd is not None else None
    gbd = zeros(bd) if bd is not None else None
    sum_dy = torch.zeros(c_out, dtype=torch.float64, device=x.device)
    sum_dy_xhat = torch.zeros(c_out, dtype=torch.float64, device=x.device)

    # Pass 1: per tile, the gradients of conv2 and the shortcut for the tile's own outputs, and BatchNorm's two
    # sums over the tile's own frames of conv1's output (each needs the pool's gradient one frame beyond the tile).
    with _heap_reuse(x):  # the tiles allocate and free the same temporaries over and over
        for s, e in tiles:
            g = _unpool(grad_out, offsets, s - 1, e + 1, width)  # the pool's input gradient on [s - 1, e + 1)
            g_own = g[..., 1:-1]
            a = _padded_selu(xc, w1c, b1c, scale, shift, s, e, width, dtype)
            gw2 += conv2d_weight(a, w2.shape, g_own).float()
            gb2 += g_own.sum(dims, dtype=torch.float32)
            if gwd is not None and gbd is not None:
                gwd += conv2d_weight(_frames(xc, s - 1, e + 1, width), wd.shape, g_own).float()
                gbd += g_own.sum(dims, dtype=torch.float32)
            # conv2's input gradient on [s, e) is complete here: it reads the pool gradient on [s - 1, e + 1).
            da = conv2d_input((batch, c_out, h_mid, e - s), w2c, g, padding=(0, 2))
            dy = _selu_backward(da, a[..., 1:-1]).float()
            del a, da, g, g_own
            # In place from here on: each extra tile-sized float32 map is part of the policy's peak.
            xhat = _conv1(xc, w1c, b1c, s, e, width).float().sub_(_channel_view(mean)).mul_(_channel_view(invstd))
            sum_dy += dy.sum(dims).double()
            sum_dy_xhat += xhat.mul_(dy).sum(dims).double()
            del dy, xhat

    # Pass 2: BatchNorm's input gradient on [s - 1, e + 1), then conv1's (and the shortcut's) input gradient on the
    # tile's own frames [s, e) and conv1's weight gradient from its own outputs there.
    mean_dy, mean_dy_xhat = (sum_dy / count).float(), (sum_dy_xhat / count).float()
    k = _channel_view(gamma.float() * invstd)
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    with _heap_reuse(x):  # the tiles allocate and free the same temporaries over and over
        for s, e in tiles:
            lo, hi = max(s - 1, 0), min(e + 1, width)
            g = _unpool(grad_out, offsets, s - 2, e + 2, width)  # frame f sits at index f - (s - 2)
            da = conv2d_input((batch, c_out, h_mid, hi - lo), w2c, g[..., lo - s + 1 : hi - s + 3], padding=(0, 2))
            h = _conv1(xc, w1c, b1c, lo, hi, width)
            dy = _selu_backward(da, _bn_selu(h, scale, shift, dtype)).float()
            del da
            xhat = h.float().sub_(_channel_view(mean)).mul_(_channel_view(invstd))  # in place, as in pass 1
            del h
            dy.sub_(_channel_view(mean_dy)).sub_(xhat.mul_(_channel_view(mean_dy_xhat))).mul_(k)
            del xhat
            gh = dy.to(dtype)
            del dy
            gh = F.pad(gh, (lo - s + 1, e + 1 - hi))  # no conv1 output outside [0, width): no gradient there
            gh_own = gh[..., 1:-1]
            gw1 += conv2d_weight(_frames(xc, s - 1, e + 1, width), w1.shape, gh_own, padding=(1, 0)).float()
            gb1 += gh_own.sum(dims, dtype=torch.float32)
            gx = conv2d_input((batch, c_in, height, e - s), w1c, gh, padding=(1, 2))
            del gh, gh_own
            g_sc = g[..., 1:-1]  # the pool's input gradient on [s - 1, e + 1), which the shortcut's outputs receive
            if wdc is not None:
                gx += conv2d_input((batch, c_in, height, e - s), wdc, g_sc, padding=(0, 2))
            else:
                gx += g_sc[..., 1:-1]
            grad_x[..., s:e].copy_(gx)
            del g, g_sc, gx

    ggamma = (sum_dy_xhat.float()).to(gamma.dtype)
    gbeta = sum_dy.float().to(beta.dtype)
    return (
        grad_x,
        gw1.to(w1.dtype),
        gb1.to(b1.dtype),
        ggamma,
        gbeta,
        gw2.to(w2.dtype),
        gb2.to(b2.dtype),
        gwd.to(wd.dtype) if gwd is not None else None,
        gbd.to(bd.dtype) if gbd is not None else None,
        None,
        None,
        None,
    )


class _TiledForward(_CheckpointedForward):
    """Instance-level ``forward`` of a residual block: tiled while training with gradients, the stock one otherwise.

    A subclass of the checkpointing wrapper only so that :func:`.techniques.apply_checkpointing`, applied after
    :func:`apply_tiled`, sees the block as already handled and leaves it alone (either order composes). Picklable
    and deep-copyable like that wrapper: the copy tiles its own block.
    """

    def __init__(self, module: ResidualBlock, tile: int) -> None:
        super().__init__(module, type(module).forward)
        self.tile = tile

    def __call__(self, x: Tensor) -> Tensor:  # type: ignore[override]
        block = self.module
        if not (block.training and torch.is_grad_enabled()):
            return type(block).forward(block, x)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        sc = block.conv_downsample
        return TiledBlock0Function.apply(
            x,
            block.conv1.weight,
            block.conv1.bias,
            block.bn2.weight,
            block.bn2.bias,
            block.conv2.weight,
            block.conv2.bias,
            sc.weight if sc is not None else None,
            sc.bias if sc is not None else None,
            block.bn2,
            self.tile,
            dtype,
        )


def apply_tiled(model: nn.Module, tile: int = DEFAULT_TILE, blocks: tuple[int, ...] = (0,)) -> list[str]:
    """Run residual block 0 (and any other ``blocks``, by encoder index) over time in tiles of ``tile`` frames.

    Each chosen block gets an instance-level ``forward`` that uses :class:`TiledBlock0Function` in train mode with
    gradients enabled; eval and ``no_grad`` forwards are the stock ones. Parameters, buffers and state-dict keys are
    untouched. Apply it after :func:`.techniques.apply_checkpointing` or before (the checkpointing skips tiled
    blocks either way); the block's own ``pool`` is not used while tiled (the tiled pool keeps 2-bit
    offsets). Returns the names of the blocks it changed (none if already tiled).
    """
    if tile <= 0 or tile % 3:
        raise ValueError(f"tile must be a positive multiple of 3 frames (the pool's window), got {tile}")
    changed = []
    for i in blocks:
        name = f"encoder.{i}.0"
        block = model.get_submodule(name)
        if not isinstance(block, ResidualBlock):
            raise TypeError(f"{name} is {type(block).__name__}, not a ResidualBlock")
        if isinstance(block.__dict__.get("forward"), _TiledForward):
            continue
        block.forward = _TiledForward(block, tile)
        changed.append(name)
    return changed
