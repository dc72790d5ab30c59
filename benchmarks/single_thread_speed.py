"""This machine's single-thread speed, the number the README's timings are quoted with (2-core
machines of one class differ up to 3x): torch's fp32 matrix product and a ResNet-18 forward +
backward at the pretrainer's 56 px input, both on one thread, best of five.

    python benchmarks/single_thread_speed.py
"""

from __future__ import annotations

import platform
import time

import torch
import torchvision


def best_seconds(work, repeats: int = 5) -> float:
    work()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    torch.set_num_threads(1)
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    matmul = best_seconds(lambda: [a @ b for _ in range(20)])
    gflops = 20 * 2 * 512**3 / matmul / 1e9
    model = torchvision.models.resnet18()
    images = torch.randn(16, 3, 56, 56)

    def step() -> None:
        model(images).sum().backward()

    resnet = best_seconds(step)
    cpu = platform.processor() or platform.machine()
    print(f"{cpu}: {gflops:.1f} GFLOP/s fp32 matmul, ResNet-18 56 px fwd+bwd {16 / resnet:.0f} img/s (1 thread)")


if __name__ == "__main__":
    main()
