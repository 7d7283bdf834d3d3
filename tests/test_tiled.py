"""The ``tiled`` policy: residual blocks computed over time in tiles, with a two-pass BatchNorm.

Tiling changes the order of floating-point sums, so results are not bit-identical to the stock block. They are
checked at two levels: one block alone with a fixed output gradient (every tensor within 1e-5 in fp32, 1e-2 under
bf16 autocast), and a whole AASIST training step. A whole step amplifies rounding chaotically (max-pool near-ties
and GraphPool's top-k pick other elements), so there results are held to "no further from the exact answer than the
stock model's own rounding", as a distribution: fp32 against float64 runs of six random draws (a single draw can land
either side by 20x); bf16 against fp32, within a multiple of how far stock bf16 steps rounded three equally valid
ways land from it in the same run (so on whichever CPU runs the tests).
"""

from __future__ import annotations

import copy
import pickle
import statistics
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lowmem_aasist.memory.tiled as tiled_mod
from lowmem_aasist.memory.engine import prepare_model
from lowmem_aasist.memory.estimate import estimate_step_peak
from lowmem_aasist.memory.techniques import (
    apply_channels_last,
    apply_checkpointing,
    apply_lean_pooling,
)
from lowmem_aasist.memory.tiled import DEFAULT_TILE, TiledBlock0Function, _pack, _unpack, apply_tiled
from lowmem_aasist.models.aasist import AASIST, ResidualBlock
from lowmem_aasist.models.aasist_memory import TILED_BLOCKS, TILED_TILE

CROP = 6000  # front end output: 1,957 frames (W % 3 == 1, so the pool drops a frame)
WIDTH = (CROP - 128) // 3
TILES = [3 * 100, DEFAULT_TILE, 3 * 1000]  # dividing nothing, the default (one partial tile), longer than W


