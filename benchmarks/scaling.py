"""Cost curves at real dataset sizes without the data (issue 18): each stage at growing N, with
generated stand-ins, its seconds, peak anonymous memory and disk, and a fitted growth exponent.

Stages (sizes are the defaults; ``--quick`` runs the two smallest of each):

- ``index-imagefolder`` / ``index-places`` / ``index-inat`` / ``index-coco``: listing a split of
  empty files (ImageFolder tree, Places205 list, iNat18 JSON, COCO instances JSON) through the
  project's own adapters, plus the cache fingerprint for ImageFolder (a stat per file, no image
  is opened);
- ``cache-write`` / ``cache-read``: N x 2048 float32 rows through the feature cache's job
  (memory-mapped, committed every 2 s, published as an entry), then one pass over the entry;
  ``cache-resume``: the writer killed half way, the next one resumes where the commit says;
- ``knn-2048`` (5,000 queries) and ``knn-128`` (NPID's bank, 10,000 queries): the blocked kNN
  (its cost is linear in the queries too: 50,000 queries take 5x or 10x these);
- ``svm-gram`` / ``svm-primal`` / ``svm``: the full VOC07 SVM protocol (MMS costs, 3 folds, 20
  classes, 5,000 test rows) with each method forced and with the size-chosen one;
  ``svm-liblinear``: the anchors' LinearSVC on one class, all costs, times the classes
  (extrapolated as benchmarks/voc_svm_speed.py does);
- ``report``: what `npidbench report --format markdown` does (load the records, render) over
  10 .. 10,000 records.

Every point runs in its own process (its peak memory is its own) with ``--threads`` torch threads
(default 1: one core's figures, steady when the machine's other core is busy; the exponents do
not depend on it). The exponent is the slope of
log seconds on log N over the points from ``fit_from`` up.

    python benchmarks/scaling.py [--only svm knn-128] [--quick] [--plot benchmarks/results/scaling.png]
    python benchmarks/scaling.py --only svm --sizes 118287 --add-to benchmarks/results/scaling.json \
        --plot benchmarks/results/scaling.png     # one more point into the kept sweep

``benchmarks/regenerate.py --only scaling`` runs it, keeps its JSON in benchmarks/results/ and
rewrites the scaling table of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from knn_memory import AnonPeak, _status_mb  # noqa: E402  (the benchmarks' shared memory probe)

HERE = Path(__file__).resolve().parent
DIM = 2048
SVM_CLASSES, SVM_TEST = 20, 5000


@dataclass(frozen=True)
class Stage:
    name: str
    sizes: tuple[int, ...]
    what: str
    fit_from: int = 0  # the exponent is fitted on sizes >= this


STAGES = [
    Stage("index-imagefolder", (10_000, 100_000, 1_280_000), "ImageFolder tree listed + fingerprinted"),
    Stage("index-places", (10_000, 100_000, 1_280_000, 2_450_000), "Places205 list file"),
    Stage("index-inat", (10_000, 100_000, 437_513), "iNat18 JSON"),
    Stage("index-coco", (10_000, 40_000, 118_287), "COCO instances JSON, 7 boxes per image"),
    Stage("cache-write", (10_000, 100_000, 400_000), f"N x {DIM} float32 written through a cache job"),
    Stage("cache-read", (10_000, 100_000, 400_000), f"one pass over an N x {DIM} cache entry"),
    Stage("cache-resume", (100_000,), "writer killed half way, then resumed"),
    Stage("knn-2048", (10_000, 100_000, 400_000), f"kNN bank N x {DIM}, 5,000 queries"),
    Stage("knn-128", (10_000, 100_000, 1_280_000), "kNN bank N x 128 (NPID's), 10,000 queries"),
    Stage("svm-gram", (1_250, 2_500, 5_000), f"full SVM, Gram method forced, {DIM} dims", fit_from=2_500),
    Stage("svm-primal", (1_250,), f"full SVM, primal method forced, {DIM} dims (the crossover)"),
    Stage("svm", (2_500, 10_000, 40_000), f"full SVM, size-chosen method (primal here), {DIM} dims", 10_000),
    Stage("svm-liblinear", (1_250, 2_500), "liblinear, 1 class x 19 costs x (3 folds + refit); x 20 classes"),
    Stage("report", (10, 1_000, 10_000), "npidbench report --format markdown over N records"),
]


# -- one point per process -----------------------------------------------------------------------


def measure(stage: Callable[[int, Path], Callable[[], dict]]) -> Callable[[int, Path], dict]:
    """Wrap a stage: it prepares its inputs (not timed, not counted) and returns the work to time;
    the point is that work's seconds, its peak anonymous memory above what the inputs hold, and
    the figures it returns."""

    def run(size: int, work: Path) -> dict:
        import torch  # noqa: F401  (imports are not the stage's memory)

        import npidbench.cli  # noqa: F401

        timed = stage(size, work)
        gc.collect()
        base = _status_mb("RssAnon")
        started = time.perf_counter()
        with AnonPeak() as anon:
            out = timed()
        out["seconds"] = round(time.perf_counter() - started, 3)
        out["peak_anon_mb"] = round(anon.peak - base, 1)
        return out

    return run


Timed = Callable[[], dict]


def _index_imagefolder(n: int, work: Path) -> Timed:
    from npidbench.data.imagenet import load_imagefolder

    classes = 1000 if n >= 100_000 else 100
    root = work / "imagenet"
    for c in range(classes):
        folder = root / "train" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(c * n // classes, (c + 1) * n // classes):
            (folder / f"n{c:08d}_{i}.JPEG").touch()

    def timed() -> dict:
        t = time.perf_counter()
        split = load_imagefolder(root, "train")
        listed = time.perf_counter() - t
        split.fingerprint_fn()  # one stat per file, no image opened
        return {"list_s": round(listed, 3), "entries": len(split.samples)}

    return timed


def _index_places(n: int, work: Path) -> Timed:
    from npidbench.data.imagenet import load_places205

    root = work / "places"
    root.mkdir()
    lines = (f"{chr(97 + i % 26)}/class{i % 205}/{i:08d}.jpg {i % 205}" for i in range(n))
    (root / "train_places205.csv").write_text("\n".join(lines) + "\n")
    return lambda: {"entries": len(load_places205(root, "train").samples)}


def _index_inat(n: int, work: Path) -> Timed:
    from npidbench.data.imagenet import load_inat18

    root = work / "inat"
    root.mkdir()
    data = {
        "images": [{"id": i, "file_name": f"train_val2018/Plantae/{i % 8142}/{i}.jpg"} for i in range(n)],
        "annotations": [{"id": i, "image_id": i, "category_id": i % 8142} for i in range(n)],
    }
    (root / "train2018.json").write_text(json.dumps(data))
    return lambda: {"entries": len(load_inat18(root, "train").samples)}


def _index_coco(n: int, work: Path) -> Timed:
    from npidbench.data.coco import load_coco

    root = work / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    rng = np.random.default_rng(0)
    corners = rng.integers(0, 500, (n, 7, 2)).astype(float)
    anns = [
        {
            "id": 7 * i + j,
            "image_id": i,
            "category_id": 1 + (i + j) % 80,
            "iscrowd": 0,
            "bbox": [x, y, 40.0, 30.0],
            "area": 1200.0,
            "segmentation": [[x, y, x + 40, y, x + 40, y + 30, x, y + 30]],
        }
        for i in range(n)
        for j, (x, y) in enumerate(corners[i].tolist())
    ]
    data = {
        "images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": 640, "height": 480} for i in range(n)],
        "annotations": anns,
        "categories": [{"id": c, "name": f"c{c}"} for c in range(1, 81)],
    }
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(data))
    del data, anns
    return lambda: {"entries": len(load_coco(root, "train2017").images)}


def _cache_job(work: Path):
    from npidbench.cache import FeatureCache, FeatureKey

    cache = FeatureCache(work / "cache")
    key = FeatureKey("0" * 64, "", "resnet50", "imagenet", "f" * 16, "train", "eval", "AvgPool")
    return cache, key


BATCH = np.random.default_rng(0).random((256, DIM), dtype=np.float32)  # row i of a batch at lo: BATCH[i] + lo


def _write_rows(n: int, work: Path, stop_after: int | None = None) -> dict:
    """Rows in batches of 256 as an extraction writes them (resuming where a commit says)."""
    cache, key = _cache_job(work)
    with cache.locked(key):
        job = cache.job([key], n, {key.layer: DIM})
        job.create_or_resume()
        start = job.resume_row()
        for lo in range(start, n, 256):
            rows = np.arange(lo, min(n, lo + 256))
            job.write(rows, {key.layer: BATCH[: len(rows)] + lo}, rows)
            job.commit(int(rows[-1]) + 1)
            if stop_after is not None and rows[-1] + 1 >= stop_after:
                job.commit(int(rows[-1]) + 1, force=True)
                print(json.dumps({"committed": int(rows[-1]) + 1}), flush=True)
                time.sleep(3600)  # killed here by the parent
        job.commit(n, force=True)
        job.finalize({})
    return {"resumed_at": start, "disk_bytes": _bytes(cache.root)}


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _cache_write(n: int, work: Path) -> Timed:
    return lambda: _write_rows(n, work)


def _cache_read(n: int, work: Path) -> Timed:
    """One pass over a published entry (from the page cache when it fits: this measures the
    cache's own overhead, not the disk)."""
    cache, key = _cache_job(work)
    _write_rows(n, work)

    def timed() -> dict:
        entry = cache.lookup(key)
        total = 0.0
        for lo in range(0, n, 8192):
            total += float(np.asarray(entry.features[lo : lo + 8192], dtype=np.float64).sum())
        return {"disk_bytes": _bytes(cache.root)}

    return timed


def _cache_resume(n: int, work: Path) -> Timed:
    """Kill a writer after half of the rows; time the resumed writer and check every row."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import scaling; from pathlib import Path; "
        "scaling._write_rows(int(sys.argv[2]), Path(sys.argv[3]), stop_after=int(sys.argv[2]) // 2)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(HERE), str(n), str(work)], stdout=subprocess.PIPE, text=True
    )
    committed = json.loads(proc.stdout.readline())["committed"]
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    def timed() -> dict:
        out = _write_rows(n, work)
        cache, key = _cache_job(work)
        features = cache.lookup(key).features
        exact = all(np.array_equal(features[lo : lo + 256], BATCH[: min(256, n - lo)] + lo) for lo in range(0, n, 256))
        return {**out, "killed_after": committed, "rows_redone": committed - out["resumed_at"], "rows_exact": exact}

    return timed


def _knn(dim: int, queries: int) -> Callable[[int, Path], Timed]:
    def stage(n: int, work: Path) -> Timed:
        from npidbench.solvers.knn import weighted_knn

        rng = np.random.default_rng(0)
        classes = 1000
        centres = rng.normal(size=(classes, dim)).astype(np.float32)
        train_y = rng.integers(0, classes, n)
        bank = np.lib.format.open_memmap(work / "bank.npy", mode="w+", dtype=np.float32, shape=(n, dim))
        for lo in range(0, n, 65536):
            y = train_y[lo : lo + 65536]
            bank[lo : lo + len(y)] = centres[y] + 4 * rng.standard_normal((len(y), dim), dtype=np.float32)
        bank.flush()
        del bank
        test_y = rng.integers(0, classes, queries)
        test = centres[test_y] + 4 * rng.standard_normal((queries, dim), dtype=np.float32)

        def timed() -> dict:
            bank = np.load(work / "bank.npy", mmap_mode="r")  # as the feature cache hands it over
            result = weighted_knn(bank, train_y, test, test_y, num_classes=classes)
            return {"top1_k200": round(result.top1[200], 2)}

        return timed

    return stage


def _svm_data(n: int, dims: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """VOC-like multi-label features: non-negative, class structure, 25% positives, 3% difficult."""
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random((n, SVM_CLASSES)) < 0.25, 1, -1).astype(np.int8)
    labels[rng.random((n, SVM_CLASSES)) < 0.03] = 0
    centres = rng.normal(size=(SVM_CLASSES, dims)).astype(np.float32) * 0.5
    x = np.empty((n, dims), dtype=np.float32)
    for lo in range(0, n, 8192):
        part = labels[lo : lo + 8192] == 1
        noise = rng.standard_normal((len(part), dims), dtype=np.float32) * 1.6
        x[lo : lo + len(part)] = np.maximum(noise + part.astype(np.float32) @ centres + 0.5, 0)
    return x, labels


def _svm(method: str) -> Callable[[int, Path], Timed]:
    def stage(n: int, work: Path) -> Timed:
        from npidbench.solvers.voc_svm import cost_list, full_svm

        train_x, train_y = _svm_data(n, DIM, 0)
        test_x, test_y = _svm_data(SVM_TEST, DIM, 1)

        def timed() -> dict:
            started = last = time.perf_counter()

            def progress(done: int, total: int) -> None:
                # a COCO-size point runs for half an hour: say how far it is, every 30 s (stderr
                # passes through scaling.py and regenerate.py)
                nonlocal last
                now = time.perf_counter()
                if now - last >= 30 or done == total:
                    print(f"  svm {n:,}: {done}/{total} cost solves, {now - started:.0f} s", file=sys.stderr, flush=True)
                    last = now

            result = full_svm(
                train_x, train_y, test_x, test_y, cost_list("mms"), method=method, progress=progress  # type: ignore[arg-type]
            )
            stats = result.stats
            return {
                "method": stats["method"],
                "mAP": round(result.map, 3),
                "cg_iterations": int(sum(stats["cg_iterations"])),
                "unconverged": stats["unconverged"],
                **{k: stats[k] for k in ("basis_s", "solve_s", "score_s")},
            }

        return timed

    return stage


def _svm_liblinear(n: int, work: Path) -> Timed:
    """The anchors' LinearSVC on class 0 only (every cost, 3 folds + refit); seconds x 20 classes
    is what they would take (the classes are alike), as benchmarks/voc_svm_speed.py extrapolates."""
    from npidbench.solvers.voc_svm import cost_list, full_svm

    train_x, train_y = _svm_data(n, DIM, 0)
    test_x, test_y = _svm_data(SVM_TEST, DIM, 1)

    def timed() -> dict:
        t = time.perf_counter()
        result = full_svm(train_x, train_y, test_x, test_y, cost_list("mms"), solver="sklearn", classes=[0])
        one = time.perf_counter() - t
        return {"one_class_s": round(one, 2), "twenty_classes_s": round(SVM_CLASSES * one, 1), "ap0": round(result.map, 3)}

    return timed


def _report(n: int, work: Path) -> Timed:
    from npidbench.results import ResultStore, new_record

    store = ResultStore(work / "results")
    for i in range(n):
        sha = f"{i:064x}"
        store.write(
            new_record(
                task="knn",
                family="knn",
                table="knn",
                dataset={"name": "imagenet", "display": "imagenet", "synthetic": False, "root": "/data"},
                model={"name": f"model-{i}", "config": "-", "sha256": sha, "checkpoint": {"sha256": sha}},
                metrics={"top1": {k: 40.0 + i % 7 for k in ("10", "20", "100", "200")}, "top5": {}},
                protocol="npid-knn",
                config={"ks": [10, 20, 100, 200]},
                seeds=[0],
                timings={"total_s": 1.0},
            )
        )
    def timed() -> dict:
        # what `npidbench report --format markdown` does, in this process so its memory counts
        from npidbench.report import report

        records, _ = ResultStore(work / "results").load()
        text = report(records, "markdown")
        return {"rows": sum(1 for line in text.splitlines() if line.startswith("| model-"))}

    return timed


POINTS: dict[str, Callable[[int, Path], dict]] = {
    "index-imagefolder": measure(_index_imagefolder),
    "index-places": measure(_index_places),
    "index-inat": measure(_index_inat),
    "index-coco": measure(_index_coco),
    "cache-write": measure(_cache_write),
    "cache-read": measure(_cache_read),
    "cache-resume": measure(_cache_resume),
    "knn-2048": measure(_knn(DIM, 5_000)),
    "knn-128": measure(_knn(128, 10_000)),
    "svm-gram": measure(_svm("gram")),
    "svm-primal": measure(_svm("primal")),
    "svm": measure(_svm("auto")),
    "svm-liblinear": measure(_svm_liblinear),
    "report": measure(_report),
}


# -- the sweep ------------------------------------------------------------------------------------


def exponent(points: list[dict], fit_from: int) -> float | None:
    """Least-squares slope of log seconds on log N over the points from ``fit_from`` up."""
    use = [(p["size"], p["seconds"]) for p in points if p["size"] >= fit_from and p["seconds"] > 0]
    if len(use) < 2:
        return None
    x = np.log([u[0] for u in use])
    y = np.log([u[1] for u in use])
    return round(float(np.polyfit(x, y, 1)[0]), 2)


def sweep(stages: list[Stage], quick: bool, threads: int) -> dict:
    results = {}
    for stage in stages:
        sizes = stage.sizes[:2] if quick else stage.sizes
        points = []
        for size in sizes:
            with tempfile.TemporaryDirectory(prefix=f"scaling-{stage.name}-") as work:
                code = (
                    "import sys, json, torch; sys.path.insert(0, sys.argv[1]); import scaling; "
                    "from pathlib import Path; torch.set_num_threads(int(sys.argv[5])); "
                    "print(json.dumps(scaling.POINTS[sys.argv[2]](int(sys.argv[3]), Path(sys.argv[4]))))"
                )
                env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                # stderr passes through: a long point's progress lines (and any error) show
                proc = subprocess.run(
                    [sys.executable, "-c", code, str(HERE), stage.name, str(size), work, str(threads)],
                    stdout=subprocess.PIPE,
                    text=True,
                    check=False,
                    env=env,
                )
                if proc.returncode != 0:
                    raise SystemExit(f"{stage.name} at {size} failed (exit {proc.returncode}); its messages are above")
                point = {"size": size, **json.loads(proc.stdout.strip().splitlines()[-1])}
                shutil.rmtree(work, ignore_errors=True)
            print(f"[{stage.name}] N={size:,}: {point}", file=sys.stderr, flush=True)
            points.append(point)
        fit_from = stage.fit_from if not quick else 0
        results[stage.name] = {
            "what": stage.what,
            "points": points,
            "exponent": exponent(points, fit_from),
            "fit_from": fit_from,
        }
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5))
    for name, stage in results.items():
        sizes = [p["size"] for p in stage["points"]]
        if len(sizes) < 2:
            continue
        label = f"{name} (exp {stage['exponent']})"
        ax_t.plot(sizes, [p["seconds"] for p in stage["points"]], "o-", label=label)
        ax_m.plot(sizes, [max(p["peak_anon_mb"], 1) for p in stage["points"]], "o-", label=name)
    for ax, ylabel in ((ax_t, "seconds"), (ax_m, "peak anonymous memory (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N (entries / rows / records)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    ax_m.legend(fontsize=7)
    fig.suptitle("npidbench cost curves with generated stand-ins (benchmarks/scaling.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or the machine type where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def add_points(kept_path: Path, stage_name: str, sizes: list[int], threads: int, plot_path: Path | None) -> None:
    """Measure more sizes of one stage into a kept sweep (benchmarks/results/scaling.json, as
    regenerate.py keeps it) and refit its exponent: a long point (the SVM at COCO size) need not
    rerun everything. The thread count must be the sweep's, or the points would not compare."""
    kept = json.loads(kept_path.read_text())
    output = kept["outputs"][0]
    if output.get("threads", 1) != threads:
        raise SystemExit(f"{kept_path} was measured with {output.get('threads', 1)} threads, not {threads}")
    stage = next(s for s in STAGES if s.name == stage_name)
    fresh = sweep([Stage(stage.name, tuple(sizes), stage.what, stage.fit_from)], False, threads)[stage.name]
    for point in fresh["points"]:
        point["cpu"] = cpu_model()  # a sweep's points compare only on one CPU: say which
    entry = output["stages"][stage.name]
    points = {p["size"]: p for p in entry["points"]}
    points.update({p["size"]: p for p in fresh["points"]})
    entry["points"] = [points[size] for size in sorted(points)]
    entry["exponent"] = exponent(entry["points"], entry["fit_from"])
    entry["added"] = sorted({*entry.get("added", []), *sizes})  # measured after the sweep, same set-up
    kept_path.write_text(json.dumps(kept, indent=1) + "\n")
    if plot_path is not None:
        plot(output["stages"], plot_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=[s.name for s in STAGES])
    parser.add_argument("--quick", action="store_true", help="the two smallest sizes of each stage")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each point")
    parser.add_argument("--plot", type=Path, default=None, help="draw the curves into this PNG")
    parser.add_argument(
        "--add-to", type=Path, default=None, metavar="KEPT_JSON",
        help="with --only STAGE --sizes N...: measure those sizes into a kept sweep and refit",
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    args = parser.parse_args()
    if args.add_to is not None:
        if not args.only or len(args.only) != 1 or not args.sizes:
            raise SystemExit("--add-to needs --only with one stage and --sizes")
        add_points(args.add_to, args.only[0], args.sizes, args.threads, args.plot)
        return
    stages = [s for s in STAGES if args.only is None or s.name in args.only]
    results = sweep(stages, args.quick, args.threads)
    if args.plot is not None:
        plot(results, args.plot)
    print(json.dumps({"stages": results, "quick": args.quick, "threads": args.threads}, indent=1))


if __name__ == "__main__":
    main()
