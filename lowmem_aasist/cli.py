"""The ``lowmem-aasist`` command: parse arguments, call the library, format results. No training logic here."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from rich.console import Console
from rich.table import Table

from . import __version__
from .config import checkpoint_policies
from .data.corpora import LAYOUTS, PHASES
from .data.split import CROP_FROM
from .memory.plan import OPTIMIZERS, PRECISIONS
from .scorefiles import ASVSPOOF5_HEADER, SCORE_LAYOUTS

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CLIError(Exception):
    """A usage problem: printed as one line on stderr, exit 2."""


def _stderr() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _stdout() -> Console:
    # Piped output gets a wide fixed width so table rows (long paths) stay on one line for grep and logs.
    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=240)


def default_demo_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lowmem-aasist" / "demo"


# --- score -----------------------------------------------------------------------------------------------------


def _calibration(args: argparse.Namespace):
    from .scorefiles import read_calibration

    return read_calibration(args.calibration) if args.calibration else None


def cmd_score(args: argparse.Namespace) -> int:
    from .audio import list_audio_files
    from .detection import bayes_threshold
    from .memory.device import resolve_device
    from .models import load
    from .scoring import score_files

    calibration = _calibration(args)  # a bad file fails before the model loads
    # A calibrated score is an LLR: the Bayes decision for the spoof prior it was fitted for; a raw logit: 0.
    threshold = bayes_threshold(calibration.p_spoof) if calibration else 0.0
    device = resolve_device(args.device)
    model, family = load(args.weights, args.model, map_location=device)
    model = model.to(device)
    paths: list[Path] = []
    err = _stderr()
    failed = 0
    for given in args.paths:
        p = Path(given)
        if p.is_dir():
            found = list_audio_files(p)
            if not found:
                err.print(f"{p}: no audio files in this folder")
                failed += 1
            paths += found
        else:
            paths.append(p)  # missing or unreadable files are reported by the scorer, in order

    out = _stdout()
    what = "LLR, calibrated" if calibration else "bona fide logit"
    table = Table("file", "score", "windows", "verdict", title=f"{family.name} scores ({what})")
    if args.format == "asvspoof5":
        print(ASVSPOOF5_HEADER, flush=True)
    for result in score_files(model, paths, device, full=args.full, batch=args.batch):
        if result.error:
            failed += 1
            err.print(f"error: {result.error}")
            continue
        score = float(calibration.llr(result.score)) if calibration else result.score
        if args.format == "asvspoof5":
            print(f"{result.path}\t{score:.6f}", flush=True)
        elif args.format == "json":
            print(json.dumps({"path": result.path, "score": round(score, 6), "windows": result.windows,
                              "model": family.name, "calibrated": calibration is not None}), flush=True)
        else:
            table.add_row(result.path, f"{score:.6f}", str(result.windows), "bona fide" if score > threshold else "spoof")
    if args.format == "table" and table.row_count:
        out.print(table)
        out.print(f"verdict: bona fide when the LLR exceeds {threshold:.4f}, the Bayes decision at spoof prior "
                  f"{calibration.p_spoof}" if calibration else
                  "score > 0 means the model prefers bona fide; the EER threshold of a trained model is usually not 0.")
    return EXIT_FAILED if failed else EXIT_OK


# --- demo-data -------------------------------------------------------------------------------------------------


def _generate_demo(root: Path, console: Console, **params) -> Path:
    from .data.demo import demo_corpus_ready, ensure_demo_corpus
    from .progress import progress_bar

    if demo_corpus_ready(root, **params):
        console.print(f"demo corpus: using {root}")
        return root
    t0 = time.perf_counter()
    total = params["n_train"] + params["n_dev"] + params["n_eval"]
    try:
        with progress_bar(console, "demo corpus", total) as bar:
            ensure_demo_corpus(root, progress=lambda done, _total: bar.advance(1), **params)
    except FileExistsError:
        raise CLIError(f"{root}: folder exists and is not a demo corpus; give an empty or new folder") from None
    except ValueError as exc:
        raise CLIError(f"demo corpus: {exc}") from None
    console.print(f"demo corpus: {total} utterances written to {root} in {time.perf_counter() - t0:.1f} s")
    return root


def cmd_augment_preview(args: argparse.Namespace) -> int:
    from .augment.base import parse_spec
    from .augment.preview import preview

    if args.n < 1:
        raise CLIError(f"--n {args.n}: write at least 1 version")
    audio = Path(args.audio)
    if not audio.is_file():
        raise CLIError(f"{audio}: no such audio file")
    chain = parse_spec(args.augment)
    if not chain:
        raise CLIError("--augment none: nothing to preview; give a spec such as rawboost:5")
    result = preview(audio, chain, args.n, Path(args.out), args.seed)
    console = _stdout()
    for path, clipped in zip(result.flacs, result.clipped, strict=True):
        note = f" ({clipped:,} samples clipped to [-1, 1] in the file; training sees them unclipped)" if clipped else ""
        console.print(f"wrote {path}{note}", highlight=False)
    console.print(f"wrote {result.png}" if result.png else "no PNG: pip install matplotlib to draw the spectrograms",
                  highlight=False)
    return EXIT_OK


def cmd_demo_data(args: argparse.Namespace) -> int:
    _generate_demo(Path(args.dir), _stdout(), n_train=args.n_train, n_dev=args.n_dev,
                   n_eval=args.n_eval, seed=args.seed, workers=args.workers)
    return EXIT_OK


# --- fit -------------------------------------------------------------------------------------------------------


def _fit_overrides(args: argparse.Namespace) -> dict:
    pairs = {
        "model.name": args.model,
        "model.ssl_weights": args.ssl_weights,
        "model.ssl_weights_trusted": args.ssl_weights_trusted,
        "train.epochs": args.epochs,
        "train.max_steps": args.max_steps,
        "train.batch": args.batch,
        "train.crop": args.crop,
        "train.crop_from": args.crop_from,
        "train.seed": args.seed,
        "train.lr": args.lr,
        "train.precision": args.precision,
        "train.workers": args.workers,
        "train.save_every": args.save_every,
        "train.sync_bn": args.sync_bn,
        "data.root": args.data,
        "data.layout": args.layout,
        "data.max_bad": args.max_bad,
        "data.augment": None if args.augment is None else "" if args.augment.strip().lower() in ("none", "off") else args.augment,
        "memory.budget": args.budget,
        "memory.checkpoint": args.checkpoint,
        "memory.optimizer": args.optimizer,
        "memory.micro_batch": args.micro_batch,
        "memory.optimizer_in_backward": args.optimizer_in_backward,
    }
    return {k: v for k, v in pairs.items() if v is not None}


def _resume_config(args: argparse.Namespace):
    """A resumed run's config: what it was trained with (its config.json), then whatever the command line says.

    The run's own config is the base, not a profile: an option left out of the resume command keeps the run's
    value, and one given with the run's own value changes nothing, so the first command plus ``--resume`` works.
    A profile is applied only when named; ``fit`` then refuses whatever differs and changes the result."""
    from .config import config_from_dict, load_config

    saved_path = Path(args.out) / "config.json"
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, ValueError):
        raise CLIError(f"--resume: {saved_path} not found or unreadable; --out must be the folder of a run to continue") from None
    saved.pop("resolved", None)
    return load_config(args.profile, _fit_overrides(args), base=config_from_dict(saved, str(saved_path)))


def _demo_root(args: argparse.Namespace, cfg, console: Console) -> Path:
    """The demo corpus folder, generated once (rank 0 under torchrun; the other ranks wait for it)."""
    d = cfg.demo
    root = Path(args.demo_dir or d.cache or default_demo_dir())
    params = dict(n_train=d.n_train, n_dev=d.n_dev, n_eval=d.n_eval, seed=d.seed)
    if os.environ.get("RANK", "0") == "0":
        _generate_demo(root, console, **params, workers=2)
    else:
        from .data.demo import demo_corpus_ready

        while not demo_corpus_ready(root, **params):
            time.sleep(1.0)
    return root


def _fit_config(args: argparse.Namespace, console: Console):
    from .config import load_config
    from .models import FAMILIES

    if args.demo and args.data:
        raise CLIError("fit: give one of --data ROOT (a corpus with train and dev splits) or --demo, not both")
    if args.resume:
        if not args.out:
            raise CLIError("fit --resume: give --out, the folder of the run to continue")
        cfg = _resume_config(args)
    else:
        if not (args.demo or args.data):
            raise CLIError("fit: give exactly one of --data ROOT (a corpus with train and dev splits) or --demo")
        family = FAMILIES.get(args.model or next(iter(FAMILIES)))
        profile = args.profile or ("demo" if args.demo else family.profile)
        cfg = load_config(profile, _fit_overrides(args))
    if args.demo:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(_demo_root(args, cfg, console))))
    return cfg


def cmd_fit(args: argparse.Namespace) -> int:
    from .train import fit

    # Under torchrun only rank 0 speaks; the others train silently.
    console = _stdout() if os.environ.get("RANK", "0") == "0" else Console(quiet=True)
    cfg = _fit_config(args, console)
    out = Path(args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    result = fit(cfg, out, device=args.device, console=console, resume=args.resume)

    from .memory.budget import format_bytes

    eers = ", ".join(f"{e:.2f}" for e in result.dev_eers)
    resumed = f" (resumed at step {result.resumed_from:,})" if result.resumed_from else ""
    console.print(
        f"\ndone: {result.steps} steps, {result.epochs} epochs in {result.wall_s:.0f} s on {result.device} "
        f"({result.precision}){resumed}; dev EER per evaluation (%): {eers}; best {result.best_eer:.2f}% at epoch "
        f"{result.best_epoch}"
    )
    if result.peak_bytes:
        what = "GPU memory (NVML)" if result.device.startswith("cuda") else "resident memory"
        planned = f" against a predicted {format_bytes(result.predicted_peak_bytes)}" if result.predicted_peak_bytes else ""
        console.print(f"peak {what}: {format_bytes(result.peak_bytes)}{planned}")
    files = "config.json, metrics.jsonl, scores/dev.txt, checkpoints/best.pt, last.pt"
    files += "".join(f", {png}" for png in ("training.png", "dev_det.png") if (out / png).is_file())
    console.print(f"run folder: {out} ({files})")
    best = out / "checkpoints" / "best.pt"
    console.print("next:")
    console.print(f"  lowmem-aasist eval --data {cfg.data.root} --split eval --weights {best}   # EER on the eval split")
    console.print(f"  lowmem-aasist score AUDIO... --weights {best}")
    console.print("  lowmem-aasist probe --budget 6GB   # plan the paper's recipe for your GPU")
    return EXIT_OK


# --- probe -----------------------------------------------------------------------------------------------------


def _describe_device(facts) -> str:
    from .memory.budget import format_bytes

    what = "available" if facts.kind == "cpu" else "free"
    cc = f", compute capability {facts.compute_capability[0]}.{facts.compute_capability[1]}" if facts.compute_capability else ""
    return (f"{facts.kind}: {facts.name}{cc}; {format_bytes(facts.total_bytes)} total, {format_bytes(facts.free_bytes)} "
            f"{what} (from {facts.source}); native bf16: {'yes' if facts.native_bf16 else 'no'}")


def _describe_plan(plan) -> str:
    return (f"micro-batch {plan.micro_batch} x accumulation {plan.grad_accum} = {plan.effective_batch}, crop {plan.crop:,}, "
            f"{plan.precision}, checkpoint {plan.checkpoint}, optimizer {plan.optimizer}")


def cmd_probe(args: argparse.Namespace) -> int:
    from .config import load_config
    from .memory.budget import format_bytes
    from .memory.device import resolve_device
    from .memory.engine import plan_run
    from .models import get_family
    from .progress import progress_bar
    from .train.setup import synthetic_data_path

    device = resolve_device(args.device)
    recipe = load_config(get_family(args.model).profile).train  # what --batch and --crop default to
    batch, crop = args.batch or recipe.batch, args.crop or recipe.crop
    data_path = synthetic_data_path(args.augment, crop, batch)  # a bad spec stops here, before any calibration
    out = _stdout()
    with progress_bar(_stderr(), "calibrating", None) as bar:
        run = plan_run(args.model, device, args.budget, batch, crop, args.precision, args.checkpoint,
                       args.optimizer, args.micro_batch,
                       on_progress=lambda t: bar.advance(1, status=f"{t.precision} {t.checkpoint}"),
                       data_path=data_path)
    for warning in run.warnings:
        _stderr().print(f"warning: {warning}")
    if args.json:
        print(json.dumps(run.to_dict()))
        return EXIT_OK
    plan = run.plan
    out.print(_describe_device(run.facts))
    out.print(f"budget: {format_bytes(run.budget_bytes)} (--budget {args.budget}; GB means GiB)")
    out.print(f"plan: {_describe_plan(plan)}")
    out.print(f"predicted peak: {format_bytes(plan.predicted_peak_bytes)} of {format_bytes(run.budget_bytes)} "
              f"({100 * plan.predicted_peak_bytes / run.budget_bytes:.0f}%)")
    for note in plan.notes:
        out.print(f"[bold yellow]note:[/bold yellow] {note}")
    from .memory.engine import label

    for key, o in run.calibration.overheads.items():
        out.print(f"overheads ({label(key)}): {format_bytes(o.base_bytes)} fixed + {format_bytes(int(o.per_sample_bytes))} "
                  f"per sample, {100 * o.slack_fraction:.0f}% allocator slack")
    if run.calibration.skipped:
        names = ", ".join(label((t.precision, t.checkpoint)) for t in run.calibration.skipped)
        out.print(f"not measured: {names} (even at its largest micro-batch it could not beat the plan)")
    out.print(f"  ({run.calibration.note})")
    table = Table("micro x accum", "crop", "precision", "checkpoint", "optimizer", "predicted peak", "relative cost",
                  title="candidates that fit (best first)")
    for c in run.candidates:
        table.add_row(f"{c.micro_batch} x {c.grad_accum}", f"{c.crop:,}", c.precision, c.checkpoint, c.optimizer,
                      format_bytes(c.predicted_peak_bytes), f"{c.relative_cost:.3f}")
    out.print(table)
    if args.explain:
        from .memory.explain import explain

        explain(args.model, crop, out)
    return EXIT_OK


# --- check-data ------------------------------------------------------------------------------------------------


def cmd_check_data(args: argparse.Namespace) -> int:
    from .data.check import absent_line, check_data

    err = _stderr()
    report = check_data(args.data, args.layout, args.phase, args.deep, max(1, args.workers), err)
    if args.json:
        print(json.dumps(report))
        return EXIT_FAILED if report["problems"] else EXIT_OK
    out = _stdout()
    out.print(f"{args.data}: layout {report['layout']}" + (" (every file decoded)" if args.deep else " (headers checked)"))
    table = Table("split", "files", "bona fide", "spoof", "attacks", "hours", "sample rates", "problems")
    for name, s in report["splits"].items():
        attacks = ", ".join(f"{a} {n:,}" for a, n in s["attacks"].items())
        rates = ", ".join(f"{int(r):,} Hz: {n:,}" for r, n in s["sample_rates"].items())
        bona = f"{s['bonafide']:,}" + (f" (+{s['unlabeled']:,} unlabeled)" if "unlabeled" in s else "")
        table.add_row(name, f"{s['files']:,}", bona, f"{s['spoof']:,}", attacks or "-", f"{s['hours']:.2f}", rates or "-",
                      f"{s['problems']:,}")
    out.print(table)
    if note := absent_line(report):  # a partial copy is normal: said once, not a problem
        out.print(note, markup=False, soft_wrap=True)
    for p in report["problems"]:
        out.print(f"{p['split']}: {p['path']}: {p['error']}")
    if report["problems"]:
        out.print(f"{len(report['problems']):,} problem(s); training skips these files (fit --max-bad sets how many it accepts)")
        return EXIT_FAILED
    out.print("no problems found" + ("" if args.deep else " (--deep also decodes every file)"))
    return EXIT_OK


# --- eval ------------------------------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import run_eval
    from .metrics import format_evaluation

    out = _stdout()
    result = run_eval(args.data, args.weights, split=args.split, layout=args.layout, phase=args.phase,
                      out=Path(args.out) if args.out else None, budget=args.budget, device=args.device,
                      precision=args.precision, batch=args.batch, workers=args.workers,
                      asv_scores=Path(args.asv_scores) if args.asv_scores else None, console=out, model=args.model,
                      score_layout=args.format, calibration=_calibration(args))
    resumed = f", {result.resumed:,} of them from an interrupted run" if result.resumed else ""
    out.print(f"scored {result.scored:,} utterances{resumed} in {result.seconds:.0f} s (batch {result.batch}); "
              f"skipped {result.skipped:,}; scores: {result.scores_path}")
    if result.metrics is not None:
        out.print(format_evaluation(result.metrics), highlight=False, markup=False)
    else:
        out.print("no EER: the split has no keys (or only one class); the score file can be evaluated once keys exist")
    return EXIT_FAILED if result.skipped else EXIT_OK


# --- evaluate --------------------------------------------------------------------------------------------------


def _read_for_evaluation(args: argparse.Namespace):
    from .scorefiles import read_calibration, read_scores

    cm = read_scores(args.scores, args.keys)
    return read_calibration(args.calibration).apply(cm) if getattr(args, "calibration", None) else cm


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .metrics import evaluate, format_evaluation, read_asv_scores
    from .report import plot_det, plot_histograms

    if bool(args.scores) == bool(args.sasv):
        raise CLIError("evaluate: give one of --scores (a CM score file) or --sasv (an ASVspoof 5 Track 2 file)")
    if args.sasv:
        return _evaluate_sasv(args)
    cm = _read_for_evaluation(args)
    asv = read_asv_scores(args.asv_scores) if args.asv_scores else None
    try:
        result = evaluate(cm, asv, by=args.by)
    except ValueError as e:
        raise CLIError(f"evaluate: {e}") from None
    if args.json:
        print(json.dumps(result))
    else:
        _stdout().print(format_evaluation(result), highlight=False, markup=False)
    if args.plot:
        plots = Path(args.plot)
        bona, spoof = cm.by_class()
        drawn = (plot_det(bona, spoof, plots / "det.png", f"DET: {Path(args.scores).name}")
                 and plot_histograms(bona, spoof, plots / "scores.png", f"scores: {Path(args.scores).name}"))
        _stderr().print(f"wrote {plots / 'det.png'} and {plots / 'scores.png'}" if drawn
                        else "no plots: pip install matplotlib to draw them")
    return EXIT_OK


def _evaluate_sasv(args: argparse.Namespace) -> int:
    from .metrics import evaluate_sasv
    from .scorefiles import read_sasv

    if not args.keys:
        raise CLIError("evaluate --sasv: give --keys, the Track 2 key file ('spk filename cm-label asv-label')")
    trials = read_sasv(args.sasv, args.keys)
    try:
        result = evaluate_sasv(trials)
    except ValueError as e:  # a trial type with no trials
        raise CLIError(f"evaluate --sasv: {e}") from None
    if args.json:
        print(json.dumps(result))
        return EXIT_OK
    teer = "not computed (the file has '-' CM or ASV scores)" if result["t_eer"] is None else f"{result['t_eer']:.4f} %"
    c = result["counts"]
    _stdout().print(f"min a-DCF: {result['a_dcf']:.5f}\nt-EER: {teer}\ntrials: {c['target']} target, "
                    f"{c['nontarget']} non-target, {c['spoof']} spoof", highlight=False, markup=False)
    return EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .detection import cllr, effective_prior, fit_calibration
    from .scorefiles import Calibration, write_calibration

    cm = _read_for_evaluation(args)
    bona, spoof = cm.by_class()
    if not (bona.size and spoof.size):
        raise CLIError(f"calibrate: {args.scores} needs both bona fide and spoof trials to fit a calibration")
    if not 0 < args.prior < 1:
        raise CLIError(f"calibrate --prior {args.prior}: the spoof prior must lie strictly between 0 and 1")
    prior = effective_prior(args.prior)
    a, b = fit_calibration(bona, spoof, prior)
    cal = Calibration(a, b, args.prior, str(args.scores))
    after = cal.apply(cm)
    before_cllr, after_cllr = cllr(bona, spoof), cllr(*after.by_class())
    write_calibration(Path(args.out), cal, {"effective_bonafide_prior": prior, "trials": int(cm.key.size),
                                            "cllr_before": before_cllr, "cllr_after": after_cllr})
    _stdout().print(f"calibration: llr = {a:.6g} x score + {b:.6g} (spoof prior {args.prior}, effective bona fide "
                    f"prior {prior:.4f}); Cllr on these scores {before_cllr:.4f} -> {after_cllr:.4f} bits; "
                    f"wrote {args.out}", highlight=False)
    return EXIT_OK


# --- parser ----------------------------------------------------------------------------------------------------

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "score": cmd_score,
    "fit": cmd_fit,
    "demo-data": cmd_demo_data,
    "augment-preview": cmd_augment_preview,
    "probe": cmd_probe,
    "check-data": cmd_check_data,
    "eval": cmd_eval,
    "evaluate": cmd_evaluate,
    "calibrate": cmd_calibrate,
}


def _add_score(sub: argparse._SubParsersAction, models: list[str]) -> None:
    p = sub.add_parser("score", help="score audio files with a trained model (bona fide logit)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="audio files or folders (any format soundfile reads)")
    p.add_argument("--weights", required=True, help="published weights (AASIST.pth) or a run's checkpoint (best.pt)")
    p.add_argument("--model", default="auto", choices=["auto", *models],
                   help="auto recognises the model by its tensor names and shapes (default)")
    p.add_argument("--full", action="store_true",
                   help="score the whole recording: reference-length windows at 50%% overlap (AASIST: 64,600 samples "
                        "every 32,300), mean logit (default: the reference input, AASIST's first 64,600 samples, "
                        "short clips tiled)")
    p.add_argument("--json", dest="format", action="store_const", const="json", default="table",
                   help="one JSON object per file per line")
    p.add_argument("--format", default="table", choices=["table", "json", "asvspoof5"],
                   help="table (default), json, or asvspoof5 (a 'filename<tab>cm-score' header, then a line per file)")
    p.add_argument("--calibration", help="a file from 'lowmem-aasist calibrate': print LLRs and decide at its prior")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--batch", type=int, default=8, help="clips (or windows) per forward pass (default 8)")


def _add_fit(sub: argparse._SubParsersAction, models: list[str], policies: tuple[str, ...]) -> None:
    p = sub.add_parser("fit", help="train on a corpus with train and dev splits (--data) or the built-in demo (--demo)")
    p.add_argument("--data", help="corpus folder: ASVspoof 2019 LA or ASVspoof 5 (the layout is recognised by its files)")
    p.add_argument("--layout", choices=["auto", *LAYOUTS], help="force the corpus layout (default: recognised)")
    p.add_argument("--max-bad", help="stop before training when more of a split is missing or unreadable: a "
                                     "percentage (default 5%%) or a count")
    p.add_argument("--augment", metavar="SPEC",
                   help="training augmentation, e.g. rawboost:5 or rawboost:5+codec:p=0.5 or "
                        "noise:dir=~/musan,snr=5-20,p=0.6; none turns a profile's off (docs/augmentation.md)")
    p.add_argument("--demo", action="store_true", help="generate (once) and train on the synthetic demo corpus")
    p.add_argument("--demo-dir", help=f"where the demo corpus is cached (default {default_demo_dir()})")
    p.add_argument("--profile", help="TOML profile: a path or a name in profiles/ (default: the model's published "
                                     "recipe, or demo with --demo)")
    p.add_argument("--model", choices=models, help=f"model (overrides the profile; default {models[0]})")
    p.add_argument("--ssl-weights", metavar="SOURCE",
                   help="XLSR-AASIST: initialise the wav2vec 2.0 front end from a fairseq xlsr2_300m.pt, a fine-tuned "
                        "SSL_Anti-spoofing checkpoint, a Hugging Face folder or hub id (pip install -e '.[ssl]')")
    p.add_argument("--ssl-weights-trusted", action="store_true", default=None,
                   help="unpickle the --ssl-weights file fully (only for a file you trust)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--batch", type=int, help="utterances per optimizer step (paper: 24)")
    p.add_argument("--crop", type=int, help="training crop in samples at 16 kHz (paper: 64600)")
    p.add_argument("--crop-from", choices=CROP_FROM,
                   help="where the training crop starts: random (AASIST's recipe) or start, the first --crop samples "
                        "of each recording (SSL_Anti-spoofing's; the xlsr-aasist profile sets it)")
    p.add_argument("--lr", type=float, help="peak learning rate (paper: 1e-4)")
    p.add_argument("--precision", choices=["auto", *PRECISIONS])
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, help="data-loading processes (default: from the cores)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--out", help="run folder (default runs/<timestamp>); must be new or empty unless --resume")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from checkpoints/last.pt (exactly: same weights as never stopping); "
                        "its config comes from the run folder: the first command plus --resume works, and options "
                        "given with other values may change the budget, device, workers, data location and "
                        "--max-steps only")
    p.add_argument("--sync-bn", action="store_true", default=None,
                   help="under torchrun: synchronise BatchNorm across processes (default: per process, as the reference)")
    p.add_argument("--save-every", type=int, help="save last.pt every N steps (default: every 5 minutes, and each epoch)")
    p.add_argument("--budget", help="plan within this memory (6GB, 6.5GiB, 6144MB; GB = GiB = 2^30 bytes) or auto; "
                                    "--batch is then the effective batch, split into micro-batch x accumulation")
    p.add_argument("--checkpoint", choices=["auto", *policies],
                   help="activation checkpointing policy (default: the planner's choice with --budget, else none)")
    p.add_argument("--optimizer", choices=["auto", *OPTIMIZERS])
    p.add_argument("--micro-batch", type=int, help="utterances per forward pass; must divide --batch")
    p.add_argument("--optimizer-in-backward", action="store_true", default=None,
                   help="update each parameter in backward as soon as its gradient is complete and free the gradient "
                        "(exact; saves the gradients' memory at accumulation 1; not with fp16 or torchrun)")


def _add_demo_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-data", help="write the synthetic demo corpus (ASVspoof 2019 LA layout) into DIR")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--n-train", type=int, default=800)
    p.add_argument("--n-dev", type=int, default=200)
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="processes generating audio (output is identical for any)")


def _add_augment_preview(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("augment-preview", help="write augmented versions of one recording (FLAC) and their "
                                               "spectrograms (PNG), to hear and see a spec before training")
    p.add_argument("audio", metavar="AUDIO")
    p.add_argument("--augment", required=True, metavar="SPEC", help="as fit --augment, e.g. rawboost:5+codec")
    p.add_argument("--n", type=int, default=4, help="versions to write (default 4)")
    p.add_argument("--out", required=True, help="folder for the FLAC files and the PNG")
    p.add_argument("--seed", type=int, default=0, help="the same seed writes the same versions")


def _add_probe(sub: argparse._SubParsersAction, models: list[str], policies: tuple[str, ...]) -> None:
    p = sub.add_parser("probe", help="read the device, predict peak memory and print a plan that fits the budget")
    p.add_argument("--budget", default="auto",
                   help="memory to plan for: a size like 6GB, 6.5GiB, 6144MB (GB = GiB = 2^30 bytes: a '6 GB' card "
                        "has 6,144 MiB), or auto = free memory minus a safety margin (default)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--model", default=models[0], choices=models)
    p.add_argument("--batch", type=int, help="effective batch to keep (default: the model's recipe; AASIST: 24)")
    p.add_argument("--crop", type=int, help="training crop in samples (default: the model's recipe; AASIST: 64600)")
    p.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS])
    p.add_argument("--checkpoint", default="auto", choices=["auto", *policies])
    p.add_argument("--optimizer", default="adam", choices=["auto", *OPTIMIZERS])
    p.add_argument("--micro-batch", type=int, default=0, help="force the micro-batch (must divide --batch)")
    p.add_argument("--json", action="store_true", help="one JSON object: device, budget_bytes, plan, candidates")
    p.add_argument("--explain", action="store_true", help="where memory goes, per module, and what each technique saves")
    p.add_argument("--augment", default="", metavar="SPEC",
                   help="the augmentation fit will run (as fit --augment): on a CPU, where fit reads and augments in "
                        "the training process, its memory is counted in the plan and its time reported")


def _add_check_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-data", help="count a corpus (per split, per attack, hours) and find bad audio")
    p.add_argument("--data", required=True, help="corpus folder or list file")
    p.add_argument("--layout", default="auto", choices=["auto", *LAYOUTS], help="force the layout (default: recognised)")
    p.add_argument("--phase", default="eval", choices=PHASES,
                   help="ASVspoof 2021 only: which phase's trials (default eval)")
    p.add_argument("--deep", action="store_true", help="decode every file in full (truncation, NaN/Inf samples)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding threads for --deep")
    p.add_argument("--json", action="store_true", help="one JSON object: layout, splits, problems")


def _add_eval(sub: argparse._SubParsersAction, models: list[str]) -> None:
    p = sub.add_parser("eval", help="score a whole split of a corpus with a model and report EER (resumable)")
    p.add_argument("--data", required=True, help="corpus folder or list file (any layout check-data knows)")
    p.add_argument("--weights", required=True, help="published weights or a run's checkpoint (best.pt)")
    p.add_argument("--split", default="eval", help="split to score (default eval)")
    p.add_argument("--layout", default="auto", choices=["auto", *LAYOUTS], help="force the layout (default: recognised)")
    p.add_argument("--phase", default="eval", choices=PHASES,
                   help="ASVspoof 2021 only: which phase's trials (default eval)")
    p.add_argument("--out", help="score file (default scores-<layout>-<split>.txt); an interrupted run continues it")
    p.add_argument("--model", default="auto", choices=["auto", *models])
    p.add_argument("--budget", default="auto", help="memory for scoring (6GB, auto); picks the batch")
    p.add_argument("--batch", type=int, default=0, help="utterances per forward pass (default: from the budget)")
    p.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS])
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--workers", type=int, default=-1, help="data-loading processes (default: from the cores)")
    p.add_argument("--asv-scores", help="ASV score file, for min t-DCF")
    p.add_argument("--format", default="2019", choices=SCORE_LAYOUTS,
                   help="score file layout: 2019 ('UTT ATTACK KEY SCORE', default) or asvspoof5 (its submission layout)")
    p.add_argument("--calibration", help="a file from 'lowmem-aasist calibrate': write (and evaluate) LLRs")


def _add_score_inputs(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--scores", required=required,
                   help="CM score file: 'UTT ATTACK bonafide|spoof SCORE' (2019), an ASVspoof 5 file (header "
                        "'filename<tab>cm-score') or 'TRIAL SCORE' (2021); the layout is recognised")
    p.add_argument("--keys", help="labels for a score file without them: an ASVspoof5.*.tsv protocol, a "
                                  "'filename cm-label' file or a 2021 trial_metadata.txt")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="EER, minDCF, actDCF, Cllr, min t-DCF, t-EER and per-condition tables of a "
                                        "score file (ASVspoof 2019, 2021 and 5 rules)")
    _add_score_inputs(p, required=False)
    p.add_argument("--sasv", help="instead of --scores: an ASVspoof 5 Track 2 file ('spk filename cm-score "
                                  "asv-score sasv-score'), for min a-DCF and t-EER; keys from --keys")
    p.add_argument("--asv-scores", help="ASV score file ('SPEAKER target|nontarget|spoof SCORE'), for min t-DCF "
                                        "and t-EER")
    p.add_argument("--by", help="break results down by attack, codec, condition (2021: C1..C9; ASVspoof 5: the "
                                "codec), transmission (2021 LA) or vocoder / source (2021 DF), as the keys allow")
    p.add_argument("--calibration", help="a file from 'lowmem-aasist calibrate': evaluate the scores as LLRs")
    p.add_argument("--plot", metavar="DIR", help="write det.png (DET curve, EER marked) and scores.png there")
    p.add_argument("--json", action="store_true", help="one JSON object (eer, min_dcf, act_dcf, cllr, min_cllr, "
                                                       "min_tdcf, t_eer, per_attack, counts, by)")


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="fit score -> log-likelihood ratio on dev scores (prior-weighted "
                                         "logistic regression); score, eval and evaluate take the file")
    _add_score_inputs(p)
    p.add_argument("--prior", type=float, default=0.05, help="spoof prior of the cost model (ASVspoof 5: 0.05); "
                                                             "the fit weighs the classes at its effective prior")
    p.add_argument("--out", required=True, help="the calibration file to write (JSON)")


class _Parser(argparse.ArgumentParser):
    """Bad usage is one line naming the option and where help is, not argparse's usage block before it."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


