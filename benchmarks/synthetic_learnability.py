"""Is the embedded synthetic ImageNet learnable, and not trivial? (datasets issue)

Side by side on the same data: the kNN top-1 of a random-init ResNet-18 (what an untrained
backbone gets for free) against a short supervised ResNet-18 run from scratch (its val top-1
and the kNN top-1 of its features). A good synthetic set leaves the first well above chance and
well below the others.

    python benchmarks/synthetic_learnability.py [--epochs 10] [--size 56]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torchvision.transforms.v2 as T
from torch import nn

from npidbench.backbones.resnet import build_resnet
from npidbench.data import load_split
from npidbench.data.images import decode_rgb, normalize_batch
from npidbench.solvers.knn import weighted_knn


def load_images(split, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    resize = T.Compose([T.Resize(size + size // 7, antialias=True), T.CenterCrop(size)])
    images = torch.stack([resize(decode_rgb(path)) for path, _ in split.samples])
    return images, torch.tensor([label for _, label in split.samples])


@torch.inference_mode()
def features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(normalize_batch(chunk)) for chunk in images.split(256)])


def knn_top1(model: nn.Module, train, test) -> float:
    result = weighted_knn(features(model, train[0]), train[1], features(model, test[0]), test[1], ks=(20,))
    return result.top1[20]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args()
    torch.manual_seed(0)
    train_split, val_split = load_split("imagenet", "train", None), load_split("imagenet", "val", None)
    train = load_images(train_split, args.size)
    val = load_images(val_split, args.size)
    classes = len(train_split.classes)

    random_model = build_resnet("resnet18")
    random_knn = knn_top1(random_model, train, val)

    model = build_resnet("resnet18")
    head = nn.Linear(512, classes)
    net = nn.Sequential(model, head).to(memory_format=torch.channels_last)
    augment = T.Compose(
        [T.RandomResizedCrop(args.size, scale=(0.5, 1.0), antialias=True), T.RandomHorizontalFlip()]
    )
    steps = args.epochs * (len(train[0]) // args.batch_size)
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps)
    start = time.perf_counter()
    for _ in range(args.epochs):
        net.train()
        order = torch.randperm(len(train[0]))
        for i in range(len(order) // args.batch_size):
            batch = order[i * args.batch_size : (i + 1) * args.batch_size]
            images = torch.stack([augment(img) for img in train[0][batch]])
            loss = nn.functional.cross_entropy(net(normalize_batch(images)), train[1][batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    minutes = (time.perf_counter() - start) / 60
    with torch.inference_mode():
        net.eval()
        logits = torch.cat([net(normalize_batch(chunk)) for chunk in val[0].split(256)])
    supervised_top1 = 100.0 * float((logits.argmax(1) == val[1]).float().mean())
    result = {
        "data": f"synthetic ImageNet: {len(train[0])} train / {len(val[0])} val images, {classes} classes, {args.size}px",
        "chance_top1": round(100.0 / classes, 2),
        "random_init_knn20_top1": round(random_knn, 2),
        "supervised_resnet18_val_top1": round(supervised_top1, 2),
        "supervised_resnet18_knn20_top1": round(knn_top1(model, train, val), 2),
        "supervised_minutes": round(minutes, 2),
        "epochs": args.epochs,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
