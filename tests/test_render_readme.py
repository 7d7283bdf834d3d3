"""The README's measured-results section is exactly what benchmarks/render_readme.py renders from the files."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "render_readme.py"


def _load():
    spec = importlib.util.spec_from_file_location("render_readme", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


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
