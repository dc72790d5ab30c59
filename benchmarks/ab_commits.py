"""The same commands with the code of a git revision and with the working tree, alternating, on
this machine: wall and process CPU seconds (user + system, workers included) of each, and
whether the two produced the same numbers (a record's metrics, a checkpoint's weights).

For changes meant to cost less and change nothing (issue 20: the main job's CPU seconds,
measured before / after on one machine). Each command gets a fresh results / cache / output
folder per side; the synthetic data folder is shared (NPIDBENCH_DATA, generated once).

    python benchmarks/ab_commits.py --before HEAD~1 --checkpoint CKPT \\
        [--tasks linear-imagenet seg-cityscapes] [--pretrain-epochs 25] [--rounds 2] [--out F]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


def export_revision(revision: str, into: Path) -> Path:
    """The package and presets of ``revision`` under ``into`` (what PYTHONPATH then imports)."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, "npidbench", "tasks", "pretrain"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def timed(command: list[str], code: Path, env: dict[str, str]) -> dict[str, float]:
    """Run ``command`` importing npidbench from ``code``; its wall and CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(
        command,
        check=True,
        cwd=tempfile.gettempdir(),
        env={**env, "PYTHONPATH": str(code)},
        stdout=subprocess.DEVNULL,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(time.perf_counter() - started, 2), "cpu_s": round(cpu, 2)}


def outcome(folder: Path) -> Any:
    """What the command produced: the record's metrics, or the checkpoint's weights."""
    records = sorted(folder.glob("results/*.json"))
    if records:
        return json.loads(records[-1].read_text())["metrics"]
    return torch.load(folder / "out" / "last.pth", weights_only=False)["state_dict"]


def same(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and a and all(torch.is_tensor(v) for v in a.values()):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return a == b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="git revision of the 'before' code")
    parser.add_argument("--checkpoint", type=Path, required=True, help="evaluated by every task")
    parser.add_argument("--tasks", nargs="*", default=["linear-imagenet"])
    parser.add_argument(
        "--pretrain-epochs", type=int, default=0, help="also a pretraining of this many epochs"
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    env = {**os.environ, "NPIDBENCH_QUIET": "1"}
    commands = {task: ["run", task, str(args.checkpoint.resolve())] for task in args.tasks}
    if args.pretrain_epochs:
        epochs = args.pretrain_epochs
        commands["pretrain"] = ["pretrain", "--set", f"epochs={epochs}", "--set", f"knn_every={epochs}"]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="npidbench-ab-") as tmp:
        sides = {"before": export_revision(args.before, Path(tmp) / "before"), "after": ROOT}
        for label, command in commands.items():
            rows: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
            outcomes = {}
            for round_ in range(args.rounds):
                for side, code in sides.items():
                    folder = Path(tmp) / f"{label}-{side}-{round_}"
                    full = [sys.executable, "-m", "npidbench.cli", *command]
                    if command[0] == "run":
                        full += ["--results", str(folder / "results"), "--cache", str(folder / "cache")]
                    else:
                        full += ["--out", str(folder / "out")]
                    rows[side].append(timed(full, code, env))
                    outcomes[side] = outcome(folder)
                    print(label, side, rows[side][-1], file=sys.stderr, flush=True)
            cpu = {side: sum(r["cpu_s"] for r in runs) for side, runs in rows.items()}
            results[label] = {
                **rows,
                "cpu_ratio_after_over_before": round(cpu["after"] / cpu["before"], 3),
                "same_numbers": same(outcomes["before"], outcomes["after"]),
            }
    text = json.dumps(
        {
            "before": args.before,
            "after": "working tree",
            "commands": {k: " ".join(["npidbench", *v]) for k, v in commands.items()},
            "results": results,
            "machine": f"{os.cpu_count()} cores, {platform.machine()}, {platform.processor() or '?'}",
            "threads": torch.get_num_threads(),
        },
        indent=1,
    )
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
