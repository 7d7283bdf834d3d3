"""Training-input throughput and resident memory, one JSON line per (reading method, DataLoader workers).

    python benchmarks/loader.py --make-corpus /tmp/loader-100 --files 100
    python benchmarks/loader.py --data /tmp/loader-100 --crop 64600 --samples 2000 --repeats 3 --workers 0 1 2 \
        --reference --out benchmarks/results/cpu/loader.jsonl
    python benchmarks/loader.py --markdown benchmarks/results/cpu/loader.md --out benchmarks/results/cpu/loader.jsonl

``lowmem`` reads through exactly what ``fit`` builds: load_split -> TrainCrops -> EpochSampler over the readable
utterances -> make_loader. ``whole-file`` (``--reference``) is the published AASIST recipe's way of reading -- the
whole file decoded with soundfile, then a random window cut in numpy -- behind the same sampler, collate and
DataLoader settings, so only the reading differs. Each configuration runs in a fresh process, so a peak is that
configuration's own; the index is built and the audio read once beforehand, so every configuration sees a cached
index and a warm page cache. Prints what it measured, on which device, with the command. Asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import psutil
import soundfile as sf
import torch
from torch.utils.data import Dataset

from lowmem_aasist.data.dataset import EpochSampler, Item, TrainCrops, crop_start, make_loader
from lowmem_aasist.data.load import load_split
from lowmem_aasist.data.split import Split
from lowmem_aasist.memory.device import device_facts

METHODS = ("lowmem", "whole-file")
MiB = 2**20
RESULTS = Path(__file__).resolve().parent / "results"


class PeakMemory:
    """Peak over a block of the summed resident memory of this process and all its descendants (DataLoader workers),
    sampled by a background thread. PSS is kept too: forked workers share most pages with the main process and
    summed RSS counts those once per process, while PSS splits them, so it is the physical footprint.

    RSS is read every tick (/proc statm, microseconds). Listing descendants scans all of /proc and PSS walks every
    page (milliseconds each on a torch process), which every 20 ms would take a quarter of a core from the loader
    being measured on a small machine, so the process list is refreshed every ``list_every`` ticks and PSS read
    every ``pss_every``: the PSS peak is the coarser of the two."""

    def __init__(self, interval_s: float = 0.02, list_every: int = 5, pss_every: int = 10) -> None:
        self.interval_s, self.list_every, self.pss_every = interval_s, list_every, pss_every
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._me = psutil.Process()
        self._procs = [self._me]
        self._tick = 0

    def sample(self, refresh: bool = True, pss: bool = True) -> None:
        if refresh:
            try:
                self._procs = [self._me, *self._me.children(recursive=True)]
            except psutil.Error:
                self._procs = [self._me]
        rss = pss_sum = 0
        for p in self._procs:
            # A worker can exit between listing and reading; it then holds no memory.
            try:
                if pss:
                    full = p.memory_full_info()
                    rss, pss_sum = rss + full.rss, pss_sum + getattr(full, "pss", full.rss)
                else:
                    rss += p.memory_info().rss
            except psutil.Error:
                continue
        self.peak_rss = max(self.peak_rss, rss)
        if pss:
            self.peak_pss = max(self.peak_pss, pss_sum)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._tick += 1
            self.sample(self._tick % self.list_every == 0, self._tick % self.pss_every == 0)

    def __enter__(self) -> PeakMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def whole_file_crop(path: str, crop: int, rng: np.random.Generator) -> np.ndarray:
    """The reference recipe's training input: decode the whole file (soundfile's default float64), cut a random
    window, tile a short clip; float32 as the reference's ``Tensor(x)`` makes it. The window is drawn with the
    same rule and stream as TrainCrops, so both methods yield identical samples and only the reading differs."""
    x, _ = sf.read(path)
    if x.ndim > 1:
        x = x.mean(axis=1)
    start = crop_start(len(x), crop, rng)
    window = x[start : start + crop] if len(x) >= crop else np.tile(x, crop // len(x) + 1)[:crop]
    return window.astype(np.float32)


class WholeFileCrops(Dataset):
    """The reference's dataset shape: file paths as a Python list (as its ``list_IDs``), whole-file reads.
    ``split`` is kept for the labels that make_loader's collate takes from it."""

    def __init__(self, split: Split, crop: int, seed: int) -> None:
        self.split, self.crop, self.seed = split, crop, seed
        self.paths = list(split.path)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> Item:
        index, epoch = key
        rng = np.random.default_rng([self.seed, epoch, index])
        return index, whole_file_crop(self.paths[index], self.crop, rng), ()


