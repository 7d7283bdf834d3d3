"""Loading a split for streaming: one resampling note per corpus, in the trainer's output once."""

from __future__ import annotations

import dataclasses

import numpy as np
import soundfile as sf
from rich.console import Console

from lowmem_aasist.config import load_config
from lowmem_aasist.data.corpora import read_split
from lowmem_aasist.data.demo import make_demo_corpus
from lowmem_aasist.data.load import load_split, resampling_note
from lowmem_aasist.train import fit


def test_resampling_note_counts_rates_over_the_whole_corpus(tmp_path):
    root = make_demo_corpus(tmp_path / "la", n_train=4, n_dev=2, n_eval=2, seed=1, workers=1)
    assert resampling_note([load_split(root, "train").split]) is None
    for path in list(read_split(root, "train").path)[:2] + list(read_split(root, "dev").path)[:1]:
        x, _ = sf.read(path, dtype="float32")
        sf.write(path, np.repeat(x, 2)[: len(x) * 2], 32_000)
    note = resampling_note([load_split(root, "train").split, load_split(root, "dev").split])
    assert note == "audio not at 16 kHz (3 at 32,000 Hz): resampled to 16 kHz on the fly with soxr"


def test_fit_prints_the_resampling_note_once(tmp_path):
    root = make_demo_corpus(tmp_path / "la", n_train=8, n_dev=4, n_eval=2, seed=1, workers=1)
    for path in read_split(root, "train").path:
        x, _ = sf.read(path, dtype="float32")
        sf.write(path, x, 22_050)  # a different rate: every file resampled, one note
    cfg = load_config("demo", {"data.root": str(root), "train.crop": 4000, "train.batch": 4, "train.workers": 0,
                               "train.max_steps": 2, "data.eval_samples": 4000})
    console = Console(record=True, width=200)
    fit(dataclasses.replace(cfg), tmp_path / "run", console=console)
    assert console.export_text().count("resampled to 16 kHz") == 1
