"""WaNet (Nguyen & Tran 2021) as BackdoorBench runs it (docs/methods/attacks.md).

Trigger: a fixed smooth warping field. A k x k field of U(-1, 1) offsets, scaled to mean |offset| = 1, is
upsampled bicubically to H x W; the backdoor grid is G = clamp((identity + s * noise / H) * grid_rescale,
-1, 1) and an image is warped with grid_sample(bilinear, align_corners=True).

Training is batch-level: in every batch the first int(ratio * bs) samples are warped with G and relabelled,
the next int(that * cross_ratio) "noise" (cross) samples are warped with G plus a fresh per-sample
U(-1, 1) / H jitter and keep their labels, the rest stay clean; then the batch-wise PostTensorTransform
(attacks/batch_poisoning.py). BackdoorBench warps *normalised* tensors; so does the hook. Because every
sampling point lies inside the image (clamped grid, align_corners=True), bilinear warping is a convex
combination of pixels and commutes with the per-channel affine normalisation: warping in pixel space would
differ only by float rounding. bd_test images (apply_trigger on uint8) follow BackdoorBench's bd_test
exactly: normalise, warp, denormalise, x 255 and truncate to uint8.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from attacks.base import Attack, AttackConfigError, PoisonedSet
from attacks.batch_poisoning import (batch_poison_count, denormalize_like_backdoorbench, random_post_tensor_transform,
                                     to_pil_uint8)
from bdcore.data import DatasetSpec, ImageSet, normalize
from bdcore.train import TrainingHooks

TRIGGER_CHUNK = 1024  # images warped at once by apply_trigger (bounds memory on large test sets)


def make_noise_grid(k: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """(1, H, W, 2): U(-1, 1) of shape (1, 2, k, k) divided by its mean |value|, bicubic upsampling
    (align_corners=True), channels last."""
    ins = torch.rand(1, 2, k, k, generator=generator) * 2 - 1
    ins = ins / torch.mean(torch.abs(ins))
    return F.interpolate(ins, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)


def make_identity_grid(height: int, width: int) -> torch.Tensor:
    """(1, H, W, 2) with [..., 0] = x (column) and [..., 1] = y (row), both in linspace(-1, 1)."""
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, steps=height), torch.linspace(-1, 1, steps=width),
                                indexing="ij")
    return torch.stack((cols, rows), 2)[None, ...]


def backdoor_grid(identity_grid: torch.Tensor, noise_grid: torch.Tensor, s: float, grid_rescale: float
                  ) -> torch.Tensor:
    """G = clamp((identity + s * noise / H) * grid_rescale, -1, 1), (1, H, W, 2); H divides both axes as in
    BackdoorBench (its images are square)."""
    height = identity_grid.shape[1]
    return torch.clamp((identity_grid + s * noise_grid / height) * grid_rescale, -1, 1)


def cross_grids(grid: torch.Tensor, uniform_noise: torch.Tensor) -> torch.Tensor:
    """Noise-mode grids: clamp(G + u / H, -1, 1) for per-sample u ~ U(-1, 1) of shape (n, H, W, 2)."""
    height = grid.shape[1]
    return torch.clamp(grid.repeat(len(uniform_noise), 1, 1, 1) + uniform_noise / height, -1, 1)


def warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """grid_sample(bilinear, zero padding, align_corners=True); a (1, H, W, 2) grid is shared by the batch."""
    if grid.shape[0] == 1 and len(x) != 1:
        grid = grid.expand(len(x), -1, -1, -1)
    return F.grid_sample(x, grid.to(device=x.device, dtype=x.dtype), align_corners=True)


def wanet_trigger_uint8(images: torch.Tensor, grid: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    """BackdoorBench's bd_test image: ToTensor + Normalize, warp with G, its denormaliser, ToPILImage."""
    out = torch.empty_like(images)
    for start in range(0, len(images), TRIGGER_CHUNK):
        x = normalize(images[start:start + TRIGGER_CHUNK], spec)
        out[start:start + TRIGGER_CHUNK] = to_pil_uint8(denormalize_like_backdoorbench(warp(x, grid), spec))
    return out


