"""VOC07 SVM + low-shot on VOC07-size features: the batched solver against the anchors' way.

Features: npidbench's synthetic VOC2007 generated at the real size (5011 trainval, 4952 test),
Feature1..5 of a seeded random-init ResNet-50 extracted by npidbench (squash to 96 px on this
CPU; the pooling grid and dims are those of 224 px: 9216/9216/8192/9216/8192), written as a
``--features-dir`` folder. Test mAPs land around 20-30%: not made-up easy features.

Parts (run separately, each prints one JSON line; ``--out`` appends it to a file):

  prepare          generate data + features into DIR (about 5 min on 2 cores)
  batched          full SVM on all five layers, best layer, low-shot (k=1..96, 5 samples)
  sklearn          the anchors' way (one LinearSVC at a time, 3-fold CV, refit) on a subset of
                   classes per layer and one low-shot sample of a subset of classes; times are
                   process CPU time of the single liblinear thread, extrapolated linearly to
                   20 classes / 5 samples (stated in the output)
  objective        liblinear's objective vs ours for one class and every cost, with a tightly
                   converged float64 run of ours as the reference

    python benchmarks/voc_svm_speed.py prepare --dir /tmp/voc-features
    python benchmarks/voc_svm_speed.py batched --dir /tmp/voc-features
    python benchmarks/voc_svm_speed.py sklearn --dir /tmp/voc-features --classes 0,10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from knn_memory import AnonPeak  # same folder: peak anonymous memory sampler

LAYERS = ("Feature1", "Feature2", "Feature3", "Feature4", "Feature5")


def prepare(folder: Path) -> dict:
    from npidbench.backbones.resnet import FEATURE_LAYERS, build_resnet
    from npidbench.cache import FeatureCache
    from npidbench.checkpoint import load_backbone
    from npidbench.checkpoint.own import npidbench_checkpoint, save_npidbench_checkpoint
    from npidbench.data.images import EvalTransform
    from npidbench.data.synthetic import SuiteSpec, VocSpec, generate_suite
    from npidbench.data.voc import load_classification
    from npidbench.features import ExtractOptions, extract

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data"
    if not (data / "VOCdevkit").exists():
        spec = VocSpec(
            voc07_trainval=5011, voc07_test=4952, voc12_trainval=8, seg_train=2, seg_val=2, aug_extra=2
        )
        generate_suite(data, SuiteSpec(voc=spec), only=("voc",))
    torch.manual_seed(0)
    checkpoint = folder / "r50-random-init.pth"
    save_npidbench_checkpoint(
        checkpoint, npidbench_checkpoint(build_resnet("resnet50"), "resnet50", {"recipe": "bench"})
    )
    backbone = load_backbone(checkpoint)
    cache = FeatureCache(folder / "cache")
    for split in ("trainval", "test"):
        part = load_classification(data / "VOCdevkit", split)
        feats = extract(
            backbone,
            part,
            EvalTransform(96, 96, "squash"),
            FEATURE_LAYERS,
            cache,
            ExtractOptions("cpu", 0, 64),
        )
        for layer, entry in feats.items():
            np.save(folder / f"{split}_{layer}.npy", np.asarray(entry.features))
        # FAIR / VISSL / mmselfsup convention: 1 present, 0 absent, -1 difficult
        voc = part.label_matrix
        np.save(folder / f"{split}_labels.npy", np.select([voc == 1, voc == -1], [1, 0], -1).astype(np.int8))
    (folder / "layers.json").write_text(json.dumps(list(LAYERS)))
    return {"part": "prepare", "dir": str(folder)}


def _load(folder: Path, layer: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    def voc(labels: np.ndarray) -> np.ndarray:  # FAIR convention -> VOC's 1 / -1 / 0
        return np.select([labels == 1, labels == 0], [1, -1], 0)

    return (
        np.load(folder / f"trainval_{layer}.npy", mmap_mode="r"),
        voc(np.load(folder / "trainval_labels.npy")),
        np.load(folder / f"test_{layer}.npy", mmap_mode="r"),
        voc(np.load(folder / "test_labels.npy")),
    )


def batched(folder: Path) -> dict:
    from npidbench.solvers.voc_svm import cost_list, full_svm, lowshot_svm

    costs = cost_list("mms")
    with AnonPeak() as peak:
        started = time.perf_counter()
        layers, kernel = {}, {}
        for layer in LAYERS:
            tr, trl, te, tel = _load(folder, layer)
            result = full_svm(tr, trl, te, tel, costs, keep_kernel=True)
            layers[layer] = {"mAP": round(result.map, 3), "s": round(result.seconds, 1), **result.stats}
            print(layer, layers[layer], file=sys.stderr, flush=True)
            if max(layers, key=lambda name: layers[name]["mAP"]) == layer:  # as voc-svm: keep the best's
                kernel = {layer: result.kernel}
            del result
        full_s = time.perf_counter() - started
        best = max(layers, key=lambda name: layers[name]["mAP"])
        tr, trl, te, tel = _load(folder, best)
        low = lowshot_svm(tr, trl, te, tel, costs, layer=best, kernel=kernel[best])
        total = time.perf_counter() - started
    return {
        "part": "batched",
        "torch_threads": torch.get_num_threads(),
        "full_s": round(full_s, 1),
        "lowshot_s": round(low.seconds, 1),
        "total_s": round(total, 1),
        "peak_anon_gb": round(peak.peak / 1024, 2),
        "best_layer": best,
        "layers": layers,
        "lowshot": {k: v["mean"] for k, v in low.summary().items()},
        "lowshot_costs": {k: v["cost"] for k, v in low.summary().items()},
    }


def sklearn(folder: Path, classes: list[int], lowshot_classes: list[int]) -> dict:
    from npidbench.solvers.voc_svm import cost_list, full_svm, lowshot_svm

    costs = cost_list("mms")
    out: dict = {"part": "sklearn", "classes": classes, "layers": {}}
    for layer in LAYERS:
        tr, trl, te, tel = _load(folder, layer)
        cpu, wall = time.process_time(), time.perf_counter()
        ref = full_svm(tr, trl, te, tel, costs, solver="sklearn", classes=classes)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        ours = full_svm(tr, trl, te, tel, costs, classes=classes)
        out["layers"][layer] = {
            "cpu_s": round(cpu, 1),
            "wall_s": round(wall, 1),
            "cpu_s_20_classes": round(cpu * 20 / len(classes), 1),
            "ap_sklearn": [round(a, 3) for a in ref.ap],
            "ap_batched": [round(a, 3) for a in ours.ap],
            "cost_sklearn": ref.chosen_costs,
            "cost_batched": ours.chosen_costs,
            **ref.stats,
        }
        print(layer, out["layers"][layer], file=sys.stderr, flush=True)
    tr, trl, te, tel = _load(folder, "Feature5")
    cpu, wall = time.process_time(), time.perf_counter()
    ref = lowshot_svm(
        tr, trl, te, tel, costs, layer="Feature5", samples=1, solver="sklearn", classes=lowshot_classes
    )
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    ours = lowshot_svm(tr, trl, te, tel, costs, layer="Feature5", samples=1, classes=lowshot_classes)
    scale = 5 * 20 / len(lowshot_classes)
    out["lowshot"] = {
        "classes": lowshot_classes,
        "samples": 1,
        "cpu_s": round(cpu, 1),
        "wall_s": round(wall, 1),
        "cpu_s_extrapolated": round(cpu * scale, 1),
        "map_sklearn": {k: v["mean"] for k, v in ref.summary().items()},
        "map_batched": {k: v["mean"] for k, v in ours.summary().items()},
    }
    full = sum(v["cpu_s_20_classes"] for v in out["layers"].values())
    out["anchors_total_cpu_s_extrapolated"] = round(full + out["lowshot"]["cpu_s_extrapolated"], 1)
    return out


def objective(folder: Path, layer: str, cls: int) -> dict:
    """liblinear (the anchors' settings) vs ours on trainval, class ``cls``, every cost."""
    from sklearn.svm import LinearSVC

    from npidbench.solvers.svm import eigen_embedding, gram_matrix, solve_cost_path
    from npidbench.solvers.voc_svm import binary_labels, class_weights, cost_list, normalise
    from npidbench.solvers.voc_svm_sklearn import linear_svc

    costs = cost_list("mms")
    tr, trl, _, _ = _load(folder, layer)
    x = normalise(tr)
    y = binary_labels(trl[:, cls])
    w = class_weights(y)
    gram = gram_matrix(x)
    labels = torch.tensor(y)[None, :, None]
    weights = torch.tensor(w)[None, :, None]
    ours = solve_cost_path(eigen_embedding(gram[None]), labels, weights, costs)
    tight = solve_cost_path(eigen_embedding(gram[None], torch.float64), labels, weights, costs, tol=1e-14)
    rows = []
    xn = x.numpy()
    for j, cost in enumerate(costs):
        model: LinearSVC = linear_svc(cost).fit(xn, y)
        s = xn @ model.coef_.ravel() + model.intercept_[0]
        lib = 0.5 * (model.coef_.ravel() @ model.coef_.ravel() + model.intercept_[0] ** 2)
        lib += float(np.sum(cost * w * np.maximum(0, 1 - y * s) ** 2))
        rows.append(
            {
                "C": cost,
                "liblinear": lib,
                "liblinear_iter": int(model.n_iter_),
                "ours": float(ours[j].objective),
                "tight": float(tight[j].objective),
                "ours_vs_liblinear": float(ours[j].objective) / lib - 1,
                "ours_vs_tight": float(ours[j].objective) / float(tight[j].objective) - 1,
            }
        )
        print(rows[-1], file=sys.stderr, flush=True)
    return {"part": "objective", "layer": layer, "class": cls, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("part", choices=("prepare", "batched", "sklearn", "objective"))
    parser.add_argument("--dir", type=Path, default=Path("/tmp/voc-features"))
    parser.add_argument("--classes", default="0,10", help="sklearn: classes timed per layer")
    parser.add_argument("--lowshot-classes", default="0,10")
    parser.add_argument("--layer", default="Feature5")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.part == "prepare":
        result = prepare(args.dir)
    elif args.part == "batched":
        result = batched(args.dir)
    elif args.part == "sklearn":
        result = sklearn(
            args.dir,
            [int(c) for c in args.classes.split(",")],
            [int(c) for c in args.lowshot_classes.split(",")],
        )
    else:
        result = objective(args.dir, args.layer, int(args.classes.split(",")[0]))
    line = json.dumps(result)
    print(line)
    if args.out:
        with args.out.open("a") as fh:
            fh.write(line + "\n")


if __name__ == "__main__":
    main()
