"""Shared fixtures: the published weights and reference clips in ../shared, when present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WEIGHTS = SHARED / "weights"
REFERENCE = SHARED / "reference"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    # Audio indexes, calibrated costs and the demo corpus go to a throwaway cache, never the user's home.
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (WEIGHTS / "AASIST.pth").is_file() or not (REFERENCE / "scores.jsonl").is_file():
        pytest.skip(f"published weights and reference scores not found under {SHARED} (../shared beside the repo)")
    return SHARED


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is available here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
