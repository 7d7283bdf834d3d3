"""Live-tensor tracking, step measurement, and the fake-tensor estimator checked against real CPU measurements."""

from __future__ import annotations

import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.checkpoint import checkpoint

from lowmem_aasist.memory.estimate import adam8bit_saving, estimate_step_peak, fit_linear
from lowmem_aasist.memory.measure import (
    LiveTensorTracker,
    build_step,
    measure_step,
    reset_rss_peak,
    rss_peak,
    state_bytes,
    tensors_bytes,
)
from lowmem_aasist.memory.techniques import apply_channels_last
from lowmem_aasist.models.aasist import AASIST

MiB = 2**20


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Only memory is checked here, never speed; one thread keeps the real steps quick even when other jobs share
    # the CI cores (two OpenMP threads on two busy cores ran these steps ~6x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- tracker -----------------------------------------------------------------------------------------------


def test_tracker_counts_allocations_and_frees_exactly():
    with LiveTensorTracker() as tracker:
        a = torch.empty(1000)  # 4,000 bytes
        b = torch.empty(500, dtype=torch.float64)  # 4,000 bytes
        assert (tracker.current_bytes, tracker.peak_bytes) == (8000, 8000)
        del a
        assert (tracker.current_bytes, tracker.peak_bytes) == (4000, 8000)
        tracker.reset_peak()
        assert tracker.peak_bytes == 4000
        c = b + 1  # a new 4,000-byte result
        assert tracker.peak_bytes == 8000
        del b, c
    assert tracker.current_bytes == 0


def test_views_and_in_place_ops_allocate_nothing():
    outside = torch.zeros(256)  # made before the mode: its in-place updates and views must not count either
    with LiveTensorTracker() as tracker:
        a = torch.zeros(64, 64)
        base = tracker.current_bytes
        views = [a[1:], a.t(), a.view(-1), a.reshape(4096), a.detach(), a[:, 0], *a.split(16)]
        a.add_(1)
        a.mul_(2).clamp_(max=3.0)
        torch.add(a, 1, out=a)
        outside.add_(1)
        outside[3:].zero_()
        assert tracker.current_bytes == base == 64 * 64 * 4
        assert tensors_bytes([a, *views]) == base  # the helper also counts shared storage once
        del views


def test_saved_activation_is_freed_by_backward():
    x = torch.randn(256, requires_grad=True)  # float32, made outside the mode
    with LiveTensorTracker() as tracker:
        z = x.double().exp()  # exp saves its float64 result (2,048 bytes); the float64 copy of x is not saved
        loss = z.sum()
        del z
        assert tracker.current_bytes == 2048 + 8  # z lives on inside the graph, plus the scalar loss
        loss.backward()
        assert tracker.current_bytes == 8 + 256 * 4  # graph freed (z with it); x.grad was made by backward
        assert x.grad is not None


def test_tracker_works_on_fake_tensors_and_filters_devices():
    with FakeTensorMode(), LiveTensorTracker("cpu") as tracker:
        a = torch.empty(1000)
        _ = a.view(10, 100)
        m = torch.empty(1000, device="meta")  # another device: not counted
        assert tracker.current_bytes == 4000
        del a, m


# --- measurement ---------------------------------------------------------------------------------------------


def _model(name: str = "AASIST-L", prepare=None) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = AASIST(name).train()
    if prepare is not None:
        prepare(model)
    return model, torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-4)


def test_measure_step_cpu():
    model, opt = _model()
    build_step(model, opt, 1, 8000, 1, "fp32", "cpu")()  # one warm-up for the three measurements below
    results = {
        b: measure_step(build_step(model, opt, b, 8000, b, "fp32", "cpu"), model, opt, "cpu", warmup=0)
        for b in (1, 2, 4)
    }
    r = results[2]
    # Counted by hand: every parameter in float32; the gradient, exp_avg and exp_avg_sq of each one used (block
    # 1-5's bn1 are not: no gradient, so no Adam state), plus Adam's float32 step counter; BatchNorm's float32
    # running statistics and int64 batch counters; the sinc front end's fixed float32 filter bank.
    used = [p for p in model.parameters() if p.grad is not None]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    expected = (4 * sum(p.numel() for p in model.parameters()) + 3 * 4 * sum(p.numel() for p in used)
                + 4 * len(used) + sum(2 * 4 * m.num_features + 8 for m in bns) + 4 * 70 * 129)
    assert model.conv_time.bank.shape == (70, 1, 129)
    assert len(used) < len(list(model.parameters())) and len(opt.state) == len(used)
    assert r.state_bytes == expected
    assert r.peak_bytes > r.state_bytes
    assert r.cuda_peak_allocated is None and r.cuda_peak_reserved is None
    assert r.step_s > 0
    per_sample = results[2].peak_bytes - results[1].peak_bytes
    assert per_sample > 0
    assert results[4].peak_bytes - results[2].peak_bytes == pytest.approx(2 * per_sample, rel=0.02)
    if sys.platform.startswith("linux"):
        assert r.rss_peak_bytes is not None and r.rss_peak_bytes > r.peak_bytes  # RSS adds the process itself


def test_state_bytes_counts_weights_gradients_adam_state_and_buffers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))  # 12 parameters in 4 tensors
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    # Parameters 12 x 4 B; BatchNorm's running mean and variance 2 x 2 x 4 B and its int64 batch count 8 B.
    assert state_bytes(model) == state_bytes(model, opt) == 48 + 16 + 8
    model(torch.randn(4, 3)).square().sum().backward()
    assert state_bytes(model, opt) == 72 + 48  # the gradients
    opt.step()
    # Adam's exp_avg and exp_avg_sq (12 x 4 B each) and a float32 step counter per parameter tensor.
    assert state_bytes(model, opt) == 120 + 2 * 48 + 4 * 4
    assert state_bytes(model) == 120  # without the optimizer: its state is not the model's


