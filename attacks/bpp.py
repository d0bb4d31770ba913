"""BppAttack (Wang et al. 2022) as BackdoorBench runs it (docs/methods/attacks.md).

Trigger: colour-depth squeezing, Q(x) = round(x / 255 * (n - 1)) / (n - 1) * 255 per channel with n =
squeeze_num levels (8), optionally with Floyd-Steinberg error diffusion (dithering, off by default).

Training is batch-level: in every batch the first int(ratio * bs) samples become Q(x) with backdoor labels;
the next int(bs * neg_ratio) become "negative" samples that keep their labels: x + (BD[r] - CLEAN[r]), the
squeezing residual of a random training image r, clamped to [0, 255]; the rest stay clean; then the batch-wise
PostTensorTransform (attacks/batch_poisoning.py). BackdoorBench squeezes in *pixel* space: it maps the
normalised batch back to x * 255 (unrounded), squeezes and re-normalises; the hook does the same float ops.
BD[r] and CLEAN[r] are BackdoorBench's stored PNGs of image r, recomputed here from the uint8 image:
BD[r] = apply_trigger(image r); CLEAN[r] = the normalise -> denormalise -> x 255 -> truncate round trip,
which is the original minus 1 at some pixels (kept: it is the published arithmetic).
bd_test images (apply_trigger on uint8) are BackdoorBench's bd_test PNGs: Q of the rounded pixels, / 255,
x 255, truncated (levels 0, 36, 72, 109, 145, 182, 218, 255 at n = 8; with dithering BackdoorBench rounds the
levels first: 0, 36, 73, 109, 146, 182, 219, 255). round(denormalise(normalise(v)) * 255)
is v for every uint8 v and every data set's constants, so apply_trigger starts from v directly.
"""
from __future__ import annotations

import numpy as np
import torch

from attacks.base import Attack, AttackConfigError, PoisonedSet
from attacks.batch_poisoning import (batch_poison_count, denormalize_like_backdoorbench, random_post_tensor_transform,
                                     to_pil_uint8)
from bdcore.data import DatasetSpec, ImageSet, normalize
from bdcore.train import TrainingHooks

# BackdoorBench's bpp.py hard-codes these in back_to_np_4d / np_4d_to_tensor; they differ from the data set's
# normalisation only on CIFAR-100 (published_cifar100_constants=True reproduces the mismatch).
PUBLISHED_CIFAR100_STATS = ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
TRIGGER_CHUNK = 1024  # images squeezed at once by apply_trigger (bounds memory on large test sets)


def squeeze_colors(pixels: torch.Tensor, squeeze_num: int) -> torch.Tensor:
    """Q(x) on float pixels in [0, 255], BackdoorBench's float op order."""
    return torch.round(pixels / 255.0 * (squeeze_num - 1)) / (squeeze_num - 1) * 255


def floyd_steinberg_squeeze(pixels: np.ndarray, squeeze_num: int) -> np.ndarray:
    """BackdoorBench's floydDitherspeed, vectorised over the leading (image, channel) axes.

    pixels: float32 (..., H, W) in [0, 255]. Raster order; each pixel is squeezed in float64 and stored as
    float32; its float64 error goes right 7/16, down-right 1/16, down 5/16, down-left 3/16, each neighbour
    computed in float64 and stored as float32 (the numba routine's types). Returns float32 levels, unrounded.
    """
    image = np.array(pixels, dtype=np.float32, copy=True)
    h, w = image.shape[-2:]
    levels = float(squeeze_num) - 1
    for y in range(h):
        for x in range(w):
            old = image[..., y, x].astype(np.float64)
            new = np.rint(old / 255.0 * levels) / levels * 255
            error = old - new
            image[..., y, x] = new
            if x + 1 < w:
                image[..., y, x + 1] = image[..., y, x + 1] + error * 0.4375
            if y + 1 < h and x + 1 < w:
                image[..., y + 1, x + 1] = image[..., y + 1, x + 1] + error * 0.0625
            if y + 1 < h:
                image[..., y + 1, x] = image[..., y + 1, x] + error * 0.3125
            if x - 1 >= 0 and y + 1 < h:
                image[..., y + 1, x - 1] = image[..., y + 1, x - 1] + error * 0.1875
    return image


