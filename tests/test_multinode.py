"""Two torchrun "nodes" on this machine (one gloo process each, meeting on 127.0.0.1 through
torchrun's c10d rendezvous): feature extraction, a linear probe and NPID pretraining each give the
record, or the checkpoint, of one process.

Unlike ``--standalone --nproc-per-node 2`` (tests/test_distributed_run.py), each process here has
LOCAL_RANK 0 and LOCAL_WORLD_SIZE 1 while RANK is 0 or 1, and the two launchers only meet through
the rendezvous endpoint, as on two hosts. The launchers use c10d, the rendezvous the README's
SLURM example uses (no fixed master address per job; it assigns the ranks itself, so which of
the two launchers gets rank 0 is not fixed). Every launch has a deadline: a hung rendezvous or
collective fails the test and its processes are killed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TASKS = Path(__file__).with_name("torchrun_tasks.py")


def free_port() -> int:
    """A port nobody listens on now (torchrun binds it a moment later; a lost race is retried)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class NodeResult:
    returncode: int
    stdout: str
    stderr: str


def two_node_command(node: int, port: int, run_id: str, join_timeout: int) -> list[str]:
    """What each host of a two-node job runs (one process per node), here on one machine."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--node-rank",  # ignored by c10d (it assigns the ranks), kept as a job script would pass it
        str(node),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        run_id,
        "--rdzv-conf",
        f"join_timeout={join_timeout}",
        "--local-addr",
        "127.0.0.1",
        "--max-restarts",
        "0",
    ]


def _kill(processes: list[subprocess.Popen]) -> None:
    """Each launcher leads its own session: the signal reaches its worker too."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for process in processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for process in processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass


def run_two_nodes(
    args: list[str],
    env: dict[str, str],
    logs: Path,
    timeout: float = 300,
    node_env: tuple[dict[str, str], dict[str, str]] = ({}, {}),
) -> list[NodeResult]:
    """Start both nodes' torchrun on ``args`` (``node_env``: what differs between the two hosts'
    environments) and wait for both, within ``timeout`` seconds. The workers import this
    checkout's npidbench whatever is installed."""
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))}
    for attempt in range(2):
        port, run_id = free_port(), f"npidbench-{uuid.uuid4().hex[:12]}"
        logs.mkdir(parents=True, exist_ok=True)
        processes, files = [], []
        for node in (0, 1):
            out = open(logs / f"node{node}-try{attempt}.out", "w+")
            err = open(logs / f"node{node}-try{attempt}.err", "w+")
            files.append((out, err))
            processes.append(
                subprocess.Popen(
                    [*two_node_command(node, port, run_id, join_timeout=int(timeout)), *args],
                    stdout=out,
                    stderr=err,
                    env={**env, **node_env[node]},
                    cwd=REPO,
                    start_new_session=True,
                )
            )
        deadline, hung = time.monotonic() + timeout, False
        try:
            for process in processes:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill(processes)
            hung = True
        results = []
        for process, (out, err) in zip(processes, files, strict=True):
            out.seek(0)
            err.seek(0)
            results.append(NodeResult(process.returncode, out.read(), err.read()))
            out.close()
            err.close()
        if hung:
            tails = "\n".join(f"node {n}: {r.stderr[-2000:]}" for n, r in enumerate(results))
            pytest.fail(f"the two-node launch did not finish in {timeout:.0f} s:\n{tails}")
        if attempt == 0 and any("address already in use" in r.stderr.lower() for r in results):
            continue  # someone took the free port before the rendezvous bound it
        return results
    return results


NPID_TINY = {
    "name": "tiny",
    "arch": "resnet18",
    "epochs": 1,
    "batch_size": 8,
    "lr": 0.05,
    "lr_batch": 8,
    "negatives": 16,
    "input_size": 16,  # float64 convolutions stay cheap; layer4 still sees a 1 x 1 map
    "crop_scale": (0.5, 1.0),
    "eval_resize": 36,
    "eval_crop": 32,
    "knn_k": 5,
    "knn_every": 0,
    "freeze_bn": True,  # per-rank batch statistics would differ from one process's
    "save_every_steps": 0,
    "workers": 0,
}


