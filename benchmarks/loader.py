"""Training-input throughput and resident memory, one JSON line per (reading method, DataLoader workers).

    python benchmarks/loader.py --make-corpus /tmp/loader-100 --files 100
    python benchmarks/loader.py --data /tmp/loader-100 --crop 64600 --samples 2000 --repeats 3 --workers 0 1 2 \
        --reference --out benchmarks/results/cpu/loader.jsonl
    python benchmarks/loader.py --markdown benchmarks/results/cpu/loader.md --out benchmarks/results/cpu/loader.jsonl

Augmentation cost (``lowmem`` only, one configuration per spec and workers; ``""`` = none; ``--make-noise`` writes
synthetic noise and RIR folders for the ``noise`` and ``reverb`` specs)::

    python benchmarks/loader.py --make-noise /tmp/loader-noise-200 --noise-files 200 --rir-files 50
    python benchmarks/loader.py --data /tmp/loader-100 --crop 16000 --workers 0 1 2 --augment "" rawboost:5 codec \
        "noise:dir=/tmp/loader-noise-200/noise,snr=5-20" "reverb:dir=/tmp/loader-noise-200/rirs" \
        --out benchmarks/results/cpu/loader_augment.jsonl

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
import re
import shlex
import shutil
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

from lowmem_aasist.augment.base import NO_AUGMENTATION, Chain, parse_spec
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


def make_dataset(method: str, split: Split, crop: int, seed: int,
                 augment: Chain = NO_AUGMENTATION) -> TrainCrops | WholeFileCrops:
    if method == "lowmem":
        return TrainCrops(split, crop, seed, augment=augment)
    if method == "whole-file":
        if augment:
            raise ValueError("augmentation is measured with the lowmem method only (what fit builds)")
        return WholeFileCrops(split, crop, seed)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def cpu_name() -> str:
    return device_facts(torch.device("cpu")).name


def augment_folders(chain: Chain) -> list[dict[str, Any]]:
    """The folders a chain's noise/reverb steps indexed: path, readable files, and the --make-noise command where
    the folder is one of its synthetic ones (read from the marker it leaves), so a report can say so."""
    found = []
    for step in chain.steps:
        index = getattr(step.augment, "index", None)
        if index is None:
            continue
        entry: dict[str, Any] = {"step": step.name, "dir": index.root, "files": len(index), "synthetic": None}
        try:
            marker = json.loads((Path(index.root).parent / NOISE_MARKER).read_text())
            if marker.get("kind") == NOISE_KIND:
                entry["synthetic"] = make_noise_command(Path(index.root).parent, marker["params"])
        except (OSError, ValueError, KeyError):
            pass
        found.append(entry)
    return found


def measure(root: str | Path, method: str, workers: int, crop: int, samples: int, batch: int = 24, seed: int = 0,
            warmup_batches: int = 1, cache_dir: Path | None = None, augment: str = "") -> dict[str, Any]:
    """Read ``samples`` training items of ``root``'s train split after ``warmup_batches`` batches (worker start-up,
    first opens), epoch after epoch as ``fit`` does, each augmented by the ``augment`` spec (as ``fit --augment``).
    Peaks cover the whole run, indexing (of the corpus and of any noise/RIR folder) included."""
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        split = load_split(root, "train", cache_dir=cache_dir).split
        index_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        chain = parse_spec(augment)  # indexes noise/RIR folders, as fit does before its workers start
        augment_setup_s = time.perf_counter() - t0
        dataset = make_dataset(method, split, crop, seed, chain)
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
        # From the dataset that was read, not from the argument: a spec that never reached it records "".
        "augment": getattr(dataset, "augment", NO_AUGMENTATION).spec,
        "augment_setup_s": round(augment_setup_s, 4),
        "augment_folders": augment_folders(chain),
    }


def measure_fresh(root: Path, method: str, workers: int, crop: int, samples: int, batch: int, seed: int,
                  augment: str = "") -> dict[str, Any]:
    """:func:`measure` in a new interpreter, so neither the previous configuration's allocator high-water mark nor
    its modules count in this one's peak."""
    cmd = [sys.executable, __file__, "--single", method, "--data", str(root), "--crop", str(crop), "--samples",
           str(samples), "--batch", str(batch), "--seed", str(seed), "--workers", str(workers),
           f"--augment={augment}"]  # one argument with '=': a spec may start with '-' or be empty
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


