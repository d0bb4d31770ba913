"""In-memory image sets and batched on-device augmentation (docs/architecture.md, "Data").

Images live as uint8 N x C x H x W tensors; the order on a sample is
trigger (pixel space) -> augmentation -> float/255 -> normalisation -> model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class DatasetSpec:
    """What a model and an attack need to know about a data set."""

    name: str
    num_classes: int
    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool = False  # BackdoorBench flips only CIFAR-10
    crop_padding: int = 4

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


@dataclass
class ImageSet:
    """uint8 images (N, C, H, W) with int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        if self.images.dtype != torch.uint8:
            raise TypeError(f"ImageSet images must be uint8, got {self.images.dtype}")
        if self.images.ndim != 4 or len(self.images) != len(self.labels):
            raise ValueError("ImageSet needs images (N, C, H, W) and N labels")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices) -> "ImageSet":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageSet(self.images[idx], self.labels[idx])

    def to(self, device) -> "ImageSet":
        return ImageSet(self.images.to(device), self.labels.to(device))


def normalize(images: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    """uint8 -> float in [0, 1] -> (x - mean) / std, on whatever device the images are."""
    x = images.float().div_(255.0)
    mean = torch.tensor(spec.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def random_crop_flip(images: torch.Tensor, spec: DatasetSpec, generator: torch.Generator) -> torch.Tensor:
    """BackdoorBench's train transform on a batch: RandomCrop(size, padding, zero fill) per sample,
    then RandomHorizontalFlip(p=0.5) when the data set uses it. Works on uint8, stays on the device."""
    n, c, h, w = images.shape
    pad = spec.crop_padding
    device = images.device
    if pad > 0:
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=generator.device).to(device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=generator.device).to(device)
        rows = (dy.view(n, 1) + torch.arange(h, device=device).view(1, h))  # n x h
        cols = (dx.view(n, 1) + torch.arange(w, device=device).view(1, w))  # n x w
        batch_idx = torch.arange(n, device=device).view(n, 1, 1)
        # gather per-sample windows: result n x h x w x c, then back to n x c x h x w
        out = padded.permute(0, 2, 3, 1)[batch_idx, rows.view(n, h, 1), cols.view(n, 1, w)]
        images = out.permute(0, 3, 1, 2).contiguous()
    if spec.hflip:
        flip = torch.rand(n, generator=generator, device=generator.device).to(device) < 0.5
        images = torch.where(flip.view(n, 1, 1, 1), images.flip(3), images)
    return images


@dataclass
class DefenseData:
    """What a data-dependent defense receives (baselines/base.py); data-free defenses receive None.

    `clean` is the defender's budget, drawn from the *clean* training set; `clean_indices` say where it came
    from (tests assert a defense reads nothing else). `validation` is a held-out part of the budget for
    defenses that select a threshold or an epoch under `selection_split: validation`; `evaluate` (test-set
    ACC/ASR/RA) may be used only to select under the published `selection_split: test` (and for reports).
    """

    clean: ImageSet
    spec: DatasetSpec
    clean_indices: torch.Tensor | None = None
    validation: ImageSet | None = None
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    apply_trigger: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None
    evaluate: Callable[[torch.nn.Module], dict] | None = None
    precision: str = "fp32"  # the job's resolved precision: pass it on to bdcore.train.train_model
