"""Extraction throughput vs the bare backbone forward pass, side by side in one run.

Workload (issue "The spine", Performance): ResNet-50 at 224 on VOC-size JPEGs (500x375), the
five pooled FeatureN layers plus AvgPool written to a fresh feature cache, against the same
backbone's plain forward pass on the same batches already decoded and resized in memory. The
two are interleaved (bare, npidbench, bare, npidbench, ...) so that machine noise hits both;
the ratio of the medians is reported.

    python benchmarks/extraction_throughput.py [--images 160] [--repeats 3] [--arch resnet50]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from npidbench.backbones.resnet import LAYERS, build_resnet
from npidbench.cache import FeatureCache
from npidbench.checkpoint import load_backbone
from npidbench.checkpoint.own import npidbench_checkpoint, save_npidbench_checkpoint
from npidbench.data.imagenet import load_imagefolder
from npidbench.data.images import EvalTransform, decode_rgb, normalize_batch
from npidbench.data.synthetic.render import class_styles, encode_jpeg, random_instance, render
from npidbench.features import ExtractOptions, ExtractStats, extract
from npidbench.runner import default_workers


def write_voc_sized_jpegs(root: Path, count: int) -> None:
    """Scenes at VOC's typical 500x375 (landscape) / 375x500 (portrait), JPEG quality 90."""
    styles = class_styles(20)
    for i in range(count):
        rng = np.random.default_rng(i)
        height, width = (375, 500) if i % 4 else (500, 375)
        instances = [
            random_instance(styles[int(rng.integers(20))], rng, height, width, (0.2, 0.5))
            for _ in range(int(rng.integers(1, 4)))
        ]
        pixels = render(instances, height, width, rng).pixels
        folder = root / "train" / f"c{i % 5}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.jpg").write_bytes(encode_jpeg(pixels))


def bare_forward(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """Images per second of the plain forward pass on pre-decoded uint8 batches."""
    images = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            model(normalize_batch(batch))
            images += batch.shape[0]
    return images / (time.perf_counter() - start)


def npidbench_extract(ckpt: Path, split, transform, cache_root: Path, batch_size: int, workers: int) -> float:
    """Images per second of npidbench's extraction into an empty cache (decode to disk write)."""
    shutil.rmtree(cache_root, ignore_errors=True)
    stats = ExtractStats()
    backbone = load_backbone(ckpt)  # loading the checkpoint is not extraction: not timed
    start = time.perf_counter()
    extract(
        backbone,
        split,
        transform,
        LAYERS,
        FeatureCache(cache_root),
        ExtractOptions("cpu", workers, batch_size),
        stats,
    )
    return stats.images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="npidbench-bench-"))
    try:
        write_voc_sized_jpegs(tmp / "data", args.images)
        split = load_imagefolder(tmp / "data", "train")
        transform = EvalTransform(256, 224, "squash")  # the VOC07 SVM extraction transform
        torch.manual_seed(0)
        model = build_resnet(args.arch).eval().to(memory_format=torch.channels_last)
        ckpt = tmp / "ckpt.pth"
        save_npidbench_checkpoint(ckpt, npidbench_checkpoint(model, args.arch, {"recipe": "bench"}))
        decoded = torch.stack([transform(decode_rgb(path)) for path, _ in split.samples])
        batches = list(decoded.split(args.batch_size))
        bare_forward(model, batches[:2])  # warm-up (oneDNN primitive creation)
        bare, ours = [], []
        for _ in range(args.repeats):
            bare.append(bare_forward(model, batches))
            ours.append(
                npidbench_extract(ckpt, split, transform, tmp / "cache", args.batch_size, args.workers)
            )
        result = {
            "workload": f"{args.arch} 224x224, {args.images} JPEGs 500x375, Feature1..5+AvgPool",
            "threads": torch.get_num_threads(),
            "workers": args.workers,
            "batch_size": args.batch_size,
            "bare_forward_img_s": [round(v, 2) for v in bare],
            "npidbench_extract_img_s": [round(v, 2) for v in ours],
            # Each npidbench run is compared with the bare run just before it (noise on a shared
            # machine drifts over minutes), and the median of those ratios is the figure.
            "pair_ratios": [round(o / b, 3) for o, b in zip(ours, bare, strict=True)],
            "ratio_median_of_pairs": round(
                statistics.median(o / b for o, b in zip(ours, bare, strict=True)), 3
            ),
            "ratio_of_medians": round(statistics.median(ours) / statistics.median(bare), 3),
        }
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