def test_rss_peak_reset_reads_back():
    if not (sys.platform.startswith("linux") and reset_rss_peak()):
        pytest.skip("VmHWM reset needs Linux /proc/self/clear_refs")
    peak = rss_peak()
    assert peak is not None and peak > 0


# --- estimator -----------------------------------------------------------------------------------------------


def _checkpoint_encoder(model: torch.nn.Module) -> torch.nn.Module:
    # A stand-in for the checkpointing technique: proves the estimator follows recomputation in backward.
    for block in model.get_submodule("encoder"):
        block.forward = lambda x, f=block.forward: checkpoint(f, x, use_reentrant=False)
    return model


CONFIGS = [
    # model, batch, crop, micro_batch, precision, prepare
    ("AASIST-L", 4, 8000, 2, "fp32", None),
    ("AASIST-L", 4, 12000, 4, "bf16", None),
    ("AASIST-L", 2, 16000, 2, "fp32", apply_channels_last),
    ("AASIST-L", 4, 8000, 4, "bf16", apply_channels_last),
    ("AASIST-L", 3, 8000, 2, "bf16", _checkpoint_encoder),
    ("AASIST", 2, 8000, 2, "fp32", None),
]


@pytest.mark.parametrize(
    "name,batch,crop,micro,precision,prepare",
    CONFIGS,
    ids=[f"{c[0]}-b{c[1]}-c{c[2]}-m{c[3]}-{c[4]}{'-' + c[5].__name__ if c[5] else ''}" for c in CONFIGS],
)
def test_estimator_matches_cpu_measurement(name, batch, crop, micro, precision, prepare):
    """The issue's acceptance criterion: estimate within 5% of the real CPU measurement (observed: ~0.001%)."""
    model, opt = _model(name, prepare)
    measured = measure_step(build_step(model, opt, batch, crop, micro, precision, "cpu"), model, opt, "cpu")
    estimated = estimate_step_peak(name, batch, crop, micro, precision, prepare=prepare)
    assert estimated == pytest.approx(measured.peak_bytes, rel=0.05)


def test_estimator_short_run_equals_every_micro_batch():
    # 7 = 2+2+2+1 runs as 2+2+1; the result must be exact: only the left-out samples' batch tensors are added back.
    args = ("AASIST-L", 7, 8000, 2, "fp32")
    assert estimate_step_peak(*args) == estimate_step_peak(*args, full_batch=True)


def test_estimator_allocates_nothing_real():
    if not (sys.platform.startswith("linux") and reset_rss_peak()):
        pytest.skip("needs Linux VmHWM")
    before = rss_peak()
    peak = estimate_step_peak("AASIST", 24, 64600, 24, "fp32")
    assert peak > 8 * 2**30  # a reference-size batch needs about 10 GiB of live tensors...
    assert rss_peak() - before < 512 * MiB  # ...which the estimate never touches


def test_estimator_rejects_unknown_optimizer():
    with pytest.raises(ValueError, match="optimizer"):
        estimate_step_peak("AASIST-L", 2, 8000, 2, "fp32", optimizer="lion")


def testadam8bit_saving_counts_blockwise_state():
    small, big = torch.nn.Parameter(torch.empty(100)), torch.nn.Parameter(torch.empty(5000))
    # small keeps float32 state; big: 2 x 4 bytes -> 2 x (1 byte + a float32 absmax per 256 elements, 20 blocks)
    assert adam8bit_saving([small, big]) == 2 * 5000 * 4 - 2 * (5000 + 20 * 4)


# --- fit -----------------------------------------------------------------------------------------------------


def test_fit_linear_recovers_a_line():
    fixed, slope = fit_linear([(s, 3_000_000 + 512 * s) for s in (8000, 16000, 32000)])
    assert fixed == pytest.approx(3_000_000)
    assert slope == pytest.approx(512)
    noisy = [(8000, 7_100_000), (16000, 11_000_000), (24000, 15_100_000)]  # about 3 MB + 500 B per sample
    fixed, slope = fit_linear(noisy)
    assert slope == pytest.approx(500, rel=0.02) and fixed == pytest.approx(3_066_667, rel=0.01)
    with pytest.raises(ValueError):
        fit_linear([(8000, 1), (8000, 2)])


def test_the_data_path_counts_its_peak_and_what_it_holds_not_what_it_leaves_to_the_process():
    import numpy as np

    from lowmem_aasist.memory.measure import measure_data_path

    kept: list[np.ndarray] = []

    def read_batch():
        if not kept:  # a first call's library loads and caches stay: the process's, counted with it
            kept.append(np.ones(48 * MiB // 8))
        scratch = np.ones(32 * MiB // 8)  # a temporary freed before the batch is returned
        del scratch
        return np.ones(16 * MiB // 8)  # the batch, held through the step

    nbytes, seconds = measure_data_path(read_batch, items=4)
    # The peak is the scratch (32 MiB) while nothing else of the call was alive, or the batch (16): 32, within
    # allocator noise; the 48 MiB cache of the first call is not in it.
    assert 30 * MiB <= nbytes <= 40 * MiB, nbytes / MiB
    assert 0 < seconds < 1
