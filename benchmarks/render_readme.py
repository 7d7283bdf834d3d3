"""Render the README's measured-results section from the result files, so no figure in it is typed by hand.

    python benchmarks/render_readme.py          # rewrite the block between the markers in README.md
    python benchmarks/render_readme.py --check  # exit 1 if README.md is out of date (the test suite runs this)

Reads ``benchmarks/results/*/budget_sweep.jsonl`` (one table per device, naming it, its driver and the versions)
and ``benchmarks/results/*/memory_matrix.jsonl`` (activation memory per sample at the paper's crop, per policy), and
draws ``benchmarks/results/summary.png`` (peak against cap for every device).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- results:begin (benchmarks/render_readme.py) -->", "<!-- results:end -->"
MiB = 2**20

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sweep's own table, whoever imports this script
import budget_sweep  # noqa: E402


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _sweep_table(folder: Path, rows: list[dict]) -> list[str]:
    first = rows[0]
    what = f"{first['device']}" + (f", driver {first['driver']}, CUDA {first['cuda']}" if first.get("cuda") else " (CPU)")
    return [f"**{what}**, torch {first['torch']} (`{folder.relative_to(ROOT)}/budget_sweep.md`; "
            f"`{first.get('sweep_command', '')}`). A cap emulates a smaller card's memory, not its speed:", "",
            *budget_sweep.table(rows)]


# Activation memory per sample at the paper's crop that issues 8 and 9 set as targets, per (precision, policy) of
# the lean blocks; the unmodified fp32 recipe's figure is a reference point, not a target.
TARGETS = {("bf16", "block0"): 85, ("fp32", "block0"): 170, ("bf16", "tiled"): 40}


def _per_sample(folder: Path, rows: list[dict]) -> list[str]:
    """Activation memory per sample (the slope between micro-batches) per configuration at the longest crop, with
    its target where there is one, and the throughput of the largest micro-batch measured."""
    crop = max(r["crop"] for r in rows)
    by_config: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        if r["crop"] == crop and r.get("model", "AASIST") == "AASIST":
            key = (r["precision"], "lean" if r.get("lean_blocks") else "stock", r["checkpoint"], r.get("optimizer", "adam"))
            by_config.setdefault(key, {})[r["micro_batch"]] = r
    lines = [f"Activation memory per sample, AASIST at crop {crop:,} (`{folder.relative_to(ROOT)}/memory_matrix.md`, "
             f"{rows[0]['device']}; step times on a shared CPU, compare within this table only):", "",
             "| precision | blocks | checkpoint | optimizer | MiB per sample | target | samples/s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for (precision, blocks, ckpt, opt), by_micro in sorted(by_config.items()):
        if len(by_micro) >= 2:
            lo, hi = sorted(by_micro)[:2]
            slope = (by_micro[hi]["measured_peak_bytes"] - by_micro[lo]["measured_peak_bytes"]) / (hi - lo) / MiB
            if blocks == "stock" and ckpt == "none" and precision == "fp32":
                target = "(the unmodified recipe)"
            elif blocks == "lean" and opt == "adam" and (precision, ckpt) in TARGETS:
                bound = TARGETS[precision, ckpt]
                target = f"≤ {bound} " + ("met" if slope <= bound else "NOT met")
            else:
                target = ""
            speed = by_micro[max(by_micro)]["samples_per_s"]
            lines.append(f"| {precision} | {blocks} | {ckpt} | {opt} | {slope:,.1f} | {target} | {speed:.2f} |")
    return lines


def render() -> str:
    parts: list[str] = []
    for folder in sorted(p for p in RESULTS.iterdir() if p.is_dir()):
        sweep, matrix = folder / "budget_sweep.jsonl", folder / "memory_matrix.jsonl"
        if sweep.is_file():
            parts += [*_sweep_table(folder, _rows(sweep)), ""]
        if matrix.is_file():
            parts += [*_per_sample(folder, _rows(matrix)), ""]
    gpu = any((f / "budget_sweep.jsonl").is_file() for f in RESULTS.iterdir() if f.is_dir() and f.name != "cpu")
    if not gpu:
        parts += ["No GPU results yet: no NVIDIA GPU has been available to this project. `python benchmarks/gpu_proof.py` "
                  "on any card produces them first (see [docs/benchmarks.md](docs/benchmarks.md)).", ""]
    return "\n".join([BEGIN, "", *parts, END])


def chart(path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    top = 0.0
    for folder in sorted(p for p in RESULTS.iterdir() if p.is_dir()):
        sweep = folder / "budget_sweep.jsonl"
        if not sweep.is_file():
            continue
        for model in sorted({r["model"] for r in _rows(sweep)}):
            mine = [r for r in _rows(sweep) if r["model"] == model and r["budget_bytes"] and r.get("measured_peak_bytes")]
            if mine:
                ax.plot([r["budget_bytes"] / MiB for r in mine], [r["measured_peak_bytes"] / MiB for r in mine], "o-",
                        label=f"{folder.name}: {model}")
                top = max(top, *(r["budget_bytes"] / MiB for r in mine))
    if not top:
        plt.close(fig)
        return False
    ax.plot([0, top], [0, top], "k:", lw=1, label="cap")
    ax.set(xlabel="budget (MiB)", ylabel="measured peak (MiB)", title="peak memory under each cap")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def replace_block(text: str, block: str) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{README}: markers {BEGIN!r} ... {END!r} not found")
    head, rest = text.split(BEGIN, 1)
    return head + block + rest.split(END, 1)[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 when README.md differs from the result files")
    args = p.parse_args(argv)
    text = README.read_text()
    new = replace_block(text, render())
    if args.check:
        if new != text:
            print("README.md results section is out of date: run python benchmarks/render_readme.py")
            return 1
        return 0
    README.write_text(new)
    chart(RESULTS / "summary.png")
    print(f"rendered {README} and {RESULTS / 'summary.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
