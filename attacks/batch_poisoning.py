"""Pieces shared by the attacks that poison each training batch (WaNet, BPP; docs/methods/attacks.md).

BackdoorBench trains these attacks on the *test* transform (no per-sample augmentation) and poisons the first
int(ratio * bs) samples of every shuffled batch. After poisoning, one "PostTensorTransform" acts on the whole
normalised batch: one random crop (zero padding, p = 0.8), one random rotation (nearest, zero fill, p = 0.5)
and, on CIFAR-10 only, one horizontal flip (p = 0.5), each with a single parameter set for the batch.

BackdoorBench draws the gates from Python's `random` and the parameters from torch's global generator; here
every draw comes from one private torch generator, so a run is reproducible without touching global state.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from bdcore.data import DatasetSpec


def batch_poison_count(ratio: float, batch_size: int, generator: torch.Generator) -> int:
    """int(ratio * bs); below one sample per batch, 1 with probability ratio * bs, else 0
    (BackdoorBench's generalize_to_lower_pratio)."""
    expected = ratio * batch_size
    if expected >= 1:
        return int(expected)
    return int(torch.rand((), generator=generator).item() < expected)


@dataclass(frozen=True)
class PostTensorParams:
    """One draw of the batch-wise transform; None / False = that step is skipped."""

    crop_offset: tuple[int, int] | None  # (top, left) in the zero-padded batch
    angle: float | None  # degrees, counter-clockwise (torchvision's convention)
    flip: bool


def draw_post_tensor_params(generator: torch.Generator, crop_padding: int, rotation_degrees: float,
                            hflip: bool) -> PostTensorParams:
    """The draws of BackdoorBench's PostTensorTransform, in its order: crop gate and offset, rotation gate
    and angle ~ U(-deg, deg), flip."""
    crop_offset = None
    if torch.rand((), generator=generator).item() < 0.8:
        top = int(torch.randint(0, 2 * crop_padding + 1, (), generator=generator))
        left = int(torch.randint(0, 2 * crop_padding + 1, (), generator=generator))
        crop_offset = (top, left)
    angle = None
    if torch.rand((), generator=generator).item() < 0.5:
        angle = float(torch.empty(()).uniform_(-float(rotation_degrees), float(rotation_degrees),
                                               generator=generator))
    flip = bool(hflip) and torch.rand((), generator=generator).item() < 0.5
    return PostTensorParams(crop_offset, angle, flip)


def post_tensor_transform(x: torch.Tensor, params: PostTensorParams, crop_padding: int) -> torch.Tensor:
    """Apply one parameter set to the whole batch x (N, C, H, W), normalised floats: zero here is the data
    set's mean colour, exactly what BackdoorBench's zero fill on normalised tensors gives."""
    h, w = x.shape[-2:]
    if params.crop_offset is not None and crop_padding > 0:
        top, left = params.crop_offset
        padded = torch.nn.functional.pad(x, (crop_padding,) * 4)
        x = padded[..., top:top + h, left:left + w]
    if params.angle is not None:
        x = TF.rotate(x, params.angle, interpolation=InterpolationMode.NEAREST, fill=[0.0] * x.shape[1])
    if params.flip:
        x = x.flip(-1)
    return x.contiguous()


def random_post_tensor_transform(x: torch.Tensor, spec: DatasetSpec, generator: torch.Generator,
                                 crop_padding: int, rotation_degrees: float) -> torch.Tensor:
    """Draw a parameter set and apply it; the flip only where BackdoorBench flips (spec.hflip: CIFAR-10)."""
    params = draw_post_tensor_params(generator, crop_padding, rotation_degrees, spec.hflip)
    return post_tensor_transform(x, params, crop_padding)


def channel_stats(spec: DatasetSpec, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The data set's mean and std as (1, C, 1, 1) tensors."""
    mean = torch.tensor(spec.mean, device=device, dtype=dtype).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device, dtype=dtype).view(1, -1, 1, 1)
    return mean, std


def denormalize_like_backdoorbench(x: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    """BackdoorBench's get_dataset_denormalization, float op for float op: Normalize(0, 1/std) then
    Normalize(-mean, 1), i.e. x / f32(1/std) - f32(-mean). Returns [0, 1] floats."""
    inv_std = torch.tensor([1.0 / s for s in spec.std], device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    neg_mean = torch.tensor([-m for m in spec.mean], device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return x / inv_std - neg_mean


def to_pil_uint8(x01: torch.Tensor) -> torch.Tensor:
    """torchvision's ToPILImage on a float tensor (x * 255, then truncation by .byte()), as BackdoorBench
    stores every generated image; the clamp only guards float dust outside [0, 1]."""
    return (x01 * 255).clamp_(0, 255).to(torch.uint8)
