"""benchmarks/budget_sweep.py in short: every line of it runs on CPU (a tiny recipe, one cap, the baseline)."""

from __future__ import annotations

import json

from conftest import load_benchmark


def _load():
    return load_benchmark("budget_sweep")


def test_short_sweep_plans_caps_trains_and_reports(tmp_path):
    sweep = _load()
    out = tmp_path / "results"
    argv = ["--budgets", "1.5GB", "--models", "AASIST-L", "--steps", "2", "--batch", "4", "--crop", "4000",
            "--n-train", "8", "--device", "cpu", "--out", str(out)]
    assert sweep.main(argv) == 0
    rows = [json.loads(line) for line in (out / "budget_sweep.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["baseline", "capped"]
    base, capped = rows
    assert base["budget_bytes"] is None and base["precision"] == "fp32" and base["micro_batch"] == 4
    assert capped["budget_bytes"] == 1536 * 2**20 and capped["micro_batch"] * capped["grad_accum"] == 4
    assert 0 < capped["measured_peak_bytes"] <= capped["budget_bytes"] and capped["oom_count"] == 0
    assert capped["predicted_peak_bytes"] > 0 and capped["samples_per_s"] > 0 and capped["steps"] == 2
    assert capped["baseline_samples_per_s"] == base["samples_per_s"]
    assert {"device", "torch", "command", "sweep_command"} <= capped.keys()
    text = (out / "budget_sweep.md").read_text()
    assert "| AASIST-L | 1,536 MiB |" in text and "none (baseline)" in text and "not its speed" in text
    assert (out / "budget_sweep.png").stat().st_size > 0
