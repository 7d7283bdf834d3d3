"""Plan, cap and train the paper's recipe under a sweep of memory budgets; measure what each run really used.

    python benchmarks/budget_sweep.py                      # CUDA: 2..15 GiB caps below the card; CPU: 1.5, 2, 3 GiB
    python benchmarks/budget_sweep.py --budgets 2GB 3GB --models AASIST-L --steps 2

Every row is one ``lowmem-aasist fit --demo --budget B`` in a fresh process (so its peak is its own): the memory
engine plans the recipe (effective batch 24, crop 64,600) for the budget, the trainer enforces the cap, and a few
steps run on the demo corpus. Beside them, in the same sweep, the **baseline**: the unmodified recipe (fp32, no
checkpointing, Adam, micro-batch = batch, no budget). Peaks are what ``fit`` logs: the process's GPU memory as NVML
counts it on CUDA, whole-process resident memory on CPU. A cap emulates a smaller card's memory, not its speed.

One JSON object per row into ``benchmarks/results/<device>/budget_sweep.jsonl``, written as each row finishes (a
sweep stopped midway keeps its finished rows), plus a markdown table and a PNG chart beside it. ``--append`` adds to
the file instead of starting it afresh (``benchmarks/gpu_proof.py`` runs one sweep per row, most important first).
Prints what it measured, on which device, with the command. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from lowmem_aasist.memory.budget import parse_budget
from lowmem_aasist.memory.device import device_facts, resolve_device

MiB = 2**20
GPU_CAPS = ("2GB", "3GB", "4GB", "6GB", "8GB", "12GB", "15GB")
CPU_CAPS = ("1.5GB", "2GB", "3GB")

# Logged every step so the last step's throughput (after warm-up) is its own; dev scored on short inputs because
# the sweep measures training, not evaluation.
PROFILE = """[train]
epochs = 1
log_every = 1
lr = 1e-4
workers = {workers}
[data]
eval_samples = 16000
dev_batch = 16
[demo]
n_train = {n_train}
n_dev = {n_dev}
n_eval = 2
"""


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def _fit(args: list[str], out: Path) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "lowmem_aasist", "fit", *args, "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    return done.returncode, (done.stdout + done.stderr)[-2000:]


def _measured(out: Path) -> dict:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in lines if "loss" in r]
    config = json.loads((out / "config.json").read_text())["resolved"]
    return {
        "peak_bytes": max((r.get("peak_bytes") or 0) for r in steps) if steps else None,
        "samples_per_s": steps[-1]["samples_per_s"] if steps else None,
        "oom_count": sum(1 for r in lines if r.get("event") == "oom_backoff"),
        "steps": len(steps),
        "resolved": config,
    }


def run_row(model: str, budget: str | None, common: list[str], work: Path, precision: str = "auto") -> dict:
    """One fit; ``budget`` None is the baseline (the unmodified recipe, uncapped)."""
    out = work / f"{model}-{budget or 'baseline'}-{precision}"
    if budget is None:
        extra = ["--precision", "fp32", "--checkpoint", "none", "--optimizer", "adam"]
    else:
        extra = ["--budget", budget, "--precision", precision]
    args = ["--model", model, *common, *extra]
    code, tail = _fit(args, out)
    row: dict = {"model": model, "budget_bytes": parse_budget(budget) if budget else None,
                 "command": "lowmem-aasist fit " + shlex.join(args), "exit_code": code}
    if code != 0:
        return {**row, "error": tail.strip().splitlines()[-1] if tail.strip() else f"exit {code}"}
    m = _measured(out)
    r = m["resolved"]
    plan = json.loads((out / "plan.json").read_text())["plan"] if budget else None
    micro = plan["micro_batch"] if plan else r["micro_batch"]
    batch = int(common[common.index("--batch") + 1])
    return {
        **row,
        "effective_batch": batch,
        "micro_batch": micro,
        "grad_accum": batch // micro,
        "crop": r["crop"],
        "precision": r["precision"],
        "checkpoint": r["checkpoint"],
        "optimizer": r["optimizer"],
        "predicted_peak_bytes": plan["predicted_peak_bytes"] if plan else None,
        "measured_peak_bytes": m["peak_bytes"],
        "oom_count": m["oom_count"],
        "samples_per_s": m["samples_per_s"],
        "steps": m["steps"],
    }


def sweep(budgets: list[str], models: list[str], steps: int, batch: int, crop: int, device: str, work: Path,
          baseline: bool = True, n_train: int = 48, workers: int = 0, fp16: bool = False,
          precisions: list[str] | None = None, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Run the rows; ``precisions`` per cap (default: auto, plus fp16 with ``fp16`` on CUDA); ``on_row`` gets each
    row as soon as it is measured."""
    dev = resolve_device(device)
    facts = device_facts(dev)
    profile = work / "sweep.toml"
    profile.write_text(PROFILE.format(workers=workers, n_train=max(n_train, batch), n_dev=4))
    common = ["--demo", "--demo-dir", str(work / "demo"), "--profile", str(profile), "--device", device,
              "--batch", str(batch), "--crop", str(crop), "--max-steps", str(steps)]
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda, "driver": facts.driver or None,
                "python": platform.python_version()}
    chosen = precisions or (["auto", "fp16"] if fp16 and dev.type == "cuda" else ["auto"])
    rows: list[dict] = []

    def keep(row: dict) -> None:
        row = {"device": facts.name, "device_kind": facts.kind, **versions, **row}
        rows.append(row)
        if on_row is not None:
            on_row(row)

    for model in models:
        base = run_row(model, None, common, work) if baseline else None
        if base is not None:
            keep({**base, "kind": "baseline"})
        for budget in budgets:
            if facts.kind == "cuda" and (parse_budget(budget) or 0) > facts.total_bytes:
                continue
            for precision in chosen:
                row = run_row(model, budget, common, work, precision)
                row["kind"] = "capped"
                row["baseline_samples_per_s"] = base.get("samples_per_s") if base else None
                keep(row)
    return rows


