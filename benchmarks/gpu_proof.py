"""The GPU evidence in one prepared command: run it first on any NVIDIA GPU lent to this project.

    python benchmarks/gpu_proof.py                       # ~8 minutes; results in benchmarks/results/<gpu name>
    python benchmarks/gpu_proof.py --dry-run             # any machine: the plan, with an estimated time per row
    python benchmarks/gpu_proof.py --wheels ~/wheels     # offline: soundfile, soxr, bitsandbytes from wheel files
    python benchmarks/gpu_proof.py --device cpu --quick --out /tmp/proof   # the short CPU form the tests run

Until a GPU was lent, every CUDA path (NVML peaks, the allocator cap, bf16 and fp16 + GradScaler on a card) was
tested with fakes only. This runs, most important first, each row in its own processes through the benchmark
scripts' command lines (never the package's internals, which may move):

1. the GPU-marked tests (``pytest -m gpu -rs``);
2. the budget sweep's core: AASIST, the unmodified fp32 recipe uncapped (baseline) and the planned run under 4 and
   2 GiB caps (``--precisions auto``: bf16 on compute capability >= 8.0);
3. memory-matrix rows on the card (bf16, lean blocks, checkpoint none / block0 / tiled, two micro-batches each):
   live-tensor peak, the allocator's allocated and reserved peaks and NVML's count, each against the planner;
4. the rest of the sweep: fp16 + GradScaler at 4 and 2 GiB, AASIST-L, the 3 and 6 GiB caps;
5. ``benchmarks/render_readme.py``, so the README shows what was measured.

Work stops cleanly at ``--minutes``: a row starts only when its estimate fits in the time left (estimates are the
constants in ``PACE``, rescaled by the rows already run), a row still running at the limit is stopped, and every
finished row is already on disk, because the scripts append each row to their JSONL as it completes. A row that
fails is recorded with the last lines of its output and the later rows still run. The source tree is put on
PYTHONPATH for every process, so the package need not be installed (``python -m lowmem_aasist``); the demo corpus
is generated on the spot; ``--wheels DIR`` installs the packages that fail to import from local wheel files into
a private folder (``pip install --no-index --no-deps --target``) for machines without network access.

Writes into ``--out`` (default ``benchmarks/results/<slug of the GPU name>``; files of an earlier run there move to
``previous/``): ``budget_sweep.*`` and ``memory_matrix.*`` (the scripts' own files), ``gpu_proof.jsonl`` (a header
with the device, versions and command, then one line per row as it ends) and ``gpu_proof.md`` (the same as a
report, with NVML against allocator peaks and the planner's error per row; rewritten after every row).
Exit 0 when no row failed (rows skipped or stopped for time are not failures), 1 when one did, 2 when it cannot
start (no CUDA device, packages missing after ``--wheels``).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
MiB = 2**20
REF_SAMPLES = 24 * 64_600  # the paper's batch x crop, the unit of PACE.step

# Packages a GPU machine may lack, by import name: the run cannot do without the first two (the demo corpus and the
# audio reader import them), the others cost one feature each.
NEEDED = {"soundfile": "the demo corpus and every fit", "soxr": "the audio reader (every fit)"}
WANTED = {"bitsandbytes": "8-bit Adam, only if the planner picks it", "pytest": "step 1, the GPU-marked tests"}
# The wheels each one needs, from their Requires-Dist (numpy and torch, and typing-extensions with torch, are taken
# as present on a machine with CUDA torch; the wheels of packages already importable are not installed anyway).
WHEELS_FOR = {"soundfile": "soundfile cffi pycparser typing-extensions", "soxr": "soxr",
              "bitsandbytes": "bitsandbytes packaging",
              "pytest": "pytest pluggy iniconfig packaging pygments"
                        + (" exceptiongroup tomli" if sys.version_info < (3, 11) else "")}
# pip download matches --platform exactly, so every manylinux level these wheels are published for is named
# (bitsandbytes: 2_24; soxr: 2_27/2_28; soundfile: 2_28; cffi: 2014 = 2_17).
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64")
# Files the scripts write into --out; an earlier run's copies move to previous/ so rows never mix across runs.
OWNED = ("budget_sweep.jsonl", "budget_sweep.md", "budget_sweep.png", "memory_matrix.jsonl", "memory_matrix.md",
         "memory_matrix.png", "gpu_proof.jsonl", "gpu_proof.md")
STOP_GRACE_S = 10  # after SIGINT a fit finishes its step and Python removes its temporary folders; then SIGKILL


@dataclass(frozen=True)
class Pace:
    """Rough seconds per piece of work, only to order-check the plan and decide whether a row still fits.

    cuda: guessed for an H100/H200-class card with 16 cores (no GPU has been measured yet); cpu: this project's
    2-core machine. Rows that finish rescale every later estimate by actual / estimated time."""

    process: float  # a Python process that imports torch and the package and opens the device
    fit: float  # one `fit` beyond its steps: process, demo corpus, index, a few dev utterances
    calibrate: float  # the planner's first plan of a (model, precision): fake-tensor estimates + 2 real steps
    step: float  # one optimizer step of the recipe's 24 x 64,600 in bf16 (fp32: x FP32_STEP)
    pytest: float  # the GPU-marked tests, collection included
    matrix: float  # one memory-matrix configuration beyond its steps: estimator, gradients against the stock model
    render: float  # benchmarks/render_readme.py


PACE = {"cuda": Pace(process=8, fit=20, calibrate=30, step=1.0, pytest=60, matrix=20, render=10),
        "cpu": Pace(process=4, fit=8, calibrate=15, step=25.0, pytest=15, matrix=15, render=6)}
FP32_STEP = 1.7  # the fp32 baseline's step against bf16 (measured 1.7x on the CPU; Tensor Cores may make it more)
PYTEST_LIMIT_S = {"cuda": 300, "cpu": 120}  # a hung test must not eat the whole budget


@dataclass(frozen=True)
class Recipe:
    """What the sweep and the matrix measure: the full GPU run or the short CPU form (--quick)."""

    models: tuple[str, ...]
    core_caps: tuple[str, ...]  # step 2 (first model) and the head of step 4 (the others)
    more_caps: tuple[str, ...]  # step 4
    fp16: bool  # step 4: the fp16 + GradScaler path at every cap (CUDA only)
    steps: int  # optimizer steps per fit (the last one's throughput counts)
    batch: int
    crop: int
    n_train: int
    matrix_model: str
    matrix_crop: int
    matrix_micro: tuple[int, ...]
    matrix_policies: tuple[str, ...]


FULL = Recipe(models=("AASIST", "AASIST-L"), core_caps=("4GB", "2GB"), more_caps=("3GB", "6GB"), fp16=True, steps=3,
              batch=24, crop=64_600, n_train=48, matrix_model="AASIST", matrix_crop=64_600, matrix_micro=(2, 4),
              matrix_policies=("none", "block0", "tiled"))
QUICK = Recipe(models=("AASIST-L",), core_caps=("1.5GB",), more_caps=("2GB",), fp16=False, steps=2,
               batch=4, crop=4_000, n_train=8, matrix_model="AASIST-L", matrix_crop=4_000, matrix_micro=(2, 4),
               matrix_policies=("none",))


@dataclass
class Row:
    """One unit of work: a command, its estimate, and what it wrote once it ran."""

    step: int
    key: str  # "2.1"
    title: str
    kind: str  # pytest | sweep | matrix | render
    argv: list[str]
    est_s: float
    limit_s: float | None = None
    result: dict = field(default_factory=dict)


# --- the plan ------------------------------------------------------------------------------------------------


def in_root(path: Path) -> str:
    """``path`` as the commands name it: they run in the repository root, so relative to it when inside."""
    path = path.absolute()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def sweep_row(step: int, key: str, model: str, caps: tuple[str, ...], precision: str, baseline: bool, recipe: Recipe,
              steps: int, device: str, out: Path, pace: Pace, calibrated: set) -> Row:
    argv = [sys.executable, "benchmarks/budget_sweep.py", "--models", model, "--budgets", *caps,
            "--precisions", precision, "--steps", str(steps), "--batch", str(recipe.batch), "--crop", str(recipe.crop),
            "--n-train", str(recipe.n_train), "--device", device, "--out", in_root(out), "--append"]
    if not baseline:
        argv.append("--no-baseline")
    scale = recipe.batch * recipe.crop / REF_SAMPLES
    est = pace.process + len(caps) * (pace.fit + steps * pace.step * scale)
    if baseline:
        est += pace.fit + steps * pace.step * scale * FP32_STEP
    if (model, precision) not in calibrated:  # the planner's estimates are cached per (model, technique) after this
        calibrated.add((model, precision))
        est += pace.calibrate
    what = f"{precision} precision" if precision != "auto" else "planned precision (auto: bf16 where native)"
    title = (f"budget sweep {model}: " + ("fp32 baseline uncapped + " if baseline else "")
             + f"{what} at {', '.join(caps)}")
    return Row(step, key, title, "sweep", argv, est)


def matrix_row(step: int, key: str, policy: str, recipe: Recipe, device: str, out: Path, pace: Pace) -> Row:
    label = f"bf16 lean ckpt={policy} adam"
    argv = [sys.executable, "benchmarks/memory_matrix.py", "--model", recipe.matrix_model,
            "--crop", str(recipe.matrix_crop), "--micro", *map(str, recipe.matrix_micro), "--only", label,
            "--device", device, "--out", in_root(out), "--append"]
    steps = sum(2 * m for m in recipe.matrix_micro)  # a warm-up and a measured step per micro-batch
    est = pace.process + pace.matrix + steps * pace.step * recipe.matrix_crop / REF_SAMPLES
    micro = " and ".join(map(str, recipe.matrix_micro))
    return Row(step, key, f"memory matrix {recipe.matrix_model} {label} at micro-batch {micro}", "matrix", argv, est)


def gpu_test_files() -> list[str]:
    """Test files holding GPU-marked tests: collecting only these keeps step 1 to seconds."""
    files = [p for p in sorted((ROOT / "tests").glob("test_*.py")) if "mark.gpu" in p.read_text(errors="replace")]
    return [str(p.relative_to(ROOT)) for p in files] or ["tests"]


def make_plan(recipe: Recipe, steps: int, device: str, out: Path) -> list[Row]:
    pace = PACE[device]
    calibrated: set = set()
    rows = [Row(1, "1.1", "GPU-marked tests (pytest -m gpu)", "pytest",
                [sys.executable, "-m", "pytest", "-m", "gpu", "-rs", "-q", "-p", "no:cacheprovider", *gpu_test_files()],
                pace.pytest, limit_s=PYTEST_LIMIT_S[device])]

    first, others = recipe.models[0], recipe.models[1:]
    core: list[tuple[str, tuple[str, ...], str, bool]] = [(first, recipe.core_caps[:1], "auto", True)]
    core += [(first, (cap,), "auto", False) for cap in recipe.core_caps[1:]]
    for i, (model, caps, precision, base) in enumerate(core, 1):
        rows.append(sweep_row(2, f"2.{i}", model, caps, precision, base, recipe, steps, device, out, pace, calibrated))

    for i, policy in enumerate(recipe.matrix_policies, 1):
        rows.append(matrix_row(3, f"3.{i}", policy, recipe, device, out, pace))

    # Step 4, in order of what a row proves: fp16 + GradScaler has never run on a card at all; AASIST-L is the
    # second model; then the caps between and above the core ones; the fp16 runs of the rest come last.
    fp16 = recipe.fp16 and device == "cuda"
    rest: list[tuple[str, tuple[str, ...], str, bool]] = []
    if fp16:
        rest += [(first, (cap,), "fp16", False) for cap in recipe.core_caps]
    for model in others:
        rest += [(model, recipe.core_caps[:1], "auto", True)]
        rest += [(model, (cap,), "auto", False) for cap in recipe.core_caps[1:]]
    rest += [(first, (cap,), "auto", False) for cap in recipe.more_caps]
    rest += [(model, (cap,), "auto", False) for model in others for cap in recipe.more_caps]
    if fp16:
        rest += [(first, (cap,), "fp16", False) for cap in recipe.more_caps]
        rest += [(model, (cap,), "fp16", False) for model in others for cap in (*recipe.core_caps, *recipe.more_caps)]
    for i, (model, caps, precision, base) in enumerate(rest, 1):
        rows.append(sweep_row(4, f"4.{i}", model, caps, precision, base, recipe, steps, device, out, pace, calibrated))

    rows.append(Row(5, "5.1", "re-render the README's measured results", "render",
                    [sys.executable, "benchmarks/render_readme.py"], pace.render, limit_s=120))
    return rows


# --- packages and offline wheels -----------------------------------------------------------------------------


def private_site() -> Path:
    """Where --wheels installs: outside the repository and per Python version (wheels are built for one)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lowmem-aasist" / f"site-py{sys.version_info.major}{sys.version_info.minor}"


