"""The defender's clean budgets (bdcore/budget.py) against literal transcriptions of the published draws."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from bdcore.budget import BudgetConfigError, NoBudget, PerClassBudget, RatioBudget

CONF = Path(__file__).resolve().parents[1] / "conf" / "budget"


# --------------------------------------------------------------------------------------------------
# transcriptions of the published code (global RNG state saved and restored around each)
# --------------------------------------------------------------------------------------------------

def backdoorbench_choose_index(num_samples: int, ratio: float, seed: int) -> list[int]:
    """utils/choose_index.py::choose_index with an empty index, after fix_random(seed)."""
    state = random.getstate()
    try:
        random.seed(seed)
        return random.sample(range(num_samples), int(num_samples * ratio))
    finally:
        random.setstate(state)


def backdoorbench_choose_by_class(labels: list[int], num_classes: int, ratio: float, seed: int) -> list[int]:
    """utils/choose_index.py::choose_by_class after fix_random(seed) (np.random.seed)."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        by_class = [[] for _ in range(num_classes)]
        for index, label in enumerate(labels):
            by_class[label].append(index)
        chosen = []
        for class_ in range(num_classes):
            chosen += np.random.choice(by_class[class_], int(len(labels) * ratio / num_classes),
                                       replace=False).tolist()
        return chosen
    finally:
        np.random.set_state(state)


def gradprune_spc_choose(labels: list[int], samples_per_class: int, val_ratio: float, seed: int):
    """Grad-Prune utils/bd_dataset_v2.py::spc_choose_poisoned_sample after fix_random(seed)."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        if val_ratio > 0:
            num_val_samples = int(samples_per_class * val_ratio)
            if num_val_samples < 1:
                num_val_samples = 1
                samples_per_class = samples_per_class + 1
        index_class_dict = {}
        for index, label in enumerate(labels):
            index_class_dict.setdefault(label, []).append(index)
        chosen = {}
        for label, index_list in index_class_dict.items():
            if len(index_list) > samples_per_class:
                chosen[label] = np.random.choice(index_list, samples_per_class, replace=False)
        train, val = [], []
        for label, index_list in chosen.items():
            val.extend(index_list[:num_val_samples].tolist())
            train.extend(index_list[num_val_samples:].tolist())
        return train, val
    finally:
        np.random.set_state(state)


def shuffled_labels(num_classes: int, per_class: int, seed: int = 0) -> torch.Tensor:
    labels = np.repeat(np.arange(num_classes), per_class)
    np.random.RandomState(seed).shuffle(labels)
    return torch.from_numpy(labels).long()


def assert_sorted_long(indices: torch.Tensor) -> None:
    assert indices.dtype == torch.int64 and indices.ndim == 1
    assert torch.equal(indices, torch.sort(indices).values)
    assert len(torch.unique(indices)) == len(indices)


# --------------------------------------------------------------------------------------------------
# ratio budgets
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_samples", [50_000, 39_209, 100_000])
def test_ratio_budget_is_backdoorbench_index_file(num_samples):
    """random.seed(0); random.sample(range(N), int(0.05 * N)), the draw BackdoorBench's index files hold."""
    labels = torch.zeros(num_samples, dtype=torch.long)
    got = RatioBudget(ratio=0.05, seed=0).indices(labels)
    assert_sorted_long(got)
    state = random.getstate()
    random.seed(0)
    expected = random.sample(range(num_samples), int(0.05 * num_samples))
    random.setstate(state)
    assert got.tolist() == sorted(expected)
    assert len(got) == {50_000: 2500, 39_209: 1960, 100_000: 5000}[num_samples]


def test_rnp_budget_preset_is_half_a_percent_and_seeded():
    budget = OmegaConf.load(CONF / "rnp.yaml")
    assert budget._target_ == "bdcore.budget.RatioBudget" and budget.ratio == 0.005
    labels = torch.zeros(50_000, dtype=torch.long)
    got = RatioBudget(ratio=0.005, seed=3).indices(labels)
    assert len(got) == 250 and got.tolist() == sorted(backdoorbench_choose_index(50_000, 0.005, 3))


def test_ratio_budget_leaves_the_global_random_state_alone():
    random.seed(123)
    before = random.getstate()
    RatioBudget(0.05, 0).indices(torch.zeros(1000, dtype=torch.long))
    assert random.getstate() == before


def test_ratio_validation_split_is_the_head_of_the_draw_and_disjoint():
    labels = torch.zeros(50_000, dtype=torch.long)
    budget = RatioBudget(ratio=0.05, seed=0, validation_ratio=0.1)
    train, val = budget.indices(labels), budget.validation_indices(labels)
    assert_sorted_long(train)
    assert_sorted_long(val)
    draw = backdoorbench_choose_index(50_000, 0.05, 0)
    assert len(val) == 250 and len(train) == 2250
    assert val.tolist() == sorted(draw[:250]) and train.tolist() == sorted(draw[250:])
    assert not set(train.tolist()) & set(val.tolist())
    assert RatioBudget(0.05, 0).validation_indices(labels) is None


