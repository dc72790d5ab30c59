"""How stable the embedded suite's cached AvgPool probe is, and what float16 storage does to it at
a step size where it is stable (issue 18: the float16 cache's effect on the linear numbers).

For a short NPID checkpoint and the recipe's random init, the AvgPool head of
`linear-imagenet --set mode=cached` at several ``avgpool_lr`` values, each with the features as
computed (float32), rounded to float16 (what ``--cache-dtype float16`` stores), and float32 with
seeds 1 and 2. Top-1 on the 400 test images: one image is 0.25 points.

    python benchmarks/linear_probe_stability.py [--lrs 30 3 0.3] [--pretrain-epochs 30]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_precision import pretrain  # noqa: E402  (the same short checkpoint)

VARIANTS = {"float32": ([], False), "float16": ([], True), "seed1": (["seed=1"], False), "seed2": (["seed=2"], False)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lrs", nargs="+", type=float, default=[30.0, 3.0, 0.3])
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    args = parser.parse_args()
    os.environ.setdefault("NPIDBENCH_QUIET", "1")
    from npidbench.runner import RunRequest, run_task
    from npidbench.tasks import linear as linear_task

    real_rows = linear_task._rows
    rounding = {"on": False}

    def rows(arrays, index, device):  # the float16 cache's rounding, applied to float32 rows
        out = real_rows(arrays, index, device)
        return {k: v.half().float() for k, v in out.items()} if rounding["on"] else out

    linear_task._rows = rows
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="npidbench-probe-stability-") as tmp:
        folder = Path(tmp)
        checkpoints = {f"npid {args.pretrain_epochs} ep": pretrain(folder, args.pretrain_epochs)}
        command = [sys.executable, "-m", "npidbench.cli", "pretrain", "--set", "epochs=0", "--out", str(folder / "r")]
        subprocess.run(command, check=True, stdout=sys.stderr)
        checkpoints["random init"] = folder / "r" / "last.pth"
        for lr in args.lrs:
            for name, checkpoint in checkpoints.items():
                row = {}
                for variant, (options, rounded) in VARIANTS.items():
                    rounding["on"] = rounded
                    path = run_task(
                        RunRequest(
                            task="linear-imagenet",
                            checkpoint=checkpoint,
                            set_options=["mode=cached", "parts=avgpool", f"avgpool_lr={lr}", *options],
                            results=folder / "results",
                            cache=folder / "cache",
                        )
                    )
                    row[variant] = json.loads(Path(path).read_text())["metrics"]["top1"]["AvgPool"]
                results.setdefault(f"avgpool_lr={lr:g}", {})[name] = row
                print(f"avgpool_lr {lr:g} {name}: {row}", file=sys.stderr, flush=True)
    print(json.dumps({"top1_avgpool": results, "threads": torch.get_num_threads()}, indent=1))


if __name__ == "__main__":
    main()