def plain_line(r: dict[str, Any], show_augment: bool = False) -> str:
    spec = f"augment {r.get('augment') or 'none'}  " if show_augment else ""
    return (f"{r['method']:<10} {spec}workers {r['workers']}  files {r['files']:>6,}  crop {r['crop']:,}  "
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


def spec_cell(spec: str) -> str:
    return f"`{spec}`" if spec else "none"


def folder_template(spec: str) -> str:
    """A spec with its folders blanked, so that runs differing only in the noise/RIR folder compare."""
    return re.sub(r"(dir=)[^,+]*", r"\1*", spec)


def markdown(rows: list[dict[str, Any]], results: Path = RESULTS, command: str | None = None) -> str:
    # A configuration measured again replaces its earlier line. Lines written before --augment existed have no
    # augment field: they were measured without augmentation.
    latest: dict[tuple[str, int, int, int, str], dict[str, Any]] = {}
    for r in rows:
        latest[(r["method"], r["workers"], r["files"], r["crop"], r.get("augment", ""))] = r
    # Specs in the order they were first measured (the order given on the command line).
    spec_order = {s: i for i, s in enumerate(dict.fromkeys(r.get("augment", "") for r in rows))}
    rows = sorted(latest.values(), key=lambda r: (-r["crop"], r["files"], r["method"] != "lowmem",
                                                  spec_order[r.get("augment", "")], r["workers"]))
    # The augment column, and all that goes with it, only where some row was augmented: tables of unaugmented
    # runs render exactly as before the option existed.
    augmented = any(r.get("augment") for r in rows)
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
    ]
    if augmented:
        lines[0] += (" augment = the `--augment` spec every training crop went through, in the data workers (in the "
                     "main process with workers 0), as `fit --augment SPEC` applies it: "
                     "`TrainCrops(split, crop, seed, augment=parse_spec(SPEC))`; none = no augmentation. Its peaks "
                     "include indexing any noise/RIR folder.")
    aug_head, aug_rule = ("augment | ", "--- | ") if augmented else ("", "")
    lines += [
        "",
        f"| method | {aug_head}workers | files | crop | batch | samples | samples/s | peak RSS MiB | peak PSS MiB | "
        "index s | clips shorter than crop |",
        f"| --- | {aug_rule}--- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r['method']} | {spec_cell(r.get('augment', '')) + ' | ' if augmented else ''}{r['workers']} | "
              f"{r['files']:,} | {r['crop']:,} | {r['batch']} | {r['samples']:,} | "
              f"{rate(r)} | {r['peak_rss_bytes'] / MiB:,.1f} | {r['peak_pss_bytes'] / MiB:,.1f} | "
              f"{r['index_s']:.3f} | {r['clips_shorter_than_crop']:.0%} |" for r in rows]
    growth = []
    for (method, workers, files, crop, spec), small in sorted(latest.items()):
        same = [(f, r) for (m, w, f, c, a), r in latest.items() if (m, w, c, a) == (method, workers, crop, spec)]
        larger = [r for f, r in same if f > files]
        if not larger or any(f < files for f, _ in same):
            continue
        big = max(larger, key=lambda r: r["files"])
        growth.append(f"| {method} | {spec_cell(spec) + ' | ' if augmented else ''}{workers} | {crop:,} | "
                      f"{files:,} -> {big['files']:,} | "
                      f"{(big['peak_rss_bytes'] - small['peak_rss_bytes']) / MiB:+,.1f} | "
                      f"{(big['peak_pss_bytes'] - small['peak_pss_bytes']) / MiB:+,.1f} |")
    if growth:
        lines += ["", "Peak memory growth from the smallest to the largest corpus (same crop, samples, batch):", "",
                  f"| method | {aug_head}workers | crop | files | RSS growth MiB | PSS growth MiB |",
                  f"| --- | {aug_rule}--- | --- | --- | --- | --- |", *growth]
    if augmented:
        lines += folder_growth(rows)
    for crop in sorted({r["crop"] for r in rows}):
        short = max(r["clips_shorter_than_crop"] for r in rows if r["crop"] == crop)
        if short >= 0.5:
            lines += ["", f"At crop {crop:,}, {short:.0%} of the training clips are shorter than the crop: both methods "
                      "then decode the whole file and tile it, so any difference between them there does not come from "
                      "how much audio is decoded."]
    intro, steps = step_demand(results)
    if augmented:
        lines += ["", *affordability(rows, intro, steps)]
    else:
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
    synthetic = list(dict.fromkeys(f["synthetic"] for r in rows for f in r.get("augment_folders", []) if f["synthetic"]))
    if synthetic:
        lines += ["", "The noise and RIR folders are synthetic, written by `--make-noise` (commands below): coloured "
                  "noise (white, pink, brown, hum) of 1-10 s and exponentially decaying noise of 0.3-1 s with a "
                  "direct-path impulse as RIRs, 16 kHz FLAC. They cost what files of those lengths cost to read, "
                  "not what MUSAN or RIRS_NOISES would teach a model."]
    lines += ["", "Commands:", ""]
    commands = list(dict.fromkeys(r["command"] for r in rows))
    lines += [f"    {c}" for c in [*corpus_commands(commands), *synthetic, *commands, *([command] if command else [])]]
    return "\n".join(lines) + "\n"