def make_dataset(method: str, split: Split, crop: int, seed: int) -> TrainCrops | WholeFileCrops:
    if method == "lowmem":
        return TrainCrops(split, crop, seed)
    if method == "whole-file":
        return WholeFileCrops(split, crop, seed)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def cpu_name() -> str:
    return device_facts(torch.device("cpu")).name


def measure(root: str | Path, method: str, workers: int, crop: int, samples: int, batch: int = 24, seed: int = 0,
            warmup_batches: int = 1, cache_dir: Path | None = None) -> dict[str, Any]:
    """Read ``samples`` training items of ``root``'s train split after ``warmup_batches`` batches (worker start-up,
    first opens), epoch after epoch as ``fit`` does. Peaks cover the whole run, indexing included."""
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        split = load_split(root, "train", cache_dir=cache_dir).split
        index_s = time.perf_counter() - t0
        dataset = make_dataset(method, split, crop, seed)
        # The sampler draws from the readable utterances, as fit's does, for both methods.
        readable = np.flatnonzero(np.asarray(split.frames) > 0)
        if samples < 1 or not len(readable):  # either would leave nothing to time, or loop for ever
            raise ValueError(f"need samples >= 1 and readable audio; got samples={samples}, "
                             f"{len(readable)} readable of {len(split)} files in {root}")
        sampler = EpochSampler(readable, seed)
        loader = make_loader(dataset, batch, workers, sampler, pin_memory=False)
        counted = warm = epoch = 0
        t_start = time.perf_counter()
        while counted < samples:
            sampler.set_epoch(epoch)
            for b in loader:
                if b.wave.shape != (len(b.index), crop):
                    raise RuntimeError(f"{method}: batch of shape {tuple(b.wave.shape)}, expected ({len(b.index)}, {crop})")
                if warm < warmup_batches:
                    warm += 1
                    t_start = time.perf_counter()
                    continue
                counted += len(b.index)
                if counted >= samples:
                    break
            epoch += 1
        elapsed = time.perf_counter() - t_start
        # Persistent workers live as long as the loader; end them so the next measurement starts without them.
        del loader
        gc.collect()
    frames = np.asarray(split.frames)
    return {
        "device": cpu_name(),
        "method": method,
        "workers": workers,
        "files": len(split),
        "crop": crop,
        "batch": batch,
        "samples": counted,
        "samples_per_s": round(counted / elapsed, 2),
        "elapsed_s": round(elapsed, 3),
        "peak_rss_bytes": mem.peak_rss,
        "peak_pss_bytes": mem.peak_pss,
        "index_s": round(index_s, 4),
        "clips_shorter_than_crop": round(float((frames[readable] < crop).mean()), 4) if len(readable) else 0.0,
        "cores": psutil.cpu_count(),
        "torch": torch.__version__,
    }


