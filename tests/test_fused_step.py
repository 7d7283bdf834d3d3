"""The optimizer step fused into backward (memory/fused_step.py): bit-identical to the ordinary step, with
accumulation, a schedule and a resume; never holding every gradient at once; refusing what it cannot do."""

from __future__ import annotations

import copy
import io
from contextlib import nullcontext

import pytest
import torch
from torch import nn

from lowmem_aasist.memory.engine import prepare_model
from lowmem_aasist.memory.fused_step import (
    OptimizerInBackward,
    PartialStepError,
    fused_step_problems,
    stepping,
)
from lowmem_aasist.memory.measure import measure_step
from lowmem_aasist.memory.optim import make_optimizer
from lowmem_aasist.memory.plan import NoPlanError
from lowmem_aasist.models import build_model
from lowmem_aasist.step import forward_backward
from lowmem_aasist.train.setup import cosine_lr

LR, MIN_LR, BETAS, WEIGHT_DECAY = 1e-3, 1e-4, (0.9, 0.999), 1e-4  # the recipe's Adam (L2 decay), a larger lr
WEIGHTS = torch.tensor([0.1, 0.9])
CROP, BATCH = 4000, 4


def _factory(name: str = "adam"):
    return lambda groups: make_optimizer(name, groups, LR, BETAS, WEIGHT_DECAY)


def _optimizer(model: nn.Module, fused: bool, name: str = "adam") -> torch.optim.Optimizer:
    make = _factory(name)
    return OptimizerInBackward(model.parameters(), make) if fused else make(model.parameters())


def _schedule(optimizer: torch.optim.Optimizer, total: int = 3):
    # A short cosine, so that the lr differs at every step (the trainer's schedule, setup.cosine_lr).
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, total, LR, MIN_LR) / LR)


def _train(model, optimizer, scheduler, batches, micro_batch: int, weights: torch.Tensor = WEIGHTS) -> None:
    """The trainer's step: zero_grad, micro-batches with the last one's backward stepping, step, schedule."""
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        total = weights[y.to(weights.device)].sum()
        parts = list(zip(x.split(micro_batch), y.split(micro_batch), strict=True))
        for n, (xs, ys) in enumerate(parts):
            with stepping(optimizer) if n == len(parts) - 1 else nullcontext():
                forward_backward(model, xs, ys, weights, len(xs), nullcontext, total_weight=total)
        optimizer.step()
        scheduler.step()


def _batches(n: int, width: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, width, generator=gen), torch.tensor([0, 1, 1, 0])) for _ in range(n)]