def folder_growth(rows: list[dict[str, Any]]) -> list[str]:
    """Peak memory against the size of the noise/RIR folder, between runs that differ only in the folder."""
    groups: dict[tuple[str, int, int, int, str], dict[int, dict[str, Any]]] = {}
    for r in rows:
        n = sum(f["files"] for f in r.get("augment_folders", []))
        if n:
            key = (r["method"], r["workers"], r["files"], r["crop"], folder_template(r["augment"]))
            groups.setdefault(key, {})[n] = r
    out = []
    for (method, workers, files, crop, template), by_n in sorted(groups.items()):
        if len(by_n) < 2:
            continue
        small, big = by_n[min(by_n)], by_n[max(by_n)]
        out.append(f"| {method} | `{template}` | {workers} | {crop:,} | {files:,} | {min(by_n):,} -> {max(by_n):,} | "
                   f"{small['peak_rss_bytes'] / MiB:,.1f} -> {big['peak_rss_bytes'] / MiB:,.1f} "
                   f"({(big['peak_rss_bytes'] - small['peak_rss_bytes']) / MiB:+,.1f}) | "
                   f"{small['peak_pss_bytes'] / MiB:,.1f} -> {big['peak_pss_bytes'] / MiB:,.1f} "
                   f"({(big['peak_pss_bytes'] - small['peak_pss_bytes']) / MiB:+,.1f}) | "
                   f"{small.get('augment_setup_s', 0):.2f} -> {big.get('augment_setup_s', 0):.2f} |")
    if not out:
        return []
    return ["", "Peak memory as the noise/RIR folder grows (same spec but its folder, same corpus, crop and workers; "
            "setup = parsing the spec, i.e. indexing the folder's headers):", "",
            "| method | augment | workers | crop | corpus files | folder files | peak RSS MiB | peak PSS MiB | "
            "setup s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |", *out]


