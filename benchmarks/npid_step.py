"""NPID's step (bank scores, loss, bank update) against the same backbone's plain forward +
backward with a linear head, side by side on the same batches (issue "The bundled NPID
pretrainer", Performance).

Fixed workload: ResNet-18 at the embedded default's input size (56), batch 128, a bank of
N = 50,000, K = 4,096 and K = 65,536 noise samples. Repetitions are interleaved (plain, NPID,
plain, NPID, ...) and the median ratio of paired step times is reported.

    python benchmarks/npid_step.py [--arch resnet18] [--size 56] [--batch 128] [--bank 50000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from npidbench.backbones.resnet import build_resnet, layer_channels
from npidbench.pretrain.npid import (
    EmbeddingModel,
    MemoryBank,
    bank_scores,
    draw_noise,
    estimate_z,
    nce_loss,
    softmax_loss,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--bank", type=int, default=50_000)
    parser.add_argument("--negatives", type=int, nargs="+", default=[4096, 65536])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone = build_resnet(args.arch)
    model = (
        EmbeddingModel(backbone, layer_channels(backbone)["AvgPool"])
        .to(device)
        .to(memory_format=torch.channels_last)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    bank = MemoryBank(args.bank, 128, generator=torch.Generator().manual_seed(0)).to(device)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(
        memory_format=torch.channels_last
    )
    indices = torch.randperm(args.bank, device=device)[: args.batch]
    targets = torch.randint(128, (args.batch,), device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    z: dict[int, torch.Tensor] = {}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def plain_step() -> None:  # the same network and head, an ordinary classification loss
        with amp:
            logits = model.head(model.backbone(images)).float()
        loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def npid_step(k: int, kind: str, step: int) -> None:
        with amp:
            features = model(images)
        noise = draw_noise(args.batch, k, args.bank, 0, step, device)
        scores = bank_scores(features, bank.bank, indices, noise)
        if kind == "nce":
            if k not in z:  # once, on the first batch, as in training
                z[k] = estimate_z(scores, 0.07, args.bank)
            loss = nce_loss(scores, z[k], 0.07, args.bank)
        else:
            loss = softmax_loss(scores, 0.07)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bank.update(indices, features.detach())

    def timed(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    for _ in range(2):  # warm-up
        plain_step()
        npid_step(args.negatives[0], "nce", 0)
    results = {
        "workload": f"{args.arch} {args.size}px batch {args.batch}, bank N={args.bank:,}",
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    for k in args.negatives:
        for kind in ("nce", "softmax"):
            plain, npid = [], []
            for step in range(args.repeats):
                plain.append(timed(plain_step))
                npid.append(timed(lambda k=k, kind=kind, step=step: npid_step(k, kind, step)))
            ratios = [n / p for n, p in zip(npid, plain, strict=True)]
            results[f"K={k} {kind}"] = {
                "plain_step_s": round(statistics.median(plain), 4),
                "npid_step_s": round(statistics.median(npid), 4),
                "overhead_median_of_pairs": f"{100 * (statistics.median(ratios) - 1):+.1f}%",
            }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
