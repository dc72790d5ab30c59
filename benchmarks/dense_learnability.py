"""Do the embedded detection / segmentation profiles rank checkpoints? (dense issue)

Runs every dense preset's `[synthetic]` profile on a pretrained checkpoint and on its random
init, each with ``trials=3`` (seeds 0, 1, 2), side by side on the same machine, and prints per
table the mean ± sample std of every trial's metric, the margin (pretrained - random), and
whether the margin exceeds the larger of the two spreads (the acceptance of the dense issue).
Wall time per run is printed too (the main job's budget).

    python benchmarks/dense_learnability.py runs/npid/last.pth runs/random-init/last.pth \
        [--trials 3] [--tasks det-voc0712 det-coco seg-voc12aug seg-cityscapes] [--out results.json] \
        [--set key=value ...]

``--set`` passes settings to every run (e.g. ``--set lr=0.01``): how a profile change was tried
before it was written into the preset. Detection rows also print the trials' other metrics (AP50,
AP75, mask AP) so that one sees which part a change moves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# task -> the metric its table leads with
METRICS = {
    "det-voc0712": "AP50",
    "det-coco": "AP(Box)",
    "seg-voc12aug": "mIoU",
    "seg-cityscapes": "mIoU",
}


def run(task: str, checkpoint: str, trials: int, results: Path, settings: list[str]) -> tuple[dict, float]:
    start = time.perf_counter()
    overrides = [arg for setting in [f"trials={trials}", *settings] for arg in ("--set", setting)]
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from npidbench.cli import main; sys.exit(main())",
         "run", task, checkpoint, *overrides, "--results", str(results)],
        check=True, capture_output=True, text=True,
    )
    path = out.stdout.strip().splitlines()[-1]
    return json.loads(Path(path).read_text()), time.perf_counter() - start


def trial_values(record: dict, metric: str) -> list[float]:
    """Every trial's ``metric``: detection lists each trial's metrics, segmentation its mIoU."""
    trials = record["metrics"].get("trials") or [record["metrics"]]
    return [t if isinstance(t, float | int) else t[metric] for t in trials]


def other_metrics(record: dict, lead: str) -> dict[str, float]:
    """The trials' mean of every metric beside ``lead`` (detection lists them per trial)."""
    trials = record["metrics"].get("trials") or []
    names = [k for k in (trials[0] if trials and isinstance(trials[0], dict) else {}) if k != lead]
    return {k: statistics.mean(t[k] for t in trials) for k in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pretrained")
    parser.add_argument("random_init")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--tasks", nargs="+", default=list(METRICS))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    summary: dict = {"settings": args.settings} if args.settings else {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            metric = METRICS[task]
            row = {}
            for name, checkpoint in (("pretrained", args.pretrained), ("random", args.random_init)):
                record, seconds = run(task, checkpoint, args.trials, Path(tmp) / name, args.settings)
                values = trial_values(record, metric)
                others = other_metrics(record, metric)
                row[name] = {
                    "values": values,
                    "mean": statistics.mean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "seconds": round(seconds, 1),
                    **({"other_metrics": others} if others else {}),
                }
            margin = row["pretrained"]["mean"] - row["random"]["mean"]
            spread = max(row["pretrained"]["std"], row["random"]["std"])
            row.update(metric=metric, margin=margin, spread=spread, ranks=margin > spread)
            summary[task] = row
            p, r = row["pretrained"], row["random"]
            print(
                f"{task:15s} {metric:8s} pretrained {p['mean']:6.2f} ± {p['std']:5.2f} ({p['seconds']:.0f} s)  "
                f"random {r['mean']:6.2f} ± {r['std']:5.2f} ({r['seconds']:.0f} s)  "
                f"margin {margin:+6.2f} vs spread {spread:5.2f}: {'ranks' if margin > spread else 'DOES NOT rank'}",
                flush=True,
            )
            for name in ("pretrained", "random"):
                if row[name].get("other_metrics"):
                    print(f"    {name:10s} " + "  ".join(f"{k} {v:.2f}" for k, v in row[name]["other_metrics"].items()))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
