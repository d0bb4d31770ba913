"""The attack interface shared by every attack (DESIGN.md §3) and BackdoorBench's poisoning rules
(specs/attacks.md §1.4, §2)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.data import DatasetSpec, ImageSet
from core.train import TrainingHooks


class AttackConfigError(ValueError):
    """A user-fixable attack setting; the message is one line naming the fix."""


@dataclass
class PoisonedSet:
    """A poisoned copy of the training set and which of its indices carry the trigger."""

    data: ImageSet
    poison_indices: torch.Tensor  # int64, in draw order


@dataclass
class BackdoorTestSet:
    """Triggered test images. ASR compares predictions with `target_labels`, RA with `true_labels`."""

    images: torch.Tensor
    target_labels: torch.Tensor
    true_labels: torch.Tensor
    source_indices: torch.Tensor  # indices into the clean test set

    def __len__(self) -> int:
        return len(self.true_labels)


class Attack(ABC):
    """A backdoor attack built from its config.

    Subclasses implement `apply_trigger`; data-poisoning attacks need nothing else. Attacks that control
    training override `training_hooks`.
    """

    def __init__(self, spec: DatasetSpec, target: int = 0, poison_ratio: float = 0.1,
                 label_transform: str = "all2one"):
        if not 0.0 < float(poison_ratio) <= 1.0:
            raise AttackConfigError(f"attack.poison_ratio={poison_ratio} is outside (0, 1]; "
                                    "use e.g. attack.poison_ratio=0.1")
        if not 0 <= int(target) < spec.num_classes:
            raise AttackConfigError(f"attack.target={target} but {spec.name} has {spec.num_classes} classes; "
                                    f"choose attack.target between 0 and {spec.num_classes - 1}")
        if label_transform not in ("all2one", "all2all"):
            raise AttackConfigError(f"attack.label_transform={label_transform!r}; use all2one or all2all")
        self.spec = spec
        self.target = int(target)
        self.poison_ratio = float(poison_ratio)
        self.label_transform = label_transform

    @abstractmethod
    def apply_trigger(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Stamp the trigger on uint8 images (N, C, H, W); returns new uint8 images."""

    def backdoor_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """all2one: every label becomes the target; all2all: y -> (y + 1) mod K (specs/attacks.md §2.1)."""
        if self.label_transform == "all2one":
            return torch.full_like(labels, self.target)
        return (labels + 1) % self.spec.num_classes

    def poison_indices(self, num_samples: int, seed: int) -> torch.Tensor:
        """round(ratio * N) indices drawn uniformly from all N, target class included, exactly as
        BackdoorBench's first numpy draw after fix_random(seed) (specs/attacks.md §1.4)."""
        count = round(self.poison_ratio * num_samples)
        rng = np.random.RandomState(seed)
        return torch.from_numpy(rng.choice(np.arange(num_samples), count, replace=False)).long()

    def poison_train(self, train: ImageSet, seed: int) -> PoisonedSet:
        """Trigger baked into a copy before any augmentation (specs/attacks.md §2.3)."""
        idx = self.poison_indices(len(train), seed)
        images, labels = train.images.clone(), train.labels.clone()
        images[idx] = self.apply_trigger(images[idx], labels[idx])
        labels[idx] = self.backdoor_labels(labels[idx])
        return PoisonedSet(ImageSet(images, labels), idx)

    def bd_test(self, test: ImageSet) -> BackdoorTestSet:
        """all2one: every non-target test image, triggered; the target class is excluded (§2.1)."""
        keep = torch.arange(len(test)) if self.label_transform == "all2all" else \
            torch.nonzero(test.labels != self.target).flatten()
        true = test.labels[keep]
        return BackdoorTestSet(self.apply_trigger(test.images[keep], true), self.backdoor_labels(true), true, keep)

    def training_hooks(self, model: torch.nn.Module, device: torch.device) -> TrainingHooks | None:
        """Data-poisoning attacks do not touch training."""
        return None

    def state_dict(self) -> dict:
        """Everything needed to rebuild bd_test later without the config's resources."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def load_pattern_image(path: str | Path, spec: DatasetSpec) -> np.ndarray:
    """Read any image file and resize it to the data set's size like BackdoorBench (PIL bilinear,
    aspect ratio not kept). 1-channel data sets get the luma ('L') conversion. Returns uint8 H x W x C."""
    path = Path(path)
    if not path.is_file():
        raise AttackConfigError(f"attack.pattern_path={path} does not exist; give an image file or null "
                                "for the built-in pattern")
    with Image.open(path) as img:
        return pil_resize(img, spec)


def pil_resize(img: Image.Image, spec: DatasetSpec) -> np.ndarray:
    img = img.convert("L" if spec.channels == 1 else "RGB")
    if img.size != (spec.width, spec.height):
        img = img.resize((spec.width, spec.height), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr
