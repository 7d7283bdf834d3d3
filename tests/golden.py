"""Golden logits: AASIST and AASIST-L on generated audio, kept in tests/fixtures/golden_logits.json.

``python tests/golden.py --write`` regenerates the fixture, and only while the published weights (../shared)
reproduce the published reference scores to TOLERANCE: the logits of the seeded random models it records then
carry that check to machines without ../shared (tests/test_model.py compares both). Without ``--write`` it prints
how far the current code is from the fixture.

Not collected by pytest (no test_ prefix); tests/test_model.py imports it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch import Tensor, nn

from lowmem_aasist.models import build_model, load_model

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "golden_logits.json"
MODELS = ("AASIST", "AASIST-L")
TOLERANCE = 1e-5  # on a logit; the published scores are reproduced to ~3e-6 (docs/data.md)
AUDIO_SEED, CLIPS, SAMPLES, SAMPLE_RATE = 2024, 3, 24_000, 16_000
INIT_SEED = 0
REFERENCE_SAMPLES = 64_600


def golden_audio() -> Tensor:
    """CLIPS seeded clips [CLIPS, SAMPLES] float32: three sines each, plus uniform noise.

    Computed in float64 and rounded once to float32, and the noise is uniform (no log/sin of random numbers in
    float32), so that the SIMD path a CPU happens to take cannot change a sample.
    """
    gen = torch.Generator().manual_seed(AUDIO_SEED)
    t = torch.arange(SAMPLES, dtype=torch.float64) / SAMPLE_RATE
    clips = []
    for _ in range(CLIPS):
        freqs = 80.0 + 3_920.0 * torch.rand(3, 1, generator=gen, dtype=torch.float64)
        amps = 0.05 + 0.25 * torch.rand(3, 1, generator=gen, dtype=torch.float64)
        phases = 2 * math.pi * torch.rand(3, 1, generator=gen, dtype=torch.float64)
        noise = 0.1 * (2 * torch.rand(SAMPLES, generator=gen, dtype=torch.float64) - 1)
        clips.append((amps * torch.sin(2 * math.pi * freqs * t + phases)).sum(0) + noise)
    return torch.stack(clips).float()


def random_model(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The seeded randomly initialised model whose logits the fixture records, in eval mode, with the BatchNorm
    statistics of one train-mode pass over :func:`golden_audio`.

    Fresh statistics (mean 0, variance 1) leave an untrained model nearly blind to its input: running the filter
    bank's sinc in float64 moved its logits by 6e-8, the published model's by 2e-5. With the audio's own statistics
    every layer's output depends on it (the same change then moves these logits by 4e-6 to 7e-6).
    """
    torch.manual_seed(INIT_SEED)
    model = build_model(name).to(dtype).train()
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.momentum = None  # a cumulative average over one batch: exactly that batch's statistics
        elif isinstance(module, nn.Dropout):
            module.eval()  # no masks: how bernoulli_ draws them differs between builds (MKL or not)
    with torch.no_grad():
        model(golden_audio().to(dtype))
    return model.eval()


def logits(model: nn.Module) -> Tensor:
    """The model's logits [CLIPS, 2] for :func:`golden_audio`, in the model's dtype."""
    with torch.no_grad():
        return model(golden_audio().to(next(model.parameters()).dtype))


def gap(a: Tensor | list, b: Tensor | list) -> float:
    """max |a - b|, in float64."""
    return (torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max().item()


def _reference_worst(shared: Path) -> float:
    """Largest |score - published score| over ../shared/reference/scores.jsonl, as tests/test_model.py checks it."""
    rows = [json.loads(line) for line in (shared / "reference" / "scores.jsonl").read_text().splitlines()]
    models = {name: load_model(shared / "weights" / f"{name}.pth").eval() for name in {r["model"] for r in rows}}
    worst = 0.0
    with torch.no_grad():
        for row in rows:
            x, _ = sf.read(shared / "reference" / row["file"], dtype="float32")
            x = np.tile(x, -(-REFERENCE_SAMPLES // len(x)))[:REFERENCE_SAMPLES]
            score = models[row["model"]](torch.from_numpy(x)[None])[0, 1].item()
            worst = max(worst, abs(score - row["score"]))
    return worst


def _without_onednn(make: Callable[[], nn.Module]) -> Tensor:
    # PyTorch's own convolution kernels instead of oneDNN's: a stand-in for another CPU's float32 rounding.
    torch.backends.mkldnn.enabled = False
    try:
        return logits(make())
    finally:
        torch.backends.mkldnn.enabled = True


def _floats(t: Tensor) -> list:
    # 9 significant digits give back every float32 exactly, in half the characters of repr(float).
    return np.vectorize(lambda v: float(f"{v:.9g}"))(t.double().numpy()).tolist()


def compute(shared: Path) -> dict:
    makers: dict[str, Callable[[], nn.Module]] = {}
    for n in MODELS:
        makers[f"published {n}"] = lambda n=n: load_model(shared / "weights" / f"{n}.pth").eval()
        makers[f"random {n}"] = lambda n=n: random_model(n)
    exact = {**{f"published {n}": makers[f"published {n}"]().double() for n in MODELS},
             **{f"random {n}": random_model(n, torch.float64) for n in MODELS}}
    out = {name: logits(make()) for name, make in makers.items()}
    return {
        "about": "logits [clip][class: 0 spoof, 1 bona fide] of tests/golden.py's models on its golden_audio(); "
        "regenerate with python tests/golden.py --write",
        "torch": torch.__version__,
        "tolerance": TOLERANCE,
        "audio": {
            "seed": AUDIO_SEED,
            "clips": CLIPS,
            "samples": SAMPLES,
            "sum_of_squares": [float(x.double().square().sum()) for x in golden_audio()],
        },
        "published": {n: _floats(out[f"published {n}"]) for n in MODELS},
        "random_init": {"seed": INIT_SEED, **{n: _floats(out[f"random {n}"]) for n in MODELS}},
        # The margin TOLERANCE leaves: float32 against float64, and oneDNN's kernels against PyTorch's own.
        "max_difference": {
            "float64": {name: gap(out[name], logits(exact[name])) for name in makers},
            "without_onednn": {name: gap(out[name], _without_onednn(make)) for name, make in makers.items()},
        },
    }


def main(argv: list[str] | None = None) -> int:
    from conftest import SHARED  # the tests' own idea of where ../shared is

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {FIXTURE}")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))  # as tests/conftest.py runs the tests
    worst = _reference_worst(SHARED)
    print(f"published reference scores reproduced to {worst:.3g}")
    if worst >= TOLERANCE:
        print(f"not within {TOLERANCE}: the model is not the published function; nothing written")
        return 1
    new = compute(SHARED)
    if FIXTURE.is_file():
        old = json.loads(FIXTURE.read_text())
        for group in ("published", "random_init"):
            for name in MODELS:
                print(f"{group} {name}: max |logit - fixture| = {gap(new[group][name], old[group][name]):.3g}")
    margins = new["max_difference"]
    print(json.dumps(margins, indent=1))
    if max(v for kind in margins.values() for v in kind.values()) > TOLERANCE / 2:
        print(f"float32 rounding alone moves a logit by more than {TOLERANCE / 2}: too close to the tolerance for "
              "other CPUs; nothing written")
        return 1
    if args.write:
        FIXTURE.parent.mkdir(exist_ok=True)
        FIXTURE.write_text(json.dumps(new, indent=1) + "\n")
        print(f"wrote {FIXTURE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