def _aasist(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("AASIST-L").train()


class _MLP(nn.Module):
    """Transformer-like: pre-norm residual feed-forward blocks, weights large against the activations of a batch
    of 4, so that gradients dominate a step's memory as in a 300 M-parameter model."""

    def __init__(self, d: int = 64, blocks: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
                                    for _ in range(blocks))
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def _mlp(seed: int = 0, blocks: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    model = _MLP(blocks=blocks)
    model.blocks[0][0].bias.requires_grad_(False)  # a frozen parameter: no hook, never updated, as in plain Adam
    return model


def _same(a, b, where: str = "") -> None:
    """Equal to the bit: tensors by torch.equal (and dtype), containers item by item, the rest by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _snapshot(model, optimizer) -> dict:
    return copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})


def _bnb_or_skip(name: str, device: str = "cpu") -> None:
    if name == "adam":
        return
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed")
    try:  # some bitsandbytes builds have no kernels for this device
        p = nn.Parameter(torch.randn(4096, device=device))
        p.grad = torch.randn(4096, device=device)
        make_optimizer(name, [p], LR, BETAS, WEIGHT_DECAY).step()
    except Exception as exc:
        pytest.skip(f"bitsandbytes {name} does not step on {device} here ({type(exc).__name__}: {str(exc)[:80]})")


def _grad_peak(model: nn.Module) -> list[int]:
    """Record, as each gradient is completed, the bytes of every ``.grad`` alive; the hooks go on before the
    optimizer's (hooks run in the order registered), so the gradient just completed is counted too."""
    params, peak = list(model.parameters()), [0]

    def record(_):
        peak[0] = max(peak[0], sum(p.grad.nbytes for p in params if p.grad is not None))

    for p in params:
        p.register_post_accumulate_grad_hook(record)
    return peak


def test_aasist_steps_bit_identical_and_never_holds_every_gradient():
    """AASIST-L, fp32, accumulation 1, cosine schedule: the same weights, BatchNorm statistics and Adam state as
    the ordinary step after every step; and when a gradient is completed no other one is alive."""
    batches = _batches(2, CROP)
    runs = {}
    for fused in (False, True):
        model = _aasist()
        initial = copy.deepcopy(model.state_dict())
        peak = _grad_peak(model)
        optimizer = _optimizer(model, fused)
        scheduler = _schedule(optimizer)
        torch.manual_seed(1)  # the same dropout masks in both runs
        states = []
        for batch in batches:
            _train(model, optimizer, scheduler, [batch], BATCH)
            if fused:
                assert all(p.grad is None for p in model.parameters())  # freed in backward
            states.append(_snapshot(model, optimizer))
        runs[fused] = states, peak[0], model
    (plain, plain_peak, model), (fused, fused_peak, _) = runs[False], runs[True]
    for step, (a, b) in enumerate(zip(plain, fused, strict=True)):
        _same(a, b, f"step {step + 1}")  # parameters, BatchNorm buffers, Adam state and lr
    lrs = [s["optimizer"]["param_groups"][0]["lr"] for s in plain]
    assert lrs[0] != lrs[1]  # the schedule moved: the fused path followed it
    stats = [k for k in initial if k.endswith(("running_mean", "running_var"))]
    assert sum(not torch.equal(initial[k], plain[-1]["model"][k]) for k in stats) >= 10  # BatchNorm statistics moved

    # The parameters that got a gradient are those with Adam state (AASIST's uncomputed bn1 of blocks 1-5 get none).
    trained = [p for i, p in enumerate(model.parameters()) if i in plain[-1]["optimizer"]["state"]]
    assert 0 < len(trained) < len(list(model.parameters()))
    assert plain_peak == sum(p.nbytes for p in trained)  # the ordinary backward ends holding every gradient
    assert fused_peak == max(p.nbytes for p in trained)  # the fused one holds the gradient being applied, no other


def test_aasist_accumulation_and_resume_are_exact(tmp_path):
    """Micro-batch 2 of 4: the update uses the whole batch's gradient, once per step. Stopped after step 2, saved
    (weights_only), rebuilt from other weights, loaded and continued, the fused run equals the uninterrupted
    ordinary one."""
    batches = _batches(3, CROP, seed=2)
    model = _aasist()
    optimizer = _optimizer(model, fused=False)
    scheduler = _schedule(optimizer)
    torch.manual_seed(1)
    _train(model, optimizer, scheduler, batches[:2], 2)
    plain_at_2 = _snapshot(model, optimizer)
    _train(model, optimizer, scheduler, batches[2:], 2)
    plain_at_3 = _snapshot(model, optimizer)

    model = _aasist()
    optimizer = _optimizer(model, fused=True)
    scheduler = _schedule(optimizer)
    torch.manual_seed(1)
    _train(model, optimizer, scheduler, batches[:2], 2)
    _same(plain_at_2, _snapshot(model, optimizer), "step 2")
    path = tmp_path / "last.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()}, path)

    model = _aasist(seed=7)  # other weights: everything must come from the checkpoint
    optimizer = _optimizer(model, fused=True)
    scheduler = _schedule(optimizer)
    ckpt = torch.load(path, weights_only=True)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng"])
    _train(model, optimizer, scheduler, batches[2:], 2)
    _same(plain_at_3, _snapshot(model, optimizer), "step 3 after resume")


@pytest.mark.parametrize("policy", ["encoder", "tiled"])
def test_aasist_with_checkpointing_bit_identical(policy):
    """Checkpointing recomputes the forward inside backward with the weights: each parameter is updated only after
    its last use there (torch.utils.checkpoint, non-reentrant: ``encoder``; the hand-written block Functions:
    ``tiled``), so the fused step stays exact with the techniques it is meant to be combined with."""
    batches = _batches(2, CROP, seed=3)
    snapshots = []
    for fused in (False, True):
        model = _aasist()
        prepare_model(model, policy)
        optimizer = _optimizer(model, fused)
        scheduler = _schedule(optimizer)
        torch.manual_seed(1)
        _train(model, optimizer, scheduler, batches, BATCH)
        snapshots.append(_snapshot(model, optimizer))
    _same(*snapshots, policy)


@pytest.mark.parametrize("name", ["adam", "adam8bit", "adamw8bit"])
def test_mlp_steps_bit_identical_and_state_interchangeable(name):
    """A transformer-like MLP, accumulation 2, cosine schedule, three steps: the fused path (and the same object
    used without stepping(), i.e. off) equals the ordinary one, for torch Adam and bitsandbytes' 8-bit Adam / AdamW;
    the state dicts are the same, so a checkpoint of one continues exactly in the other."""
    _bnb_or_skip(name)
    batches = _batches(4, 64)
    results = {}
    for mode in ("plain", "fused", "off"):
        model = _mlp()
        optimizer = _optimizer(model, mode != "plain", name)
        scheduler = _schedule(optimizer)
        _train(model, optimizer, scheduler, batches[:1], 2)
        if mode == "off":  # never inside stepping(): the ordinary update, applied by step()
            for x, y in batches[1:3]:
                optimizer.zero_grad(set_to_none=True)
                forward_backward(model, x, y, WEIGHTS, 2, nullcontext)
                assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
                optimizer.step()
                scheduler.step()
        else:
            _train(model, optimizer, scheduler, batches[1:3], 2)
        results[mode] = model, optimizer, scheduler
    plain = _snapshot(*results["plain"][:2])
    assert not torch.equal(plain["model"]["blocks.0.1.weight"], _mlp().state_dict()["blocks.0.1.weight"])
    assert plain["model"]["blocks.0.0.bias"].eq(0).all()  # the frozen one stayed
    _same(plain, _snapshot(*results["fused"][:2]), "fused")
    _same(plain, _snapshot(*results["off"][:2]), "off")

    # Cross-load: the fused run continues from the ordinary run's checkpoint and vice versa, exactly.
    ends = []
    for source, target in (("plain", "fused"), ("fused", "plain")):
        src_model, src_optimizer, src_scheduler = results[source]
        buffer = io.BytesIO()
        torch.save({"model": src_model.state_dict(), "optimizer": src_optimizer.state_dict(),
                    "scheduler": src_scheduler.state_dict()}, buffer)
        buffer.seek(0)
        ckpt = torch.load(buffer, weights_only=True)
        fresh = _mlp(seed=5)
        fresh_optimizer = _optimizer(fresh, target == "fused", name)
        fresh_scheduler = _schedule(fresh_optimizer)
        fresh.load_state_dict(ckpt["model"])
        fresh_optimizer.load_state_dict(ckpt["optimizer"])
        fresh_scheduler.load_state_dict(ckpt["scheduler"])
        _train(fresh, fresh_optimizer, fresh_scheduler, batches[3:], 2)
        ends.append(_snapshot(fresh, fresh_optimizer))
    _same(*ends, "cross-loaded")


def test_live_memory_never_holds_every_gradient():
    """The project's live-tensor count of a whole steady-state step (accumulation 1), 16 weight matrices of 64 KiB:
    the fused step's peak is below the ordinary one's by every gradient but four of the largest's size (the fused
    step holds the gradient being applied and Adam's temporaries for it, the L2 term, square root and quotient).
    Only freeing each gradient as it is applied achieves it: a gradient kept anywhere, .grad or not, is counted."""
    peaks = {}
    for fused in (False, True):
        model = _mlp(blocks=8)
        optimizer = _optimizer(model, fused)
        x, y = _batches(1, 64)[0]

        def step(model=model, optimizer=optimizer, x=x, y=y):
            optimizer.zero_grad(set_to_none=True)
            with stepping(optimizer):
                forward_backward(model, x, y, WEIGHTS, BATCH, nullcontext)
            optimizer.step()

        peaks[fused] = measure_step(step, model, optimizer, "cpu").peak_bytes
    trained = [p for p in model.parameters() if p.requires_grad]
    grads, largest = sum(p.nbytes for p in trained), max(p.nbytes for p in trained)
    assert peaks[False] - peaks[True] >= grads - 4 * largest, (peaks, grads, largest)


def test_a_second_gradient_in_one_stepping_backward_is_refused():
    # stepping() around every micro-batch would apply each micro-batch's gradient as a step of its own.
    model = _mlp()
    optimizer = _optimizer(model, fused=True)
    x, y = _batches(1, 64)[0]
    with pytest.raises(RuntimeError, match="second gradient"), stepping(optimizer):
        forward_backward(model, x, y, WEIGHTS, 2, nullcontext)


def test_out_of_memory_after_an_update_cannot_be_retried():
    model = _mlp()
    optimizer = _optimizer(model, fused=True)
    x, y = _batches(1, 64)[0]
    with pytest.raises(torch.OutOfMemoryError), stepping(optimizer):  # nothing updated yet: the backoff may redo it
        raise torch.OutOfMemoryError("fake: in the forward pass")
    with pytest.raises(PartialStepError, match=r"after \d+ of \d+ trainable parameters were updated.*--resume") as caught:
        with stepping(optimizer):
            forward_backward(model, x, y, WEIGHTS, BATCH, nullcontext)
            raise torch.OutOfMemoryError("fake: late in backward")
    assert isinstance(caught.value, NoPlanError)  # the CLI prints it in one line; the step's retry does not catch it
    assert not isinstance(caught.value, torch.OutOfMemoryError)


def test_what_cannot_be_fused_is_refused_in_one_line():
    assert fused_step_problems("fp32", distributed=False) == []
    assert fused_step_problems("bf16", distributed=False) == []
    (fp16,) = fused_step_problems("fp16", distributed=False)
    assert "GradScaler" in fp16 and "\n" not in fp16
    (ddp,) = fused_step_problems("bf16", distributed=True)
    assert "torchrun" in ddp
    with pytest.raises(NotImplementedError):
        _optimizer(_mlp(), fused=True).add_param_group({"params": [nn.Parameter(torch.zeros(1))]})


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["adam", "adam8bit", "adamw8bit"])
def test_cuda_steps_bit_identical_and_peak_lower(name):
    """On CUDA, where torch Adam takes its foreach path, bitsandbytes its CUDA kernels and backward runs on the
    device's autograd thread: the same bits as the ordinary step, and a step's allocator peak (accumulation 1)
    lower by every gradient but four of the largest's size."""
    _bnb_or_skip(name, "cuda")
    device = torch.device("cuda")
    weights = WEIGHTS.to(device)
    batches = _batches(3, 256)
    results = {}
    for mode in ("plain", "plain again", "fused"):
        torch.manual_seed(0)
        model = _MLP(d=256, blocks=8).to(device)
        optimizer = _optimizer(model, mode == "fused", name)
        scheduler = _schedule(optimizer)
        _train(model, optimizer, scheduler, batches[:2], 2, weights)  # the state exists; the last step is measured
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        _train(model, optimizer, scheduler, batches[2:], BATCH, weights)
        torch.cuda.synchronize()
        results[mode] = _snapshot(model, optimizer), torch.cuda.max_memory_allocated()
        del model, optimizer, scheduler
    _same(results["plain"][0], results["plain again"][0], "the ordinary step is not reproducible on this GPU")
    _same(results["plain"][0], results["fused"][0], "fused")
    trained = list(_MLP(d=256, blocks=8).parameters())
    grads, largest = sum(p.nbytes for p in trained), max(p.nbytes for p in trained)
    assert results["plain"][1] - results["fused"][1] >= grads - 4 * largest, (results["plain"][1], results["fused"][1])


@pytest.mark.parametrize("micro_batch", [4, 2])
def test_fit_with_the_step_in_backward_trains_the_same_weights(tmp_path, micro_batch):
    from lowmem_aasist.config import load_config
    from lowmem_aasist.data.demo import make_demo_corpus
    from lowmem_aasist.train import fit

    root = make_demo_corpus(tmp_path / "la", n_train=8, n_dev=4, n_eval=2, seed=5, workers=1)

    def run(name: str, fused: bool) -> dict:
        cfg = load_config("demo", {"data.root": str(root), "train.crop": 3000, "train.batch": 4, "train.workers": 0,
                                   "train.max_steps": 3, "train.precision": "fp32", "data.eval_samples": 3000,
                                   "memory.micro_batch": micro_batch, "memory.optimizer_in_backward": fused})
        fit(cfg, tmp_path / name)
        return torch.load(tmp_path / name / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)

    plain, fused = run("plain", False), run("fused", True)
    assert all(torch.equal(plain["model"][k], fused["model"][k]) for k in plain["model"])
    states = [o["state"] for o in (plain["optimizer"], fused["optimizer"])]
    assert states[0].keys() == states[1].keys() and all(
        torch.equal(states[0][i][k], states[1][i][k]) for i in states[0] for k in states[0][i])
