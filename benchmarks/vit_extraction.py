"""Multi-layer ViT extraction vs the bare timm forward, side by side on the same batches.

npidbench's ViT extractor (npidbench/backbones/vit.py) returns the SVM's four block CLS tokens,
the final CLS and the mean patch token in one pass; the reference is timm's own forward of the
same model (the final CLS only). Runs alternate A/B per round on one machine; the figure is the
median ratio of throughputs (issue 15's target: at least 0.95x). Prints JSON.

    python benchmarks/vit_extraction.py --models vit_small_patch16_224 vit_base_patch16_224
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from npidbench.backbones import backbone_for
from npidbench.backbones.vit import ViTSpec, build_vit

SPECS = {
    "vit_small_patch16_224": ViTSpec(depth=12, embed_dim=384, num_heads=6, patch_size=16, img_size=224),
    "vit_base_patch16_224": ViTSpec(depth=12, embed_dim=768, num_heads=12, patch_size=16, img_size=224),
}


def _seconds(fn, images: torch.Tensor) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        fn(images)
    return time.perf_counter() - started


def measure(name: str, batch: int, rounds: int) -> dict:
    torch.manual_seed(0)
    model = build_vit(SPECS[name]).eval()
    backbone = backbone_for(model, name, "vit")
    layers = (*backbone.feature_layers, "CLS", "AvgPatch")
    extractor = backbone.extractor(layers).eval()
    images = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():  # warm-up, and the CLS of both paths agree
        assert torch.allclose(extractor(images)["CLS"], model(images), atol=1e-5)
    ours, bare = [], []
    for _ in range(rounds):
        ours.append(_seconds(extractor, images))
        bare.append(_seconds(model, images))
    ratios = [b / o for o, b in zip(ours, bare, strict=True)]  # our throughput over the bare one
    return {
        "model": name,
        "layers": list(layers),
        "batch": batch,
        "rounds": rounds,
        "ours_img_per_s": round(batch / statistics.median(ours), 2),
        "bare_img_per_s": round(batch / statistics.median(bare), 2),
        "throughput_ratio_median": round(statistics.median(ratios), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SPECS), choices=list(SPECS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results = [measure(name, args.batch, args.rounds) for name in args.models]
    print(
        json.dumps(
            {"machine": f"{torch.get_num_threads()} threads, {platform.machine()}", "results": results},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
