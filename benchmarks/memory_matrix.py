"""Measured vs predicted peak memory, step time and gradient fidelity per configuration.

    python benchmarks/memory_matrix.py --model AASIST --crop 64600 --micro 1 2 --out benchmarks/results/cpu

For each configuration (precision x checkpoint policy x lean building blocks x optimizer) and each micro-batch,
one steady-state training step is measured: the live-tensor peak (exact, a dispatch-mode tracker), the process
peak (RSS on CPU; allocator reserve on CUDA), the step time, and the cosine of its gradient with the unmodified
fp32 recipe's gradient on the same weights, data and dropout masks, and its relative difference from the unmodified
model's gradient at the row's own precision (what the policy itself changes: 0 for exact policies, rounding for
``tiled``, whose tile order changes the order of additions). The prediction is the planner's memory model
(fixed + slope, calibrated by the fake-tensor estimator at micro-batch 1 and 2), so rows at other micro-batches
test its extrapolation. On CUDA each row also records the allocator's peaks (``max_memory_allocated``,
``max_memory_reserved``) and what NVML charges the process after the step (context + the allocator's cache, emptied
before each row). Rows go to ``memory_matrix.jsonl`` as each is measured (``--append`` adds to the file instead of
starting it afresh); a markdown table and a PNG chart of every row in the file are written beside.
Prints what it measured, on which device, with the command. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lowmem_aasist.memory.device import device_facts, process_gpu_bytes, resolve_device
from lowmem_aasist.memory.engine import prepare_model, technique_costs
from lowmem_aasist.memory.estimate import estimate_step_peak
from lowmem_aasist.memory.measure import build_step, measure_step
from lowmem_aasist.memory.optim import make_optimizer
from lowmem_aasist.memory.plan import REF_CROP, Cost, Technique
from lowmem_aasist.models import build_model

MiB = 2**20
GRAD_BATCH = 2  # gradients compared on one micro-batch of 2 (the planner's smallest) at crop min(crop, 16,000)


@dataclass(frozen=True)
class Row:
    precision: str
    checkpoint: str
    lean: bool
    optimizer: str = "adam"

    @property
    def label(self) -> str:
        blocks = "lean" if self.lean else "stock"
        return f"{self.precision} {blocks} ckpt={self.checkpoint} {self.optimizer}"


CONFIGS = [
    Row("fp32", "none", lean=False),  # the unmodified recipe
    Row("fp32", "none", lean=True),
    Row("fp32", "encoder", lean=True),
    Row("fp32", "block0-segments", lean=True),
    Row("fp32", "block0", lean=True),
    Row("fp32", "tiled", lean=True),
    Row("bf16", "none", lean=False),
    Row("bf16", "none", lean=True),
    Row("bf16", "gat", lean=True),
    Row("bf16", "encoder", lean=False),
    Row("bf16", "encoder", lean=True),
    Row("bf16", "block0-segments", lean=True),
    Row("bf16", "block0", lean=True),
    Row("bf16", "tiled", lean=True),
    Row("bf16", "block0-segments", lean=True, optimizer="adam8bit"),
    Row("fp32", "none", lean=True, optimizer="adam8bit"),
]


def row_model(model_name: str, row: Row, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(model_name).to(device).train()
    if row.lean:
        prepare_model(model, row.checkpoint)
    else:
        from lowmem_aasist.memory.techniques import apply_checkpointing

        apply_checkpointing(model, row.checkpoint)
    return model


def row_cost(model_name: str, row: Row) -> Cost:
    """The planner's memory model for this row (lean rows: exactly what the planner uses; stock rows: the same
    estimator with the stock blocks, so the unmodified recipe is predicted too)."""
    if row.lean:
        return next(iter(technique_costs(model_name, [Technique(row.precision, row.checkpoint, row.optimizer)]).values()))
    from lowmem_aasist.memory.techniques import apply_checkpointing

    p1, p2 = (
        estimate_step_peak(model_name, mb, REF_CROP, mb, row.precision, optimizer=row.optimizer,
                           prepare=lambda m: apply_checkpointing(m, row.checkpoint))
        for mb in (1, 2)
    )
    return Cost(int(2 * p1 - p2), float(p2 - p1))


def gradient(model_name: str, row: Row, device: torch.device, batch: int, crop: int) -> torch.Tensor:
    """The flattened gradient of one micro-batch at fixed weights, data and dropout masks."""
    model = row_model(model_name, row, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    step = build_step(model, optimizer, batch, crop, batch, row.precision, device)
    torch.manual_seed(1)
    step()
    return torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="AASIST", choices=["AASIST", "AASIST-L"])
    p.add_argument("--crop", type=int, default=64_600)
    p.add_argument("--micro", type=int, nargs="+", default=[1, 2], help="micro-batch sizes to measure")
    p.add_argument("--device", default="auto")
    p.add_argument("--only", nargs="*", help="substring filter on configuration labels")
    p.add_argument("--out", type=Path, required=True, help="folder for memory_matrix.{jsonl,md,png}")
    p.add_argument("--append", action="store_true",
                   help="add rows to memory_matrix.jsonl in --out instead of starting it afresh (tables cover all rows)")
    args = p.parse_args()

    device = resolve_device(args.device)
    facts = device_facts(device)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    args.out.mkdir(parents=True, exist_ok=True)
    jsonl = args.out / "memory_matrix.jsonl"
    earlier = ([json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
               if args.append and jsonl.is_file() else [])
    if not args.append:
        jsonl.write_text("")
    configs = [r for r in CONFIGS if not args.only or any(s in r.label for s in args.only)]
    grad_crop = min(args.crop, 16_000)
    stock = {p: gradient(args.model, Row(p, "none", lean=False), device, GRAD_BATCH, grad_crop)
             for p in sorted({r.precision for r in configs} | {"fp32"})}
    rows = []
    for row in configs:
        cost = row_cost(args.model, row)
        g = gradient(args.model, row, device, GRAD_BATCH, grad_crop)
        cosine = torch.nn.functional.cosine_similarity(g, stock["fp32"], dim=0).item()
        same = stock[row.precision]
        diff = ((g - same).norm() / same.norm()).item()
        for micro in args.micro:
            if device.type == "cuda":
                torch.cuda.empty_cache()  # so NVML after the step sees this row's allocator cache, not an earlier row's
            model = row_model(args.model, row, device)
            optimizer = make_optimizer(row.optimizer, model.parameters(), 1e-4, (0.9, 0.999), 1e-4)
            step = build_step(model, optimizer, micro, args.crop, micro, row.precision, device)
            t0 = time.perf_counter()
            mem = measure_step(step, model, optimizer, device)
            wall = time.perf_counter() - t0
            result = {
                "device": facts.name,
                "device_kind": facts.kind,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "model": args.model,
                "precision": row.precision,
                "checkpoint": row.checkpoint,
                "lean_blocks": row.lean,
                "optimizer": row.optimizer,
                "micro_batch": micro,
                "crop": args.crop,
                "measured_peak_bytes": mem.peak_bytes,
                "predicted_peak_bytes": int(cost.peak(micro, args.crop)),
                "rss_peak_bytes": mem.rss_peak_bytes,
                "cuda_peak_reserved_bytes": mem.cuda_peak_reserved,
                "cuda_peak_allocated_bytes": mem.cuda_peak_allocated,
                "nvml_process_bytes": process_gpu_bytes(device),
                "step_s": round(mem.step_s, 3),
                "samples_per_s": round(micro / mem.step_s, 3),
                "grad_cosine_vs_fp32": round(cosine, 6),
                "grad_rel_diff_vs_stock_same_precision": float(f"{diff:.3g}"),
                "wall_s": round(wall, 1),
                "command": command,
            }
            rows.append(result)
            print(json.dumps(result), flush=True)
            with open(jsonl, "a") as f:  # each row as it is measured: a run stopped midway keeps what it finished
                f.write(json.dumps(result) + "\n")
            del model, optimizer, step
    rows = earlier + rows
    if not rows:
        print("no configuration matches --only", file=sys.stderr)
        return
    write_markdown(rows, args.out / "memory_matrix.md", command)
    write_chart(rows, args.out / "memory_matrix.png")


def _slopes(rows: list[dict]) -> dict[tuple, float]:
    """Measured bytes per sample between the two smallest micro-batches of each configuration."""
    by: dict[tuple, list[dict]] = {}
    for r in rows:
        by.setdefault((r["precision"], r["checkpoint"], r["lean_blocks"], r["optimizer"]), []).append(r)
    out = {}
    for key, rs in by.items():
        rs = sorted(rs, key=lambda r: r["micro_batch"])
        if len(rs) >= 2:
            a, b = rs[0], rs[1]
            out[key] = (b["measured_peak_bytes"] - a["measured_peak_bytes"]) / (b["micro_batch"] - a["micro_batch"])
    return out


def write_markdown(rows: list[dict], path: Path, command: str) -> None:
    slopes = _slopes(rows)
    r0 = rows[0]
    commands = ", ".join(f"`{c}`" for c in dict.fromkeys(r.get("command") or command for r in rows))
    lines = [
        f"Measured by {commands} on {r0['device']} ({r0['device_kind']}, {r0['threads']} threads), torch {r0['torch']}, "
        f"{r0['model']}, crop {r0['crop']:,}.",
        "",
        "Measured = exact live-tensor peak of one steady-state training step; predicted = the planner's memory model "
        "(fixed + slope from the fake-tensor estimator at micro-batch 1 and 2, crop 64,600, scaled linearly to the row); "
        "slope = measured MiB per extra sample. "
        + ("Step times on a shared 2-core CPU: compare within one file only. " if r0["device_kind"] == "cpu" else "")
        + f"Gradients: one micro-batch of {GRAD_BATCH} at crop {min(r0['crop'], 16_000):,}, same weights, data and "
        "dropout masks; cosine against the unmodified fp32 recipe, and relative difference (norm of the difference "
        "over the norm) against the unmodified recipe at the row's own precision.",
        "",
        "| precision | blocks | checkpoint | optimizer | micro | measured MiB | predicted MiB | error | slope MiB/sample "
        "| RSS MiB | s/step | samples/s | grad cos vs fp32 | grad diff vs stock, same precision |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        key = (r["precision"], r["checkpoint"], r["lean_blocks"], r["optimizer"])
        pred = r["predicted_peak_bytes"]
        err = f"{100 * (pred - r['measured_peak_bytes']) / r['measured_peak_bytes']:+.2f}%"
        slope = f"{slopes[key] / MiB:.1f}" if key in slopes else "—"
        rss = f"{r['rss_peak_bytes'] / MiB:,.0f}" if r["rss_peak_bytes"] else "—"
        lines.append(
            f"| {r['precision']} | {'lean' if r['lean_blocks'] else 'stock'} | {r['checkpoint']} | {r['optimizer']} | "
            f"{r['micro_batch']} | {r['measured_peak_bytes'] / MiB:,.1f} | {pred / MiB:,.1f} | {err} | "
            f"{slope} | {rss} | {r['step_s']:.2f} | {r['samples_per_s']:.2f} | {r['grad_cosine_vs_fp32']:.4f} | "
            f"{r['grad_rel_diff_vs_stock_same_precision']:.2g} |"
        )
    path.write_text("\n".join(lines) + "\n")


def write_chart(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no chart", file=sys.stderr)
        return
    slopes = _slopes(rows)
    labels = [f"{p} {'lean' if lean else 'stock'}\n{c} {o}" for (p, c, lean, o) in slopes]
    values = [v / MiB for v in slopes.values()]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.barh(range(len(values)), values, color=["#c44" if "stock" in lbl else "#48a" for lbl in labels])
    ax.set_yticks(range(len(values)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"measured activation memory per sample (MiB), crop {rows[0]['crop']:,}")
    ax.set_title(f"{rows[0]['model']} training step on {rows[0]['device']}")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.0f}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
