"""Shared fixtures: an isolated npidbench home per test session, small random checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from npidbench.checkpoint.own import npidbench_checkpoint, save_npidbench_checkpoint

from checkpoint_zoo import random_resnet

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "real-layouts"

# pytest-xdist runs one worker per core: keep each worker's torch to one thread.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def npidbench_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cache, generated data and results of the whole session live in a temporary folder."""
    home = tmp_path_factory.mktemp("npidbench-home")
    os.environ["NPIDBENCH_CACHE_HOME"] = str(home)
    os.environ["NPIDBENCH_QUIET"] = "1"
    os.environ.pop("NPIDBENCH_CACHE", None)
    # The generated synthetic suite is shared by the xdist workers (generation is locked).
    shared = home.parent.parent if os.environ.get("PYTEST_XDIST_WORKER") else home.parent
    os.environ["NPIDBENCH_DATA"] = str(shared / "npidbench-data")
    os.environ.pop("NPIDBENCH_RESULTS", None)
    return home


@pytest.fixture()
def results_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "results"
    monkeypatch.setenv("NPIDBENCH_RESULTS", str(folder))
    return folder


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init ResNet-18 in this project's own format."""
    path = tmp_path_factory.mktemp("ckpt") / "random.pth"
    model = random_resnet("resnet18", seed=1)
    meta = {"recipe": "test-random", "epochs": 0, "seed": 1}
    save_npidbench_checkpoint(path, npidbench_checkpoint(model, "resnet18", meta))
    return path


def fixture_path(*parts: str) -> Path:
    """A file under ../shared/fixtures/real-layouts; the test is skipped when it is absent."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared fixture {path} not present")
    return path


def pytest_collection_modifyitems(config, items):
    """GPU-only checks carry the `gpu` marker and skip where no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