def child_env(site: Path) -> dict[str, str]:
    """The environment of every process run here: the source tree (and the private site) importable."""
    env = dict(os.environ)
    parts = [str(ROOT)] + ([str(site)] if site.is_dir() else []) + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONUNBUFFERED"] = "1"  # child output reaches the log line by line, not when the child ends
    return env


def failed_imports(names: list[str], env: dict[str, str]) -> dict[str, str]:
    """Import each module in a fresh process; returns name -> the last line of its error."""
    procs = {n: subprocess.Popen([sys.executable, "-c", f"import {n}"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True) for n in names}
    failed = {}
    for name, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            failed[name] = "import took over 300 s"
            continue
        if proc.returncode != 0:
            lines = err.strip().splitlines()
            failed[name] = lines[-1] if lines else f"exit {proc.returncode}"
    return failed


def check_packages(site: Path) -> dict[str, str]:
    """Missing or broken packages, name -> why: the needed ones are imported (a module can be found yet fail to
    load, e.g. soundfile without cffi); the wanted ones only looked up (bitsandbytes imports torch: seconds)."""
    broken = failed_imports(list(NEEDED), child_env(site))
    found = findable(list(WANTED), site)
    return {**broken, **{n: "not installed" for n, ok in found.items() if not ok}}


def findable(names: list[str], site: Path) -> dict[str, bool]:
    """Whether each module can be found (not imported: --dry-run loads nothing)."""
    extra = [str(ROOT)] + ([str(site)] if site.is_dir() else [])
    sys.path[:0] = extra
    try:
        importlib.invalidate_caches()
        return {n: importlib.util.find_spec(n) is not None for n in names}
    finally:
        del sys.path[:len(extra)]


def wheel_modules(wheel: Path) -> list[str]:
    """Top-level import names a wheel installs (its public ones when it has any): packages with an __init__.py and
    top-level modules, not data folders such as soxr's licensing/."""
    names = set()
    with zipfile.ZipFile(wheel) as z:
        for entry in z.namelist():
            parts = entry.split("/")
            if len(parts) == 2 and parts[1] == "__init__.py":
                names.add(parts[0])
            elif len(parts) == 1 and entry.endswith((".py", ".so", ".pyd")):
                names.add(entry.split(".", 1)[0])
    public = sorted(n for n in names if not n.startswith("_"))
    return public or sorted(names)


def supported_tags() -> set[str] | None:
    try:
        from packaging.tags import sys_tags
    except ImportError:
        try:
            from pip._vendor.packaging.tags import sys_tags
        except ImportError:
            return None
    return {str(t) for t in sys_tags()}


def wheel_fits(wheel: Path, tags: set[str] | None) -> bool:
    parts = wheel.name[:-len(".whl")].split("-")
    if tags is None or len(parts) < 5:
        return True
    py, abi, plat = parts[-3:]
    return any(f"{a}-{b}-{c}" in tags for a in py.split(".") for b in abi.split(".") for c in plat.split("."))


def download_hint(names: list[str]) -> str:
    """The pip download command that gathers wheels for this very Python, to run on a machine with network."""
    dists = " ".join(dict.fromkeys(" ".join(WHEELS_FOR.get(n, n) for n in names).split()))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    platforms = " ".join(f"--platform {p}" for p in PLATFORMS)
    return (f"python -m pip download --only-binary=:all: --no-deps --python-version {version} {platforms} "
            f"-d WHEELS {dists}")


def install_wheels(folder: Path, broken: dict[str, str], site: Path, tags: set[str] | None) -> tuple[list[str], str]:
    """Install every wheel in ``folder`` that fits this Python and provides a module that is missing or broken
    (dependencies such as cffi included); returns the wheels installed and pip's error, if any."""
    found = findable([m for w in folder.glob("*.whl") for m in wheel_modules(w)], site)
    chosen: dict[str, Path] = {}
    for wheel in sorted(folder.glob("*.whl")):
        if wheel_fits(wheel, tags) and any(m in broken or not found[m] for m in wheel_modules(wheel)):
            chosen.setdefault(wheel.name.split("-", 1)[0].lower().replace("_", "-"), wheel)  # one per distribution
    if not chosen:
        return [], ""
    site.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--upgrade", "--disable-pip-version-check",
           "--target", str(site), *map(str, chosen.values())]
    done = subprocess.run(cmd, capture_output=True, text=True)
    error = "" if done.returncode == 0 else (done.stdout + done.stderr).strip().splitlines()[-1]
    return [w.name for w in chosen.values()], error


