"""A procedural data set that a tiny CNN learns in seconds, for tests and smoke runs."""
from __future__ import annotations

import torch

from bdcore.data import DatasetSpec, ImageSet
from bdcore.datasets.base import DataSource


def _synthetic_images(templates: torch.Tensor, labels: torch.Tensor, gen: torch.Generator,
                      max_shift: int, noise: float) -> torch.Tensor:
    n = len(labels)
    _, c, h, w = templates.shape
    x = templates[labels]  # n x c x h x w, float in [0, 255]
    if max_shift > 0:
        p = max_shift
        padded = torch.nn.functional.pad(x, (p, p, p, p), mode="replicate")
        dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        rows = dy.view(n, 1) + torch.arange(h).view(1, h)
        cols = dx.view(n, 1) + torch.arange(w).view(1, w)
        bidx = torch.arange(n).view(n, 1, 1)
        x = padded.permute(0, 2, 3, 1)[bidx, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)
    gain = 1.0 + 0.15 * (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1)  # brightness / contrast jitter
    bias = 20.0 * (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1)
    x = (x - 127.5) * gain + 127.5 + bias + noise * torch.randn(x.shape, generator=gen)
    return x.round().clamp_(0, 255).to(torch.uint8).contiguous()


def make_synthetic(num_classes: int = 4, channels: int = 3, size: int = 32, train_per_class: int = 64,
                   test_per_class: int = 32, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """A procedural, class-balanced data set that a tiny CNN learns in seconds.

    Each class owns a smooth random template (a 4x4 grid of random colours upsampled bilinearly to
    size x size); an image is its class template shifted by up to size/16 pixels, with per-image
    brightness/contrast jitter and Gaussian pixel noise, rounded and clipped to uint8. Everything comes
    from one CPU generator seeded by ``seed``; sample order is shuffled (labels are balanced).
    """
    if num_classes < 1 or channels < 1 or size < 4 or train_per_class < 0 or test_per_class < 0:
        raise ValueError("make_synthetic needs num_classes >= 1, channels >= 1, size >= 4 and "
                         "non-negative per-class counts")
    gen = torch.Generator().manual_seed(int(seed))
    grid = torch.rand(num_classes, channels, 4, 4, generator=gen)
    smooth = torch.nn.functional.interpolate(grid, size=(size, size), mode="bilinear",
                                             align_corners=True)
    # a per-class oriented stripe texture (random orientation, 2-5 periods per image, per-channel
    # phase): translation-invariant, so crops and shifts keep it recognisable
    angle = torch.rand(num_classes, generator=gen) * torch.pi
    freq = (2.0 + 3.0 * torch.rand(num_classes, generator=gen)) * 2 * torch.pi / size
    phase = torch.rand(num_classes, channels, generator=gen) * 2 * torch.pi
    coords = torch.arange(size, dtype=torch.float32)
    proj = (angle.cos().view(-1, 1, 1) * coords.view(1, 1, size)
            + angle.sin().view(-1, 1, 1) * coords.view(1, size, 1)) * freq.view(-1, 1, 1)  # K x H x W
    stripes = 0.5 + 0.5 * torch.sin(proj.unsqueeze(1) + phase.view(num_classes, channels, 1, 1))
    templates = 30.0 + 195.0 * (0.6 * smooth + 0.4 * stripes)  # headroom for jitter and triggers
    max_shift = max(1, size // 16)
    sets = []
    for per_class in (train_per_class, test_per_class):
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        labels = labels[torch.randperm(len(labels), generator=gen)]
        images = _synthetic_images(templates, labels, gen, max_shift, noise=24.0)
        sets.append(ImageSet(images, labels.long()))
    return sets[0], sets[1]


class Synthetic(DataSource):
    """`make_synthetic` as a data source; `pattern_seed` fixes the class templates and samples."""

    def __init__(self, root: str = "data", download: bool = False, train_size: int | None = None,
                 seed: int = 0, num_classes: int = 4, channels: int = 3, size: int = 32,
                 train_per_class: int = 64, test_per_class: int = 32, pattern_seed: int = 0):
        super().__init__(root, download, train_size, seed)
        self.spec = DatasetSpec("synthetic", int(num_classes), int(channels), int(size), int(size),
                                (0.5,) * int(channels), (0.25,) * int(channels))
        self.sizes = {"num_classes": int(num_classes), "channels": int(channels), "size": int(size),
                      "train_per_class": int(train_per_class), "test_per_class": int(test_per_class)}
        self.pattern_seed = int(pattern_seed)

    def read(self) -> tuple[ImageSet, ImageSet]:
        return make_synthetic(**self.sizes, seed=self.pattern_seed)