def table(rows: list[dict]) -> list[str]:
    """The sweep's markdown table, one line per row (also rendered into the README by render_readme.py)."""
    lines = [
        "| model | budget | plan (micro x accum, precision, checkpoint) | predicted MiB | measured peak MiB "
        "| planner error | under budget | OOM | samples/s | vs baseline |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        budget = "none (baseline)" if r["budget_bytes"] is None else f"{r['budget_bytes'] / MiB:,.0f} MiB"
        if "error" in r:
            lines.append(f"| {r['model']} | {budget} | failed: {r['error'][:80]} | | | | | | | |")
            continue
        plan = f"{r['micro_batch']} x {r['grad_accum']}, {r['precision']}, {r['checkpoint']}"
        pred = f"{r['predicted_peak_bytes'] / MiB:,.0f}" if r.get("predicted_peak_bytes") else "-"
        peak = r.get("measured_peak_bytes")
        error = (f"{100 * (r['predicted_peak_bytes'] - peak) / peak:+.1f}%"
                 if r.get("predicted_peak_bytes") and peak else "-")
        under = "-" if r["budget_bytes"] is None or not peak else ("yes" if peak <= r["budget_bytes"] else "NO")
        ratio = (f"{r['samples_per_s'] / r['baseline_samples_per_s']:.2f}x"
                 if r.get("baseline_samples_per_s") and r.get("samples_per_s") else "-")
        lines.append(f"| {r['model']} | {budget} | {plan} | {pred} | {peak / MiB if peak else 0:,.0f} | {error} | {under} | "
                     f"{r.get('oom_count', 0)} | {r['samples_per_s']:.2f} | {ratio} |")
    return lines


def markdown(rows: list[dict], command: str) -> str:
    first = rows[0]
    lines = [
        f"Budget sweep on {first['device']} ({first['device_kind']}), torch {first['torch']}"
        + (f", CUDA {first['cuda']}, driver {first['driver']}" if first["cuda"] else "") + ". "
        "Peak = the process's GPU memory as NVML counts it (CUDA) or its whole resident memory (CPU), the highest "
        "logged over the steps. A cap emulates a smaller card's memory, not its speed.",
        "",
        *table(rows),
    ]
    # Rows appended by several sweeps (--append) name every command that made them.
    commands = list(dict.fromkeys(r.get("sweep_command") or command for r in rows))
    lines += ["", f"Command: `{command}`"] if len(commands) == 1 else ["", "Commands:", *(f"- `{c}`" for c in commands)]
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    capped = [r for r in rows if r["budget_bytes"] and "error" not in r and r["measured_peak_bytes"]]
    if not capped:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    # Rows appended by several sweeps (--append) come in any order: one line per model and precision, by budget.
    groups = sorted({(r["model"], r["precision"]) for r in capped})
    several = len({precision for _, precision in groups}) > 1
    drawn = set()
    for model, precision in groups:
        mine = sorted((r for r in capped if (r["model"], r["precision"]) == (model, precision)),
                      key=lambda r: r["budget_bytes"])
        label = f"{model} {precision}" if several else model
        ax1.plot([r["budget_bytes"] / MiB for r in mine], [r["measured_peak_bytes"] / MiB for r in mine], "o-", label=label)
        ax2.plot([r["budget_bytes"] / MiB for r in mine], [r["samples_per_s"] for r in mine], "o-", label=label)
        base = next((r for r in rows if r["model"] == model and r["budget_bytes"] is None and "error" not in r), None)
        if base and base["samples_per_s"] and model not in drawn:
            drawn.add(model)
            ax2.axhline(base["samples_per_s"], ls="--", lw=1, color=ax2.lines[-1].get_color())
    top = max(r["budget_bytes"] for r in capped) / MiB
    ax1.plot([0, top], [0, top], "k:", lw=1, label="cap")
    ax1.set(xlabel="budget (MiB)", ylabel="measured peak (MiB)", title="peak vs cap")
    ax2.set(xlabel="budget (MiB)", ylabel="samples/s", title="throughput (dashed: baseline)")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budgets", nargs="+", help="caps (default: 2..15 GiB on CUDA below the card, 1.5/2/3 GiB on CPU)")
    p.add_argument("--models", nargs="+", default=["AASIST", "AASIST-L"])
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per row (the last one's throughput counts)")
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--crop", type=int, default=64_600)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--fp16", action="store_true", help="CUDA: also run each cap with fp16 + GradScaler")
    p.add_argument("--precisions", nargs="+", choices=["auto", "fp32", "bf16", "fp16"],
                   help="precisions to run at each cap (default: auto, plus fp16 with --fp16)")
    p.add_argument("--append", action="store_true",
                   help="add rows to budget_sweep.jsonl in --out instead of starting it afresh (tables cover all rows)")
    p.add_argument("--n-train", type=int, default=48, help="demo training utterances")
    p.add_argument("--out", help="results folder (default benchmarks/results/<device>)")
    args = p.parse_args(argv)

    dev = resolve_device(args.device)
    facts = device_facts(dev)
    budgets = args.budgets or list(GPU_CAPS if facts.kind == "cuda" else CPU_CAPS)
    command = "python benchmarks/budget_sweep.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / (
        device_slug(facts.name) if facts.kind == "cuda" else "cpu")
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "budget_sweep.jsonl"
    earlier = ([json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
               if args.append and jsonl.is_file() else [])
    # A capped row appended without its own baseline (--no-baseline) compares with the model's baseline in the file.
    baselines = {r["model"]: r.get("samples_per_s") for r in earlier if r.get("kind") == "baseline" and "error" not in r}
    if not args.append:
        jsonl.write_text("")

    def write(row: dict) -> None:
        row["sweep_command"] = command
        if row.get("kind") == "capped" and row.get("baseline_samples_per_s") is None:
            row["baseline_samples_per_s"] = baselines.get(row["model"])
        with open(jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")

    with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
        rows = sweep(budgets, args.models, args.steps, args.batch, args.crop, args.device, Path(tmp),
                     baseline=not args.no_baseline, n_train=args.n_train, fp16=args.fp16,
                     precisions=args.precisions, on_row=write)
    rows = earlier + rows
    if not rows:
        print("no rows: every cap given is above the device's memory")
        return 0
    text = markdown(rows, command)
    (out / "budget_sweep.md").write_text(text)
    chart(rows, out / "budget_sweep.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