def poison_wanet_batch(x: torch.Tensor, y: torch.Tensor, grid: torch.Tensor, num_bd: int,
                       cross_noise: torch.Tensor, backdoor_labels: Callable[[torch.Tensor], torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch of WaNet's train_step before the PostTensorTransform (x normalised).

    The first num_bd samples are warped with G and get backdoor labels (target-class samples included); the
    next len(cross_noise) are warped with their noise grid and keep their labels. Returns (x, y, kind) with
    kind 1 = backdoor, 2 = cross, 0 = clean (BackdoorBench's per-batch poison indicator)."""
    num_cross = len(cross_noise)
    kind = torch.zeros(len(y), dtype=torch.long, device=y.device)
    kind[:num_bd] = 1
    kind[num_bd:num_bd + num_cross] = 2
    parts_x = [warp(x[:num_bd], grid)] if num_bd else []
    if num_cross:
        parts_x.append(warp(x[num_bd:num_bd + num_cross], cross_grids(grid, cross_noise)))
    parts_x.append(x[num_bd + num_cross:])
    new_y = torch.cat([backdoor_labels(y[:num_bd]), y[num_bd:]])
    return torch.cat(parts_x), new_y, kind


class WaNet(Attack):
    def __init__(self, spec: DatasetSpec, target: int = 0, poison_ratio: float = 0.1,
                 label_transform: str = "all2one", cross_ratio: float = 2.0, s: float = 0.5, k: int = 4,
                 grid_rescale: float = 1.0, random_crop: int = 5, random_rotation: float = 10.0, seed: int = 0,
                 train_overrides: dict | None = None):
        super().__init__(spec, target, poison_ratio, label_transform, train_overrides)
        if int(k) < 1 or int(k) != k:
            raise AttackConfigError(f"attack.k={k} must be a positive integer (the warping field is k x k); "
                                    "BackdoorBench uses k=4")
        if float(s) < 0 or float(grid_rescale) <= 0:
            raise AttackConfigError(f"attack.s={s}, attack.grid_rescale={grid_rescale}: need s >= 0 and "
                                    "grid_rescale > 0; BackdoorBench uses s=0.5, grid_rescale=1")
        if float(cross_ratio) < 0 or self.poison_ratio * (1 + float(cross_ratio)) > 1:
            raise AttackConfigError(f"attack.cross_ratio={cross_ratio} with poison_ratio={poison_ratio} needs "
                                    "cross_ratio >= 0 and poison_ratio * (1 + cross_ratio) <= 1; "
                                    "BackdoorBench uses cross_ratio=2 with poison_ratio=0.1")
        if int(random_crop) < 0 or float(random_rotation) < 0:
            raise AttackConfigError(f"attack.random_crop={random_crop}, attack.random_rotation={random_rotation} "
                                    "must be >= 0; BackdoorBench uses 5 and 10")
        self.cross_ratio, self.s, self.k = float(cross_ratio), float(s), int(k)
        self.grid_rescale = float(grid_rescale)
        self.random_crop, self.random_rotation = int(random_crop), float(random_rotation)
        self.seed = int(seed)
        generator = torch.Generator().manual_seed(self.seed)
        self.noise_grid = make_noise_grid(self.k, spec.height, spec.width, generator)
        self.identity_grid = make_identity_grid(spec.height, spec.width)

    @property
    def grid(self) -> torch.Tensor:
        return backdoor_grid(self.identity_grid, self.noise_grid, self.s, self.grid_rescale)

    def apply_trigger(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return wanet_trigger_uint8(images, self.grid, self.spec)

    def poison_train(self, train: ImageSet, seed: int) -> PoisonedSet:
        """Nothing is baked in: the hook poisons each batch. No fixed sample carries the trigger, so the
        poison index is empty (BackdoorBench's saved bd_train is a post-hoc re-draw, docs/methods/attacks.md)."""
        return PoisonedSet(train, torch.empty(0, dtype=torch.long))

    def training_hooks(self, model: torch.nn.Module, device: torch.device) -> TrainingHooks:
        generator = torch.Generator().manual_seed(self.seed + 1)  # per-batch draws; CPU, so device-independent
        grid = self.grid.to(device)
        height, width = self.spec.height, self.spec.width

        def batch_transform(x, y, epoch):
            num_bd = min(batch_poison_count(self.poison_ratio, len(y), generator), len(y))
            num_cross = min(int(num_bd * self.cross_ratio), len(y) - num_bd)
            noise = (torch.rand(num_cross, height, width, 2, generator=generator) * 2 - 1).to(x.device)
            x, y, _ = poison_wanet_batch(x, y, grid, num_bd, noise, self.backdoor_labels)
            return random_post_tensor_transform(x, self.spec, generator, self.random_crop,
                                                self.random_rotation), y

        return TrainingHooks(batch_transform=batch_transform,
                             resumable_state=lambda: {"generator": generator.get_state()},
                             load_resumable_state=lambda state: generator.set_state(state["generator"]))

    def state_dict(self) -> dict:
        return {"noise_grid": self.noise_grid.clone(), "identity_grid": self.identity_grid.clone(),
                "s": self.s, "grid_rescale": self.grid_rescale, "k": self.k}

    def load_state_dict(self, state: dict) -> None:
        self.noise_grid, self.identity_grid = state["noise_grid"].clone(), state["identity_grid"].clone()
        self.s, self.grid_rescale, self.k = float(state["s"]), float(state["grid_rescale"]), int(state["k"])
