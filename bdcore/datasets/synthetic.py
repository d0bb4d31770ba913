"""A procedural data set on which a tiny CNN learns both the clean task and a backdoor in seconds, for tests
and smoke runs.

Why it looks the way it does (PreAct-ResNet18 width 4, 10 % poison, conf/train/synthetic.yaml):
- objects sit on a dark, flat background, never reach the corners, and stay below `_FOREGROUND_MAX`, so
  BadNets' white corner square is the only bright, sharp thing in an image; on bright textured images with
  strong pixel noise the net fits the clean task and ignores the patch (ASR ~0 % even after 20 epochs);
- pixel noise is low and the nuisance variation (shift, gain, bias) is smooth, so Blended's alpha = 0.2 noise
  pattern is the only high-frequency texture;
- 256 training images per class: with 160 (64 poisoned images) BadNets failed on 2 of 6 seeds;
- the spec normalises with the images' own mean / std (`MEAN`, `STD`), which makes white stand out.
The schedule trains without augmentation (see conf/train/synthetic.yaml for why).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bdcore.data import DatasetSpec, ImageSet
from bdcore.datasets.base import DataSource

_BACKGROUND = 30.0  # dark but off zero, so noise does not clip
_FOREGROUND_MIN, _FOREGROUND_MAX = 60.0, 190.0  # headroom below white (255) triggers
_NOISE_STD = 6.0
_GAIN_JITTER, _BIAS_JITTER = 0.15, 10.0
_OBJECT_RADIUS = 0.35  # of the image side: objects stay clear of the corners
# the defaults' pixel statistics (measured 0.19-0.20 / 0.12-0.13 per channel), normalised like a real data set;
# with (0.5, 0.25) instead a white trigger is a much weaker input and BadNets failed on 1 of 8 seeds
MEAN, STD = 0.2, 0.125


def class_templates(num_classes: int, channels: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class: a foreground texture (K x C x S x S, in [0, 1]) and a soft object mask (K x 1 x S x S).

    Texture: a 4 x 4 grid of random colours upsampled bilinearly, mixed with an oriented stripe pattern
    (random orientation, 2-5 periods per image, per-channel phase). Mask: a random 5 x 5 blob (bicubic)
    thresholded softly, inside a centred disc. Classes differ in colour, texture and shape.
    """
    k, c, s = num_classes, channels, size
    grid = torch.rand(k, c, 4, 4, generator=gen)
    smooth = F.interpolate(grid, size=(s, s), mode="bilinear", align_corners=True)
    angle = torch.rand(k, generator=gen) * torch.pi
    freq = (2.0 + 3.0 * torch.rand(k, generator=gen)) * 2 * torch.pi / s
    phase = torch.rand(k, c, generator=gen) * 2 * torch.pi
    coords = torch.arange(s, dtype=torch.float32)
    proj = (angle.cos().view(-1, 1, 1) * coords.view(1, 1, s)
            + angle.sin().view(-1, 1, 1) * coords.view(1, s, 1)) * freq.view(-1, 1, 1)  # K x S x S
    stripes = 0.5 + 0.5 * torch.sin(proj.unsqueeze(1) + phase.view(k, c, 1, 1))
    texture = 0.6 * smooth + 0.4 * stripes
    blob = F.interpolate(torch.rand(k, 1, 5, 5, generator=gen), size=(s, s), mode="bicubic", align_corners=True)
    centred = (coords - (s - 1) / 2) / s
    radius = (centred.view(1, s) ** 2 + centred.view(s, 1) ** 2).sqrt()
    disc = torch.sigmoid((_OBJECT_RADIUS - radius) * 40.0)
    mask = torch.sigmoid((blob - 0.4) * 12.0) * disc
    return texture, mask


def shift_images(x: torch.Tensor, gen: torch.Generator, max_shift: int) -> torch.Tensor:
    """Translate each image by its own random offset in [-max_shift, max_shift]^2 (edge values replicated)."""
    n, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), mode="replicate")
    dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    rows = dy.view(n, 1) + torch.arange(h).view(1, h)
    cols = dx.view(n, 1) + torch.arange(w).view(1, w)
    batch = torch.arange(n).view(n, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)


def render_images(texture: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, gen: torch.Generator,
                  max_shift: int) -> torch.Tensor:
    """uint8 images of `labels`: object on the background, shifted, with gain/bias jitter and pixel noise."""
    n = len(labels)
    foreground = _FOREGROUND_MIN + (_FOREGROUND_MAX - _FOREGROUND_MIN) * texture
    x = (_BACKGROUND + (foreground - _BACKGROUND) * mask)[labels]  # composed once per class, then indexed
    if max_shift > 0:
        x = shift_images(x, gen, max_shift)
    gain = 1.0 + _GAIN_JITTER * (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1)
    bias = _BIAS_JITTER * (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1)
    x = x * gain + bias + _NOISE_STD * torch.randn(x.shape, generator=gen)
    return x.round().clamp_(0, 255).to(torch.uint8).contiguous()


def make_synthetic(num_classes: int = 4, channels: int = 3, size: int = 32, train_per_class: int = 256,
                   test_per_class: int = 64, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """A procedural, class-balanced data set (train, test) that a tiny CNN learns in seconds, with or without
    a BadNets / Blended backdoor.

    Each class owns a textured, coloured object shape (`class_templates`) on a dark background; an image is its
    class object shifted by up to size/8 pixels, with per-image gain/bias jitter and Gaussian pixel noise,
    rounded and clipped to uint8. Everything comes from one CPU generator seeded by `seed`; sample order is
    shuffled (labels are balanced).
    """
    if num_classes < 1 or channels < 1 or size < 4 or train_per_class < 0 or test_per_class < 0:
        raise ValueError(f"make_synthetic needs num_classes >= 1, channels >= 1, size >= 4 and non-negative "
                         f"per-class counts; got num_classes={num_classes}, channels={channels}, size={size}, "
                         f"train_per_class={train_per_class}, test_per_class={test_per_class} "
                         "(e.g. num_classes=4, channels=3, size=32)")
    gen = torch.Generator().manual_seed(int(seed))
    texture, mask = class_templates(num_classes, channels, size, gen)
    max_shift = max(1, size // 8)
    sets = []
    for per_class in (train_per_class, test_per_class):
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        labels = labels[torch.randperm(len(labels), generator=gen)]
        sets.append(ImageSet(render_images(texture, mask, labels, gen, max_shift), labels.long()))
    return sets[0], sets[1]


class Synthetic(DataSource):
    """`make_synthetic` as a data source; `pattern_seed` fixes the class templates and samples."""

    def __init__(self, root: str = "data", download: bool = False, train_size: int | None = None,
                 seed: int = 0, num_classes: int = 4, channels: int = 3, size: int = 32,
                 train_per_class: int = 256, test_per_class: int = 64, pattern_seed: int = 0):
        super().__init__(root, download, train_size, seed)
        self.spec = DatasetSpec("synthetic", int(num_classes), int(channels), int(size), int(size),
                                (MEAN,) * int(channels), (STD,) * int(channels))
        self.sizes = {"num_classes": int(num_classes), "channels": int(channels), "size": int(size),
                      "train_per_class": int(train_per_class), "test_per_class": int(test_per_class)}
        self.pattern_seed = int(pattern_seed)

    def read(self) -> tuple[ImageSet, ImageSet]:
        return make_synthetic(**self.sizes, seed=self.pattern_seed)
