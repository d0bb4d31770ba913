"""Throughput of the one training loop against a bare forward/backward/step loop, same model and batch,
measured in one run. Prints images/s for both and their ratio.

    python -m experiments.bench_train_throughput [--width 16] [--batches 40] [--shape 1 28 28]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn

from bdcore.data import DatasetSpec, ImageSet, normalize
from bdcore.device import select_device
from bdcore.models import build_model
from bdcore.train import TrainSettings, train_model


def bare_loop(model, images, labels, spec, batch_size, device) -> float:
    """Forward/backward/SGD step on pre-normalised batches: no shuffling, augmentation or bookkeeping."""
    x_all = normalize(images, spec).to(device)
    y_all = labels.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    steps = len(labels) // batch_size
    start = time.perf_counter()
    for i in range(steps):
        x, y = x_all[i * batch_size:(i + 1) * batch_size], y_all[i * batch_size:(i + 1) * batch_size]
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shape", type=int, nargs=3, default=[1, 28, 28])
    args = parser.parse_args()
    c, h, w = args.shape
    spec = DatasetSpec("bench", 10, c, h, w, (0.5,) * c, (0.25,) * c)
    device = select_device()
    n = args.batches * args.batch_size
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8), torch.randint(0, 10, (n,), generator=g))
    settings = TrainSettings(epochs=1, batch_size=args.batch_size, t_max=1)
    bare, ours = [], []
    for _ in range(args.repeats):  # alternate the two, so warm-up and machine noise hit both alike
        torch.manual_seed(0)
        bare.append(bare_loop(build_model("preactresnet18", 10, c, width=args.width).to(device), data.images,
                              data.labels, spec, args.batch_size, device))
        torch.manual_seed(0)
        history = train_model(build_model("preactresnet18", 10, c, width=args.width), data, spec, settings,
                              device=device, progress=False)
        ours.append(history[0]["images_per_second"])
    bare, ours = max(bare), max(ours)
    print(f"device {device}, PreAct-ResNet18 width {args.width}, input {c}x{h}x{w}, batch {args.batch_size}, "
          f"{args.batches} batches, best of {args.repeats} alternating runs")
    print(f"bare forward/backward loop : {bare:8.1f} img/s")
    print(f"bdcore.train.train_model    : {ours:8.1f} img/s (shuffle + on-device crop/flip + normalise + metrics)")
    print(f"ratio (ours / bare)        : {ours / bare:8.3f}")


if __name__ == "__main__":
    main()
