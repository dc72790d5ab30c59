"""kill -9 in the middle of long work, then the same command again: the results equal an
uninterrupted run's (timings, hosts and dates aside), with no duplicate or partial record. Also
two `run` processes writing to one results folder at once. (kill -9 during extraction and a full
disk while writing a record: tests/test_features.py and tests/report/test_results.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import tiny_imagefolder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reliability-data")
    tiny_imagefolder(root / "imagenet", classes=3, per_class=12, split="train", seed=0)
    tiny_imagefolder(root / "imagenet", classes=3, per_class=4, split="val", seed=1)
    return root


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "NPIDBENCH_CACHE_HOME": str(home), "OMP_NUM_THREADS": "1", "NPIDBENCH_QUIET": "1"}


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "npidbench.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _in_process(args: list[str], home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The uninterrupted reference run, in this worker (one torch thread, as the subprocesses'
    OMP_NUM_THREADS=1): the same CLI path without another interpreter start."""
    from npidbench.cli import main

    monkeypatch.setenv("NPIDBENCH_CACHE_HOME", str(home))
    try:
        main(args)
    except SystemExit as exc:
        assert not exc.code, f"exit {exc.code}"
    monkeypatch.undo()


def _kill_when(args: list[str], env: dict[str, str], ready: Callable[[], bool], timeout: float = 300) -> None:
    """Start the command, SIGKILL it as soon as ``ready()`` (polled), and check it was mid-way."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "npidbench.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    finished_first = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not finished_first, "the command ended before it could be killed: make the workload longer"
    assert ready(), "the command was killed before it reached the point under test"


def _epoch_when_changed(path: Path, seen: dict[str, tuple[int, int]]) -> int:
    """The ``epoch`` a resume file records (-1 before it exists), loaded again only when the file
    has changed since the last poll: loading a 90 MB state every 20 ms slowed the run under test."""
    try:
        stamp = path.stat().st_mtime_ns
        if str(path) in seen and seen[str(path)][0] == stamp:
            return seen[str(path)][1]
        epoch = int(torch.load(path, weights_only=True)["epoch"])
    except Exception:  # noqa: BLE001 - not written yet, or being replaced
        return -1
    seen[str(path)] = (stamp, epoch)
    return epoch


def _without_timings(value):
    """Drop wall-clock figures (``seconds``, ``*_s``) wherever a record nests them."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k != "seconds" and not k.endswith("_s")}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _comparable(record: dict) -> dict:
    keys = ("task", "metrics", "config", "variant", "protocol", "seeds", "dataset")
    return _without_timings({k: record[k] for k in keys})


def _records(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def test_kill_9_during_pretraining_then_resume(tmp_path, data_root, monkeypatch):
    # 4 steps an epoch; a resume point every 3 steps falls mid-epoch as well as at epoch ends.
    settings = ["epochs=4", "batch_size=8", "lr_batch=8", "pool_per_class=0", "negatives=16", "input_size=32"]
    settings += ["eval_resize=36", "eval_crop=32", "knn_every=0", "save_every_steps=3", "warmup_epochs=0"]
    sets = [part for s in settings for part in ("--set", s)]
    common = ["pretrain", *sets, "--data-root", str(data_root)]
    _in_process([*common, "--out", str(tmp_path / "straight")], tmp_path / "h1", monkeypatch)

    out = tmp_path / "killed"

    def mid_run() -> bool:
        return _epoch_when_changed(out / "resume.pth", seen) >= 2

    seen: dict[str, tuple[int, int]] = {}

    _kill_when([*common, "--out", str(out)], _env(tmp_path / "h2"), mid_run)
    _cli([*common, "--out", str(out), "--resume"], _env(tmp_path / "h2"))
    a = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)
    b = torch.load(out / "last.pth", weights_only=True)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert a["meta"]["epochs"] == b["meta"]["epochs"] == 4


