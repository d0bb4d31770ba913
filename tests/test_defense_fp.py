"""FP, Fine-Pruning (baselines/fp.py) against BackdoorBench's defense/fp.py."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import baselines.finetune as finetune
from baselines.fp import (accuracy_kept, activation_order, channels_to_prune, defend, final_level,
                          mean_last_child_input, pruning_levels, validate)
from bdcore.data import DatasetSpec, DefenseData, ImageSet, normalize, random_crop_flip
from bdcore.datasets import make_synthetic
from bdcore.models import PreActResNet18
from helpers import Guarded

CHANNELS = 16
HAND_SPEC = DatasetSpec("hand", 4, CHANNELS, 6, 6, (0.0,) * CHANNELS, (1.0,) * CHANNELS)
SYN_SPEC = DatasetSpec("synthetic", 4, 3, 32, 32, (0.5,) * 3, (0.25,) * 3, hflip=True)


class HandNet(nn.Module):
    """The last child's input is the per-channel mean of the (normalised) image: activations by hand."""

    def __init__(self):
        super().__init__()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(CHANNELS, 4)

    def forward(self, x):
        return self.head(self.pool(x))


def hand_data(channel_values, n=24, seed=0):
    """n images whose channel c is the constant channel_values[c] (uint8), random labels."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.as_tensor(channel_values, dtype=torch.uint8)
    images = values.view(1, CHANNELS, 1, 1).expand(n, CHANNELS, 6, 6).clone()
    return ImageSet(images, torch.randint(0, 4, (n,), generator=gen))


def zero_columns(model) -> torch.Tensor:
    return torch.where((model.head.weight == 0).all(dim=0))[0]


def fake_evaluate(drop_per_column=3.0, calls=None):
    """Test ACC falls by `drop_per_column` points per zeroed classifier column (100 unpruned)."""
    def evaluate(model):
        if calls is not None:
            calls.append(1)
        return {"acc": 100.0 - drop_per_column * len(zero_columns(model)), "asr": 50.0, "ra": 10.0}
    return evaluate


VALUES = [200, 7, 90, 3, 150, 60, 11, 250, 30, 120, 5, 180, 70, 40, 99, 20]  # distinct: a unique order


def naive_published_activation(model, images, spec, batch_size):
    """defense/fp.py: activation += sum(result_mid over the batch) / len(dataset), batch after batch."""
    feats = []
    model.eval()
    hook = list(model.children())[-1].register_forward_hook(lambda m, i, o: feats.append(i[0]))
    activation = None
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            model(normalize(images[start:start + batch_size], spec))
            part = torch.sum(feats[-1], dim=[0]) / len(images)
            activation = part if activation is None else activation + part
    hook.remove()
    return activation


# --------------------------------------------------------------------------------------------------
# pure pieces
# --------------------------------------------------------------------------------------------------

def test_activation_matches_the_published_accumulation_and_ranks_least_active_first():
    data = hand_data(VALUES)
    model = HandNet()
    ours = mean_last_child_input(model, data, HAND_SPEC, batch_size=5, device=torch.device("cpu"), seed=0)
    # our pass shuffles (as the published loader does): the oracle reads the same order
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    oracle = naive_published_activation(model, data.images[order], HAND_SPEC, batch_size=5)
    assert torch.equal(ours, oracle)
    assert torch.allclose(ours, torch.tensor(VALUES, dtype=torch.float32) / 255, atol=1e-6)
    assert activation_order(ours).tolist() == sorted(range(CHANNELS), key=lambda c: VALUES[c])


def test_activation_is_taken_on_augmented_images_in_eval_mode():
    train, _ = make_synthetic(num_classes=4, train_per_class=4, test_per_class=1)
    model = PreActResNet18(num_classes=4, width=4).train()
    buffers = copy.deepcopy(model.state_dict())
    augment = lambda x, g: random_crop_flip(x, SYN_SPEC, g)
    plain = mean_last_child_input(model, train, SYN_SPEC, batch_size=8, device=torch.device("cpu"), seed=0)
    crops = mean_last_child_input(model, train, SYN_SPEC, batch_size=8, device=torch.device("cpu"), seed=0,
                                  augment=augment)
    assert plain.shape == (32,) and not torch.equal(plain, crops)
    assert model.training  # mode restored
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())  # eval: BN stats untouched


def test_levels_step_and_the_published_off_by_one():
    levels = pruning_levels(512, 0.01)
    assert levels[:3] == [0, 6, 12] and levels[-1] == 510 and len(levels) == 86
    order = torch.arange(512).flip(0)
    assert channels_to_prune(order, 0).numel() == 0 and channels_to_prune(order, 0, True).numel() == 0
    assert channels_to_prune(order, 6).tolist() == [511, 510, 509, 508, 507, 506]
    assert channels_to_prune(order, 6, published_bugs=True).tolist() == [511, 510, 509, 508, 507]
    assert channels_to_prune(order, 510, published_bugs=True).numel() == 509  # never violated: 509, not 510


def test_stop_rule_is_relative_strict_and_counts_rises():
    assert accuracy_kept(91.0, 100.0, 0.1) and not accuracy_kept(90.0, 100.0, 0.1)  # strict
    assert not accuracy_kept(110.0, 100.0, 0.1)  # |delta|: a 10 % rise also stops
    assert accuracy_kept(0.0, 0.0, 0.1) and not accuracy_kept(5.0, 0.0, 0.1)
    # default: last kept level; published aliasing: the first violating one (or the last level)
    assert final_level([True, True, True, False]) == 2
    assert final_level([True, True, True, False], published_bugs=True) == 3
    assert final_level([True, True, True]) == final_level([True, True, True], published_bugs=True) == 2


# --------------------------------------------------------------------------------------------------
# the defense
# --------------------------------------------------------------------------------------------------

def _hand_defense_data(evaluate=None, validation=None):
    clean = hand_data(VALUES)
    return DefenseData(clean=clean, spec=HAND_SPEC, clean_indices=torch.arange(len(clean)), evaluate=evaluate,
                       validation=validation)


@pytest.mark.parametrize("published_bugs, expected_pruned, expected_level", [(False, 3, 3), (True, 4, 5)])
def test_prunes_the_least_active_columns_in_order_and_count(published_bugs, expected_pruned, expected_level):
    # ACC drops 3 points per zeroed column: 4 columns (12 %) break the 10 % rule
    model = HandNet()
    calls = []
    data = _hand_defense_data(evaluate=fake_evaluate(calls=calls))
    out, diag = defend(model, data, seed=0, progress=False, once_prune_ratio=1 / CHANNELS, epochs=0,
                       published_bugs=published_bugs)
    least_active = sorted(range(CHANNELS), key=lambda c: VALUES[c])
    assert diag["pruned_channels"] == least_active[:expected_pruned]
    assert sorted(zero_columns(out).tolist()) == sorted(least_active[:expected_pruned])
    assert diag["selected_num_pruned"] == expected_level and diag["pruned"] == expected_pruned
    assert diag["selection_split"] == "test" and diag["stopped"] == "accuracy"
    # evaluated levels 0..first violation, each once, with ASR / RA recorded
    assert [lv["num_pruned"] for lv in diag["levels"]] == list(range(len(calls)))
    assert [lv["kept"] for lv in diag["levels"]][-1] is False
    assert {"acc", "asr", "ra"} <= set(diag["levels"][0])


def test_pruned_columns_stay_zero_through_fine_tuning_and_the_mask_is_folded_in():
    model = HandNet()
    data = _hand_defense_data(evaluate=fake_evaluate())
    out, diag = defend(model, data, seed=0, progress=False, once_prune_ratio=1 / CHANNELS, epochs=2,
                       batch_size=8, lr=0.1)
    assert sorted(zero_columns(out).tolist()) == sorted(diag["pruned_channels"]) and diag["pruned"] == 3
    assert out.state_dict().keys() == model.state_dict().keys()  # no weight_orig / weight_mask left
    kept = [c for c in range(CHANNELS) if c not in diag["pruned_channels"]]
    assert not torch.equal(out.head.weight[:, kept], model.head.weight[:, kept])  # it did fine-tune
    assert diag["history"]["epochs"] == 2


def test_selection_on_validation_reads_validation_only_and_records_the_choice():
    model = HandNet()
    validation = Guarded(hand_data(VALUES, n=8, seed=1))

    def no_test(model):
        raise AssertionError("selection_split=validation must not touch the test set")

    data = _hand_defense_data(evaluate=no_test, validation=validation)
    _, diag = defend(model, data, seed=0, progress=False, once_prune_ratio=0.25, epochs=0,
                     selection_split="validation")
    assert validation.reads > 0
    assert diag["selection_split"] == "validation" and "selected_num_pruned" in diag
    assert set(diag["levels"][0]) == {"num_pruned", "pruned", "acc", "kept"}  # clean accuracy only
    assert diag["selected_num_pruned"] in [lv["num_pruned"] for lv in diag["levels"]]


def test_selection_on_test_never_reads_validation():
    data = _hand_defense_data(evaluate=fake_evaluate(), validation=Guarded(hand_data(VALUES, n=4), forbid=True))
    _, diag = defend(HandNet(), data, seed=0, progress=False, once_prune_ratio=0.25, epochs=0)
    assert diag["selection_split"] == "test"


def test_missing_selection_data_is_one_line():
    with pytest.raises(ValueError, match="selection_split=test needs the test evaluator"):
        defend(HandNet(), _hand_defense_data(), progress=False, epochs=0)
    with pytest.raises(ValueError, match="selection_split=validation needs a validation split"):
        defend(HandNet(), _hand_defense_data(evaluate=fake_evaluate()), progress=False, epochs=0,
               selection_split="validation")


def test_reads_only_the_clean_budget_leaves_input_unchanged(monkeypatch):
    train, test = make_synthetic(num_classes=4, train_per_class=8, test_per_class=2)
    indices = torch.tensor([1, 4, 5, 9, 12, 20, 21, 30])
    clean = Guarded(train.subset(indices))
    seen = []
    real = finetune.train_model
    monkeypatch.setattr(finetune, "train_model", lambda m, d, *a, **k: seen.append(d) or real(m, d, *a, **k))

    def no_trigger(*args):
        raise AssertionError("fp must not synthesise triggered images")

    data = DefenseData(clean=clean, spec=SYN_SPEC, clean_indices=indices, apply_trigger=no_trigger,
                       validation=Guarded(test, forbid=True), evaluate=fake_evaluate_on_linear(),
                       augment=lambda x, g: random_crop_flip(x, SYN_SPEC, g))
    model = PreActResNet18(num_classes=4, width=4)
    before = copy.deepcopy(model.state_dict())
    out, diag = defend(model, data, seed=0, progress=False, epochs=1, batch_size=4, once_prune_ratio=0.25)
    assert clean.reads > 0 and len(seen) == 1 and seen[0] is clean
    assert torch.equal(seen[0].images, train.images[indices])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert type(out) is PreActResNet18 and out is not model and not out.training
    assert out.state_dict().keys() == model.state_dict().keys()
    assert all(torch.isfinite(v).all() for v in out.state_dict().values() if v.is_floating_point())
    assert diag["fp_seconds"] > 0 and diag["pruned_layer"] == "linear" and diag["channels"] == 32


def fake_evaluate_on_linear():
    def evaluate(model):
        zeros = int((model.linear.weight == 0).all(dim=0).sum())
        return {"acc": 100.0 - 4.0 * zeros, "asr": 0.0, "ra": 0.0}
    return evaluate


def test_budget_none_and_bad_keys_are_one_line_errors():
    with pytest.raises(ValueError, match=r"^fp needs clean data: use budget=ratio \(the default\) or budget=spc$"):
        defend(HandNet(), None)
    with pytest.raises(ValueError, match=r"defense\.selection_split=val is invalid"):
        validate(selection_split="val")
    with pytest.raises(ValueError, match=r"defense\.once_prune_ratio=0 is invalid"):
        validate(once_prune_ratio=0)


def test_config_defaults_are_backdoorbench_s():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from helpers import ROOT

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cifar = OmegaConf.to_container(compose("config", overrides=["defense=fp"]).defense, resolve=True)
        tiny = OmegaConf.to_container(compose("config", overrides=["defense=fp", "dataset=tiny"]).defense,
                                      resolve=True)
    assert cifar["_target_"] == "baselines.fp.defend"
    assert {k: cifar[k] for k in ("acc_ratio", "once_prune_ratio", "selection_split", "published_bugs", "epochs",
                                  "batch_size", "lr", "scheduler")} == {
        "acc_ratio": 0.1, "once_prune_ratio": 0.01, "selection_split": "test", "published_bugs": False,
        "epochs": 100, "batch_size": 256, "lr": 0.01, "scheduler": "cosine"}
    assert (tiny["epochs"], tiny["scheduler"]) == (200, "plateau")