def prepare_packages(wheels: Path | None, site: Path) -> tuple[dict, str | None]:
    """Check the packages, install missing ones from ``wheels``; returns (report, a fatal line or None)."""
    broken = check_packages(site)
    report: dict = {"missing": dict(broken), "installed": []}
    if wheels is not None and not broken:
        print(f"packages: all importable; --wheels {wheels} not needed")
    if broken and wheels is not None:
        if not wheels.is_dir():
            return report, f"--wheels {wheels}: not a folder"
        installed, error = install_wheels(wheels, broken, site, supported_tags())
        report["installed"] = installed
        if error:
            print(f"pip could not install the wheels: {error}")
        if installed:
            print(f"installed from {wheels} into {site}: {', '.join(installed)}")
        broken = check_packages(site)
        report["missing"] = dict(broken)
        lost = [n for n in NEEDED if n in broken]
        if lost:
            return report, (f"--wheels {wheels}: still cannot import {', '.join(lost)} (no wheel for it there that fits "
                            f"Python {platform.python_version()} on {sys.platform}, or a wheel it needs is missing: "
                            f"{'; '.join(broken[n] for n in lost)}); gather them on a machine with network: "
                            f"{download_hint(list(broken))}")
    for name, error in broken.items():
        why = NEEDED.get(name) or WANTED[name]
        print(f"warning: cannot import {name} ({error}); needed for {why}; offline, give --wheels DIR "
              f"(gather with: {download_hint([name])})")
    return report, None


