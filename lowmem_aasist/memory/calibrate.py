"""CPU calibration: real training steps, each in a fresh process, measured as ``fit`` would run them.

On the CPU the budget is the process's resident memory, and what a step holds beyond its live tensors (oneDNN's
reorder buffers and scratchpads, the heap) depends on the checkpoint policy and the micro-batch, not on the
precision alone: the policy decides which convolutions run at full width. So every technique the planner weighs is
measured, at two micro-batches of the run's own crop (a shorter crop does not scale: measured, tiled's scratch per
sample is flat in the crop and none's is not proportional to it).

Each measurement runs in a fresh process, because a process that has already run a step keeps some 80 MB more
resident and peaks 30-50 MB higher in the next one than a process that runs only that step, as ``fit`` does. The
fresh processes are forked from one server process that has imported torch (and torch._dynamo, which the first
optimizer imports: 1.4 s) but never run a tensor op: a process that has run OpenMP work cannot fork one that runs
it again, and a fork skips the 3 s of imports each fresh interpreter would pay. :func:`prestart` starts that server
before the planning process imports torch itself, so the two imports overlap. A forked child starts with some 50 MiB
fewer resident pages than a fresh interpreter: Linux maps a parent's file pages into a child only as the child
touches them. The pages of the server's it has not mapped are added to each reading, page by page (so a page the
step touches counts once); measured, the readings then agree with a fresh interpreter's within 2-5 MiB (AASIST
none and AASIST-L tiled, micro-batch 2 and 6), where a whole-process correction overcounted by 16-23 MiB.

The step is tracked with :class:`.measure.LiveTensorTracker`, so the same run gives the exact live-tensor peak and
the resident peak.

    python -m lowmem_aasist.memory.calibrate --serve    (one JSON job per line in, one JSON result per line out)
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np


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


def file_pages() -> dict[tuple[int, int], np.ndarray]:
    """Which pages of each file-backed mapping this process has mapped: (start, end) -> one bool per page, from
    /proc/self/maps and the present bits of /proc/self/pagemap (readable without privileges)."""
    page = os.sysconf("SC_PAGE_SIZE")
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((lo, hi))
    present = {}
    with open("/proc/self/pagemap", "rb") as f:
        for lo, hi in ranges:
            f.seek(lo // page * 8)
            entries = np.frombuffer(f.read((hi - lo) // page * 8), dtype=np.uint64)
            present[(lo, hi)] = (entries >> np.uint64(63)).astype(bool)
    return present


def _not_yet_mapped(parent: dict) -> int:
    """Bytes of the parent's mapped file pages that this forked child has not mapped (yet): a fresh interpreter
    that imported the same would hold them, whether or not the step touches them."""
    child = file_pages()
    lacking = sum(int((had & ~child[k]).sum()) if k in child else int(had.sum()) for k, had in parent.items())
    return lacking * os.sysconf("SC_PAGE_SIZE")


def worker(job: Job, parent_pages: dict) -> dict:
    """Build the step and measure it. Runs in a freshly forked child of the server, which maps the server's file
    pages (``parent_pages``) only as it touches them: what it lacks of them is added to each reading, page by page,
    so that a page the step touches is not counted twice."""
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
    gc.collect()
    start = rss_now()
    lacking_before = _not_yet_mapped(parent_pages)
    if not reset_rss_peak():
        raise CalibrationError("cannot reset the resident-memory peak (Linux /proc/self/clear_refs)")
    t0 = time.perf_counter()
    live, _ = tracked_step(step, model, optimizer, "cpu")
    peak = rss_peak() or 0
    # The first step creates Adam's state after backward, where the peak is; a steady-state step holds it through.
    grown = optimizer_state_bytes(optimizer)
    lacking_after = _not_yet_mapped(parent_pages)
    return {"rss_start": start + lacking_before, "rss_peak": peak + grown + lacking_after, "live_peak": live + grown,
            "seconds": time.perf_counter() - t0}


def _serve() -> None:
    """The server: import what a worker needs, then fork one child per job read from stdin and relay its result."""
    import torch

    from . import engine, optim  # noqa: F401  (imported once here, not in every child)

    # Adam's first use imports torch._dynamo; a one-element parameter runs no OpenMP work.
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    for line in sys.stdin:
        job = Job(**json.loads(line))
        read_end, write_end = os.pipe()
        parent_pages = file_pages()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            try:
                result = worker(job, parent_pages)
            except BaseException as e:  # the child must report, never return into the server's loop
                result = {"error": f"{type(e).__name__}: {e}"}
            os.write(write_end, json.dumps(result).encode())
            # Torch's teardown takes a second and the result is out.
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as f:
            out = f.read()
        _, status = os.waitpid(pid, 0)
        if not out:
            out = json.dumps({"error": f"the step's process ended with status {status} and no result"}).encode()
        print(out.decode(), flush=True)


class _Server:
    def __init__(self) -> None:
        package_root = str(Path(__file__).resolve().parents[2])  # the source tree works without an install
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        self.stderr = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "lowmem_aasist.memory.calibrate", "--serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                     env=env)

    def run(self, job: Job) -> Point:
        try:
            self.proc.stdin.write(json.dumps(dataclasses.asdict(job)) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except OSError:
            line = ""
        result = json.loads(line) if line.strip() else {"error": self._last_words()}
        if "error" in result:
            raise CalibrationError(f"calibration step {job} failed: {result['error'][:200]}")
        return Point(job=job, **result)

    def _last_words(self) -> str:
        self.stderr.seek(0)
        return ([s for s in self.stderr.read().splitlines() if s.strip()] or ["the calibration process ended"])[-1]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.stderr.close()


_server: _Server | None = None


def prestart() -> None:
    """Start the server now (its imports overlap the caller's), if it is not running."""
    global _server
    if _server is None or _server.proc.poll() is not None:
        _server = _Server()


def shutdown() -> None:
    """Stop the server (it holds some 300 MB), e.g. once a plan is made."""
    global _server
    if _server is not None:
        _server.close()
        _server = None


atexit.register(shutdown)


def measure(jobs: list[Job]) -> Iterator[Point]:
    """Measure each job in its own fresh process, in order."""
    prestart()
    for job in jobs:
        yield _server.run(job)


def likely_needed(device: str, model: str, cache: Path) -> bool:
    """Whether a plan for ``--device device`` will probably calibrate on the CPU: no GPU driver is loaded (for
    ``auto``) and the cache holds no step of ``model`` (of any model, for ""). Decided without importing torch, so
    that the caller can :func:`prestart` first."""
    if device != "cpu" and (device != "auto" or Path("/proc/driver/nvidia").exists()):
        return False
    try:
        keys = json.loads(cache.read_text())
    except (OSError, ValueError):
        return True
    return not any(k.startswith("cpu|") and (not model or f"|{model}|" in k) for k in keys)


def cache_path() -> Path:
    """Where planning costs are cached: one JSON file under the user's cache folder."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lowmem-aasist" / "costs.json"


if __name__ == "__main__":  # pragma: no cover
    if sys.argv[1:] != ["--serve"]:
        sys.exit("usage: python -m lowmem_aasist.memory.calibrate --serve")
    _serve()
