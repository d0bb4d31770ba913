"""BadNets (Gu et al. 2019) as BackdoorBench runs it (docs/methods/attacks.md).

Trigger: a 3x3 white square at the bottom-right corner of a 32x32 image; at other resolutions the 32x32
trigger image is resized (PIL bilinear) like BackdoorBench does for Tiny-ImageNet. Stamping replaces
every image value where the trigger is > 0, element-wise per channel.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from attacks.base import Attack, load_pattern_image, pil_resize
from bdcore.data import DatasetSpec


def white_square_trigger(size: int = 32, square: int = 3) -> np.ndarray:
    """BackdoorBench's resource/badnet/trigger_image.png: black, white square touching the bottom-right."""
    img = np.zeros((size, size, 3), dtype=np.uint8)
    img[size - square:, size - square:] = 255
    return img


class BadNet(Attack):
    def __init__(self, spec: DatasetSpec, target: int = 0, poison_ratio: float = 0.1,
                 label_transform: str = "all2one", pattern_path: str | None = None,
                 train_overrides: dict | None = None):
        super().__init__(spec, target, poison_ratio, label_transform, train_overrides)
        if pattern_path:
            pattern = load_pattern_image(pattern_path, spec)
        else:
            pattern = pil_resize(Image.fromarray(white_square_trigger()), spec)
        self.pattern = torch.from_numpy(pattern.transpose(2, 0, 1).copy())  # C x H x W uint8

    def apply_trigger(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        pattern = self.pattern.to(images.device)
        return torch.where(pattern > 0, pattern, images)

    def state_dict(self) -> dict:
        return {"pattern": self.pattern.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.pattern = state["pattern"].clone()
