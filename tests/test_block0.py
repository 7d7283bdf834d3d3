"""The ``block0`` policy: block 0 of AASIST as one autograd Function (lowmem_aasist.memory.block0).

Every training step is compared with the unmodified model (lean pooling on both sides) at the same precision:
loss, every parameter gradient and BatchNorm's running statistics. In fp32 on the CPU they must be bit-identical
(torch.equal), as docs/memory.md promises; that also makes the per-tensor comparison of gradients that are
mathematically zero (biases right before a BatchNorm, whose computed values are rounding noise) meaningful. Under
bf16 and fp16 autocast, which nothing promises to be exact across CPUs (oneDNN picks kernels per CPU), each tensor is
held to max |difference| / max |reference| <= 1e-3. Dropout stays on: both models draw the same masks.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lowmem_aasist.memory.block0 as block0
from lowmem_aasist.config import checkpoint_policies
from lowmem_aasist.memory.block0 import apply_block0
from lowmem_aasist.memory.engine import prepare_model
from lowmem_aasist.memory.estimate import estimate_step_peak
from lowmem_aasist.memory.measure import build_step, measure_step
from lowmem_aasist.memory.techniques import (
    LeanMaxPool,
    apply_channels_last,
    apply_checkpointing,
    apply_lean_pooling,
)
from lowmem_aasist.models.aasist import AASIST, ResidualBlock
from lowmem_aasist.models.aasist_memory import POLICIES

CROP, BATCH = 6000, 3
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {"bf16": 1e-3, "fp16": 1e-3}  # fp32 must be exact: see same()
BLOCKS = [f"encoder.{i}.0" for i in range(6)]


def cpu_autocast_runs_conv_in(dtype: torch.dtype) -> bool:
    with torch.autocast("cpu", dtype=dtype):
        return F.conv2d(torch.randn(1, 1, 3, 3), torch.randn(1, 1, 2, 2)).dtype == dtype


def needs_precision(precision: str) -> None:
    dtype = AUTOCAST[precision]
    if dtype is not None and not cpu_autocast_runs_conv_in(dtype):
        pytest.skip(f"CPU autocast does not run convolutions in {precision} in this PyTorch build")


def relative(ref: Tensor, got: Tensor) -> float:
    """max |got - ref| / max |ref| (the difference itself where the reference is all zeros)."""
    ref, got = ref.double(), got.double()
    diff = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    return diff / scale if scale > 0 else diff


def same(ref: Tensor, got: Tensor, precision: str) -> bool:
    """Bit-identical in fp32 (the documented promise); within TOLERANCE relative under autocast."""
    if precision == "fp32":
        return torch.equal(ref, got)
    return relative(ref, got) <= TOLERANCE[precision]


def train_step(model: nn.Module, batch: tuple[Tensor, Tensor], precision: str, seed: int = 123) -> Tensor:
    x, y = batch
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in every run
    dtype = AUTOCAST[precision]
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    return loss.detach()


def step_tensors(
    ref: nn.Module, ref_loss: Tensor, model: nn.Module, loss: Tensor
) -> dict[str, tuple[Tensor, Tensor]]:
    """(reference, got) for the loss, every gradient and every running statistic; batch counts must be equal."""
    out = {"loss": (ref_loss, loss)}
    for (name, p), (_, q) in zip(ref.named_parameters(), model.named_parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            out[f"grad {name}"] = (p.grad, q.grad)
    for (name, a), (_, b) in zip(ref.named_buffers(), model.named_buffers(), strict=True):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(a, b), name
        else:
            out[name] = (a, b)
    return out


def assert_same_step(ref: nn.Module, ref_loss: Tensor, model: nn.Module, loss: Tensor, precision: str) -> None:
    tensors = step_tensors(ref, ref_loss, model, loss)
    differing = {name: relative(a, b) for name, (a, b) in tensors.items() if not same(a, b, precision)}
    # The worst relative differences name the culprit when the assertion fails.
    assert not differing, sorted(differing.items(), key=lambda kv: -kv[1])[:3]


def lean(base: nn.Module, policy: str = "none") -> nn.Module:
    model = copy.deepcopy(base)
    prepare_model(model, policy)  # lean pooling, then the policy, as the trainer does
    return model


@pytest.fixture(scope="module")
def models() -> dict[str, AASIST]:
    torch.manual_seed(0)
    return {name: AASIST(name) for name in ("AASIST-L", "AASIST")}


@pytest.fixture(scope="module")
def batch() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, CROP, generator=gen), torch.tensor([0, 1, 1])


# ---------------------------------------------------------------------------------------------------------------
# Whole training steps against the unmodified model


@pytest.mark.parametrize(
    "name, precision",
    [("AASIST-L", "fp32"), ("AASIST-L", "bf16"), ("AASIST-L", "fp16"), ("AASIST", "fp32"), ("AASIST", "bf16")],
)
def test_steps_match_unmodified_model(models, batch, name, precision):
    needs_precision(precision)
    steps = 2  # the second step starts from running statistics the first one updated
    if precision == "fp16":
        # PyTorch's fp16 convolution backward is ~20x slower than bf16 on the CPU (stock and custom alike): one
        # step on a shorter batch.
        steps, batch = 1, (batch[0][:2, :3000], batch[1][:2])
    ref, model = lean(models[name]), lean(models[name], "block0")
    assert isinstance(vars(model.get_submodule("encoder.0.0"))["forward"], block0._Block0Forward)
    for step in range(steps):
        ref_loss, loss = train_step(ref, batch, precision), train_step(model, batch, precision)
        assert_same_step(ref, ref_loss, model, loss, precision)
        bn = model.get_submodule("encoder.0.0.bn2")
        assert int(bn.num_batches_tracked) == step + 1  # one momentum update per forward, not two


def test_reference_is_sensitive(models, batch):
    # The comparisons above mean something: block 0's BatchNorm statistics moved, and its gradients are not zero.
    model = lean(models["AASIST-L"], "block0")
    train_step(model, batch, "fp32")
    bn = model.get_submodule("encoder.0.0.bn2")
    assert bn.running_mean.abs().min() > 0 and not torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    assert all(p.grad.abs().max() > 0 for p in model.get_submodule("encoder.0.0").parameters())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("layout_first", [False, True], ids=["block0-first", "channels-last-first"])
def test_channels_last(models, batch, precision, layout_first):
    # Same layout on both sides. Channels-last BatchNorm sums in an order that depends on the channel count, so
    # fp32 agrees to rounding; gradients that are mathematically zero (conv1's bias, before BatchNorm) are compared
    # against the largest gradient, not their own noise.
    ref = lean(models["AASIST-L"])
    apply_channels_last(ref)
    model = copy.deepcopy(models["AASIST-L"])
    if layout_first:
        apply_channels_last(model)
        prepare_model(model, "block0")
    else:
        prepare_model(model, "block0", channels_last=True)
    ref_loss, loss = train_step(ref, batch, precision), train_step(model, batch, precision)
    assert relative(ref_loss, loss) <= (1e-6 if precision == "fp32" else TOLERANCE[precision])
    scale = max(p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None)
    rtol = 5e-5 if precision == "fp32" else TOLERANCE[precision]  # fp32: 7e-6 seen (conv2.bias)
    grad_rtol, grad_atol = rtol, rtol * 0.1 * scale
    if precision == "bf16":
        # Under autocast a convolution's weight gradient comes out of oneDNN in bf16: an fp32 sum, rounded once.
        # Block 0 computes conv2's 8 output channels at a time. With 2+ threads, oneDNN's channels-last bf16
        # backward-weights kernel without AMX (jit_bf16:avx512_core_bf16, e.g. AMD Zen 4) splits that sum over
        # threads differently for 8 output channels than for 32 (bit-identical with 1 thread, or in the default
        # layout), so 2-8 of conv2's 6,144 elements land on the neighbouring bf16 value, up to 0.23% of its largest
        # (AASIST-L and AASIST, seeds 0-7; at most one element of conv1's or conv2's bias too). Neither rounding is
        # the worse one: against float64 on the same bf16 inputs the stock gradient is off by up to 0.83 bf16
        # steps, block 0's by 0.92 (this batch). So each gradient is held to one rounding of the stock value, bf16's
        # relative spacing 2**-7 (1% off fails); the few elements 2 steps apart are cancellations below 1e-6 of
        # `scale`, well inside atol.
        grad_rtol = torch.finfo(torch.bfloat16).eps
        grad_atol = grad_rtol * 0.01 * scale
    for (name, p), (_, q) in zip(ref.named_parameters(), model.named_parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(
                q.grad, p.grad, rtol=grad_rtol, atol=grad_atol, msg=lambda m, n=name: f"{n}: {m}"
            )
    for (name, a), (_, b) in zip(ref.named_buffers(), model.named_buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=rtol, atol=1e-7, msg=name)


def test_eval_and_no_grad_forwards_are_the_stock_block(models, batch):
    base = models["AASIST-L"]
    ref, model = lean(base), lean(base, "block0")
    x = batch[0]
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ref.eval()(x))
        outputs = []
        for m in (ref, model):  # train mode without autograd: BatchNorm still updates its statistics
            torch.manual_seed(5)
            outputs.append(m.train()(x))
        assert torch.equal(*outputs)
    for (name, a), (_, b) in zip(ref.named_buffers(), model.named_buffers(), strict=True):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------------------------------
# Block 0 alone: shapes, inputs and the split sizes


def block_pair(seed: int = 0) -> tuple[ResidualBlock, ResidualBlock]:
    torch.manual_seed(seed)
    stock = ResidualBlock(1, 32, first=True).train()
    with torch.no_grad():  # non-trivial BatchNorm parameters and statistics
        stock.bn2.weight.uniform_(0.5, 1.5)
        stock.bn2.bias.uniform_(-0.5, 0.5)
        stock.bn2.running_mean.uniform_(-1, 1)
    custom = copy.deepcopy(stock)
    apply_block0(custom)
    return stock, custom


def block_step(block: nn.Module, x: Tensor, precision: str, leaf: bool) -> tuple[Tensor, Tensor | None]:
    # Block 0's input is normally the front end's output (not a leaf); a leaf input that requires grad makes
    # autocast share one cast of it between conv1 and the shortcut, which changes how its gradients add up.
    inp = x.clone().requires_grad_() if leaf else (x.clone().requires_grad_() * 1.0)
    dtype = AUTOCAST[precision]
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = block(inp)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out.float() * weights).sum().backward()
    return out.detach(), inp.grad if leaf else None


def compare_blocks(stock: nn.Module, custom: nn.Module, x: Tensor, precision: str, leaf: bool = True) -> None:
    out_a, gx_a = block_step(stock, x, precision, leaf)
    out_b, gx_b = block_step(custom, x, precision, leaf)
    assert out_a.dtype == out_b.dtype and out_a.shape == out_b.shape
    assert same(out_a, out_b, precision), relative(out_a, out_b)
    if gx_a is not None:
        assert gx_a.dtype == gx_b.dtype and same(gx_a, gx_b, precision), relative(gx_a, gx_b)
    for (name, p), (_, q) in zip(stock.named_parameters(), custom.named_parameters(), strict=True):
        assert q.grad.dtype == p.dtype and same(p.grad, q.grad, precision), (name, relative(p.grad, q.grad))
    for (name, a), (_, b) in zip(stock.named_buffers(), custom.named_buffers(), strict=True):
        assert same(a, b, precision), (name, relative(a, b))


# Whole windows, and a tail of 1 or 2 steps that gets no gradient; fp16 once (its CPU backward is slow).
@pytest.mark.parametrize(
    "precision, width", [(p, w) for p in ("fp32", "bf16") for w in (300, 301, 302)] + [("fp16", 301)]
)
def test_block_matches_stock_at_any_width(precision, width):
    needs_precision(precision)
    stock, custom = block_pair()
    x = torch.randn(2, 1, 23, width)
    for leaf in (True, False):
        compare_blocks(stock, custom, x, precision, leaf)


def test_results_do_not_depend_on_split_sizes(monkeypatch):
    # Odd group sizes and many time chunks of the pool's gradient: the same numbers.
    stock, custom = block_pair(1)
    for name, value in [("_HEAD_CHANNELS", 3), ("_OUT_CHANNELS", 5), ("_WEIGHT_GRAD_CHANNELS", 7),
                        ("_NORM_GRAD_CHANNELS", 6), ("_TIME_CHUNKS", 9)]:
        monkeypatch.setattr(block0, name, value)
    x = torch.randn(3, 1, 23, 157)
    compare_blocks(stock, custom, x, "fp32")
    compare_blocks(stock, custom, x, "bf16", leaf=False)


def test_input_without_grad_and_cumulative_momentum():
    stock, custom = block_pair(2)
    for block in (stock, custom):
        block.bn2.momentum = None  # running averages over all batches: factor 1 / num_batches_tracked
    for _ in range(2):
        x = torch.randn(2, 1, 23, 90)
        for block in (stock, custom):
            out = block(x)  # x needs no gradient: only the parameters' are computed
            out.square().sum().backward()
    for (name, p), (_, q) in zip(stock.named_parameters(), custom.named_parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), (name, relative(p.grad, q.grad))
    for (name, a), (_, b) in zip(stock.named_buffers(), custom.named_buffers(), strict=True):
        assert torch.equal(a, b), name
    assert int(custom.bn2.num_batches_tracked) == 2


def saved_bytes(fn) -> tuple[int, object]:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs (and fn's result)."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        seen[id(t.untyped_storage())] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_saves_only_input_offsets_and_statistics(precision):
    _, custom = block_pair()
    x = torch.randn(2, 1, 23, 999, requires_grad=True)
    kept = (custom.conv1.weight, custom.conv1.bias, custom.bn2.weight, custom.bn2.bias, custom.conv2.weight,
            custom.conv_downsample.weight)  # the biases of conv2 and the shortcut are not needed for backward
    params = sum(p.numel() * p.element_size() for p in kept)
    dtype = AUTOCAST[precision]
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        saved, out = saved_bytes(lambda: custom(x))
    offsets = out.numel()  # one uint8 per pooled element
    statistics = 2 * 32 * 4  # batch mean and inverse std, fp32
    assert saved == x.numel() * 4 + offsets + statistics + params  # the parameters are saved, not copied
    assert out.dtype == (dtype or torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Memory


def test_estimator_runs_the_function_on_fake_tensors_and_matches_a_real_step():
    prepare = lambda m: prepare_model(m, "block0")  # noqa: E731
    estimate = estimate_step_peak("AASIST-L", 2, 4000, 2, "bf16", prepare=prepare)
    torch.manual_seed(0)
    model = AASIST("AASIST-L")
    prepare(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-4)
    real = measure_step(build_step(model, optimizer, 2, 4000, 2, "bf16", "cpu"), model, optimizer, "cpu")
    # To the byte but for a parameter-sized tensor or two (block0-segments: 4 bytes) of the ~11 MB.
    assert abs(estimate - real.peak_bytes) <= 1024, (estimate, real.peak_bytes)


def test_block0_peak_per_sample_is_below_block0_segments():
    def per_sample(policy: str) -> int:
        prepare = lambda m: prepare_model(m, policy)  # noqa: E731
        one, two = (estimate_step_peak("AASIST", mb, 16_000, mb, "bf16", prepare=prepare) for mb in (1, 2))
        return two - one

    # At 16,000 samples: 15.5 vs 19.4 MiB per sample (at 64,600: 59 vs 98 MiB, where block 0 weighs more).
    segments, custom = per_sample("block0-segments"), per_sample("block0")
    assert custom < 0.85 * segments, (custom / 2**20, segments / 2**20)


# ---------------------------------------------------------------------------------------------------------------
# Applying it


def test_apply_block0_and_the_policy():
    model = AASIST("AASIST-L")
    keys = list(model.state_dict())
    assert apply_block0(model) == ["encoder.0.0"]
    assert apply_block0(model) == []  # already replaced
    assert list(model.state_dict()) == keys
    assert "block0" in POLICIES and "block0" in checkpoint_policies()
    assert apply_checkpointing(AASIST("AASIST-L"), "block0") == BLOCKS  # block 0 custom, blocks 1-5 in segments
    assert apply_checkpointing(model, "block0") == BLOCKS[1:]  # block 0 was done already
    assert apply_checkpointing(model, "encoder") == []
    segmented = AASIST("AASIST-L")
    apply_checkpointing(segmented, "block0-segments")
    assert apply_block0(segmented) == []  # a block already recomputed otherwise is left as it is


def test_lean_pooling_composes_in_either_order(models, batch):
    base = models["AASIST-L"]
    ref = lean(base)
    model = copy.deepcopy(base)
    apply_checkpointing(model, "block0")
    apply_lean_pooling(model)
    assert isinstance(model.get_submodule("encoder.0.0.pool"), LeanMaxPool)  # serves eval forwards
    assert_same_step(ref, train_step(ref, batch, "fp32"), model, train_step(model, batch, "fp32"), "fp32")


def test_copies_and_pickles_run_their_own_block(models, batch):
    original = lean(models["AASIST-L"], "block0")
    ref = lean(models["AASIST-L"])
    ref_loss = train_step(ref, batch, "bf16")
    for clone in (copy.deepcopy(original), pickle.loads(pickle.dumps(original))):
        block = clone.get_submodule("encoder.0.0")
        assert block.forward.module is block
        assert_same_step(ref, ref_loss, clone, train_step(clone, batch, "bf16"), "bf16")
    assert original.get_submodule("encoder.0.0.conv1").weight.grad is None


def test_unsupported_blocks_are_refused():
    model = AASIST("AASIST-L")
    model.get_submodule("encoder.0.0").pool = nn.AvgPool2d((1, 3))
    with pytest.raises(ValueError, match="encoder.0.0 cannot run as one Function: its pool"):
        apply_block0(model)
    block = ResidualBlock(1, 32, first=True)
    block.conv2 = nn.Conv2d(32, 32, (2, 3), padding=(0, 1), padding_mode="circular")
    with pytest.raises(ValueError, match="conv2 pads with circular"):
        apply_block0(block)
    assert "forward" not in vars(block)