def bpp_squeeze(pixels: torch.Tensor, squeeze_num: int, dithering: bool) -> torch.Tensor:
    """The squeezed pixels BackdoorBench feeds on: Q(x), or round(dither(x)) with dithering."""
    if not dithering:
        return squeeze_colors(pixels, squeeze_num)
    dithered = floyd_steinberg_squeeze(pixels.detach().cpu().float().numpy(), squeeze_num)
    return torch.round(torch.from_numpy(dithered)).to(device=pixels.device, dtype=pixels.dtype)


def bpp_trigger_uint8(images: torch.Tensor, squeeze_num: int, dithering: bool) -> torch.Tensor:
    """BackdoorBench's bd_test / bd_train PNG of uint8 images: squeeze the pixels, / 255, ToPILImage."""
    out = torch.empty_like(images)
    for start in range(0, len(images), TRIGGER_CHUNK):
        pixels = images[start:start + TRIGGER_CHUNK].float()
        out[start:start + TRIGGER_CHUNK] = to_pil_uint8(bpp_squeeze(pixels, squeeze_num, dithering) / 255.0)
    return out


def clean_png_uint8(images: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    """BackdoorBench's stored clean image: ToTensor + Normalize, its denormaliser, ToPILImage."""
    return to_pil_uint8(denormalize_like_backdoorbench(normalize(images, spec), spec))


def png_to_pixels(png: torch.Tensor) -> torch.Tensor:
    """to_tensor(PNG) * 255 in float32, as BackdoorBench reads a stored image back."""
    return png.float() / 255 * 255


def batch_to_pixels(x: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """back_to_np_4d: (x * std + mean) * 255, per channel, unrounded."""
    out = x.clone()
    for c in range(x.shape[1]):
        out[:, c] = x[:, c] * std[c] + mean[c]
    return out * 255


def pixels_to_batch(pixels: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """np_4d_to_tensor: (x / 255 - mean) / std, per channel."""
    out = pixels.clone().div(255.0)
    for c in range(pixels.shape[1]):
        out[:, c] = (out[:, c] - mean[c]).div(std[c])
    return out


def poison_bpp_batch(x: torch.Tensor, y: torch.Tensor, num_bd: int, donor_bd_png: torch.Tensor,
                     donor_clean_png: torch.Tensor, squeeze_num: int, dithering: bool, mean: tuple, std: tuple,
                     backdoor_labels) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch of BackdoorBench's Bpp.train_step before the PostTensorTransform (x normalised).

    First num_bd samples: squeezed, backdoor labels (target-class samples included). Next len(donors):
    negatives x * 255 + BD[r] - CLEAN[r] clamped to [0, 255], labels kept (donor PNGs uint8, one per
    negative). No negatives when num_bd == 0, as published. Returns (x, y, kind) with kind 1 = backdoor,
    2 = negative, 0 = clean."""
    num_neg = len(donor_bd_png) if num_bd else 0
    kind = torch.zeros(len(y), dtype=torch.long, device=y.device)
    kind[:num_bd] = 1
    kind[num_bd:num_bd + num_neg] = 2
    if num_bd == 0:
        return x, y, kind
    parts = [pixels_to_batch(bpp_squeeze(batch_to_pixels(x[:num_bd], mean, std), squeeze_num, dithering),
                             mean, std)]
    if num_neg:
        pixels = batch_to_pixels(x[num_bd:num_bd + num_neg], mean, std)
        negative = pixels + png_to_pixels(donor_bd_png).to(x.device) - png_to_pixels(donor_clean_png).to(x.device)
        parts.append(pixels_to_batch(torch.clamp(negative, 0, 255), mean, std))
    parts.append(x[num_bd + num_neg:])
    return torch.cat(parts), torch.cat([backdoor_labels(y[:num_bd]), y[num_bd:]]), kind


class BPP(Attack):
    def __init__(self, spec: DatasetSpec, target: int = 0, poison_ratio: float = 0.1,
                 label_transform: str = "all2one", neg_ratio: float = 0.1, squeeze_num: int = 8,
                 dithering: bool = False, random_crop: int = 5, random_rotation: float = 10.0, seed: int = 0,
                 published_cifar100_constants: bool = False, train_overrides: dict | None = None):
        super().__init__(spec, target, poison_ratio, label_transform, train_overrides)
        if int(squeeze_num) != squeeze_num or not 2 <= int(squeeze_num) <= 256:
            raise AttackConfigError(f"attack.squeeze_num={squeeze_num} must be an integer number of colour "
                                    "levels in [2, 256]; BackdoorBench uses squeeze_num=8")
        if not 0.0 <= float(neg_ratio) < 1.0 or self.poison_ratio + float(neg_ratio) > 1:
            raise AttackConfigError(f"attack.neg_ratio={neg_ratio} with poison_ratio={poison_ratio} needs "
                                    "0 <= neg_ratio and poison_ratio + neg_ratio <= 1; BackdoorBench uses 0.1")
        if int(random_crop) < 0 or float(random_rotation) < 0:
            raise AttackConfigError(f"attack.random_crop={random_crop}, attack.random_rotation={random_rotation} "
                                    "must be >= 0; BackdoorBench uses 5 and 10")
        self.neg_ratio, self.squeeze_num, self.dithering = float(neg_ratio), int(squeeze_num), bool(dithering)
        self.random_crop, self.random_rotation = int(random_crop), float(random_rotation)
        self.seed = int(seed)
        self.published_cifar100_constants = bool(published_cifar100_constants)
        self.donors: ImageSet | None = None  # the training set; negatives borrow its squeezing residuals

    def apply_trigger(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return bpp_trigger_uint8(images, self.squeeze_num, self.dithering)

    def pixel_stats(self) -> tuple[tuple, tuple]:
        """The constants the hook maps normalised batches to pixels with (back_to_np_4d)."""
        if self.published_cifar100_constants and self.spec.name == "cifar100":
            return PUBLISHED_CIFAR100_STATS
        return tuple(self.spec.mean), tuple(self.spec.std)

    def prepare(self, train: ImageSet, resources=None) -> None:
        self.donors = train

    def poison_train(self, train: ImageSet, seed: int) -> PoisonedSet:
        """Nothing is baked in: the hook poisons each batch, so the poison index is empty
        (BackdoorBench's saved bd_train is a post-hoc re-draw, docs/methods/attacks.md)."""
        self.donors = train
        return PoisonedSet(train, torch.empty(0, dtype=torch.long))

    def training_hooks(self, model: torch.nn.Module, device: torch.device) -> TrainingHooks:
        if self.donors is None:
            raise RuntimeError("BPP.training_hooks needs the training set first: call attack.poison_train(train, "
                               "seed) (or prepare) before training")
        donors = self.donors.images
        generator = torch.Generator().manual_seed(self.seed + 1)  # per-batch draws; CPU, so device-independent
        mean, std = self.pixel_stats()

        def batch_transform(x, y, epoch):
            num_bd = min(batch_poison_count(self.poison_ratio, len(y), generator), len(y))
            num_neg = min(int(len(y) * self.neg_ratio), len(y) - num_bd) if num_bd else 0
            # BackdoorBench: random.sample(range(5N), bs) mod N, i.e. uniform donors over the training set
            picked = donors[torch.randint(0, len(donors), (num_neg,), generator=generator)]
            donor_bd, donor_clean = (self.apply_trigger(picked), clean_png_uint8(picked, self.spec)) if num_neg \
                else (picked, picked)
            x, y, _ = poison_bpp_batch(x, y, num_bd, donor_bd, donor_clean, self.squeeze_num, self.dithering,
                                       mean, std, self.backdoor_labels)
            return random_post_tensor_transform(x, self.spec, generator, self.random_crop,
                                                self.random_rotation), y

        return TrainingHooks(batch_transform=batch_transform,
                             resumable_state=lambda: {"generator": generator.get_state()},
                             load_resumable_state=lambda state: generator.set_state(state["generator"]))

    def state_dict(self) -> dict:
        return {"squeeze_num": self.squeeze_num, "dithering": self.dithering}

    def load_state_dict(self, state: dict) -> None:
        self.squeeze_num, self.dithering = int(state["squeeze_num"]), bool(state["dithering"])
