"""The attack interface shared by every attack (docs/interfaces.md) and BackdoorBench's poisoning rules:
which indices are poisoned, how labels change, and which test images form bd_test."""
from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from PIL import Image

from bdcore.data import DatasetSpec, ImageSet
from bdcore.train import TrainingHooks, TrainSettings


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


class AttackResources(Protocol):
    """What the pipeline offers an attack that must generate a resource before it can poison (LF's universal
    perturbation, TrojanNN's trigger, SSBA's encoder). Implemented by experiments/ on the artifact store, so
    attacks/ never touches files; tests pass a small in-memory fake."""

    device: torch.device

    def cached(self, name: str, material: dict, produce: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """`produce()` once per (name, material, data set, seed); later calls load the stored tensors."""

    def clean_model(self) -> torch.nn.Module:
        """A clean model of the job's architecture, trained on the clean training set with the job's schedule,
        once per (dataset, model, train, seed) and shared by every attack that asks (LF, TrojanNN)."""


class Attack(ABC):
    """A backdoor attack built from its config.

    Subclasses implement `apply_trigger`; data-poisoning attacks need nothing else. Attacks that generate a
    resource override `prepare`; attacks that control training override `training_hooks`, and
    `train_overrides` (a config key) changes the schedule they train with (e.g. WaNet's constant lr).
    `state_dict()` holds only tensors and plain containers: it is stored beside the model and loaded with
    torch.load(weights_only=True).
    """

    def __init__(self, spec: DatasetSpec, target: int = 0, poison_ratio: float = 0.1,
                 label_transform: str = "all2one", train_overrides: dict | None = None):
        for key, value in (("poison_ratio", poison_ratio), ("target", target)):
            try:
                float(value)
            except (TypeError, ValueError):
                raise AttackConfigError(f"attack.{key}={value!r} is not a number; use e.g. attack.{key}="
                                        f"{'0.1' if key == 'poison_ratio' else '0'}") from None
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
        # Hydra passes lists as ListConfig; TrainSettings holds tuples (e.g. milestones)
        self.train_overrides = {k: tuple(v) if isinstance(v, (list, tuple)) or type(v).__name__ == "ListConfig" else v
                                for k, v in dict(train_overrides or {}).items()}
        unknown = set(self.train_overrides) - set(TrainSettings.__dataclass_fields__)
        if unknown:
            raise AttackConfigError(f"attack.train_overrides has unknown keys {sorted(unknown)}; use keys of "
                                    "the train group, e.g. scheduler")

    @abstractmethod
    def apply_trigger(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Stamp the trigger on uint8 images (N, C, H, W); returns new uint8 images."""

    def backdoor_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """all2one: every label becomes the target; all2all: y -> (y + 1) mod K."""
        if self.label_transform == "all2one":
            return torch.full_like(labels, self.target)
        return (labels + 1) % self.spec.num_classes

    def poison_indices(self, num_samples: int, seed: int) -> torch.Tensor:
        """round(ratio * N) indices drawn uniformly from all N, target class included, exactly as
        BackdoorBench's first numpy draw after fix_random(seed)."""
        count = round(self.poison_ratio * num_samples)
        rng = np.random.RandomState(seed)
        return torch.from_numpy(rng.choice(np.arange(num_samples), count, replace=False)).long()

    def poison_train(self, train: ImageSet, seed: int) -> PoisonedSet:
        """Trigger baked into a copy before any augmentation (BackdoorBench caches poisoned images)."""
        idx = self.poison_indices(len(train), seed)
        images, labels = train.images.clone(), train.labels.clone()
        images[idx] = self.apply_trigger(images[idx], labels[idx])
        labels[idx] = self.backdoor_labels(labels[idx])
        return PoisonedSet(ImageSet(images, labels), idx)

    def bd_test(self, test: ImageSet) -> BackdoorTestSet:
        """all2one: every non-target test image, triggered; the target class is excluded."""
        keep = torch.arange(len(test)) if self.label_transform == "all2all" else \
            torch.nonzero(test.labels != self.target).flatten()
        true = test.labels[keep]
        return BackdoorTestSet(self.apply_trigger(test.images[keep], true), self.backdoor_labels(true), true, keep)

    def prepare(self, train: ImageSet, resources: AttackResources) -> None:
        """Generate what poisoning needs (called once, before `poison_train`); most attacks need nothing."""

    def training_settings(self, settings: TrainSettings) -> TrainSettings:
        """The schedule the backdoored model trains with: the train group's, with `train_overrides` applied."""
        return replace(settings, **self.train_overrides) if self.train_overrides else settings

    def training_hooks(self, model: torch.nn.Module, device: torch.device) -> TrainingHooks | None:
        """Data-poisoning attacks do not touch training."""
        return None

    def state_dict(self) -> dict:
        """Everything needed to rebuild bd_test later without the config's resources."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def trigger_report(self) -> dict:
        """Facts about the generated trigger a reader needs beside ACC / ASR (metrics.json `backdoor.attack`)."""
        return {}

    def restored(self, state: dict) -> "Attack":
        """A copy of this attack with a stored state (the one the backdoored model was trained with)."""
        attack = copy.copy(self)
        attack.load_state_dict(state)
        return attack


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