# --- the device ----------------------------------------------------------------------------------------------

PROBE = r"""
import json, platform, sys
import torch
cuda = sys.argv[1] != "cpu" and torch.cuda.is_available()
info = {"kind": "cuda" if cuda else "cpu", "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version()}
if cuda:
    p = torch.cuda.get_device_properties(0)
    info.update(name=p.name, total_bytes=p.total_memory, capability=f"{p.major}.{p.minor}",
                devices=torch.cuda.device_count(), cudnn=torch.backends.cudnn.version())
    try:
        import pynvml
        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        info["driver"] = driver.decode() if isinstance(driver, bytes) else driver
        pynvml.nvmlShutdown()
    except Exception as e:
        info["driver"] = f"unknown (NVML: {e})"
else:
    name = platform.processor() or platform.machine()
    try:
        name = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except Exception:
        pass
    info["name"] = name
print(json.dumps(info))
"""


def start_probe(device: str, env: dict[str, str]) -> subprocess.Popen:
    """The device's facts from a short process of its own (started early: it runs beside the package checks; this
    process never imports torch, so it holds no CUDA context while the rows measure)."""
    return subprocess.Popen([sys.executable, "-c", PROBE, device], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def probe_result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    if proc.returncode != 0:
        lines = (out + err).strip().splitlines()
        raise SystemExit(f"error: cannot query the device: {lines[-1] if lines else proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def device_slug(name: str) -> str:
    # Same rule as budget_sweep.device_slug (not imported: that script imports torch, and --dry-run must not).
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def nvidia_smi_name() -> str | None:
    """The GPU's name without torch (for --dry-run's folder), when nvidia-smi is there."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else None


# --- running ---------------------------------------------------------------------------------------------------


def jsonl_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a row's whole process group (a sweep's fits included): SIGINT first, which lets Python clean up its
    temporary folders and a fit finish its step, then SIGKILL."""
    for sig, grace in ((signal.SIGINT, STOP_GRACE_S), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_command(argv: list[str], env: dict[str, str], limit_s: float) -> tuple[int | None, list[str], bool]:
    """Run ``argv`` in the repository root, echoing its output indented, and stop it at ``limit_s``. Returns (exit
    code, the last lines, whether it was stopped). Its own session, so Ctrl-C reaches it only through here."""
    tail: deque[str] = deque(maxlen=40)
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            print(f"    {line.rstrip()}", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    stopped = False
    try:
        proc.wait(timeout=max(limit_s, 0.1))
    except subprocess.TimeoutExpired:
        stopped = True
        stop_group(proc)
    except KeyboardInterrupt:
        stop_group(proc)
        raise
    finally:
        reader.join(timeout=5)
    return proc.returncode, list(tail), stopped


def judge(row: Row, code: int | None, tail: list[str], new: list[dict]) -> tuple[str, str]:
    """(status, note) of a row that ran to its end."""
    last = next((t for t in reversed(tail) if t.strip()), "")
    if row.kind == "pytest":
        summary = next((t for t in reversed(tail) if re.search(r"\d+ (passed|failed|skipped|deselected|error)", t)), last)
        if code == 0:
            return "ok", summary.strip("= ")
        if code == 5:
            return "ok", "no GPU-marked test was collected"
        return "failed", summary.strip("= ") or f"exit {code}"
    if code != 0:
        return "failed", f"exit {code}: {last}"
    if row.kind in ("sweep", "matrix"):
        errors = [r["error"] for r in new if r.get("error")]
        if errors:
            return "failed", f"{len(errors)} of {len(new)} rows failed: {errors[0]}"
        if not new:
            return "failed", "no row was written"
        return "ok", f"{len(new)} row{'s' if len(new) != 1 else ''} written"
    return "ok", last


def run_row(row: Row, env: dict[str, str], out: Path, est: float, limit: float, t0: float) -> None:
    """Run one row to its end or its limit and fill ``row.result``."""
    start = time.monotonic()
    print(f"[{start - t0:6.0f} s] {row.key} {row.title}: start (est. {est:.0f} s, limit {limit:.0f} s)", flush=True)
    print(f"    $ {shlex.join(row.argv)}", flush=True)
    target = out / ("budget_sweep.jsonl" if row.kind == "sweep" else "memory_matrix.jsonl")
    before = len(jsonl_rows(target))
    row.result = {"status": "stopped", "note": "interrupted (Ctrl-C)"}  # what stays if Ctrl-C ends the wait
    code, tail, stopped = run_command(row.argv, env, limit)
    took = time.monotonic() - start
    new = jsonl_rows(target)[before:] if row.kind in ("sweep", "matrix") else []
    if stopped:
        status, note = "stopped", f"stopped at its {limit:.0f} s limit ({len(new)} rows kept)"
    else:
        status, note = judge(row, code, tail, new)
    row.result = {"status": status, "note": note, "seconds": round(took, 1), "exit_code": code, "rows": len(new)}
    if row.kind == "pytest":  # on a machine without CUDA the skips (and their reasons) are the result
        row.result["skipped"] = [t for t in tail if t.startswith("SKIPPED")]
    if status != "ok":
        row.result["tail"] = tail[-15:]
    print(f"[{time.monotonic() - t0:6.0f} s] {row.key} {status} in {took:.0f} s: {note}", flush=True)


def run_rows(rows: list[Row], env: dict[str, str], out: Path, t0: float, deadline: float, reserve_s: float,
             on_done: Callable[[Row], None]) -> None:
    """Run the rows in order while time allows; a row that does not fit is skipped, and a later, shorter one may
    still run. The README render runs last, in the time kept for it, whenever rows were measured. Ctrl-C stops
    the running row, marks the rest skipped, and is raised again."""
    estimated = spent = 0.0
    measured = 0
    pending = list(rows)
    row: Row | None = None
    try:
        while pending:
            row = pending.pop(0)
            render = row.kind == "render"
            left = (deadline if render else deadline - reserve_s) - time.monotonic()
            # Rows that ran rescale the estimates (pytest aside: its time says little about training steps).
            est = row.est_s * (min(max(spent / estimated, 0.5), 3.0) if estimated else 1.0)
            if render and not measured:
                row.result = {"status": "skipped", "note": "nothing was measured in this run"}
            elif render and out.resolve().parent != RESULTS.resolve():
                row.result = {"status": "skipped",
                              "note": f"--out {out} is not a folder of {RESULTS}, which is what the README renders"}
            elif not render and left < est:
                row.result = {"status": "skipped", "note": f"time limit: needs ~{est:.0f} s, {max(left, 0):.0f} s left"}
            else:
                # The render gets at least 30 s even past the limit: it only reads files and keeps the README true.
                run_row(row, env, out, est, min(max(left, 30.0 if render else 0.0), row.limit_s or float("inf")), t0)
                if row.kind in ("sweep", "matrix") and row.result["status"] != "stopped":
                    estimated, spent = estimated + row.est_s, spent + row.result["seconds"]
                measured += row.result.get("rows", 0)
            if row.result["status"] == "skipped":
                print(f"[{time.monotonic() - t0:6.0f} s] {row.key} {row.title}: skipped ({row.result['note']})",
                      flush=True)
            on_done(row)
    except KeyboardInterrupt:
        if row is not None:
            on_done(row)
        for rest in pending:
            rest.result = {"status": "skipped", "note": "interrupted (Ctrl-C)"}
            on_done(rest)
        raise


# --- the report ------------------------------------------------------------------------------------------------


def _mib(value: int | None) -> str:
    return f"{value / MiB:,.0f}" if value else "-"


def _error(predicted: int | None, measured: int | None) -> str:
    return f"{100 * (predicted - measured) / measured:+.1f}%" if predicted and measured else "-"


def report(header: dict, rows: list[Row], out: Path) -> str:
    dev = header["device"]
    what = f"{dev['name']} ({dev['kind']})"
    if dev["kind"] == "cuda":
        what += (f", {dev['total_bytes'] / 2**30:.1f} GiB, compute capability {dev['capability']}, driver "
                 f"{dev.get('driver')}, CUDA {dev['cuda']}, cuDNN {dev.get('cudnn')}")
    packages = header["packages"]
    lines = [
        f"# GPU proof: {dev['name']}",
        "",
        f"Command: `{header['command']}` (started {header['started']}, limit {header['minutes']:g} minutes).",
        f"Device: {what}; torch {dev['torch']}, Python {dev['python']}.",
        "Packages: " + (", ".join(f"{k} missing ({v})" for k, v in packages["missing"].items()) or "all importable")
        + (f"; installed from wheels: {', '.join(packages['installed'])}" if packages["installed"] else "") + ".",
        "",
        "| row | what | status | seconds (est.) | note |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        res = r.result or {"status": "pending", "note": ""}
        secs = f"{res['seconds']:.0f} ({r.est_s:.0f})" if "seconds" in res else f"- ({r.est_s:.0f})"
        note = str(res.get("note", "")).replace("|", "/")
        lines.append(f"| {r.key} | {r.title} | {res['status']} | {secs} | {note} |")
    lines += ["", "Commands, in order:", "", *(f"- {r.key}: `{shlex.join(r.argv)}`" for r in rows)]

    sweep = [r for r in jsonl_rows(out / "budget_sweep.jsonl") if "error" not in r]
    if sweep:
        lines += ["", "## Budget sweep: the planner's prediction against the measured peak", "",
                  "Measured = the highest peak `fit` logged: on CUDA the larger of NVML's count for the process and "
                  "the allocator's reserved peak plus the CUDA context (the two are not logged apart); on CPU the "
                  "resident memory. Planner error = (predicted - measured) / measured.", "",
                  "| model | budget MiB | precision | checkpoint | micro x accum | predicted MiB | measured MiB "
                  "| planner error | under budget | OOM | samples/s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in sweep:
            budget = r.get("budget_bytes")
            peak = r.get("measured_peak_bytes")
            under = "-" if not budget or not peak else ("yes" if peak <= budget else "NO")
            lines.append(f"| {r['model']} | {_mib(budget) if budget else 'none (baseline)'} | {r['precision']} | "
                         f"{r['checkpoint']} | {r['micro_batch']} x {r['grad_accum']} | "
                         f"{_mib(r.get('predicted_peak_bytes'))} | {_mib(peak)} | "
                         f"{_error(r.get('predicted_peak_bytes'), peak)} | {under} | {r.get('oom_count', 0)} | "
                         f"{r.get('samples_per_s') or 0:.2f} |")
    matrix = jsonl_rows(out / "memory_matrix.jsonl")
    if matrix:
        lines += ["", "## Memory matrix: live tensors, the allocator and NVML, against the planner", "",
                  "Live = the exact live-tensor peak of one steady-state step; allocated / reserved = "
                  "`torch.cuda.max_memory_allocated` / `max_memory_reserved` over that step; NVML = what the driver "
                  "charges the process just after it (context + allocator cache). Planner error compares the "
                  "planner's memory model with the live peak, as the planner models live tensors.", "",
                  "| precision | checkpoint | micro | crop | live MiB | predicted MiB | planner error | allocated MiB "
                  "| reserved MiB | NVML MiB | RSS MiB | samples/s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in matrix:
            lines.append(f"| {r['precision']} | {r['checkpoint']} | {r['micro_batch']} | {r['crop']:,} | "
                         f"{_mib(r['measured_peak_bytes'])} | {_mib(r['predicted_peak_bytes'])} | "
                         f"{_error(r['predicted_peak_bytes'], r['measured_peak_bytes'])} | "
                         f"{_mib(r.get('cuda_peak_allocated_bytes'))} | {_mib(r.get('cuda_peak_reserved_bytes'))} | "
                         f"{_mib(r.get('nvml_process_bytes'))} | {_mib(r.get('rss_peak_bytes'))} | "
                         f"{r['samples_per_s']:.2f} |")
    return "\n".join(lines) + "\n"


def move_previous(out: Path) -> list[str]:
    earlier = [name for name in OWNED if (out / name).exists()]
    if earlier:
        (out / "previous").mkdir(exist_ok=True)
        for name in earlier:
            os.replace(out / name, out / "previous" / name)
    return earlier


# --- main ------------------------------------------------------------------------------------------------------


def print_plan(rows: list[Row], minutes: float, reserve_s: float) -> None:
    budget = minutes * 60 - reserve_s
    used = 0.0
    step = 0
    for r in rows:
        if r.step != step:
            step = r.step
            print()
        fits = r.kind == "render" or used + r.est_s <= budget
        if fits and r.kind != "render":
            used += r.est_s
        mark = "" if fits else "   (would be skipped at this --minutes)"
        print(f"{r.key:>4}  ~{r.est_s:4.0f} s  {r.title}{mark}")
        print(f"        $ {shlex.join(r.argv)}")
    total = sum(r.est_s for r in rows)
    print(f"\nestimated total {total:,.0f} s ({total / 60:.1f} min) for every row; --minutes {minutes:g} keeps "
          f"{max(budget, 0):,.0f} s for measuring and {reserve_s:.0f} s for the README render, so about "
          f"{used:,.0f} s of rows run and the rest are skipped. Estimates are rough constants (PACE in this script).")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<slug of the GPU name>)")
    p.add_argument("--minutes", type=float, default=8.0, help="stop starting work after this (default 8)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="cpu only with --quick (default auto: the GPU)")
    p.add_argument("--steps", type=int, help="optimizer steps per fit (default 3, --quick 2; the last one's "
                   "throughput counts)")
    p.add_argument("--quick", action="store_true",
                   help="the short form (one model, tiny crop and batch, one cap per step): tests the pipeline on CPU")
    p.add_argument("--wheels", type=Path, help="folder of wheel files for packages that fail to import (offline)")
    p.add_argument("--dry-run", action="store_true", help="print the plan with estimates; run and write nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    deadline = t0 + args.minutes * 60
    command = shlex.join(["python", "benchmarks/gpu_proof.py", *(sys.argv[1:] if argv is None else argv)])
    recipe = QUICK if args.quick else FULL
    site = private_site()

    if args.dry_run:
        device = "cpu" if args.device == "cpu" else "cuda"
        name = nvidia_smi_name() if device == "cuda" else None
        out = args.out or (RESULTS / device_slug(name) if name else RESULTS / "<slug of the GPU name>")
        found = findable([*NEEDED, *WANTED], site)
        print(f"gpu_proof plan (dry run: nothing is run or written): device {device}, --minutes {args.minutes:g}, "
              f"results into {out}")
        print("packages: " + ", ".join(f"{n} {'found' if ok else 'MISSING'}" for n, ok in found.items())
              + ("" if all(found.values()) else
                 (f" (--wheels {args.wheels} would install what it holds for them)" if args.wheels else
                  f" (offline: --wheels DIR; gather with {download_hint([n for n, ok in found.items() if not ok])})")))
        print(f"processes run from {ROOT} with PYTHONPATH={child_env(site)['PYTHONPATH']}")
        rows = make_plan(recipe, args.steps or recipe.steps, device, out)
        print_plan(rows, args.minutes, PACE[device].render)
        return 0

    probe = start_probe(args.device, child_env(site))
    packages, fatal = prepare_packages(args.wheels, site)
    if fatal:
        probe.kill()
        probe.communicate()
        print(f"error: {fatal}", file=sys.stderr)
        return 2
    env = child_env(site)  # again: --wheels may just have created the private site
    dev = probe_result(probe)
    if dev["kind"] != "cuda" and not (args.quick and args.device == "cpu"):
        why = "--device cpu runs only with --quick" if args.device == "cpu" else (
            f"no CUDA device is visible (torch {dev['torch']}, CUDA {dev['cuda']})")
        print(f"error: {why}: gpu_proof measures a GPU; --dry-run prints the plan, --device cpu --quick runs the "
              "short CPU form", file=sys.stderr)
        return 2
    device = dev["kind"]
    out = args.out or (RESULTS / device_slug(dev["name"]) if not args.quick
                       else Path(tempfile.mkdtemp(prefix="gpu-proof-quick-")))
    out = out.absolute()  # the rows run in the repository root, wherever this was started from
    out.mkdir(parents=True, exist_ok=True)
    moved = move_previous(out)
    if moved:
        print(f"an earlier run's files moved to {out / 'previous'}: {', '.join(moved)}")
    rows = make_plan(recipe, args.steps or recipe.steps, device, out)
    header = {"event": "start", "command": command, "started": datetime.datetime.now().isoformat(timespec="seconds"),
              "minutes": args.minutes, "quick": args.quick, "device": dev, "packages": packages, "out": str(out),
              "pythonpath": env["PYTHONPATH"], "plan": [f"{r.key} {r.title}" for r in rows]}
    print(f"gpu_proof on {dev['name']} ({device}), torch {dev['torch']}, CUDA {dev['cuda']}; {len(rows)} rows, "
          f"--minutes {args.minutes:g}; results into {out}", flush=True)
    log = out / "gpu_proof.jsonl"
    log.write_text(json.dumps(header) + "\n")

    def on_done(row: Row) -> None:
        # Each row on disk as soon as it ends, and the report with it, so a killed run still says what it did.
        with open(log, "a") as f:
            f.write(json.dumps({"event": "row", "row": row.key, "step": row.step, "title": row.title,
                                "command": shlex.join(row.argv), "est_s": round(row.est_s, 1), **row.result}) + "\n")
        (out / "gpu_proof.md").write_text(report(header, rows, out))

    interrupted = False
    try:
        run_rows(rows, env, out, t0, deadline, PACE[device].render, on_done)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: the rows finished so far are kept")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.result["status"]] = counts.get(r.result["status"], 0) + 1
    took = time.monotonic() - t0
    with open(log, "a") as f:
        f.write(json.dumps({"event": "end", "seconds": round(took, 1), "counts": counts}) + "\n")
    print(f"\ndone in {took:.0f} s: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    print(f"report: {out / 'gpu_proof.md'}; rows: {out / 'budget_sweep.jsonl'}, {out / 'memory_matrix.jsonl'}")
    return 130 if interrupted else 1 if counts.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
