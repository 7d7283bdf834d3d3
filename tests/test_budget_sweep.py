"""benchmarks/budget_sweep.py in short: every line of it runs on CPU (a tiny recipe, the baseline, a cap that does not
bind and one that does)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import load_benchmark

from lowmem_aasist.memory.engine import cpu_cost
from lowmem_aasist.memory.plan import CPU_MARGIN, Technique, predict_peak

MiB = 2**20
CROP, BATCH = 4000, 4


def _load():
    return load_benchmark("budget_sweep")


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "budget_sweep.jsonl").read_text().splitlines()]


def _binding_budget(free_row: dict) -> int:
    """A budget whose usable part lies midway between what the planner predicts for micro-batch 2 and 4.

    Computed from the calibration the first fit left in the cache (its observed peak included, as the next fit will
    read it), so the window is this machine's, whatever its kernels: a fixed figure that binds here could be slack,
    or fit nothing, on another CPU. The gap is one micro-batch's worth of memory each side (~15 MiB here)."""
    cache = Path(os.environ["XDG_CACHE_HOME"]) / "lowmem-aasist" / "costs.json"
    t = Technique(free_row["precision"], free_row["checkpoint"])
    suffix = f"|AASIST-L|{t.precision}|{t.checkpoint}|cl=False|{CROP}"
    (measured,) = [v for k, v in json.loads(cache.read_text()).items() if k.startswith("cpu|") and k.endswith(suffix)]
    # What fit holds beyond a fresh calibration worker, recovered from the first fit's own prediction, which it made
    # before its observed peak was recorded.
    workers = {"points": [p for p in measured["points"] if not p.get("observed")]}
    cost, over = cpu_cost(workers, t, "AASIST-L", CROP, 0)
    extra = free_row["predicted_peak_bytes"] - predict_peak(cost, over, t, BATCH, CROP)
    cost, over = cpu_cost(measured, t, "AASIST-L", CROP, max(extra, 0))
    p2, p4 = (predict_peak(cost, over, t, mb, CROP) for mb in (2, BATCH))
    assert p4 - p2 > 8 * MiB, f"micro-batch 2 and 4 are predicted {(p4 - p2) / MiB:.1f} MiB apart: no room for a cap"
    return int((p2 + p4) / 2 / (1 - CPU_MARGIN))


def test_short_sweep_plans_caps_trains_and_reports(tmp_path):
    sweep = _load()
    out = tmp_path / "results"
    common = ["--models", "AASIST-L", "--steps", "2", "--batch", str(BATCH), "--crop", str(CROP), "--n-train", "8",
              "--device", "cpu", "--out", str(out)]
    assert sweep.main(["--budgets", "1.5GB", *common]) == 0
    base, free = _rows(out)
    assert [base["kind"], free["kind"]] == ["baseline", "capped"]
    assert base["budget_bytes"] is None and base["precision"] == "fp32" and base["micro_batch"] == BATCH
    # 1.5 GiB is three times what this recipe needs: the plan keeps the whole batch in one pass.
    assert free["budget_bytes"] == 1536 * MiB and (free["micro_batch"], free["grad_accum"]) == (BATCH, 1)
    assert free["checkpoint"] == "none" and free["oom_count"] == 0

    budget = _binding_budget(free)
    assert sweep.main(["--budgets", f"{budget}B", "--no-baseline", "--append", *common]) == 0
    rows = _rows(out)
    assert [r["kind"] for r in rows] == ["baseline", "capped", "capped"]
    capped = rows[2]
    assert capped["budget_bytes"] == budget and "error" not in capped, capped.get("error")
    # The cap binds: the same technique, half the micro-batch, the effective batch kept by accumulation.
    assert (capped["micro_batch"], capped["grad_accum"]) == (2, 2)
    assert (capped["precision"], capped["checkpoint"]) == (free["precision"], free["checkpoint"])
    assert capped["predicted_peak_bytes"] <= budget * (1 - CPU_MARGIN) < free["predicted_peak_bytes"]
    assert 0 < capped["measured_peak_bytes"] <= budget and capped["oom_count"] == 0 and capped["steps"] == 2
    assert capped["samples_per_s"] > 0 and capped["baseline_samples_per_s"] == base["samples_per_s"]
    assert {"device", "torch", "command", "sweep_command"} <= capped.keys()

    text = (out / "budget_sweep.md").read_text()
    assert "| AASIST-L | 1,536 MiB | 4 x 1," in text and f"| {budget / MiB:,.0f} MiB | 2 x 2," in text
    assert "none (baseline)" in text and "not its speed" in text and "Commands:" in text
    assert (out / "budget_sweep.png").stat().st_size > 0
