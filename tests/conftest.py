"""Shared fixtures: the published weights and reference clips in ../shared, when present (required where
LOWMEM_REQUIRE_SHARED=1)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WEIGHTS = SHARED / "weights"
REFERENCE = SHARED / "reference"
# Set (to anything but 0) where ../shared is known to be there, as in CI: its absence then fails the tests that need
# it instead of skipping them, so that the model's fidelity to the published weights cannot go unchecked unnoticed.
REQUIRE_SHARED = "LOWMEM_REQUIRE_SHARED"

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

torch.set_num_threads(min(2, torch.get_num_threads()))


def load_benchmark(script: str, module_name: str | None = None) -> ModuleType:
    """benchmarks/<script>.py as a module (benchmarks/ is not a package), registered in sys.modules under
    ``module_name`` (default: the script's name) so that pickles of its classes, e.g. for DataLoader workers, resolve."""
    spec = importlib.util.spec_from_file_location(module_name or script, BENCHMARKS / f"{script}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    # Audio indexes, calibrated costs and the demo corpus go to a throwaway cache, never the user's home.
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


def require_shared(root: Path = SHARED) -> Path:
    """``root`` if it holds the published weights and reference scores; else skip the calling test, or fail it
    where :data:`REQUIRE_SHARED` is set."""
    needed = ("weights/AASIST.pth", "weights/AASIST-L.pth", "reference/scores.jsonl")
    missing = [name for name in needed if not (root / name).is_file()]
    if missing:
        why = (f"published weights and reference scores not found under {root} (../shared beside the repo): "
               f"no {', '.join(missing)}")
        if os.environ.get(REQUIRE_SHARED, "") not in ("", "0"):
            pytest.fail(f"{why}; {REQUIRE_SHARED} is set, so they are required", pytrace=False)
        pytest.skip(why)
    return root


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return require_shared()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is available here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
