"""The two detection backends side by side (detectron2 backend issue): the same checkpoint, the
same embedded data, seeds and schedule, trained and tested once by the built-in torchvision
backend and once by detectron2 itself (``--set backend=detectron2``), ``trials`` seeds each.

Prints per backend every metric's mean ± sample std over the trials, the seconds per training
iteration (torchvision: from the trials' images/s per window; detectron2: its IterationTimer) and
the wall time of the run, and writes them as JSON with ``--out``.

    python benchmarks/detectron2_vs_torchvision.py runs/npid/last.pth [--task det-coco] [--trials 3] \\
        [--out benchmarks/results/detectron2-vs-torchvision.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BACKENDS = ("torchvision", "detectron2")


def run(task: str, checkpoint: str, backend: str, trials: int, results: Path) -> tuple[dict, float]:
    start = time.perf_counter()
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from npidbench.cli import main; sys.exit(main())",
            "run",
            task,
            checkpoint,
            "--set",
            f"trials={trials}",
            "--set",
            f"backend={backend}",
            "--results",
            str(results),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    path = out.stdout.strip().splitlines()[-1]
    return json.loads(Path(path).read_text()), time.perf_counter() - start


def seconds_per_iteration(record: dict) -> float:
    """The mean seconds of one training iteration over the trials' history."""
    batch = record["details"]["global_batch"]
    values = []
    for trial in record["details"]["history"]:
        for line in trial:
            if "seconds_per_iteration" in line:  # detectron2's IterationTimer
                values.append(line["seconds_per_iteration"])
            elif line.get("images_per_s"):  # npidbench's loop, per window
                values.append(batch / line["images_per_s"])
    return statistics.mean(values) if values else float("nan")


def summary(record: dict, seconds: float) -> dict:
    trials = record["metrics"]["trials"]
    metrics = {
        k: {
            "mean": statistics.mean(t[k] for t in trials),
            "std": statistics.stdev(t[k] for t in trials) if len(trials) > 1 else 0.0,
            "values": [t[k] for t in trials],
        }
        for k in trials[0]
    }
    return {
        "metrics": metrics,
        "seconds_per_iteration": seconds_per_iteration(record),
        "wall_s": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--task", default="det-coco")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in BACKENDS:
            record, seconds = run(args.task, args.checkpoint, backend, args.trials, Path(tmp) / backend)
            rows[backend] = summary(record, seconds)
            print(
                f"{backend}: {rows[backend]['wall_s']:.0f} s, {rows[backend]['seconds_per_iteration']:.3f} s/iteration",
                flush=True,
            )
    names = list(rows[BACKENDS[0]]["metrics"])
    print("| backend | " + " | ".join(names) + " | s / iteration |")
    print("|---|" + "---:|" * (len(names) + 1))
    for backend, row in rows.items():
        cells = [f"{row['metrics'][k]['mean']:.2f} ± {row['metrics'][k]['std']:.2f}" for k in names]
        print(f"| {backend} | " + " | ".join(cells) + f" | {row['seconds_per_iteration']:.3f} |")
    gaps = {
        k: rows["detectron2"]["metrics"][k]["mean"] - rows["torchvision"]["metrics"][k]["mean"] for k in names
    }
    print("detectron2 - torchvision: " + ", ".join(f"{k} {v:+.2f}" for k, v in gaps.items()))
    if args.out:
        result = {
            "command": f"python benchmarks/detectron2_vs_torchvision.py <checkpoint> --task {args.task} --trials {args.trials}",
            "machine": f"{platform.machine()}, Python {platform.python_version()}",
            "task": args.task,
            "trials": args.trials,
            "backends": rows,
            "gap_detectron2_minus_torchvision": gaps,
        }
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