def affordability(rows: list[dict[str, Any]], intro: str, steps: list[dict[str, Any]]) -> list[str]:
    """Per spec and crop, what feeding a training step costs: the step's samples/s over the augmented loader's
    samples/s on one core (workers 0: all reading and augmenting in the main process), i.e. the share of one
    core the data pipeline takes while training runs at the step's pace."""
    out, used = [], []
    for st in steps:
        same_crop = [r for r in rows if r["crop"] == st["crop"] and r["method"] == "lowmem"]
        if not same_crop:
            continue
        used.append(st)
        files = min(r["files"] for r in same_crop)
        same_crop = [r for r in same_crop if r["files"] == files]
        for spec in dict.fromkeys(r.get("augment", "") for r in same_crop):
            mine = [r for r in same_crop if r.get("augment", "") == spec]
            one = next((r for r in mine if r["workers"] == 0), None)
            best = max(mine, key=lambda r: r["samples_per_s"])
            single, share = (f"{one['samples_per_s']:,.1f}", f"{st['samples_per_s'] / one['samples_per_s']:.1%}") \
                if one else ("-", "-")
            out.append(f"| {st['model']} | {st['crop']:,} | {st['samples_per_s']:,.2f} | {spec_cell(spec)} | "
                       f"{single} | {best['samples_per_s']:,.1f} (workers {best['workers']}) | {share} |")
    if not out:
        return [intro.rstrip(":") + ": none at the crops measured here."]
    srcs = "; ".join(f"{st['model']} at crop {st['crop']:,} ({st['precision']}, on {st['device']}, "
                     f"`{Path(st['source']).with_suffix('.md')}`)" for st in used)
    return [f"{intro} {srcs}. The loader must supply the step's samples/s; the last column is the share of one core "
            "it then spends reading and augmenting (the step's rate over the loader's rate with workers 0). With "
            "workers 0 that is the time added to each step; with workers it is CPU time taken from the step's "
            "threads when both share the same cores, so on a small CPU it is roughly how much training slows.", "",
            "| model | crop | step samples/s | augment | loader samples/s, 1 core (workers 0) | best loader samples/s | "
            "share of one core to keep up |",
            "| --- | --- | --- | --- | --- | --- | --- |", *out]


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


NOISE_MARKER = ".lowmem-loader-noise.json"
"""Written last by :func:`make_noise` beside its noise/ and rirs/ folders: its parameters, and that it is synthetic."""
NOISE_KIND = "synthetic noise and RIRs (benchmarks/loader.py --make-noise)"


def make_noise_command(root: Path, params: dict[str, Any]) -> str:
    return (f"python benchmarks/loader.py --make-noise {shlex.quote(str(root))} --noise-files {params['noise_files']} "
            f"--rir-files {params['rir_files']}")


def _coloured_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """White, pink or brown noise, or mains hum with harmonics over a faint noise floor; unit RMS."""
    kind = rng.integers(4)
    if kind == 3:
        t = np.arange(n) / 16_000
        f0 = rng.choice([50.0, 60.0]) * rng.uniform(0.98, 1.02)
        x = sum(rng.uniform(0.2, 1.0) / k * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi)) for k in range(1, 8))
        x = x + 0.05 * rng.standard_normal(n)
    else:
        spectrum = np.fft.rfft(rng.standard_normal(n))
        f = np.maximum(np.fft.rfftfreq(n, 1 / 16_000), 20.0)
        x = np.fft.irfft(spectrum / f ** (kind / 2.0), n)  # power slope 0 (white), -1 (pink), -2 (brown)
    return x / max(np.sqrt(np.mean(np.square(x))), 1e-12)


