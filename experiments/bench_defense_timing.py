"""OTBR stage timings and CLP's, on a full-width PreAct-ResNet18 (random weights are fine for timing),
beside the paper's Table 4 (one RTX A6000): OTBR stage 1 1.96 s, stage 2 1.16 s, CLP 8.04 s (CIFAR-10).

    python -m experiments.bench_defense_timing [--width 64] [--steps 20] [--batch-size 256]
"""
from __future__ import annotations

import argparse
import time

import torch

import otbr
from baselines import clp
from bdcore.device import select_device
from bdcore.models import PreActResNet18, torchvision_model

PAPER_SECONDS = {"otbr_stage1": 1.96, "otbr_stage2": 1.16, "clp": 8.04}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    device = select_device()
    torch.manual_seed(0)
    model = PreActResNet18(10, 3, width=args.width).to(device).eval()

    start = time.perf_counter()
    nwcs = otbr.unlearning_neuron_weight_changes(model, seed=0, device=device,
                                                 unlearn={"steps": args.steps, "batch_size": args.batch_size})
    unlearn_s = time.perf_counter() - start
    start = time.perf_counter()
    pruned_filters = otbr.select_filters_to_prune(nwcs, 0.05)
    pruned = otbr.prune_filters(model, pruned_filters)
    prune_s = time.perf_counter() - start
    start = time.perf_counter()
    _, diag = otbr.ot_fusion(pruned, model, nwcs, pruned_filters)
    fusion_s = time.perf_counter() - start
    start = time.perf_counter()
    _, clp_diag = clp.defend(model)
    clp_s = time.perf_counter() - start

    print(f"device {device}; PreAct-ResNet18 width {args.width}, 10 classes; unlearning {args.steps} x {args.batch_size}")
    print(f"{'step':38s} {'here (s)':>9s} {'paper GPU (s)':>14s} {'ratio':>8s}")
    rows = [("OTBR stage 1: random unlearning + NWC", unlearn_s, None),
            ("OTBR stage 1: pruning (gamma 0.05)", prune_s, None),
            ("OTBR stage 1 total", unlearn_s + prune_s, PAPER_SECONDS["otbr_stage1"]),
            (f"OTBR stage 2: OT + fusion ({len(diag['chain_layers'])} layers)", fusion_s, PAPER_SECONDS["otbr_stage2"]),
            ("CLP: UCLC + pruning", clp_s, PAPER_SECONDS["clp"])]
    for name, here, paper in rows:
        tail = f"{paper:14.2f} {here / paper:8.2f}" if paper else ""
        print(f"{name:38s} {here:9.2f} {tail}")
    print(f"first pruned layer: {diag['first_pruned_layer']}; CLP pruned {clp_diag['total_pruned']} channels")


if __name__ == "__main__":
    main()
