"""`npidbench run` under torchrun: two gloo ranks share the extraction; one record is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_torchrun_two_ranks_write_one_record_equal_to_one_process(random_checkpoint, tmp_path):
    from helpers import tiny_imagefolder

    tiny_imagefolder(tmp_path / "data" / "imagenet", classes=3, per_class=9, split="train", seed=0)
    tiny_imagefolder(tmp_path / "data" / "imagenet", classes=3, per_class=5, split="val", seed=1)
    data = ["--data-root", str(tmp_path / "data"), "--set", "resize=40", "--set", "crop=32"]
    env = {**os.environ, "NPIDBENCH_CACHE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    multi = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "npidbench.cli",
            "run",
            "knn",
            str(random_checkpoint),
            "--results",
            str(tmp_path / "multi"),
            "--set",
            "ks=[10,20]",
            *data,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert multi.returncode == 0, multi.stderr[-3000:]
    records = list((tmp_path / "multi").glob("*.json"))
    assert len(records) == 1
    assert [line for line in multi.stdout.splitlines() if line.strip()] == [str(records[0])]
    distributed_record = json.loads(records[0].read_text())
    assert distributed_record["details"]["world_size"] == 2

    # The same run in one process hits the cache the two ranks wrote (same checkpoint and data).
    env.pop("OMP_NUM_THREADS")
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "npidbench.cli",
            "run",
            "knn",
            str(random_checkpoint),
            "--results",
            str(tmp_path / "single"),
            "--set",
            "ks=[10,20]",
            *data,
        ],
        capture_output=True,
        text=True,
        env={**env, "NPIDBENCH_QUIET": "0"},
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    assert single.stderr.count("cache hit") == 2
    (single_path,) = Path(tmp_path / "single").glob("*.json")
    assert json.loads(single_path.read_text())["metrics"] == distributed_record["metrics"]


def _torchrun_requests(requests: list[dict], tmp_path: Path, env: dict[str, str]) -> list[str]:
    """Run ``requests`` (RunRequest fields) in one launch of two gloo ranks; the record paths."""
    listing = tmp_path / "requests.json"
    listing.write_text(json.dumps(requests))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run(
        [*command, str(Path(__file__).with_name("torchrun_tasks.py")), str(listing)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [line for line in result.stdout.splitlines() if line.strip()]


@pytest.mark.slow
def test_torchrun_linear_probe_and_fine_tuning(random_checkpoint, tmp_path):
    """Two gloo ranks: DDP heads (augmented and cached) and DDP fine-tuning; one record each,
    with the global batch and the scaled lr recorded."""
    from helpers import tiny_imagefolder

    tiny_imagefolder(tmp_path / "data" / "imagenet", classes=3, per_class=8, split="train", seed=0)
    tiny_imagefolder(tmp_path / "data" / "imagenet", classes=3, per_class=4, split="val", seed=1)
    env = {**os.environ, "NPIDBENCH_CACHE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    common = {
        "checkpoint": str(random_checkpoint),
        "data_root": str(tmp_path / "data"),
        "results": str(tmp_path / "results"),
    }
    small = ["resize=48", "crop=40", "batch_size=8"]
    runs = [
        ("linear-imagenet", [*small, "features_epochs=1", "avgpool_epochs=2", "train_resize=48"]),
        ("linear-imagenet", [*small, "mode=cached", "parts=[avgpool]", "avgpool_epochs=2"]),
        (
            "semisup-imagenet-10pct",
            [*small, "fraction=0.5", "split=drawn", "epochs=2", "lr=0.01", "head_mult=10"],
        ),
    ]
    printed = _torchrun_requests(
        [{"task": task, "set_options": settings, **common} for task, settings in runs], tmp_path, env
    )
    assert len(printed) == 3  # rank 0 only
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "results").glob("*.json"))]
    assert len(records) == 3
    for record in records:
        assert record["details"]["world_size"] == 2
        assert record["details"]["global_batch"] == 8
    linear = [r for r in records if r["family"] == "linear"]
    assert {r["protocol"] for r in linear} == {"linear-mhead", "linear-cached"}
    assert all(0 <= r["metrics"]["top1"]["AvgPool"] <= 100 for r in linear)
    assert not list((tmp_path / "home").rglob("state.pth"))  # resume states cleared after the run


@pytest.mark.slow
def test_torchrun_segmentation_and_detection(random_checkpoint, tmp_path):
    """Two gloo ranks fine-tune FCN-D8 and Faster R-CNN C4 (DDP over the windowed iterations,
    evaluation sharded and summed); one record each."""
    env = {**os.environ, "NPIDBENCH_CACHE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    runs = [
        ("seg-cityscapes", ["iterations=2", "window=1", "batch_size=2"]),
        ("det-voc0712", ["iterations=2", "window=1", "batch_size=2", "test_images=4", "precise_bn=1"]),
    ]
    common = {"checkpoint": str(random_checkpoint), "results": str(tmp_path / "results")}
    _torchrun_requests([{"task": t, "set_options": s, **common} for t, s in runs], tmp_path, env)
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "results").glob("*.json"))]
    assert sorted(r["task"] for r in records) == ["det-voc0712", "seg-cityscapes"]
    assert all(r["details"]["world_size"] == 2 and r["details"]["global_batch"] == 2 for r in records)
    seg = next(r for r in records if r["task"] == "seg-cityscapes")
    assert len(seg["metrics"]["per_class_iou"]) == 19 and 0 <= seg["metrics"]["mIoU"] <= 100
