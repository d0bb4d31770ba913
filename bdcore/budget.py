"""The defender's clean data: which training indices a data-dependent defense may read.

Always drawn from the *clean* training set (before poisoning), as BackdoorBench's defenses do. A budget
splits its draw into the defender's training part (``indices``) and, optionally, a held-out validation
part (``validation_indices``) for defenses that select a threshold or an epoch on held-out data. Both
are sorted int64 tensors of training-set indices and never overlap; calling either method again with
the same labels returns the same indices (every draw is seeded).

The pipeline turns them into ``DefenseData(clean=train.subset(indices), clean_indices=indices,
validation=None if val is None else train.subset(val), ...)``.
"""
from __future__ import annotations

import random

import numpy as np
import torch


class BudgetConfigError(ValueError):
    """A budget that cannot be drawn; one line naming the fix."""


def _sorted_long(indices) -> torch.Tensor:
    return torch.tensor(sorted(int(i) for i in indices), dtype=torch.long)


def _check_fraction(key: str, value: float, allow_zero: bool) -> None:
    """A ratio lies in (0, 1]; a validation ratio in [0, 1) (0 = no validation split)."""
    ok = (0 <= value < 1) if allow_zero else (0 < value <= 1)
    if not ok:
        bounds, example = ("[0, 1)", "0.1") if allow_zero else ("(0, 1]", "0.05")
        raise BudgetConfigError(f"budget.{key}={value} is outside {bounds}; use e.g. budget.{key}={example}")


def ratio_draw(num_samples: int, ratio: float, seed: int) -> list[int]:
    """BackdoorBench's ``choose_index`` with an empty index file: ``random.seed(seed);
    random.sample(range(N), int(N * ratio))``, in the order ``random.sample`` returns them.

    A private ``random.Random(seed)`` is the same generator as the seeded module-level one, so this
    reproduces BackdoorBench's index files bit for bit (seed 0, ratio 0.05) without touching the
    caller's global random state.
    """
    _check_fraction("ratio", ratio, allow_zero=False)
    count = int(num_samples * ratio)
    if count < 1:
        raise BudgetConfigError(f"budget.ratio={ratio} of {num_samples} images is no image; raise budget.ratio")
    return random.Random(seed).sample(range(num_samples), count)


def class_balanced_draw(labels: torch.Tensor, ratio: float, seed: int) -> dict[int, list[int]]:
    """BackdoorBench's ``choose_by_class`` (FT-SAM): for class c = 0..C-1 in turn,
    ``np.random.choice(indices of class c in data-set order, int(N * ratio / C), replace=False)``
    after ``np.random.seed(seed)``. C is ``max(label) + 1``. Returns ``{class: drawn indices in draw order}``."""
    _check_fraction("ratio", ratio, allow_zero=False)
    labels_np = labels.cpu().numpy()
    num_classes = int(labels_np.max()) + 1 if len(labels_np) else 0
    per_class = int(len(labels_np) * ratio / num_classes) if num_classes else 0
    if per_class < 1:
        raise BudgetConfigError(f"budget.ratio={ratio} with budget.class_balanced=true gives no image per class "
                                f"({len(labels_np)} images, {num_classes} classes); raise budget.ratio")
    rng = np.random.RandomState(seed)
    drawn = {}
    for c in range(num_classes):
        members = np.flatnonzero(labels_np == c)
        if len(members) < per_class:
            raise BudgetConfigError(f"budget.ratio={ratio} (class-balanced) needs {per_class} images of class {c}, "
                                    f"which has {len(members)}; lower budget.ratio")
        drawn[c] = rng.choice(members, per_class, replace=False).tolist()
    return drawn


def head_split(draw: list[int], validation_ratio: float) -> tuple[list[int], list[int]]:
    """``(train, validation)``: the first ``max(1, int(len * validation_ratio))`` of a draw go to
    validation (Grad-Prune's rule); ``validation_ratio == 0`` means no validation split."""
    if validation_ratio == 0:
        return list(draw), []
    count = max(1, int(len(draw) * validation_ratio))
    return list(draw[count:]), list(draw[:count])


