"""The defender's clean data: which training indices a data-dependent defense may read.

Always drawn from the *clean* training set (before poisoning), as BackdoorBench's defenses do.
"""
from __future__ import annotations

import random

import numpy as np
import torch


class BudgetConfigError(ValueError):
    """A budget that cannot be drawn; one line naming the fix."""


def ratio_indices(num_samples: int, ratio: float, seed: int) -> torch.Tensor:
    """BackdoorBench's clean subset: Python `random.seed(seed); random.sample(range(N), int(ratio * N))`,
    sorted (its index files equal exactly this for seed 0, ratio 0.05)."""
    if not 0 < ratio <= 1:
        raise BudgetConfigError(f"budget.ratio={ratio} is outside (0, 1]; use e.g. budget.ratio=0.05")
    count = int(num_samples * ratio)
    if count < 1:
        raise BudgetConfigError(f"budget.ratio={ratio} of {num_samples} images is no image; raise budget.ratio")
    return torch.tensor(sorted(random.Random(seed).sample(range(num_samples), count)), dtype=torch.long)


def per_class_indices(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """`per_class` images of every class (Grad-Prune's samples-per-class budgets 2 / 10 / 100), sorted."""
    rng = np.random.RandomState(seed)
    picks = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten().numpy()
        if per_class > len(members):
            raise BudgetConfigError(f"budget.spc={per_class} but class {c} has only {len(members)} images; "
                                    "lower budget.spc")
        picks.extend(rng.choice(members, per_class, replace=False).tolist())
    return torch.tensor(sorted(picks), dtype=torch.long)


class RatioBudget:
    """A random fraction of the clean training set (BackdoorBench: 5 %; RNP in the OTBR paper: 0.5 %)."""

    def __init__(self, ratio: float = 0.05, seed: int = 0):
        self.ratio, self.seed = float(ratio), int(seed)

    def indices(self, labels: torch.Tensor) -> torch.Tensor:
        return ratio_indices(len(labels), self.ratio, self.seed)


class PerClassBudget:
    """A fixed number of clean images per class."""

    def __init__(self, spc: int = 10, seed: int = 0):
        if int(spc) < 1:
            raise BudgetConfigError(f"budget.spc={spc} must be >= 1; e.g. budget.spc=10")
        self.spc, self.seed = int(spc), int(seed)

    def indices(self, labels: torch.Tensor) -> torch.Tensor:
        return per_class_indices(labels, self.spc, self.seed)


class NoBudget:
    """No clean data at all: only data-free defenses can run."""

    def indices(self, labels: torch.Tensor) -> None:
        return None
