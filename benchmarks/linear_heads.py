"""The five FeatureN heads trained together against one single-head probe over the same data
(issue "Linear probes", Performance: at most 1.2x), side by side.

Each training step of a probe is: the frozen backbone's forward pass (eval mode, no gradients,
stopping after the deepest layer the heads need), the heads' forward and backward, an SGD step.
Variants, on the same pre-normalised batches:
  five-heads  Feature1..5 heads (BN without affine + Linear), one forward pass feeds all five
  feature5    the Feature5 head alone (the same backbone depth)
  avgpool     the AvgPool head alone (MoCo's probe)
Rounds are interleaved (five-heads, feature5, avgpool, five-heads, ...); the median ratio of
paired step times is reported.

    python benchmarks/linear_heads.py [--arch resnet50] [--size 224] [--batch 32] [--classes 1000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from npidbench.backbones import backbone_for
from npidbench.backbones.resnet import FEATURE_LAYERS, build_resnet
from npidbench.tasks.linear import frozen_extractor, frozen_heads_for, sgd

VARIANTS = {"five-heads": FEATURE_LAYERS, "feature5": ("Feature5",), "avgpool": ("AvgPool",)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build_resnet(args.arch).eval()
    backbone = backbone_for(model, args.arch)
    device = torch.device("cpu")
    probes = {}
    for name, layers in VARIANTS.items():
        heads = frozen_heads_for(backbone, args.classes, layers)
        optimizer = sgd(heads.parameters(), 0.01, 0.9, True, 1e-4)  # as the task builds it
        probes[name] = (frozen_extractor(backbone, layers, device), heads.train(), optimizer)
    images = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, args.classes, (args.batch,))

    def step(name: str) -> float:
        extractor, heads, optimizer = probes[name]
        started = time.perf_counter()
        with torch.no_grad():
            features = extractor(images)
        loss = sum(F.cross_entropy(out, labels) for out in heads(features).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - started

    for name in VARIANTS:  # warm-up
        step(name)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name in VARIANTS:
            times[name].append(step(name))
    ratios = {
        single: statistics.median(a / b for a, b in zip(times["five-heads"], times[single], strict=True))
        for single in ("feature5", "avgpool")
    }
    print(
        json.dumps(
            {
                "arch": args.arch,
                "size": args.size,
                "batch": args.batch,
                "classes": args.classes,
                "threads": torch.get_num_threads(),
                "median_step_s": {name: round(statistics.median(t), 4) for name, t in times.items()},
                "five_heads_over_single_head": {k: round(v, 3) for k, v in ratios.items()},
                "head_params": {
                    name: sum(p.numel() for p in probes[name][1].parameters()) for name in VARIANTS
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