def test_kill_9_during_fine_tuning_then_rerun(tmp_path, data_root, monkeypatch):
    settings = [
        "resize=48",
        "crop=40",
        "batch_size=6",
        "epochs=5",
        "milestones=[4]",
        "fraction=1.0",
        "split=drawn",
        "lr=0.01",
        "head_mult=10",
    ]
    sets = [part for s in settings for part in ("--set", s)]
    checkpoint = tmp_path / "ckpt"
    _in_process(["pretrain", "--set", "epochs=0", "--out", str(checkpoint)], tmp_path / "h0", monkeypatch)
    args = [
        "run",
        "semisup-imagenet-1pct",
        str(checkpoint / "last.pth"),
        "--data-root",
        str(data_root),
        *sets,
    ]
    _in_process([*args, "--results", str(tmp_path / "straight")], tmp_path / "h1", monkeypatch)

    home = tmp_path / "h2"

    def mid_run() -> bool:
        return any(_epoch_when_changed(path, seen) >= 2 for path in home.rglob("training/*/state.pth"))

    seen: dict[str, tuple[int, int]] = {}

    _kill_when([*args, "--results", str(tmp_path / "killed")], _env(home), mid_run)
    assert not list((tmp_path / "killed").glob("*.json"))  # killed before any record
    _cli([*args, "--results", str(tmp_path / "killed")], _env(home))
    (straight,) = _records(tmp_path / "straight")
    (resumed,) = _records(tmp_path / "killed")  # exactly one record: no duplicate, no partial
    assert _comparable(resumed) == _comparable(straight)
    assert not list(home.rglob("training/*/state.pth"))  # cleared once the record is written


def test_kill_9_during_svm_then_rerun(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    features = tmp_path / "features"
    features.mkdir()
    layers = ["Feature1", "Feature2"]
    (features / "layers.json").write_text(json.dumps(layers))
    for split, n in (("trainval", 600), ("test", 200)):  # 6 classes: any C works (the layer takes ~1 s)
        labels = np.where(rng.random((n, 6)) < 0.15, 1, 0)
        labels[rng.random((n, 6)) < 0.02] = -1
        np.save(features / f"{split}_labels.npy", labels)
        for layer in layers:
            centers = rng.normal(size=(6, 256)).astype(np.float32) * 0.3
            x = rng.normal(size=(n, 256)).astype(np.float32) + (labels == 1).astype(np.float32) @ centers
            np.save(features / f"{split}_{layer}.npy", x)
    args = [
        "run",
        "voc-svm-full",
        "--features-dir",
        str(features),
        "--set",
        "costs=fair",
        "--set",
        "layers=[Feature1,Feature2]",
    ]
    _in_process([*args, "--results", str(tmp_path / "straight")], tmp_path / "h1", monkeypatch)

    home = tmp_path / "h2"

    def one_layer_done() -> bool:
        return any(home.rglob("voc-svm-partial/*/Feature1.json"))

    _kill_when([*args, "--results", str(tmp_path / "killed")], _env(home), one_layer_done)
    result = _cli([*args, "--results", str(tmp_path / "killed")], {**_env(home), "NPIDBENCH_QUIET": "0"})
    assert "Feature1: mAP" in result.stderr and "kept from an interrupted run" in result.stderr
    (straight,) = _records(tmp_path / "straight")
    (resumed,) = _records(tmp_path / "killed")
    assert _comparable(resumed) == _comparable(straight)


def test_two_run_processes_share_one_results_folder(tmp_path, data_root, monkeypatch):
    checkpoint = tmp_path / "ckpt"
    _in_process(["pretrain", "--set", "epochs=0", "--out", str(checkpoint)], tmp_path / "h0", monkeypatch)
    results = tmp_path / "results"
    commands = [
        [
            sys.executable,
            "-m",
            "npidbench.cli",
            "run",
            "knn",
            str(checkpoint / "last.pth"),
            "--data-root",
            str(data_root),
        ]
        + ["--results", str(results), "--set", f"ks=[{k}]", "--set", "resize=40", "--set", "crop=32"]
        for k in (3, 5)
    ]
    env = _env(tmp_path / "shared-home")  # one cache too: the second waits for the first's extraction
    procs = [
        subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in commands
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outputs]
    records = _records(results)
    assert sorted(list(r["metrics"]["top1"]) for r in records) == [["3"], ["5"]]
    assert not [p for p in results.iterdir() if not p.name.endswith(".json")]  # no temporary leftovers
