"""benchmarks/gpu_proof.py: the plan on any machine, the whole run in its short CPU form, the time limit, and the
offline wheels. Everything runs the script as a process, as a person lent a GPU would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_proof.py"


def _run(args: list[str], script: Path = SCRIPT, env: dict | None = None, timeout: int = 300):
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=script.parents[1])


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "gpu_proof.jsonl").read_text().splitlines()]


def test_dry_run_prints_the_ordered_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    # Run as __main__ in a process that reports whether torch was imported: the plan must not need it.
    probe = (f"import runpy, sys\nsys.argv = [{str(SCRIPT)!r}, '--dry-run', '--out', {str(out)!r}]\n"
             f"try:\n    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\nexcept SystemExit as e:\n"
             "    print('EXIT', e.code)\nprint('TORCH', 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=REPO)
    text = done.stdout
    assert "EXIT 0" in text and "TORCH False" in text, done.stderr
    assert not out.exists()
    keys = [line.split()[0] for line in text.splitlines() if line[:4].strip() and line.split()[0][0].isdigit()]
    assert keys[:6] == ["1.1", "2.1", "2.2", "3.1", "3.2", "3.3"] and keys[-1] == "5.1"
    assert "pytest -m gpu -rs" in text and "render_readme.py" in text
    assert "--models AASIST --budgets 4GB --precisions auto" in text  # the baseline rides with the first cap
    for cap in ("2GB", "3GB", "4GB", "6GB"):
        assert f"--models AASIST-L --budgets {cap}" in text and f"--budgets {cap} --precisions fp16" in text
    for policy in ("none", "block0", "tiled"):
        assert f"--only 'bf16 lean ckpt={policy} adam'" in text
    assert "--micro 2 4" in text
    assert "would be skipped at this --minutes" in text and "estimated total" in text
    assert all("~" in line for line in text.splitlines() if line[:4].strip()[:1].isdigit())


def test_quick_dry_run_is_the_short_cpu_form():
    done = _run(["--dry-run", "--device", "cpu", "--quick"], timeout=60)
    assert done.returncode == 0, done.stderr
    assert "device cpu" in done.stdout and "--crop 4000" in done.stdout and "--steps 2" in done.stdout
    assert "fp16" not in done.stdout  # fp16 + GradScaler is a CUDA path


@pytest.mark.slow
def test_quick_cpu_run_goes_through_every_step_and_renders_the_readme(tmp_path):
    # A copy of the repository (the package linked in), so the README render writes the copy, not this checkout.
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    for script in (REPO / "benchmarks").glob("*.py"):
        shutil.copy(script, repo / "benchmarks")
    shutil.copytree(REPO / "tests", repo / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("README.md", "setup.cfg"):
        shutil.copy(REPO / name, repo)
    (repo / "lowmem_aasist").symlink_to(REPO / "lowmem_aasist", target_is_directory=True)
    out = repo / "benchmarks" / "results" / "quick-cpu"

    t0 = time.monotonic()
    done = _run(["--device", "cpu", "--quick", "--out", str(out)], script=repo / "benchmarks" / "gpu_proof.py")
    took = time.monotonic() - t0
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    events = _events(out)
    header, rows, end = events[0], events[1:-1], events[-1]
    assert header["event"] == "start" and header["device"]["kind"] == "cpu" and "--quick" in header["command"]
    assert [r["row"] for r in rows] == ["1.1", "2.1", "3.1", "4.1", "5.1"]
    assert {r["row"]: r["status"] for r in rows} == dict.fromkeys(["1.1", "2.1", "3.1", "4.1", "5.1"], "ok")
    assert end["event"] == "end" and end["counts"] == {"ok": 5}
    if not torch.cuda.is_available():
        assert rows[0]["skipped"] and all("needs a CUDA GPU" in line for line in rows[0]["skipped"])

    sweep = [json.loads(line) for line in (out / "budget_sweep.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["budget_bytes"]) for r in sweep] == [("baseline", None), ("capped", 1536 * 2**20),
                                                               ("capped", 2048 * 2**20)]
    assert "error" not in sweep[2] and sweep[2]["steps"] == 2
    # Appended by another sweep without its own baseline: compared with the baseline already in the file.
    assert sweep[2]["baseline_samples_per_s"] == sweep[0]["samples_per_s"]
    matrix = [json.loads(line) for line in (out / "memory_matrix.jsonl").read_text().splitlines()]
    assert [r["micro_batch"] for r in matrix] == [2, 4]
    assert all({"cuda_peak_allocated_bytes", "nvml_process_bytes", "predicted_peak_bytes"} <= r.keys() for r in matrix)

    report = (out / "gpu_proof.md").read_text()
    assert "| 5.1 |" in report and "planner error" in report and "NVML" in report
    readme = (repo / "README.md").read_text()
    assert "benchmarks/results/quick-cpu/budget_sweep.md" in readme
    print(f"quick CPU run: {took:.0f} s")


def test_time_limit_skips_the_rest_and_exits_0(tmp_path):
    out = tmp_path / "out"
    done = _run(["--device", "cpu", "--quick", "--minutes", "0.01", "--out", str(out)], timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [e for e in _events(out) if e["event"] == "row"]
    assert [r["row"] for r in rows] == ["1.1", "2.1", "3.1", "4.1", "5.1"]
    assert all(r["status"] == "skipped" for r in rows)
    assert all(r["note"].startswith("time limit") for r in rows[:-1]) and "nothing was measured" in rows[-1]["note"]
    assert not (out / "budget_sweep.jsonl").exists()
    assert "| 2.1 |" in (out / "gpu_proof.md").read_text()


def test_a_row_past_its_limit_is_stopped_with_its_children():
    proof = load_benchmark("gpu_proof")
    child = "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])"
    argv = [sys.executable, "-c", f"{child}; print(p.pid, flush=True); time.sleep(60)"]
    t0 = time.monotonic()
    code, tail, stopped = proof.run_command(argv, dict(os.environ), 2.0)
    assert stopped and code != 0 and time.monotonic() - t0 < 30
    grandchild = Path(f"/proc/{int(tail[0])}/status")
    for _ in range(50):  # gone, or a zombie waiting for init: either way no longer running
        if not grandchild.exists() or "\nState:\tZ" in grandchild.read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail("the row's child process survived the stop")


def _blocked_soundfile(tmp_path: Path) -> dict:
    """An environment in which ``import soundfile`` fails, with a private cache (the wheels' site goes there)."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "soundfile.py").write_text("raise ImportError('soundfile blocked by the test')\n")
    return {**os.environ, "PYTHONPATH": str(blocker), "XDG_CACHE_HOME": str(tmp_path / "cache")}


def test_wheels_folder_without_the_missing_package_says_so_in_one_line(tmp_path):
    (tmp_path / "wheels").mkdir()
    out = tmp_path / "out"
    done = _run(["--wheels", str(tmp_path / "wheels"), "--device", "cpu", "--quick", "--out", str(out)],
                env=_blocked_soundfile(tmp_path), timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --wheels"), done.stderr
    assert "soundfile" in lines[0] and "pip download" in lines[0] and "cffi" in lines[0]
    assert not out.exists()


def test_wheels_installs_what_fails_to_import_into_a_private_site(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = wheels / "soundfile-99.0-py3-none-any.whl"
    info = "soundfile-99.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("soundfile.py", "__version__ = '99.0'\n")
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: soundfile\nVersion: 99.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", f"soundfile.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    out = tmp_path / "out"
    env = _blocked_soundfile(tmp_path)
    done = _run(["--wheels", str(wheels), "--device", "cpu", "--quick", "--minutes", "0.01", "--out", str(out)],
                env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    header = _events(out)[0]
    assert header["packages"] == {"missing": {}, "installed": [wheel.name]}
    site = tmp_path / "cache" / "lowmem-aasist" / f"site-py{sys.version_info.major}{sys.version_info.minor}"
    assert (site / "soundfile.py").is_file() and str(site) in header["pythonpath"].split(os.pathsep)