def make_noise(root: Path, noise_files: int = 200, rir_files: int = 50, seed: int = 0) -> bool:
    """Synthetic stand-ins for a noise collection and an RIR set: ``root/noise`` holds ``noise_files`` FLACs of
    1-10 s of coloured noise at -35 to -10 dBFS RMS, ``root/rirs`` ``rir_files`` FLACs of 0.3-1 s: 0-20 ms of
    silence, a direct-path impulse, then Gaussian noise decaying exponentially (RT60 0.2-0.8 s). Kept when the
    folder already holds a set with the same parameters; returns whether it wrote one."""
    params = {"noise_files": noise_files, "rir_files": rir_files, "seed": seed, "version": 1}
    marker = root / NOISE_MARKER
    try:
        old = json.loads(marker.read_text())
    except (OSError, ValueError):
        old = None
    if old is not None and old.get("params") == params:
        return False
    if old is None and root.exists() and any(root.iterdir()):
        raise SystemExit(f"--make-noise {root}: folder exists and is not one --make-noise wrote; give a new one")
    for sub in ("noise", "rirs"):
        shutil.rmtree(root / sub, ignore_errors=True)
        (root / sub).mkdir(parents=True)
    marker.unlink(missing_ok=True)
    sr = 16_000
    for i in range(noise_files):
        rng = np.random.default_rng([seed, 0, i])
        x = _coloured_noise(int(rng.uniform(1.0, 10.0) * sr), rng) * 10 ** (rng.uniform(-35, -10) / 20)
        sf.write(root / "noise" / f"noise{i:05d}.flac", np.clip(x, -1, 1), sr, subtype="PCM_16")
    for i in range(rir_files):
        rng = np.random.default_rng([seed, 1, i])
        n, delay = int(rng.uniform(0.3, 1.0) * sr), int(rng.uniform(0.0, 0.02) * sr)
        t = np.arange(n - delay) / sr
        tail = rng.standard_normal(n - delay) * np.exp(-6.9 * t / rng.uniform(0.2, 0.8)) * rng.uniform(0.1, 0.5)
        tail[0] = 1.0
        h = np.concatenate([np.zeros(delay), tail])
        sf.write(root / "rirs" / f"rir{i:05d}.flac", 0.9 * h / np.max(np.abs(h)), sr, subtype="PCM_16")
    marker.write_text(json.dumps({"kind": NOISE_KIND, "params": params}) + "\n")
    return True


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
    p.add_argument("--augment", nargs="+", metavar="SPEC",
                   help="measure lowmem with each of these fit --augment specs in turn (\"\" or none: no "
                        "augmentation), e.g. \"\" rawboost:5 codec \"noise:dir=DIR/noise,snr=5-20\"")
    p.add_argument("--make-noise", type=Path, metavar="DIR",
                   help="write synthetic noise (DIR/noise) and RIR (DIR/rirs) folders for noise:/reverb: specs")
    p.add_argument("--noise-files", type=int, default=200, help="noise files of --make-noise (1-10 s each)")
    p.add_argument("--rir-files", type=int, default=50, help="RIR files of --make-noise (0.3-1 s each)")
    p.add_argument("--single", choices=METHODS, help=argparse.SUPPRESS)  # one configuration, in this process
    args = p.parse_args(argv)

    if args.single:
        print(json.dumps(measure(args.data, args.single, args.workers[0], args.crop, args.samples, args.batch,
                                 args.seed, augment=args.augment[0] if args.augment else "")))
        return
    if args.augment and args.reference:
        p.error("--augment measures the lowmem method only (what fit builds); drop --reference")
    if args.augment:
        try:  # a bad spec or a missing folder: one line now, not a traceback from every configuration
            for spec in args.augment:
                parse_spec(spec)
        except ValueError as exc:
            p.error(str(exc))
    if args.make_noise:
        t0 = time.perf_counter()
        wrote = make_noise(args.make_noise, args.noise_files, args.rir_files)
        print(f"synthetic noise ({args.noise_files:,} files) and RIRs ({args.rir_files:,}) at {args.make_noise}"
              f"{'' if wrote else ' (already there)'} ({time.perf_counter() - t0:.1f} s)")
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
            for spec in args.augment or [""]:
                for workers in args.workers:
                    runs = [measure_fresh(args.data, method, workers, args.crop, args.samples, args.batch, args.seed,
                                          spec) for _ in range(args.repeats)]
                    row = {**combine(runs), "command": command}
                    rows.append(row)
                    print(json.dumps(row) if args.json else plain_line(row, bool(args.augment)), flush=True)
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
    if not (args.make_corpus or args.make_noise or args.data or args.markdown):
        p.error("nothing to do: give --data, --make-corpus, --make-noise or --markdown")


if __name__ == "__main__":
    main()
