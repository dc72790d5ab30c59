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