def per_class_draw(labels: torch.Tensor, spc: int, seed: int, validation_ratio: float = 0.1,
                   grow_for_validation: bool = True) -> tuple[list[int], list[int]]:
    """Grad-Prune's samples-per-class budget (``spc_choose_poisoned_sample``), ``(train, validation)``.

    ``n_val = int(spc * validation_ratio)``; when that is below 1 it becomes 1 and, with
    ``grow_for_validation`` (the published code), one more image per class is drawn, so SPC 2 gives
    2 training + 1 validation image per class (the paper's text says 1 + 1: ``grow_for_validation=false``).
    Classes are visited in order of first appearance in ``labels`` (the published dict order); per class
    ``np.random.choice(members, k, replace=False)`` after ``np.random.seed(seed)``; the first ``n_val`` of
    each class's draw go to validation. ``validation_ratio == 0``: ``spc`` per class, no validation.
    """
    _check_fraction("validation_ratio", validation_ratio, allow_zero=True)
    draw_per_class, n_val = spc, 0
    if validation_ratio > 0:
        n_val = int(spc * validation_ratio)
        if n_val < 1:
            n_val = 1
            if grow_for_validation:
                draw_per_class = spc + 1
    if draw_per_class - n_val < 1:
        raise BudgetConfigError(f"budget.spc={spc} leaves no training image per class after the validation split; "
                                "raise budget.spc or set budget.grow_for_validation=true")
    labels_np = labels.cpu().numpy()
    _, first = np.unique(labels_np, return_index=True)
    classes = labels_np[np.sort(first)]
    rng = np.random.RandomState(seed)
    train, validation = [], []
    for c in classes.tolist():
        members = np.flatnonzero(labels_np == c)
        if len(members) < draw_per_class:
            raise BudgetConfigError(f"budget.spc={spc} needs {draw_per_class} images of class {c}, which has "
                                    f"{len(members)}; lower budget.spc")
        chosen = rng.choice(members, draw_per_class, replace=False).tolist()
        validation.extend(chosen[:n_val])
        train.extend(chosen[n_val:])
    return train, validation


class RatioBudget:
    """A random fraction of the clean training set (BackdoorBench: 5 %; RNP in the OTBR paper: 0.5 %).

    ``class_balanced``: FT-SAM's per-class draw (``int(N * ratio / C)`` of every class).
    ``validation_ratio``: hold out that fraction of the draw for validation (0 = none, BackdoorBench); the
    plain draw gives its first ``max(1, int(n * validation_ratio))`` images (``random.sample`` order is
    itself random), the class-balanced draw that many of each class.
    """

    def __init__(self, ratio: float = 0.05, seed: int = 0, class_balanced: bool = False,
                 validation_ratio: float = 0.0):
        self.ratio, self.seed = float(ratio), int(seed)
        self.class_balanced, self.validation_ratio = bool(class_balanced), float(validation_ratio)
        _check_fraction("ratio", self.ratio, allow_zero=False)
        _check_fraction("validation_ratio", self.validation_ratio, allow_zero=True)

    def split(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(training indices, validation indices or None)``, both sorted int64."""
        if self.class_balanced:
            train, validation = [], []
            for drawn in class_balanced_draw(labels, self.ratio, self.seed).values():
                t, v = head_split(drawn, self.validation_ratio)
                train += t
                validation += v
        else:
            train, validation = head_split(ratio_draw(len(labels), self.ratio, self.seed), self.validation_ratio)
        if not train:
            raise BudgetConfigError(f"budget.validation_ratio={self.validation_ratio} leaves no training image; "
                                    "lower it or raise budget.ratio")
        return _sorted_long(train), (_sorted_long(validation) if self.validation_ratio > 0 else None)

    def indices(self, labels: torch.Tensor) -> torch.Tensor:
        return self.split(labels)[0]

    def validation_indices(self, labels: torch.Tensor) -> torch.Tensor | None:
        return self.split(labels)[1]


class PerClassBudget:
    """A fixed number of clean images per class with Grad-Prune's validation split (see ``per_class_draw``)."""

    def __init__(self, spc: int = 10, seed: int = 0, validation_ratio: float = 0.1,
                 grow_for_validation: bool = True):
        if int(spc) < 1:
            raise BudgetConfigError(f"budget.spc={spc} must be >= 1; e.g. budget.spc=10")
        self.spc, self.seed = int(spc), int(seed)
        self.validation_ratio, self.grow_for_validation = float(validation_ratio), bool(grow_for_validation)
        _check_fraction("validation_ratio", self.validation_ratio, allow_zero=True)

    def split(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        train, validation = per_class_draw(labels, self.spc, self.seed, self.validation_ratio,
                                           self.grow_for_validation)
        return _sorted_long(train), (_sorted_long(validation) if self.validation_ratio > 0 else None)

    def indices(self, labels: torch.Tensor) -> torch.Tensor:
        return self.split(labels)[0]

    def validation_indices(self, labels: torch.Tensor) -> torch.Tensor | None:
        return self.split(labels)[1]


class NoBudget:
    """No clean data at all: only data-free defenses can run."""

    def split(self, labels: torch.Tensor) -> tuple[None, None]:
        return None, None

    def indices(self, labels: torch.Tensor) -> None:
        return None

    def validation_indices(self, labels: torch.Tensor) -> None:
        return None