def measure_fresh(root: Path, method: str, workers: int, crop: int, samples: int, batch: int, seed: int) -> dict[str, Any]:
    """:func:`measure` in a new interpreter, so neither the previous configuration's allocator high-water mark nor
    its modules count in this one's peak."""
    cmd = [sys.executable, __file__, "--single", method, "--data", str(root), "--crop", str(crop), "--samples",
           str(samples), "--batch", str(batch), "--seed", str(seed), "--workers", str(workers)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from repeated runs of a configuration: on a small shared machine a single run's rate can be off by
    a third, the median much less; memory peaks are the highest seen, a bound rather than a typical value."""
    rates = sorted(r["samples_per_s"] for r in runs)
    mid = runs[[r["samples_per_s"] for r in runs].index(rates[(len(rates) - 1) // 2])]
    return {**mid, "samples_per_s": float(np.median(rates)), "samples_per_s_runs": rates, "repeats": len(runs),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
            "peak_pss_bytes": max(r["peak_pss_bytes"] for r in runs)}


def warm_up(root: Path) -> int:
    """Index the train split (the cache every configuration then loads) and read its audio once, so no
    configuration pays for a cold page cache that the others do not."""
    split = load_split(root, "train").split
    for path in split.path:
        Path(path).read_bytes()
    return len(split)


def plain_line(r: dict[str, Any]) -> str:
    return (f"{r['method']:<10} workers {r['workers']}  files {r['files']:>6,}  crop {r['crop']:,}  "
            f"{r['samples']:,} samples  {r['samples_per_s']:8.1f} samples/s  peak RSS {r['peak_rss_bytes'] / MiB:7.1f} MiB "
            f"(PSS {r['peak_pss_bytes'] / MiB:.1f})  index {r['index_s']:.3f} s")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_demand(results: Path = RESULTS) -> tuple[str, list[dict[str, Any]]]:
    """What a training step consumes, from the committed step measurements: a GPU's where any exist (any results
    folder but cpu/), else the CPU's. Returns a sentence on where the figures come from and, per (file, model,
    crop), the fastest step measured, with ``source`` set to the file it came from."""
    files = [f for f in sorted(results.glob("*/*.jsonl")) if f.stem in ("step_time", "memory_matrix")]
    gpu = [f for f in files if f.parent.name != "cpu"]
    if gpu:
        intro = "A training step on a GPU (the committed GPU step measurements):"
    else:
        intro = ("No GPU was available for these measurements and no GPU step time is committed under "
                 "`benchmarks/results/`, so the comparison is with a CPU training step on this machine (the fastest "
                 "configuration measured):")
    best: dict[tuple[str, str, int], dict[str, Any]] = {}
    for f in gpu or files:
        for r in read_jsonl(f):
            key = (str(f.relative_to(results.parent.parent)), r["model"], r["crop"])
            if "samples_per_s" in r and r["samples_per_s"] > best.get(key, {"samples_per_s": -1.0})["samples_per_s"]:
                best[key] = {**r, "source": key[0]}
    return intro, [best[k] for k in sorted(best)]


def rate(r: dict[str, Any]) -> str:
    runs = r.get("samples_per_s_runs", [])
    spread = f" ({min(runs):,.0f}-{max(runs):,.0f})" if len(runs) > 1 else ""
    return f"{r['samples_per_s']:,.1f}{spread}"


def markdown(rows: list[dict[str, Any]], results: Path = RESULTS, command: str | None = None) -> str:
    # A configuration measured again replaces its earlier line.
    latest: dict[tuple[str, int, int, int], dict[str, Any]] = {}
    for r in rows:
        latest[(r["method"], r["workers"], r["files"], r["crop"])] = r
    rows = sorted(latest.values(), key=lambda r: (-r["crop"], r["files"], r["method"] != "lowmem", r["workers"]))
    devices = sorted({r["device"] for r in rows})
    lines = [
        f"Training-input throughput and memory on {', '.join(devices)} "
        f"({'/'.join(str(c) for c in sorted({r.get('cores', '?') for r in rows}, key=str))} cores), torch "
        f"{', '.join(sorted({r['torch'] for r in rows}))}. `lowmem` = the loader `fit` builds (windowed reads); "
        "`whole-file` = the published AASIST recipe's reading (whole file decoded, then cropped) behind the same "
        "sampler and DataLoader settings. Samples/s after one warm-up batch, the median of the repeated runs (their range "
        "in brackets); peak RSS = main process plus DataLoader "
        "workers, summed (shared pages count once per process), the highest of the runs; PSS splits shared pages, i.e. "
        "the physical footprint (sampled every 200 ms, RSS every 20 ms). "
        "Cached index, warm page cache, each configuration in a fresh process. Demo corpus (synthetic ASVspoof 2019 LA "
        "layout, FLAC).",
        "",
        "| method | workers | files | crop | batch | samples | samples/s | peak RSS MiB | peak PSS MiB | index s | clips shorter than crop |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r['method']} | {r['workers']} | {r['files']:,} | {r['crop']:,} | {r['batch']} | {r['samples']:,} | "
              f"{rate(r)} | {r['peak_rss_bytes'] / MiB:,.1f} | {r['peak_pss_bytes'] / MiB:,.1f} | "
              f"{r['index_s']:.3f} | {r['clips_shorter_than_crop']:.0%} |" for r in rows]
    growth = []
    for (method, workers, files, crop), small in sorted(latest.items()):
        larger = [r for (m, w, f, c), r in latest.items() if (m, w, c) == (method, workers, crop) and f > files]
        if not larger or any(f < files for (m, w, f, c) in latest if (m, w, c) == (method, workers, crop)):
            continue
        big = max(larger, key=lambda r: r["files"])
        growth.append(f"| {method} | {workers} | {crop:,} | {files:,} -> {big['files']:,} | "
                      f"{(big['peak_rss_bytes'] - small['peak_rss_bytes']) / MiB:+,.1f} | "
                      f"{(big['peak_pss_bytes'] - small['peak_pss_bytes']) / MiB:+,.1f} |")
    if growth:
        lines += ["", "Peak memory growth from the smallest to the largest corpus (same crop, samples, batch):", "",
                  "| method | workers | crop | files | RSS growth MiB | PSS growth MiB |",
                  "| --- | --- | --- | --- | --- | --- |", *growth]
    for crop in sorted({r["crop"] for r in rows}):
        short = max(r["clips_shorter_than_crop"] for r in rows if r["crop"] == crop)
        if short >= 0.5:
            lines += ["", f"At crop {crop:,}, {short:.0%} of the training clips are shorter than the crop: both methods "
                      "then decode the whole file and tile it, so any difference between them there does not come from "
                      "how much audio is decoded."]
    intro, steps = step_demand(results)
    sentences = [intro]
    for st in steps:
        same_crop = [r for r in rows if r["crop"] == st["crop"]]
        text = (f"{st['model']} at crop {st['crop']:,} consumes at most {st['samples_per_s']:,.2f} samples/s "
                f"({st['precision']}, on {st['device']}, `{Path(st['source']).with_suffix('.md')}`)")
        if same_crop:
            slow = min(same_crop, key=lambda r: r["samples_per_s"])
            text += (f"; the slowest loader configuration at that crop ({slow['method']}, workers {slow['workers']}, "
                     f"{slow['files']:,} files) reads {slow['samples_per_s']:,.0f} samples/s, "
                     f"{slow['samples_per_s'] / st['samples_per_s']:,.0f}x that")
        sentences.append(text + ".")
    lines += ["", " ".join(sentences)]
    lines += ["", "Commands:", ""]
    commands = list(dict.fromkeys(r["command"] for r in rows))
    lines += [f"    {c}" for c in [*corpus_commands(commands), *commands, *([command] if command else [])]]
    return "\n".join(lines) + "\n"


def corpus_commands(commands: list[str]) -> list[str]:
    """The --make-corpus command behind each --data folder that holds a demo corpus, from the generator's own
    record of its parameters (so a folder made some other way is not claimed to be)."""
    made = []
    for c in commands:
        argv = shlex.split(c)
        if "--data" not in argv:
            continue
        root = argv[argv.index("--data") + 1]
        try:
            params = json.loads((Path(root) / ".complete").read_text())["params"]
        except (OSError, ValueError, KeyError):
            continue
        n = params["n_train"]
        if params == {**params, "n_dev": max(2, n // 4), "n_eval": 2, "seed": 0}:
            made.append(f"python benchmarks/loader.py --make-corpus {shlex.quote(root)} --files {n}")
    return list(dict.fromkeys(made))


def command_line(argv: Sequence[str] | None) -> str:
    return "python " + " ".join(shlex.quote(a) for a in (sys.argv if argv is None else ["benchmarks/loader.py", *argv]))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="corpus root (any layout load_split reads) with a train split")
    p.add_argument("--crop", type=int, default=64_600)
    p.add_argument("--samples", type=int, default=600, help="items read per configuration, after the warm-up batch")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch", type=int, default=24, help="the recipe's batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1,
                   help="fresh runs per configuration; reports the median samples/s and the highest peaks")
    p.add_argument("--reference", action="store_true", help="also measure the reference recipe's whole-file reading")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of plain ones")
    p.add_argument("--out", type=Path, help="append JSON lines here (and read them for --markdown)")
    p.add_argument("--markdown", type=Path, help="write a markdown report of all lines in --out")
    p.add_argument("--make-corpus", type=Path, metavar="DIR", help="generate a demo corpus here (if not there yet)")
    p.add_argument("--files", type=int, default=100, help="train files of --make-corpus")
    p.add_argument("--single", choices=METHODS, help=argparse.SUPPRESS)  # one configuration, in this process
    args = p.parse_args(argv)

    if args.single:
        print(json.dumps(measure(args.data, args.single, args.workers[0], args.crop, args.samples, args.batch,
                                 args.seed)))
        return
    if args.make_corpus:
        from lowmem_aasist.data.demo import ensure_demo_corpus

        t0 = time.perf_counter()
        ensure_demo_corpus(args.make_corpus, n_train=args.files, n_dev=max(2, args.files // 4), n_eval=2, seed=0)
        print(f"demo corpus with {args.files:,} train files at {args.make_corpus} ({time.perf_counter() - t0:.1f} s)")
    if args.data:
        command = command_line(argv)
        files = warm_up(args.data)
        print(f"{args.data}: {files:,} train files; crop {args.crop:,}, batch {args.batch}, {args.samples:,} samples "
              f"per configuration on {cpu_name()}", flush=True)
        methods = METHODS if args.reference else METHODS[:1]
        rows = []
        for method in methods:
            for workers in args.workers:
                runs = [measure_fresh(args.data, method, workers, args.crop, args.samples, args.batch, args.seed)
                        for _ in range(args.repeats)]
                row = {**combine(runs), "command": command}
                rows.append(row)
                print(json.dumps(row) if args.json else plain_line(row), flush=True)
        print(f"command: {command}")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    if args.markdown:
        if not args.out or not args.out.is_file():
            p.error("--markdown needs --out FILE.jsonl with measured lines")
        args.markdown.write_text(markdown(read_jsonl(args.out), command=command_line(argv)))
        print(f"wrote {args.markdown}")
    if not (args.make_corpus or args.data or args.markdown):
        p.error("nothing to do: give --data, --make-corpus or --markdown")


if __name__ == "__main__":
    main()
