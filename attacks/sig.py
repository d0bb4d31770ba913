"""SIG (Barni et al. 2019), the clean-label sinusoidal-signal attack, as BackdoorBench runs it
(docs/methods/attacks.md).

Trigger: v(i, j) = delta * sin(2 pi j f / W) on column j, the same for every row and channel (delta 40,
f 6). Stamping: uint8 image + v in float, clip to [0, 255], truncate to uint8; so where v is a tiny negative
rounding residue (f = 6, W = 32: column 16, -2.9e-14) the pixel becomes img - 1, exactly as published.

Poisoning is clean-label: round(ratio * N) indices drawn among the *target-class* training images (the
count is still relative to the whole set), labels unchanged. A count larger than the target class is an
AttackConfigError (BackdoorBench stops there too): on CIFAR-100 / GTSRB / Tiny use ratio <= class size / N.
"""
from __future__ import annotations

import numpy as np
import torch

from attacks.base import Attack, AttackConfigError, PoisonedSet
from bdcore.data import DatasetSpec, ImageSet


def sinusoid_row(width: int, delta: float, frequency: float) -> np.ndarray:
    """delta * sin(2 pi j f / W) for j = 0..W-1, evaluated per column with numpy scalars as BackdoorBench does,
    then stored in float32 (its pattern array is float32)."""
    return np.array([delta * np.sin(2 * np.pi * j * frequency / width) for j in range(width)], dtype=np.float32)


def add_signal(images: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) + float32 row (W,): the sum in float64 (numpy's uint32 + float32 promotion), clipped,
    truncated to uint8."""
    summed = images.to(torch.float64) + row.to(images.device, torch.float64).view(1, 1, 1, -1)
    return summed.clamp_(0, 255).to(torch.uint8)


def clean_label_poison_indices(labels: torch.Tensor, target: int, ratio: float, seed: int) -> torch.Tensor:
    """BackdoorBench's clean-label draw: numpy RandomState(seed).choice(target-class indices, round(ratio * N),
    replace=False). Raises AttackConfigError when the count is 0 or exceeds the target class."""
    labels_np = labels.cpu().numpy()
    count = round(ratio * len(labels_np))
    candidates = np.where(labels_np == target)[0]
    if count < 1:
        raise AttackConfigError(f"attack.poison_ratio={ratio} poisons round({ratio} * {len(labels_np)}) = 0 images; "
                                "use a larger ratio, e.g. attack.poison_ratio=0.1")
    if count > len(candidates):
        raise AttackConfigError(
            f"attack.poison_ratio={ratio} asks for {count} poisoned images but sig is clean-label and class "
            f"{target} has only {len(candidates)} of the {len(labels_np)} training images; use "
            f"attack.poison_ratio<={len(candidates) / len(labels_np):.6g}")
    rng = np.random.RandomState(seed)
    return torch.from_numpy(rng.choice(candidates, count, replace=False)).long()


class SIG(Attack):
    def __init__(self, spec: DatasetSpec, target: int = 0, poison_ratio: float = 0.1,
                 label_transform: str = "all2one", delta: float = 40.0, frequency: float = 6.0,
                 train_overrides: dict | None = None):
        super().__init__(spec, target, poison_ratio, label_transform, train_overrides)
        if label_transform != "all2one":
            raise AttackConfigError(f"attack.label_transform={label_transform!r} but sig is clean-label and "
                                    "poisons only the target class; use attack.label_transform=all2one")
        self.delta, self.frequency = float(delta), float(frequency)
        self.row = torch.from_numpy(sinusoid_row(spec.width, self.delta, self.frequency))

    def apply_trigger(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return add_signal(images, self.row)

    def poison_train(self, train: ImageSet, seed: int) -> PoisonedSet:
        """Signal on round(ratio * N) target-class images; every label stays as it is."""
        idx = clean_label_poison_indices(train.labels, self.target, self.poison_ratio, seed)
        images = train.images.clone()
        images[idx] = self.apply_trigger(images[idx])
        return PoisonedSet(ImageSet(images, train.labels.clone()), idx)

    def state_dict(self) -> dict:
        return {"row": self.row.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.row = state["row"].clone()