def max_rel(a: Tensor, b: Tensor) -> float:
    """Largest element difference relative to the reference's largest magnitude."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def no_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


# ---------------------------------------------------------------------------------------------------------------
# One block, fixed output gradient


def block_pair(in_ch: int, tile: int, seed: int = 0, out_ch: int = 32) -> tuple[ResidualBlock, ResidualBlock]:
    torch.manual_seed(seed)
    block = ResidualBlock(in_ch, out_ch, first=in_ch == 1).train()
    with torch.no_grad():  # non-trivial affine and biases, so every term of the gradients matters
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tiled = copy.deepcopy(block)
    model = nn.Module()  # apply_tiled finds blocks by their place in a model: encoder.<i>.0
    model.encoder = nn.Sequential(nn.Sequential(tiled))
    assert apply_tiled(model, tile) == ["encoder.0.0"]
    return block, tiled


def block_step(block: nn.Module, x: Tensor, grad_seed: int, bf16: bool) -> tuple[Tensor, Tensor]:
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = block(x)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.dtype)
    out.backward(grad)
    assert x.grad is not None
    return out.detach(), x.grad


def block_differences(in_ch: int, width: int, tile: int, bf16: bool, out_ch: int = 32) -> dict[str, float]:
    ref, tiled = block_pair(in_ch, tile, out_ch=out_ch)
    x = 2 * torch.randn(2, in_ch, 23, width, generator=torch.Generator().manual_seed(3)) + 0.5
    if bf16:
        x = x.bfloat16()
    out_a, gx_a = block_step(ref, x, 4, bf16)
    out_b, gx_b = block_step(tiled, x, 4, bf16)
    assert out_b.dtype == out_a.dtype and gx_b.dtype == gx_a.dtype and out_b.shape == out_a.shape
    diffs = {"output": max_rel(out_b, out_a), "input grad": max_rel(gx_b, gx_a)}
    weight_grads = {n: p.grad for n, p in ref.named_parameters()}
    for (name, p), (_, q) in zip(ref.named_parameters(), tiled.named_parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name  # bn1 of later blocks is unused
        if p.grad is None or q.grad is None:
            continue
        assert q.grad.dtype == p.grad.dtype, name
        if name == "conv1.bias":
            # A bias before train-mode BatchNorm has a zero gradient; both sides hold rounding noise, so it is
            # measured against conv1's weight gradient instead of itself.
            diffs[name] = ((q.grad - p.grad).abs().max() / weight_grads["conv1.weight"].abs().max()).item()
        else:
            diffs[name] = max_rel(q.grad, p.grad)
    for (name, a), (_, b) in zip(ref.named_buffers(), tiled.named_buffers(), strict=True):
        diffs[name] = max_rel(b, a)
    assert int(tiled.bn2.num_batches_tracked) == 1
    return diffs


# (in, out) channels: block 0; blocks 1 and 3 (identity shortcut); block 2, whose projection shortcut reads many
# input channels (AASIST 32 -> 64, AASIST-L 32 -> 24), which block 0's one-channel input cannot tell apart.
BLOCKS = [(1, 32), (32, 32), (32, 64), (32, 24)]
BLOCK_IDS = ["block0", "identity-shortcut", "downsample-64", "downsample-24"]


@pytest.mark.parametrize(("in_ch", "out_ch"), BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize("width", [90, 91, 95])  # W % 3 == 0, 1, 2
@pytest.mark.parametrize("tile", [3, 12, 45, 300])  # one frame window per tile, several, one partial, longer than W
def test_block_fp32_matches_stock(in_ch, out_ch, width, tile):
    diffs = block_differences(in_ch, width, tile, bf16=False, out_ch=out_ch)
    if in_ch != out_ch:
        assert {"conv_downsample.weight", "conv_downsample.bias"} <= diffs.keys()
    assert max(diffs.values()) <= 1e-5, diffs


@pytest.mark.parametrize(("in_ch", "out_ch"), BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize("tile", [12, 300])
def test_block_bf16_close_to_stock(in_ch, out_ch, tile):
    diffs = block_differences(in_ch, 301, tile, bf16=True, out_ch=out_ch)
    assert max(diffs.values()) <= 1e-2, diffs


def test_tile_must_be_a_positive_multiple_of_3():
    for tile in (0, -3, 10):
        with pytest.raises(ValueError, match="multiple of 3"):
            apply_tiled(AASIST("AASIST-L"), tile)


# ---------------------------------------------------------------------------------------------------------------
# A whole training step


@pytest.fixture(scope="module")
def batches() -> dict[str, tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    # AASIST-L at 6,000 samples (1,957 frames: W % 3 == 1); the wider AASIST at 4,000 (1,290 frames) to stay quick.
    return {
        "AASIST-L": (torch.randn(3, CROP, generator=gen), torch.tensor([0, 1, 1])),
        "AASIST": (torch.randn(3, 4000, generator=gen), torch.tensor([0, 1, 1])),
    }


@pytest.fixture(scope="module")
def base_models() -> dict[str, AASIST]:
    models = {}
    for arch in ("AASIST-L", "AASIST"):
        torch.manual_seed(0)
        models[arch] = no_dropout(AASIST(arch))
        apply_lean_pooling(models[arch])  # exact, and on both sides
    return models


def train_step(model: nn.Module, batch: tuple[Tensor, Tensor], mode: str = "fp32") -> tuple[Tensor, Tensor, Tensor]:
    """(loss, every gradient, every buffer) after one step, each flattened into one float64 tensor."""
    x, y = batch
    if mode == "fp64":
        model, x = copy.deepcopy(model).double(), x.double()
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None])
    stats = torch.cat([b.double().flatten() for b in model.buffers()])
    return loss.detach().double(), grads, stats


def tiled_copy(base: nn.Module, tile: int = DEFAULT_TILE, blocks: tuple[int, ...] = (0,)) -> nn.Module:
    model = copy.deepcopy(base)
    assert apply_tiled(model, tile, blocks) == [f"encoder.{i}.0" for i in blocks]
    return model


def rel_norm(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    ("arch", "tile", "blocks"),
    [("AASIST-L", 3 * 100, (0,)), ("AASIST-L", 3 * 1000, (0,)), ("AASIST", 3 * 100, (0,)), ("AASIST", 3 * 50, (0, 1, 2))],
)
def test_step_fp32_matches_stock(base_models, batches, arch, tile, blocks):
    base, batch = base_models[arch], batches[arch]
    loss_a, grads_a, stats_a = train_step(copy.deepcopy(base), batch)
    loss_b, grads_b, stats_b = train_step(tiled_copy(base, tile, blocks), batch)
    assert max_rel(loss_b, loss_a) <= 1e-5
    assert max_rel(stats_b, stats_a) <= 1e-5  # running means, variances and num_batches_tracked
    # In norm over every gradient; the stock fp32 step is itself 2e-4 to 2e-3 off float64 (next test).
    assert rel_norm(grads_b, grads_a) <= 1e-3


# The module's default (one block, 1,536-frame tiles) and what the `tiled` policy ships.
SETUPS = [(DEFAULT_TILE, (0,)), (TILED_TILE, TILED_BLOCKS)]


# Random AASIST-L models and batches: the first six drawn, not chosen.
SEEDS = range(6)


class Draw(NamedTuple):
    model: nn.Module
    batch: tuple[Tensor, Tensor]
    stock: Tensor  # the stock fp32 step's gradients
    exact: Tensor  # the same step in float64


@pytest.fixture(scope="module")
def fp32_draws() -> list[Draw]:
    draws = []
    for seed in SEEDS:
        torch.manual_seed(seed)
        model = no_dropout(AASIST("AASIST-L"))
        apply_lean_pooling(model)
        batch = (torch.randn(3, CROP, generator=torch.Generator().manual_seed(1000 + seed)), torch.tensor([0, 1, 1]))
        _, stock, _ = train_step(copy.deepcopy(model), batch)
        _, exact, _ = train_step(model, batch, "fp64")
        draws.append(Draw(model, batch, stock, exact))
    return draws


@pytest.mark.parametrize(("tile", "blocks"), SETUPS)
def test_step_fp32_as_accurate_as_stock(fp32_draws, tile, blocks):
    """As far from float64 as the stock fp32 step, over random draws; not on every draw, which no rounding is.

    A near-tie in a max-pool or in GraphPool's top-k goes one way in float64 and either way in fp32, and moves the
    gradient by 1e-4 to 1e-2; stock and tiled fp32 mostly flip together. Measured over 40 draws (seeds 0-39, this
    CPU): tiled's error over stock's had a median of 1.00 for both setups, ranged from 0.09x to 22x per draw (one
    draw in 40 beyond 5x each), and the largest tiled error in any six consecutive draws was at most 1.02x the
    largest stock error among them.
    """
    tiled_error, stock_error = [], []
    for draw in fp32_draws:
        _, grads, _ = train_step(tiled_copy(draw.model, tile, blocks), draw.batch)
        tiled_error.append(rel_norm(grads, draw.exact))
        stock_error.append(rel_norm(draw.stock, draw.exact))
    ratios = [t / s for t, s in zip(tiled_error, stock_error, strict=True)]
    shown = ", ".join(f"{r:.3g}" for r in ratios)
    assert statistics.median(ratios) <= 1.1, f"tiled / stock error from float64 per draw: {shown}"
    assert max(tiled_error) <= 1.1 * max(stock_error), (tiled_error, stock_error)


class Step(NamedTuple):
    """A bf16 step as train_step gives it, plus the encoder's buffers alone (float64, flattened)."""

    loss: Tensor
    grads: Tensor
    stats: Tensor
    encoder_stats: Tensor


