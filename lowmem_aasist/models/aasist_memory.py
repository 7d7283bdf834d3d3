"""AASIST's activation-checkpointing policies: which of its modules recompute, and the hand-scheduled blocks.

The family entry (:mod:`.aasist`) lists the policy names; this table, loaded on first use, says what each does.
Costs come from measurement (benchmarks/results/cpu/memory_matrix.md: AASIST at 64,600, bf16, step time per sample
against no checkpointing); they only rank plans that fit.
"""

from __future__ import annotations

import functools

import torch.nn.functional as F
from torch import Tensor, nn

from ..memory.block0 import apply_block0
from ..memory.techniques import LeanMaxPool, Policy, _checkpointed
from ..memory.tiled import apply_tiled
from .aasist import GraphAttention, GraphPool, HeteroGraphAttention, ResidualBlock

TILED_TILE, TILED_BLOCKS = 384, (0, 1, 2)
"""The ``tiled`` policy's tile (frames, a multiple of the pool's 3) and blocks. Measured (AASIST, bf16, crop 64,600):
blocks 0 and 1 alone leave the peak in block 2's segmented backward; tiling block 2 too moves it to block 1's
backward. Tiles of 192 frames lower it by under 1 MiB per sample; 1,536 leave 57 MiB per sample."""


def _conv1_bn(block: ResidualBlock, x: Tensor) -> Tensor:
    return block.bn2(block.conv1(x))


def _block_head(block: ResidualBlock, x: Tensor) -> Tensor:
    # conv1 -> bn2 is checkpointed again inside this segment so that, when this segment is recomputed, conv1's
    # output (which BatchNorm saves) is not alive during SELU's backward: SELU's backward holds its output, its
    # output's gradient and its input gradient (3 maps), and BatchNorm's backward later recomputes conv1 (3 maps
    # again), instead of 4 maps at once. In block 0, conv1 has one input channel, so the extra recompute is cheap.
    # SELU runs in place, as in ResidualBlock.forward: its backward then uses its output, and gradients must match
    # the model's bit for bit (tests/test_techniques.py compares them).
    return F.selu(_checkpointed(block, functools.partial(_conv1_bn, block), x), inplace=True)


def _block_tail(block: ResidualBlock, h: Tensor, x: Tensor) -> Tensor:
    out = block.conv2(h)
    shortcut = x if block.conv_downsample is None else block.conv_downsample(x)
    if shortcut.dtype == out.dtype and shortcut.shape == out.shape:
        # In place: conv2 does not need its output for backward, and it saves holding a third full map while the
        # sum is formed (same values as out + shortcut; out of place only where dtypes would promote).
        out += shortcut
    else:
        out = out + shortcut
    del shortcut  # a full map that would otherwise stay alive through the pool
    return block.pool(out)


def segmented_block(block: ResidualBlock, x: Tensor) -> Tensor:
    """ResidualBlock.forward in segments: the head (conv1, bn2, selu) checkpointed, then the tail (conv2 + shortcut,
    pool), checkpointed only when its pool is the stock one.

    Between forward and backward the block keeps its input, the head's output h (one map, which conv2 needs) and,
    with a :class:`LeanMaxPool`, the pool's uint8 offsets (a sixth of a bf16 map). The tail then needs no recompute:
    conv2 saves h and the shortcut the block input, both kept anyway, and the in-place add saves nothing. No moment
    of the backward holds more than three full maps (e.g. conv2's backward: h, its output gradient, its input
    gradient), where checkpointing the block whole recomputes every saved map of the block at once. A stock pool
    would keep its whole input plus int64 indices, so then the tail is recomputed instead.
    """
    h = _checkpointed(block, functools.partial(_block_head, block), x)
    if isinstance(block.pool, LeanMaxPool):
        return _block_tail(block, h, x)
    return _checkpointed(block, functools.partial(_block_tail, block), h, x)


def _is_graph(name: str, module: nn.Module) -> bool:
    return isinstance(module, (GraphAttention, HeteroGraphAttention, GraphPool))


def _is_block(name: str, module: nn.Module) -> bool:
    return isinstance(module, ResidualBlock)


def _in_segments(name: str, module: nn.Module):
    # Only block 0 needs it, but segmenting blocks 1-5 too lowers the peak a little more (98 instead of 101 MiB per
    # bf16 sample) at the same speed.
    return segmented_block if isinstance(module, ResidualBlock) else None


def _tiled(model: nn.Module) -> list[str]:
    return apply_tiled(model, tile=TILED_TILE, blocks=TILED_BLOCKS)


# The front end is not offered: its filter bank and first max-pool need no gradient, so it saves only ~2 MiB per
# AASIST sample (first_bn's input) and recomputing it would cost more time than it saves.
#
# Live-tensor peak per sample, AASIST, crop 64,600, with lean pooling, CPU (bf16 / fp32 MiB): none 156 / 311,
# gat 156 / 311 (the graph's activations are freed before the encoder's backward, where the peak is), encoder
# 166 / 331 (block 0 recomputed whole holds all its maps plus their gradients), block0-segments 98 / 195; block0
# and tiled: benchmarks/results/cpu/memory_matrix.md.
POLICIES: dict[str, Policy] = {
    "none": Policy("none"),
    # The graph half: it keeps ~1 MiB less per sample between forward and backward, but its activations are freed
    # before the encoder's backward, where the peak is, so the peak does not move. Offered so it can be measured.
    "gat": Policy("gat", recompute=_is_graph, relative_time=1.02),
    # Each residual block recomputed whole: only block inputs are kept between forward and backward.
    "encoder": Policy("encoder", recompute=_is_block, relative_time=1.5),
    # Each residual block in segments (see segmented_block); block 0, with ~59% of the activation memory, is the
    # one that matters: the lowest peak, and with lean pooling faster than "encoder" (no tail recompute).
    "block0-segments": Policy("block0-segments", recompute=_is_block, segmented=_in_segments, relative_time=1.4),
    # block0-segments plus the graph half (the same peak today; kept for plans that name it).
    "all": Policy("all", recompute=lambda n, m: _is_block(n, m) or _is_graph(n, m), segmented=_in_segments,
                  relative_time=1.45),
    # Block 0 as one autograd Function that saves only its input, uint8 pool offsets and BatchNorm's statistics,
    # and recomputes the rest in backward a few channels or a time chunk at a time (memory/block0.py); blocks 1-5
    # as in block0-segments. Bit-identical steps.
    "block0": Policy("block0", recompute=_is_block, segmented=_in_segments, custom=apply_block0, relative_time=1.45),
    # Blocks 0-2 time-tiled with a two-pass BatchNorm and 2-bit pool offsets (memory/tiled.py), blocks 3-5 as in
    # block0-segments. The lowest peak of all; tile order changes floating-point rounding, so it is not exact.
    # Charged below block0: on the CPU measured it was no slower in bf16 and faster in fp32.
    "tiled": Policy("tiled", recompute=_is_block, segmented=_in_segments, custom=_tiled, relative_time=1.4,
                    exact=False),
}
