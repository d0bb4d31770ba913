"""Blended (Chen et al. 2017) as BackdoorBench runs it (docs/methods/attacks.md):
out = (1 - alpha) * img + alpha * K, then clip and truncate to uint8, alpha = 0.2 for train and test.

K is read from `pattern_path` (e.g. BackdoorBench's hello_kitty.jpeg) and resized like BackdoorBench
(ToPILImage -> Resize bilinear -> ToTensor x 255, unrounded float). Without a path, K is a built-in
deterministic uniform-noise image (Chen et al.'s random-pattern variant); this differs from the paper's
Hello Kitty and is listed in the README's fidelity table.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from attacks.base import Attack, AttackConfigError, load_pattern_image, pil_resize
from bdcore.data import DatasetSpec


def builtin_blend_pattern(seed: int = 0, size: int = 32) -> Image.Image:
    """A fixed RGB noise image; deterministic across machines (numpy's legacy RandomState)."""
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8))


class Blended(Attack):
    def __init__(self, spec: DatasetSpec, target: int = 0, poison_ratio: float = 0.1,
                 label_transform: str = "all2one", alpha: float = 0.2, pattern_path: str | None = None,
                 train_overrides: dict | None = None):
        super().__init__(spec, target, poison_ratio, label_transform, train_overrides)
        if not 0.0 <= float(alpha) <= 1.0:
            raise AttackConfigError(f"attack.alpha={alpha} is outside [0, 1]; BackdoorBench uses 0.2")
        self.alpha = float(alpha)
        resized = load_pattern_image(pattern_path, spec) if pattern_path else \
            pil_resize(builtin_blend_pattern(size=max(spec.height, spec.width)), spec)
        # ToTensor (uint8 / 255 in float32) then x 255, as BackdoorBench builds K: float, unrounded
        pattern = resized.astype(np.float32) / np.float32(255.0) * np.float32(255.0)
        self.pattern = torch.from_numpy(pattern.transpose(2, 0, 1).copy())  # C x H x W float32

    def apply_trigger(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        # numpy promotion as in BackdoorBench: alpha * K stays float32 (K is float32), (1 - alpha) * img is
        # float64 (img is uint8), their sum float64; then clip and truncate
        weighted_pattern = (self.alpha * self.pattern.to(images.device)).to(torch.float64)
        blended = (1 - self.alpha) * images.to(torch.float64) + weighted_pattern
        return blended.clamp_(0, 255).to(torch.uint8)

    def state_dict(self) -> dict:
        return {"pattern": self.pattern.clone(), "alpha": self.alpha}

    def load_state_dict(self, state: dict) -> None:
        self.pattern, self.alpha = state["pattern"].clone(), float(state["alpha"])
