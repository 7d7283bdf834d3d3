"""What a run needs to continue exactly where it stopped: random-number states, and which config changes a resume
may not make.

A checkpoint holds only tensors and plain types, so every load can use ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESUME_MAY_CHANGE = frozenset({
    "train.workers", "train.max_steps", "train.log_every", "train.save_every", "train.sync_bn",
    "data.root", "data.layout", "data.max_bad", "data.dev_batch",
    "demo.cache", "memory.budget", "memory.checkpoint", "memory.optimizer", "memory.micro_batch",
    "memory.optimizer_in_backward",
})
"""Config keys a resumed run may change: where the data is, how it is read, logged and saved, and the memory plan
(re-planned; the effective batch is kept). Everything else (model, recipe, seed, epochs) defines the result."""


class ResumeError(Exception):
    """A run cannot be resumed as asked; one line."""


def rng_state() -> dict[str, Any]:
    """Every random-number state training can touch: Python, NumPy's global, torch CPU and each CUDA device."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return flat


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every result-defining key that differs between two ``Config.to_dict()``."""
    a, b = _flatten(saved), _flatten(current)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
            if k not in RESUME_MAY_CHANGE and a.get(k) != b.get(k)]


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A run checkpoint (weights_only); ResumeError naming the file when it is missing or unreadable."""
    if not path.is_file():
        raise ResumeError(f"{path}: no checkpoint to resume from (a run saves it at --save-every steps and each epoch end)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torn or foreign files: say which file, not a traceback
        raise ResumeError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(state, dict) or "position" not in state:
        raise ResumeError(f"{path}: not a lowmem-aasist run checkpoint (no data position)")
    return state
