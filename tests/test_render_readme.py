"""The README's measured-results section is exactly what benchmarks/render_readme.py renders from the files."""

from __future__ import annotations

from conftest import load_benchmark


def _load():
    return load_benchmark("render_readme")


def test_readme_results_are_in_sync_with_the_result_files():
    render = _load()
    assert render.main(["--check"]) == 0, "run: python benchmarks/render_readme.py"


def test_every_result_row_reaches_the_rendered_block():
    render = _load()
    block = render.render()
    for sweep in render.RESULTS.glob("*/budget_sweep.jsonl"):
        rows = render._rows(sweep)
        assert rows[0]["device"] in block
        assert block.count(f"| {rows[0]['model']} |") >= 1
    assert block.startswith(render.BEGIN) and block.endswith(render.END)