def get_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lowmem-aasist",
        description="Train and use AASIST anti-spoofing models within a memory budget.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    from .models import FAMILIES

    models, policies = list(FAMILIES), checkpoint_policies()
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_score(sub, models)
    _add_fit(sub, models, policies)
    _add_demo_data(sub)
    _add_augment_preview(sub)
    _add_probe(sub, models, policies)
    _add_check_data(sub)
    _add_eval(sub, models)
    _add_evaluate(sub)
    _add_calibrate(sub)

    assert set(sub.choices) == set(COMMANDS), "every subcommand needs a handler"
    return parser


DASHED_VALUES = ("--budget",)
"""Options whose value may start with a dash (``--budget -1GB``): argparse would take it for an option and print
its usage block; attached as ``--budget=-1GB`` the value reaches the option's own one-line check."""


def _attach_dashed_values(argv: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in DASHED_VALUES and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1] != "--":
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def _prestart_calibration(argv: list[str]) -> None:
    """A first CPU probe measures real steps in a server process that spends 3 s importing torch; start it before
    this process imports torch too (the parser needs the model registry), so the imports overlap. Read from the raw
    arguments, as the parser is not built yet; a wrong guess costs an idle process, never a wrong plan."""
    if not argv or argv[0] != "probe":
        return
    from .memory import calibrate

    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--device", default="auto")
    early.add_argument("--model", default="")
    known, _ = early.parse_known_args(argv[1:])
    if calibrate.likely_needed(known.device, known.model, calibrate.cache_path()):
        calibrate.prestart()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _prestart_calibration(argv)
    from .audio import AudioError
    from .augment.base import SpecError
    from .checkpoint import ResumeError
    from .config import ConfigError
    from .data.corpora import LayoutError, ProtocolError
    from .data.index import TooManyBadFiles
    from .evaluation import EvalResumeError
    from .interrupt import Interrupted
    from .memory.budget import BudgetError
    from .memory.calibrate import CalibrationError
    from .memory.device import DeviceError
    from .memory.optim import OptimizerError
    from .memory.plan import NoPlanError
    from .metrics import ScoreFileError
    from .models import MissingDependencyError, WeightsError
    from .train import RunFolderError

    args = get_parser().parse_args(_attach_dashed_values(argv))
    from .memory.enforce import enable_expandable_segments

    enable_expandable_segments()  # before anything touches CUDA
    usage_errors = (CLIError, ConfigError, DeviceError, RunFolderError, BudgetError, NoPlanError, OptimizerError,
                    LayoutError, ResumeError, EvalResumeError, SpecError, MissingDependencyError)
    try:
        return COMMANDS[args.command](args)
    except usage_errors as exc:
        _stderr().print(f"error: {exc}")
        return EXIT_USAGE
    except (WeightsError, ProtocolError, AudioError, TooManyBadFiles, ScoreFileError, CalibrationError) as exc:
        _stderr().print(f"error: {exc}")
        return EXIT_FAILED
    except Interrupted as exc:
        _stderr().print(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _stderr().print("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
