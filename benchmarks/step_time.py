"""Training-step time per numerics configuration (precision x channels-last), one JSON line per configuration.

    python benchmarks/step_time.py --model AASIST-L --batch 8 --crop 16000 --steps 12 \
        --out benchmarks/results/cpu/step_time.jsonl

A step is forward + weighted cross-entropy + backward + Adam on random input; the first steps (kernel selection,
allocator warm-up) are excluded. Prints what it measured, on which device, with the command; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lowmem_aasist.memory.device import autocast_ctx, cpu_has_native_bf16, resolve_device
from lowmem_aasist.memory.techniques import apply_channels_last
from lowmem_aasist.models import build_model

CONFIGS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def time_steps(model_name: str, batch: int, crop: int, steps: int, warmup: int, precision: str, channels_last: bool,
               device: torch.device) -> list[float]:
    torch.manual_seed(0)
    model = build_model(model_name).to(device).train()
    if channels_last:
        apply_channels_last(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch, crop, device=device)
    y = torch.randint(0, 2, (batch,), device=device)
    weight = torch.tensor([0.1, 0.9], device=device)
    times = []
    for _ in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast_ctx(device, precision):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, weight=weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()
        times.append(time.perf_counter() - t0)
    return times[warmup:]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} cpu, {torch.get_num_threads()} threads" + (
        ", native bf16" if cpu_has_native_bf16() else ""
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="AASIST-L", choices=["AASIST", "AASIST-L"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=16_000)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, help="append JSON lines here and write a .md table beside it")
    args = p.parse_args()
    device = resolve_device(args.device)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    rows = []
    for precision, channels_last in CONFIGS:
        times = sorted(time_steps(args.model, args.batch, args.crop, args.steps, args.warmup, precision, channels_last,
                                  device))
        median = times[len(times) // 2]
        row = {"device": device_name(device), "torch": torch.__version__, "model": args.model, "batch": args.batch,
               "crop": args.crop, "precision": precision, "channels_last": channels_last, "steps": args.steps,
               "step_s_median": round(median, 4), "samples_per_s": round(args.batch / median, 2),
               "command": command}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        lines = [f"Measured by `{command}` on {rows[0]['device']}, torch {torch.__version__}.", "",
                 "| model | batch x crop | precision | channels-last | s/step (median) | samples/s |",
                 "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['model']} | {r['batch']} x {r['crop']} | {r['precision']} | {r['channels_last']} | "
                  f"{r['step_s_median']:.3f} | {r['samples_per_s']:.1f} |" for r in rows]
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