@pytest.mark.slow
def test_two_nodes_extract_probe_and_pretrain_as_one_process(random_checkpoint, tmp_path):
    from npidbench.pretrain.recipe import Recipe
    from npidbench.pretrain.train import pretrain
    from npidbench.runner import RunRequest, run_task

    from helpers import tiny_imagefolder

    data = tmp_path / "data"
    tiny_imagefolder(data / "imagenet", classes=3, per_class=8, split="train", seed=0)
    tiny_imagefolder(data / "imagenet", classes=3, per_class=4, split="val", seed=1)
    small = ["resize=40", "crop=32"]
    runs = [
        ("knn", [*small, "ks=[10,20]"]),  # extraction sharded over the two nodes
        (
            "linear-imagenet",
            [*small, "mode=cached", "parts=[avgpool]", "avgpool_epochs=2", "avgpool_lr=0.3", "batch_size=8"],
        ),
    ]
    recipe = Recipe(**NPID_TINY)

    def requests(results: Path) -> list[dict]:
        common = {"checkpoint": str(random_checkpoint), "data_root": str(data), "results": str(results)}
        return [{"task": task, "set_options": settings, **common} for task, settings in runs]

    listing = tmp_path / "requests.json"
    pretrain_request = {
        "recipe": recipe.to_dict(),
        "out": str(tmp_path / "pretrain-2nodes"),
        "data_root": str(data),
        "dtype": "float64",
    }
    listing.write_text(json.dumps([*requests(tmp_path / "results-2nodes"), {"pretrain": pretrain_request}]))
    env = {**os.environ, "NPIDBENCH_CACHE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    env.pop("NPIDBENCH_CACHE", None)
    nodes = run_two_nodes([str(TASKS), str(listing)], env, tmp_path / "logs")
    for node, result in enumerate(nodes):
        assert result.returncode == 0, f"node {node}:\n{result.stderr[-3000:]}"
    printed = [line for r in nodes for line in r.stdout.splitlines() if line.strip()]
    assert len(printed) == 3  # two record paths and the checkpoint, from whichever node has rank 0
    assert sum(bool(r.stdout.strip()) for r in nodes) == 1

    # The same requests in one process, with a cache of its own: it extracts everything again.
    for fields in requests(tmp_path / "results-1process"):
        run_task(RunRequest(**fields, cache=str(tmp_path / "cache-1process")))
    pretrain(recipe, tmp_path / "pretrain-1process", data, dtype=torch.float64)

    def records(folder: Path) -> dict[str, dict]:
        found = [json.loads(p.read_text()) for p in folder.glob("*.json")]
        assert len(found) == len(runs)  # one record per request
        return {r["task"]: r for r in found}

    two_nodes, one = records(tmp_path / "results-2nodes"), records(tmp_path / "results-1process")
    for task in one:
        assert two_nodes[task]["details"]["world_size"] == 2
        assert two_nodes[task]["metrics"] == one[task]["metrics"], task
    assert two_nodes["linear-imagenet"]["details"]["global_batch"] == 8
    # The training history is the whole global batch's, not rank 0's shard's (loss: float32
    # summed in another order, rounded to 5 decimals).
    histories = [r["linear-imagenet"]["details"]["history"]["avgpool"] for r in (two_nodes, one)]
    for distributed_line, single_line in zip(*histories, strict=True):
        assert distributed_line.pop("loss") == pytest.approx(single_line.pop("loss"), rel=1e-4, abs=1e-4)
        distributed_line.pop("images_per_s"), single_line.pop("images_per_s")
        assert distributed_line == single_line

    # The feature matrices the two nodes wrote shard by shard are one process's.
    def entries(root: Path) -> dict[str, Path]:
        return {p.parent.name: p for p in root.glob("entries/*/features.npy")}

    shared_entries = entries(tmp_path / "home" / "features")
    single_entries = entries(tmp_path / "cache-1process")
    assert shared_entries.keys() == single_entries.keys() and shared_entries
    for digest, path in shared_entries.items():
        np.testing.assert_allclose(np.load(path), np.load(single_entries[digest]), rtol=1e-5, atol=1e-6)
        labels = path.with_name("labels.npy")
        np.testing.assert_array_equal(
            np.load(labels), np.load(single_entries[digest].with_name("labels.npy"))
        )
    assert not list((tmp_path / "home").rglob("progress-rank*.json"))  # jobs published and cleaned

    # One checkpoint, equal to one process's with the same global batch (as test_pretrain's check).
    a = torch.load(tmp_path / "pretrain-1process" / "resume.pth", weights_only=True)
    b = torch.load(tmp_path / "pretrain-2nodes" / "resume.pth", weights_only=True)
    assert a["global_step"] == b["global_step"] == 3 and b["world_size"] == 2
    assert a["z"] == pytest.approx(b["z"], rel=1e-12)
    torch.testing.assert_close(a["bank"], b["bank"], rtol=1e-9, atol=1e-12)
    for key, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][key], rtol=1e-9, atol=1e-12, msg=key)
    for distributed_line, single_line in zip(b["history"], a["history"], strict=True):
        assert distributed_line["loss"] == pytest.approx(single_line["loss"], rel=1e-9)  # all ranks'
    last = torch.load(tmp_path / "pretrain-2nodes" / "last.pth", weights_only=True)
    assert last["meta"]["world_size"] == 2 and last["meta"]["global_batch"] == 8


@pytest.mark.slow
def test_a_feature_cache_local_to_each_node_is_refused_on_every_node(random_checkpoint, tmp_path):
    """Ranks write their shards into the cache files rank 0 creates: a cache each node keeps
    for itself fails on both nodes with one line naming the folder, not with a FileNotFoundError
    on one rank and a peer error (or, with NCCL, a hang) on the other."""
    from helpers import tiny_imagefolder

    tiny_imagefolder(tmp_path / "data" / "imagenet", classes=3, per_class=4, split="train", seed=0)
    tiny_imagefolder(tmp_path / "data" / "imagenet", classes=3, per_class=2, split="val", seed=1)
    env = {**os.environ, "NPIDBENCH_CACHE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    node_env = (
        {"NPIDBENCH_CACHE": str(tmp_path / "node0-disk")},
        {"NPIDBENCH_CACHE": str(tmp_path / "node1-disk")},
    )
    command = [
        "-m",
        "npidbench.cli",
        "run",
        "knn",
        str(random_checkpoint),
        "--data-root",
        str(tmp_path / "data"),
    ]
    command += ["--results", str(tmp_path / "results"), "--set", "resize=40", "--set", "crop=32"]
    nodes = run_two_nodes(command, env, tmp_path / "logs", node_env=node_env)
    for result in nodes:
        assert result.returncode != 0
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "not one folder shared by every process: rank(s) 1 on" in errors[0], (
            errors
        )
        assert "FileNotFoundError" not in result.stderr and "closed by peer" not in result.stderr
    assert not list((tmp_path / "results").glob("*.json"))
    assert not list(tmp_path.glob("node*-disk/**/.shared-check-*"))