def test_class_balanced_budget_is_ftsam_choose_by_class():
    labels = shuffled_labels(10, 500, seed=1)
    budget = RatioBudget(ratio=0.05, seed=0, class_balanced=True)
    got = budget.indices(labels)
    assert_sorted_long(got)
    assert got.tolist() == sorted(backdoorbench_choose_by_class(labels.tolist(), 10, 0.05, 0))
    assert torch.bincount(labels[got], minlength=10).tolist() == [25] * 10
    assert budget.validation_indices(labels) is None


def test_class_balanced_validation_split_takes_the_same_share_of_every_class():
    labels = shuffled_labels(4, 500, seed=2)
    budget = RatioBudget(ratio=0.1, seed=0, class_balanced=True, validation_ratio=0.2)
    train, val = budget.indices(labels), budget.validation_indices(labels)
    assert torch.bincount(labels[train], minlength=4).tolist() == [40] * 4
    assert torch.bincount(labels[val], minlength=4).tolist() == [10] * 4
    assert not set(train.tolist()) & set(val.tolist())
    union = sorted(train.tolist() + val.tolist())
    assert union == sorted(backdoorbench_choose_by_class(labels.tolist(), 4, 0.1, 0))


# --------------------------------------------------------------------------------------------------
# samples-per-class budgets
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spc, train_per_class, val_per_class", [(2, 2, 1), (10, 9, 1), (100, 90, 10)])
def test_spc_counts_per_class_and_validation_disjoint(spc, train_per_class, val_per_class):
    labels = shuffled_labels(10, 300)
    budget = PerClassBudget(spc=spc, seed=0)
    train, val = budget.indices(labels), budget.validation_indices(labels)
    assert_sorted_long(train)
    assert_sorted_long(val)
    assert torch.bincount(labels[train], minlength=10).tolist() == [train_per_class] * 10
    assert torch.bincount(labels[val], minlength=10).tolist() == [val_per_class] * 10
    assert not set(train.tolist()) & set(val.tolist())


@pytest.mark.parametrize("spc", [2, 10, 100])
def test_spc_split_equals_gradprune_spc_choose(spc):
    labels = shuffled_labels(10, 300, seed=5)
    train, val = PerClassBudget(spc=spc, seed=4).split(labels)
    ref_train, ref_val = gradprune_spc_choose(labels.tolist(), spc, 0.1, seed=4)
    assert train.tolist() == sorted(ref_train) and val.tolist() == sorted(ref_val)


def test_spc_paper_split_takes_the_validation_image_out_of_the_budget():
    labels = shuffled_labels(10, 50)
    budget = PerClassBudget(spc=2, seed=0, grow_for_validation=False)
    train, val = budget.split(labels)
    assert torch.bincount(labels[train], minlength=10).tolist() == [1] * 10
    assert torch.bincount(labels[val], minlength=10).tolist() == [1] * 10
    with pytest.raises(BudgetConfigError, match="budget.spc=1"):
        PerClassBudget(spc=1, seed=0, grow_for_validation=False).split(labels)


def test_spc_without_validation_draws_spc_per_class():
    labels = shuffled_labels(4, 50)
    budget = PerClassBudget(spc=7, seed=0, validation_ratio=0.0)
    assert torch.bincount(labels[budget.indices(labels)], minlength=4).tolist() == [7] * 4
    assert budget.validation_indices(labels) is None


def test_no_budget_gives_nothing():
    labels = torch.zeros(10, dtype=torch.long)
    assert NoBudget().indices(labels) is None and NoBudget().validation_indices(labels) is None


@pytest.mark.parametrize("make, key", [
    (lambda: RatioBudget(ratio=0.0), "budget.ratio=0.0"),
    (lambda: RatioBudget(ratio=0.05, validation_ratio=1.0), "budget.validation_ratio=1.0"),
    (lambda: PerClassBudget(spc=0), "budget.spc=0"),
    (lambda: PerClassBudget(spc=60).indices(shuffled_labels(4, 50)), "budget.spc=60"),
    (lambda: RatioBudget(ratio=1e-6).indices(torch.zeros(100, dtype=torch.long)), "budget.ratio=1e-06"),
])
def test_budget_errors_are_one_line_naming_the_key(make, key):
    with pytest.raises(BudgetConfigError) as info:
        make()
    message = str(info.value)
    assert key in message and "\n" not in message and isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", sorted(p.stem for p in CONF.glob("*.yaml")))
def test_every_budget_preset_instantiates(name):
    from hydra.utils import instantiate

    budget = instantiate(OmegaConf.load(CONF / f"{name}.yaml"))
    labels = shuffled_labels(10, 300)
    train, val = budget.indices(labels), budget.validation_indices(labels)
    if name == "none":
        assert train is None and val is None
    else:
        assert_sorted_long(train)
        assert val is None or not set(train.tolist()) & set(val.tolist())
