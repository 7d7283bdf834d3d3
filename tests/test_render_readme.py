"""The README's measured-results section is exactly what benchmarks/render_readme.py renders from the files, and
what it renders carries every committed result row, each figure recomputed here from the rows."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import BENCHMARKS, load_benchmark

MiB = 2**20
RESULTS = BENCHMARKS / "results"
# Issues 8 and 9: activation MiB per sample at the paper's crop, lean blocks and Adam, per (precision, policy).
TARGETS = {("bf16", "block0"): 85, ("fp32", "block0"): 170, ("bf16", "tiled"): 40}


def _load():
    return load_benchmark("render_readme")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table_lines(block: str) -> Counter:
    return Counter(tuple(_cells(line)) for line in block.splitlines() if line.startswith("| "))


def test_readme_results_are_in_sync_with_the_result_files():
    render = _load()
    assert render.main(["--check"]) == 0, "run: python benchmarks/render_readme.py"


def test_every_budget_sweep_row_reaches_the_rendered_block():
    render = _load()
    block = render.render()
    assert block.startswith(render.BEGIN) and block.endswith(render.END)
    lines = _table_lines(block)
    sweeps = sorted(RESULTS.glob("*/budget_sweep.jsonl"))
    assert sweeps, "no committed budget sweep"
    for sweep in sweeps:
        rows = _rows(sweep)
        assert rows[0]["device"] in block
        for r in rows:
            assert "error" not in r, f"{sweep}: a failed row is committed: {r['error']}"
            capped = r["budget_bytes"] is not None
            budget = f"{r['budget_bytes'] / MiB:,.0f} MiB" if capped else "none (baseline)"
            plan = f"{r['micro_batch']} x {r['grad_accum']}, {r['precision']}, {r['checkpoint']}"
            peak = r["measured_peak_bytes"]
            if capped:
                assert peak <= r["budget_bytes"], f"{sweep}: {r['model']} at {budget} peaked at {peak / MiB:,.0f} MiB"
            assert r["oom_count"] == 0, f"{sweep}: {r['model']} at {budget} ran out of memory"
            # Counted off, so that two identical rows need two identical lines.
            wanted = [line for line in lines if line[:3] == (r["model"], budget, plan) and line[4] == f"{peak / MiB:,.0f}"
                      and line[6:8] == ("yes" if capped else "-", "0") and line[8] == f"{r['samples_per_s']:.2f}"]
            assert wanted and lines[wanted[0]] > 0, f"{sweep}: row not rendered: {r['model']} {budget} {plan}"
            lines[wanted[0]] -= 1


def test_every_memory_matrix_row_and_target_reaches_the_rendered_block():
    render = _load()
    block = render.render()
    lines = _table_lines(block)
    matrices = sorted(RESULTS.glob("*/memory_matrix.jsonl"))
    assert matrices, "no committed memory matrix"
    for matrix in matrices:
        rows = _rows(matrix)
        crop = max(r["crop"] for r in rows)
        configs: dict[tuple, dict[int, dict]] = {}
        for r in rows:
            # The block shows AASIST at the longest crop, one slope per configuration between two micro-batches:
            # a row outside that would be committed and shown nowhere.
            assert (r.get("model", "AASIST"), r["crop"]) == ("AASIST", crop), f"{matrix}: row not rendered: {r}"
            key = (r["precision"], "lean" if r["lean_blocks"] else "stock", r["checkpoint"], r.get("optimizer", "adam"))
            assert r["micro_batch"] not in configs.setdefault(key, {}), f"{matrix}: {key} twice at one micro-batch"
            configs[key][r["micro_batch"]] = r
        met = set()
        for key, by_micro in configs.items():
            assert len(by_micro) == 2, f"{matrix}: {key} needs exactly two micro-batches to be rendered, has {sorted(by_micro)}"
            lo, hi = sorted(by_micro)
            slope = (by_micro[hi]["measured_peak_bytes"] - by_micro[lo]["measured_peak_bytes"]) / (hi - lo) / MiB
            (line,) = [line for line in lines if line[:4] == key]
            assert line[4] == f"{slope:,.1f}" and line[6] == f"{by_micro[hi]['samples_per_s']:.2f}", (key, line)
            precision, blocks, policy, optimizer = key
            bound = TARGETS.get((precision, policy)) if (blocks, optimizer) == ("lean", "adam") else None
            if bound is not None:
                assert slope <= bound, f"{matrix}: {key} takes {slope:.1f} MiB per sample, target {bound}"
                assert line[5] == f"≤ {bound} met", (key, line)
                met.add((precision, policy))
        assert met == set(TARGETS), f"{matrix}: targets without a measured row: {set(TARGETS) - met}"
    assert "NOT met" not in block


@pytest.mark.parametrize("verdict", ["met", "NOT met"])
def test_a_target_verdict_follows_the_measured_slope(tmp_path, monkeypatch, verdict):
    render = _load()
    folder = tmp_path / "results" / "cpu"
    folder.mkdir(parents=True)
    per_sample = 39 if verdict == "met" else 41  # bf16 tiled's target: 40 MiB per sample
    rows = [{"device": "X", "model": "AASIST", "crop": 64_600, "precision": "bf16", "lean_blocks": True,
             "checkpoint": "tiled", "optimizer": "adam", "micro_batch": mb, "samples_per_s": 1.0,
             "measured_peak_bytes": 100 * MiB + mb * per_sample * MiB} for mb in (2, 4)]
    (folder / "memory_matrix.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(render, "RESULTS", folder.parent)
    monkeypatch.setattr(render, "ROOT", tmp_path)
    assert f"| bf16 | lean | tiled | adam | {per_sample:.1f} | ≤ 40 {verdict} | 1.00 |" in render.render()
