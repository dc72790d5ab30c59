"""kNN over 100k x 2048 training features vs 10k queries: npidbench's blocked solver against a
naive dense implementation (one queries x train similarity matrix, as DINO's eval_knn builds
per chunk and many scripts build whole), side by side.

Each variant runs in its own subprocess so that its peak resident memory (VmHWM) is its own;
the features are memory-mapped .npy files, as they come out of the feature cache. Both must
give the same accuracies.

    python benchmarks/knn_memory.py [--train 100000] [--test 10000] [--dim 2048] [--classes 1000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

KS = (10, 20, 100, 200)
NOISE = 5.0  # per-dimension noise around each class centre: kNN top-1 lands mid-range


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class AnonPeak:
    """Peak anonymous memory (RssAnon), sampled every 5 ms. VmHWM also counts the pages of the
    memory-mapped feature files, which the kernel can drop at any time; RssAnon is what a run
    really holds."""

    def __init__(self) -> None:
        self.peak = _status_mb("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_mb("RssAnon"))
            time.sleep(0.005)

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_variant(variant: str, folder: Path) -> dict:
    train = np.load(folder / "train.npy", mmap_mode="r")
    test = np.load(folder / "test.npy", mmap_mode="r")
    train_y = np.load(folder / "train_y.npy")
    test_y = np.load(folder / "test_y.npy")
    classes = int(train_y.max()) + 1
    base = _status_mb("RssAnon")
    start = time.perf_counter()
    with AnonPeak() as anon:
        top1 = _classify(variant, train, train_y, test, test_y, classes)
    seconds = time.perf_counter() - start
    return {
        "variant": variant,
        "seconds": round(seconds, 2),
        "peak_anon_mb_above_start": round(anon.peak - base, 1),
        "vmhwm_mb_incl_mapped_files": round(_status_mb("VmHWM"), 1),
        "top1": {str(k): round(v, 3) for k, v in top1.items()},
    }


def _classify(variant, train, train_y, test, test_y, classes) -> dict:
    import torch

    from npidbench.solvers.knn import weighted_knn

    if variant == "npidbench":
        result = weighted_knn(train, train_y, test, test_y, ks=KS, num_classes=classes)
        top1 = result.top1
    else:  # naive dense: everything in memory, one similarity matrix
        t = torch.nn.functional.normalize(torch.from_numpy(np.array(train)), dim=1)
        q = torch.nn.functional.normalize(torch.from_numpy(np.array(test)), dim=1)
        sims = q @ t.T
        top_sim, top_idx = sims.topk(max(KS), dim=1)
        labels = torch.from_numpy(train_y)[top_idx]
        weights = (top_sim / 0.07).exp()
        top1 = {}
        for k in KS:
            scores = torch.zeros(len(q), classes).scatter_add_(1, labels[:, :k], weights[:, :k])
            top1[k] = 100.0 * float((scores.argmax(1) == torch.from_numpy(test_y)).float().mean())
    return top1


def make_data(folder: Path, n_train: int, n_test: int, dim: int, classes: int) -> None:
    """Clustered features (class centres + noise), non-negative like post-ReLU pooled features."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((classes, dim)).astype(np.float32)
    for name, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, classes, n)
        out = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.float32, shape=(n, dim))
        for start in range(0, n, 10_000):
            stop = min(n, start + 10_000)
            block = centres[labels[start:stop]] + NOISE * rng.standard_normal(
                (stop - start, dim), dtype=np.float32
            )
            out[start:stop] = np.maximum(block, 0)
        out.flush()
        np.save(folder / f"{name}_y.npy", labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=100_000)
    parser.add_argument("--test", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.folder)))
        return
    with tempfile.TemporaryDirectory(prefix="npidbench-knn-") as tmp:
        folder = Path(tmp)
        make_data(folder, args.train, args.test, args.dim, args.classes)
        results = []
        for variant in ("npidbench", "naive-dense"):
            proc = subprocess.run(
                [sys.executable, __file__, "--variant", variant, "--folder", str(folder)],
                capture_output=True,
                text=True,
                check=True,
            )
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ours, naive = results
    summary = {
        "workload": f"{args.train:,} x {args.dim} train, {args.test:,} queries, "
        f"{args.classes} classes, k={KS}",
        "npidbench": ours,
        "naive_dense": naive,
        "same_accuracy": ours["top1"] == naive["top1"],
        "memory_ratio_naive_over_ours": round(
            naive["peak_anon_mb_above_start"] / ours["peak_anon_mb_above_start"], 2
        ),
        "time_ratio_naive_over_ours": round(naive["seconds"] / ours["seconds"], 2),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
