"""CPU calibration: real training steps, each in a fresh process, measured as ``fit`` would run them.

On the CPU the budget is the process's resident memory, and what a step holds beyond its live tensors (oneDNN's
reorder buffers and scratchpads, the heap) depends on the checkpoint policy and the micro-batch, not on the
precision alone: the policy decides which convolutions run at full width. So every technique the planner weighs is
measured, at micro-batch 2 and 4 of the run's own crop (a shorter crop does not scale: measured, tiled's scratch per
sample is flat in the crop and none's is not proportional to it).

Each measurement runs in a fresh process, because a process that has already run a step keeps some 80 MB more
resident and peaks 30-50 MB higher in the next one than a process that runs only that step, as ``fit`` does (and a
process that has run OpenMP work cannot fork one that runs it again). The step is tracked with
:class:`.measure.LiveTensorTracker`, so the same run gives the exact live-tensor peak and the resident peak. The
worker processes are pipelined: the next one imports torch and builds its model while the current one measures,
and measures only when told to, so no two measured steps overlap.

    python -m lowmem_aasist.memory.calibrate MODEL POLICY PRECISION CROP MICRO_BATCH CHANNELS_LAST
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Job:
    model: str
    policy: str
    precision: str
    crop: int
    micro_batch: int
    channels_last: bool = False


@dataclass(frozen=True)
class Point:
    """One measured step (bytes)."""

    job: Job
    rss_start: int
    """Resident memory when the step began: the process with torch, the model and its batch."""
    rss_peak: int
    live_peak: int
    """Live-tensor peak of the step, the first optimizer step's state added (it is created after the peak)."""
    seconds: float


class CalibrationError(RuntimeError):
    """A calibration step failed in its worker process; the message carries the worker's last line."""


def worker(job: Job, go: Callable[[], object]) -> dict:
    """Build the step, wait for ``go``, measure it. Runs in the worker process."""
    import torch

    from ..models import build_model
    from .enforce import release_freed_memory_promptly
    from .engine import prepare_model
    from .measure import build_step, reset_rss_peak, rss_now, rss_peak, tracked_step
    from .optim import optimizer_state_bytes

    release_freed_memory_promptly()  # the allocator settings fit runs with
    torch.manual_seed(0)
    model = build_model(job.model)
    prepare_model(model, job.policy, job.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    step = build_step(model, optimizer, job.micro_batch, job.crop, job.micro_batch, job.precision, "cpu")
    go()
    gc.collect()
    start = rss_now()
    if not reset_rss_peak():
        raise CalibrationError("cannot reset the resident-memory peak (Linux /proc/self/clear_refs)")
    t0 = time.perf_counter()
    live, _ = tracked_step(step, model, optimizer, "cpu")
    peak = rss_peak() or 0
    # The first step creates Adam's state after backward, where the peak is; a steady-state step holds it through.
    grown = optimizer_state_bytes(optimizer)
    return {"rss_start": start, "rss_peak": peak + grown, "live_peak": live + grown,
            "seconds": time.perf_counter() - t0}


def _spawn(job: Job) -> subprocess.Popen:
    package_root = str(Path(__file__).resolve().parents[2])  # the source tree works without an install
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    args = [job.model, job.policy, job.precision, str(job.crop), str(job.micro_batch), str(int(job.channels_last))]
    return subprocess.Popen([sys.executable, "-m", "lowmem_aasist.memory.calibrate", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _finish(proc: subprocess.Popen, job: Job) -> Point:
    out, err = proc.communicate("go\n")
    lines = out.strip().splitlines()
    if proc.returncode != 0 or not lines:
        last = (err.strip().splitlines() or ["no output"])[-1]
        raise CalibrationError(f"calibration step {job} failed: {last[:200]}")
    return Point(job=job, **json.loads(lines[-1]))


def measure(jobs: list[Job]) -> Iterator[Point]:
    """Measure each job in its own fresh process, in order; the next process starts while one measures."""
    procs: dict[int, subprocess.Popen] = {}
    try:
        for i, job in enumerate(jobs):
            if i not in procs:
                procs[i] = _spawn(job)
            if i + 1 < len(jobs):
                procs[i + 1] = _spawn(jobs[i + 1])  # imports and builds while job i waits for, then runs, its step
            yield _finish(procs.pop(i), job)
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def main(argv: list[str]) -> None:
    model, policy, precision, crop, micro_batch, channels_last = argv
    job = Job(model, policy, precision, int(crop), int(micro_batch), channels_last == "1")
    result = worker(job, go=sys.stdin.readline)
    print(json.dumps(result), flush=True)
    # Torch's teardown takes a second; the measurement is out, and the next worker must not wait for it.
    os._exit(0)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
