"""The one-pass multi-head linear sweep vs one head, side by side on the same batches.

A training step of ``linear-imagenet-sweep`` (npidbench/tasks/frozen_linear.py: DINOv2's 52
heads = 13 lrs x last n in {1, 4} blocks x avgpool, on one frozen forward) against a step of
``linear-imagenet-dino`` on the same backbone (one head on the last 4 class tokens): the frozen
forward, the heads' forward and backward, the optimiser step. 1000 classes, as on ImageNet.
Steps alternate A/B per round; the figure is the median ratio of step times (issue 15's target:
at most 1.2x). Prints JSON.

    python benchmarks/linear_sweep.py --models vit_small_patch16_224 --batch 64 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from npidbench.backbones import backbone_for
from npidbench.backbones.vit import ViTSpec, build_vit
from npidbench.tasks.frozen_linear import Config, _optimizer, build_probe_heads

SPECS = {
    "vit_small_patch16_224": ViTSpec(depth=12, embed_dim=384, num_heads=6, patch_size=16, img_size=224),
    "vit_base_patch16_224": ViTSpec(depth=12, embed_dim=768, num_heads=12, patch_size=16, img_size=224),
}


class _Step:
    """One training step of a protocol's heads on a frozen backbone."""

    def __init__(self, backbone, protocol: str, classes: int, batch: int) -> None:
        config = Config(protocol=protocol, batch_size=batch, last_blocks=4, avgpool="no")
        self.heads = build_probe_heads(backbone, config, classes)
        self.optimizer, _ = _optimizer(self.heads, config)
        layers = tuple(dict.fromkeys(n for plan in self.heads.plans for n in plan.layers))
        self.extractor = backbone.extractor(layers).eval()
        for param in self.extractor.parameters():
            param.requires_grad_(False)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        started = time.perf_counter()
        with torch.no_grad():
            features = self.extractor(images)
        logits = self.heads(features)
        loss = sum(F.cross_entropy(out, labels) for out in logits.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - started


def measure(name: str, batch: int, rounds: int, classes: int) -> dict:
    torch.manual_seed(0)
    backbone = backbone_for(build_vit(SPECS[name]).eval(), name, "vit")
    one, sweep = _Step(backbone, "dino", classes, batch), _Step(backbone, "sweep", classes, batch)
    images = torch.randn(batch, 3, 224, 224)
    labels = torch.randint(0, classes, (batch,))
    one(images, labels), sweep(images, labels)  # warm-up (allocations, optimiser state)
    one_s, sweep_s = [], []
    for _ in range(rounds):
        one_s.append(one(images, labels))
        sweep_s.append(sweep(images, labels))
    ratios = [s / o for o, s in zip(one_s, sweep_s, strict=True)]
    return {
        "model": name,
        "batch": batch,
        "classes": classes,
        "rounds": rounds,
        "heads": {"one": len(one.heads.plans), "sweep": len(sweep.heads.plans)},
        "one_head_step_s": round(statistics.median(one_s), 3),
        "sweep_step_s": round(statistics.median(sweep_s), 3),
        "step_time_ratio_median": round(statistics.median(ratios), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_small_patch16_224"], choices=sorted(SPECS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--classes", type=int, default=1000)
    args = parser.parse_args()
    results = [measure(m, args.batch, args.rounds, args.classes) for m in args.models]
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    print(json.dumps({"machine": machine, "torch": torch.__version__, "results": results}, indent=2))


if __name__ == "__main__":
    main()