def bf16_step(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Step:
    loss, grads, stats = train_step(model, batch, "bf16")
    encoder_stats = torch.cat([b.double().flatten() for b in model.get_submodule("encoder").buffers()])
    return Step(loss, grads, stats, encoder_stats)


class StockBF16(NamedTuple):
    """The stock model's fp32 loss and gradients, and its bf16 step rounded three equally valid ways."""

    loss_32: Tensor
    grads_32: Tensor
    runs: list[Step]  # the default layout, channels-last, the batch in another order


@pytest.fixture(scope="module")
def stock_bf16(base_models, batches) -> Callable[[str], StockBF16]:
    measured: dict[str, StockBF16] = {}

    def measure(arch: str) -> StockBF16:  # once per architecture, shared by the tests below
        if arch not in measured:
            base, (x, y) = base_models[arch], batches[arch]
            loss_32, grads_32, _ = train_step(copy.deepcopy(base), (x, y))
            order = torch.tensor([1, 2, 0])  # the same batch: the same step in exact arithmetic, other sums
            runs = [
                bf16_step(copy.deepcopy(base), (x, y)),
                bf16_step(apply_channels_last(copy.deepcopy(base)), (x, y)),
                bf16_step(copy.deepcopy(base), (x[order], y[order])),
            ]
            measured[arch] = StockBF16(loss_32, grads_32, runs)
        return measured[arch]

    return measure


def assert_within_stock_bf16_noise(step: Step, stock: StockBF16) -> None:
    """A bf16 step no further off than the stock model's own bf16 rounding takes it, measured in the same run.

    bf16 rounding flips max-pool winners in every block and GraphPool's top-k picks, so a bf16 step lands far and
    erratically from the fp32 one, and any other rounding (channels-last, the batch in another order, tiling) lands
    elsewhere in that cloud. How far depends on the CPU, whose bf16 kernels oneDNN picks (with AMX or without):
    stock bf16 gradients were 35-45% off fp32's in norm on the Intel CI machine (earlier notes), 22% to 280% on an
    AMD Zen 4 (seeds 0-11, both architectures; losses -20% to +11% off). So each quantity is held to a multiple of
    the largest deviation among the three stock runs, not to a constant. The multiples: tiled runs (both setups,
    and channels-last; those seeds, on the Zen 4 as is and with oneDNN limited to AVX512_CORE) reached 1.6x
    (encoder statistics), 1.5x (all statistics), 3.4x (loss) and 2.0x (gradient); any run of a seed tested against
    the stock default-layout run and two others, 2.1x, 2.2x, 3.9x and 2.0x (the gradient 6.1x once in 10^4 such
    draws, a stock run 2.8x off tested against three near ones).

    Inside that cloud a whole step cannot see a gradient 10% off or a missing backward term (the block tests above
    do); it sees a missing or doubled BatchNorm update, tiles without their halo, and gradients off by far more.
    """
    default, *others = stock.runs
    # Running statistics are forward-only. In the encoder (before GraphPool) another rounding moves them by 3e-5 to
    # 2.4e-4 relative, so there a wrong BatchNorm or output of a tiled block shows; all buffers: 1e-3 to 6e-3.
    within("encoder statistics", max_rel(step.encoder_stats, default.encoder_stats),
           [max_rel(r.encoder_stats, default.encoder_stats) for r in others], 3)
    within("statistics", max_rel(step.stats, default.stats), [max_rel(r.stats, default.stats) for r in others], 3)
    within("loss off fp32", abs(step.loss - stock.loss_32).item(),
           [abs(r.loss - stock.loss_32).item() for r in stock.runs], 5)
    within("gradient off fp32", rel_norm(step.grads, stock.grads_32),
           [rel_norm(r.grads, stock.grads_32) for r in stock.runs], 5)


def within(what: str, got: float, stock_runs: list[float], multiple: float) -> None:
    stock_text = ", ".join(f"{v:.3g}" for v in stock_runs)
    assert got <= multiple * max(stock_runs), f"{what}: {got:.3g}, stock bf16 runs {stock_text}"


@pytest.mark.parametrize(("tile", "blocks"), SETUPS)
@pytest.mark.parametrize("arch", ["AASIST-L", "AASIST"])
def test_step_bf16_as_accurate_as_stock_bf16(base_models, batches, stock_bf16, arch, tile, blocks):
    step = bf16_step(tiled_copy(base_models[arch], tile, blocks), batches[arch])
    assert_within_stock_bf16_noise(step, stock_bf16(arch))


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_step_channels_last(base_models, batches, stock_bf16, mode):
    # The demo profile trains channels-last: the tiled blocks take and give either layout. fp32 agrees to rounding
    # with the tiled model in the default layout; bf16 rounds differently, so it is held to the stock bf16 noise.
    base, batch = base_models["AASIST"], batches["AASIST"]
    model = tiled_copy(base, 3 * 50, (0, 1, 2))
    apply_channels_last(model)
    if mode == "bf16":
        assert_within_stock_bf16_noise(bf16_step(model, batch), stock_bf16("AASIST"))
        return
    loss_a, grads_a, stats_a = train_step(tiled_copy(base, 3 * 50, (0, 1, 2)), batch, mode)
    loss_b, grads_b, stats_b = train_step(model, batch, mode)
    assert max_rel(loss_b, loss_a) <= 1e-5 and max_rel(stats_b, stats_a) <= 1e-5
    assert rel_norm(grads_b, grads_a) <= 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Plumbing: eval, copies, composition, fake tensors, memory


def test_eval_and_no_grad_use_the_stock_forward(base_models, batches):
    base, batch = base_models["AASIST"], batches["AASIST"]
    model = tiled_copy(base)
    assert list(model.state_dict()) == list(base.state_dict())
    calls = []
    real = TiledBlock0Function.apply
    TiledBlock0Function.apply = lambda *a: calls.append(1) or real(*a)  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            assert torch.equal(model.eval()(batch[0]), copy.deepcopy(base).eval()(batch[0]))
            assert torch.equal(model.train()(batch[0]), copy.deepcopy(base).train()(batch[0]))
        assert calls == []
        model(batch[0])
        assert calls == [1]
    finally:
        TiledBlock0Function.apply = real  # type: ignore[method-assign]


def test_copies_tile_their_own_block(base_models, batches):
    base, batch = base_models["AASIST"], batches["AASIST"]
    original = tiled_copy(base)
    loss, grads, stats = train_step(copy.deepcopy(original), batch)
    for clone in (copy.deepcopy(original), pickle.loads(pickle.dumps(original))):
        block = clone.get_submodule("encoder.0.0")
        assert block.forward.module is block
        loss_c, grads_c, stats_c = train_step(clone, batch)
        assert torch.equal(loss_c, loss) and torch.equal(grads_c, grads) and torch.equal(stats_c, stats)
    assert original.get_submodule("encoder.0.0.conv1").weight.grad is None
    assert apply_tiled(original) == []  # already tiled


@pytest.mark.parametrize("tiled_first", [False, True])
def test_composes_with_checkpointing_in_either_order(base_models, batches, tiled_first):
    base, batch = base_models["AASIST"], batches["AASIST"]
    model = copy.deepcopy(base)
    if tiled_first:
        apply_tiled(model)
        assert apply_checkpointing(model, "block0-segments") == [f"encoder.{i}.0" for i in range(1, 6)]
    else:
        apply_checkpointing(model, "block0-segments")
        apply_tiled(model)
    plain = tiled_copy(base)
    loss_a, grads_a, stats_a = train_step(plain, batch)
    loss_b, grads_b, stats_b = train_step(model, batch)
    # Checkpointing blocks 1-5 is exact, so on top of the same tiled block 0 nothing changes.
    assert torch.equal(loss_a, loss_b) and torch.equal(grads_a, grads_b) and torch.equal(stats_a, stats_b)


def saved_bytes(fn) -> tuple[int, object]:
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def test_block0_keeps_only_input_offsets_and_statistics():
    torch.manual_seed(0)
    model = AASIST("AASIST-L")
    apply_tiled(model)
    block = model.get_submodule("encoder.0.0").train()
    x = torch.randn(2, 1, 23, WIDTH, requires_grad=True)
    params = sum(p.numel() * p.element_size() for p in block.parameters())
    n, out = saved_bytes(lambda: block(x))
    batch, channels, height, frames = out.shape
    offsets = batch * -(-channels // 4) * height * frames  # 2 bits per output element, four channels to a byte
    assert n == x.numel() * 4 + offsets + params + 2 * 32 * 4  # plus the per-channel mean and inverse std


@pytest.mark.parametrize("channels", [1, 4, 5, 32])
def test_pool_offsets_pack_four_to_a_byte_and_unpack_exactly(channels):
    offsets = torch.randint(0, 3, (2, channels, 3, 7), dtype=torch.uint8)
    packed = _pack(offsets)
    assert packed.dtype == torch.uint8 and packed.shape == (2, -(-channels // 4), 3, 7)
    assert torch.equal(_unpack(packed, channels), offsets.long())
    assert torch.equal(_unpack(packed[..., 2:5], channels), offsets[..., 2:5].long())  # any window range alone


def test_estimator_runs_tiled_and_sees_less_memory():
    def lean(model: nn.Module) -> None:
        apply_lean_pooling(model)

    def tiled(model: nn.Module) -> None:
        apply_lean_pooling(model)
        apply_tiled(model)

    stock = estimate_step_peak("AASIST", 2, 16_000, 2, "bf16", prepare=lean)
    small = estimate_step_peak("AASIST", 2, 16_000, 2, "bf16", prepare=tiled)
    assert small < 0.85 * stock, (small, stock)  # 0.79 measured; the fixed state weighs more at 1 s


def test_estimator_runs_representative_tiles_with_the_same_peak(monkeypatch):
    # Under fake tensors only the first two and last two tiles run; the peak must be that of the whole loop.
    def prepare(model: nn.Module) -> None:
        prepare_model(model, "tiled")

    loops: list[int] = []
    tiles = tiled_mod._tiles
    monkeypatch.setattr(tiled_mod, "_tiles", lambda *a: loops.append(len(r := tiles(*a))) or r)
    short = [estimate_step_peak("AASIST-L", mb, 16_000, mb, "bf16", prepare=prepare) for mb in (1, 2)]
    assert max(loops) == 4  # block 0 has 14 tiles of 384 frames at this crop
    monkeypatch.setattr(tiled_mod, "is_fake", lambda t: False)
    loops.clear()
    full = [estimate_step_peak("AASIST-L", mb, 16_000, mb, "bf16", prepare=prepare) for mb in (1, 2)]
    assert max(loops) == 14
    assert short == full
