"""Grad-Prune (baselines/gradprune.py) against transcriptions of the published grad-prune.py."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from baselines.gradprune import (accumulate_unlearning_gradients, defend, filter_gradient_scores, fine_tune,
                                 iterative_prune, select_filter, zero_filter)
from bdcore.data import normalize
from test_defense_anp import (CLEAN_CODES, SPEC, VAL_CODES, coded_defense_data, coded_set, record_forwards,
                              state_equal, tiny_model)


def corner_trigger(images: torch.Tensor, labels=None) -> torch.Tensor:
    """A BadNets-like 3 x 3 white corner: leaves the centre pixel (the image's code) alone."""
    out = images.clone()
    out[:, :, :3, :3] = 255
    return out


def gradprune_data(**kwargs):
    data = coded_defense_data(**kwargs)
    data.apply_trigger = corner_trigger
    return data


def backdoor_gradients(model, seed=0):
    clean = coded_set(CLEAN_CODES)
    triggered = corner_trigger(clean.images)
    accumulate_unlearning_gradients(model, triggered, clean.labels, SPEC, batch_size=16,
                                    generator=torch.Generator().manual_seed(seed), bn_mode="train")


# --------------------------------------------------------------------------------------------------
# transcriptions of the published code
# --------------------------------------------------------------------------------------------------

def published_get_mean_layer(grads):
    return [torch.mean(torch.abs(grads[i])) for i in range(grads.shape[0])]


def published_best_filter(model):
    """grad_prune's scan: strict '>' from 0 over every 4-D gradient, in parameters() order."""
    best_value, best_index = 0, None
    for layer_index, param in enumerate(model.parameters()):
        if param.requires_grad and len(param.grad.shape) == 4:
            for filter_index, value in enumerate(published_get_mean_layer(param.grad)):
                if value > best_value:
                    best_value, best_index = value, (layer_index, filter_index)
    return best_index, best_value


def published_prune_loop(measurements, accuracy_threshold, pruning_patience):
    """iterative_prune's control flow on a scripted sequence of (val accuracy, val unlearning loss)."""
    it = iter(measurements)
    val_clean_accuracy, val_rl_loss = next(it)
    val_best_loss, val_initial_accuracy, patience, rounds, best_round = val_rl_loss, val_clean_accuracy, 0, 0, 0
    while val_initial_accuracy - val_clean_accuracy < accuracy_threshold and patience < pruning_patience:
        rounds += 1
        val_clean_accuracy, val_bd_loss = next(it)
        val_clean_delta = val_initial_accuracy - val_clean_accuracy
        if val_bd_loss < val_best_loss and val_clean_delta < accuracy_threshold:
            val_best_loss, best_round, patience = val_bd_loss, rounds, 0
        else:
            patience += 1
    return rounds, best_round


# --------------------------------------------------------------------------------------------------
# oracle tests
# --------------------------------------------------------------------------------------------------

def test_gradient_scores_and_choice_equal_published_scan():
    model = tiny_model(0)
    backdoor_gradients(model)
    names = [n for n, _ in model.named_parameters()]
    scored = dict(filter_gradient_scores(model))
    for name, param in model.named_parameters():
        if param.grad.dim() == 4:
            expected = torch.stack(published_get_mean_layer(param.grad))
            torch.testing.assert_close(scored[name], expected, rtol=1e-6, atol=0)
        else:
            assert name not in scored
    assert sum(1 for n in scored if "shortcut" in n) == 3   # shortcut convs are scored too
    (layer_index, filter_index), value = published_best_filter(model)
    name, ours_filter, ours_value = select_filter(filter_gradient_scores(model))
    assert (name, ours_filter) == (names[layer_index], filter_index)
    assert ours_value == pytest.approx(float(value), rel=1e-6)


def test_ties_go_to_the_first_parameter_then_the_first_filter():
    model = tiny_model(1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model.layer2[0].conv1.weight.grad[3] = 2.0
    model.layer2[0].conv1.weight.grad[1] = 2.0
    model.layer3[0].conv1.weight.grad[0] = 2.0
    (layer_index, filter_index), _ = published_best_filter(model)
    names = [n for n, _ in model.named_parameters()]
    assert select_filter(filter_gradient_scores(model))[:2] == (names[layer_index], filter_index) == \
        ("layer2.0.conv1.weight", 1)
    assert select_filter(filter_gradient_scores(model), {("layer2.0.conv1.weight", 1)})[:2] == \
        ("layer2.0.conv1.weight", 3)
    for p in model.parameters():
        p.grad.zero_()
    assert select_filter(filter_gradient_scores(model)) is None   # the original raises a TypeError here


def test_zeroing_the_filter_only_by_default_and_the_next_parameter_as_published():
    model = tiny_model(2)
    reference = copy.deepcopy(model)
    assert zero_filter(model, "conv1.weight", 2) == [("conv1.weight", 2)]
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, reference.state_dict()[k])]
    assert changed == ["conv1.weight"] and torch.all(model.conv1.weight[2] == 0)

    published = copy.deepcopy(reference)
    zeroed = zero_filter(published, "conv1.weight", 2, zero_next_param=True)
    assert zeroed == [("conv1.weight", 2), ("layer1.0.bn1.weight", 2)]   # bias-free conv: a BN gamma
    assert published.layer1[0].bn1.weight[2] == 0
    assert zero_filter(published, "layer4.1.conv2.weight", 1, zero_next_param=True)[1] == ("linear.weight", 1)
    assert torch.all(published.linear.weight[1] == 0)
    assert zero_filter(published, "layer4.1.conv2.weight", 7, zero_next_param=True) == \
        [("layer4.1.conv2.weight", 7)]   # only 4 classifier rows: skipped (the original: IndexError)

    with_bias = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5))
    before = copy.deepcopy(with_bias)
    assert zero_filter(with_bias, "0.weight", 4) == [("0.weight", 4), ("0.bias", 4)]
    assert with_bias[0].bias[4] == 0 and torch.equal(with_bias[1].weight, before[1].weight)


ACC_FLOAT_CASES = [
    # 0.9 -> 0.8 is a drop of 0.0999...98 (< 0.1, accepted); 0.8 -> 0.7 of 0.1000...09 (rejected)
    [(0.9, 5.0), (0.8, 4.0), (0.8, 3.5), (0.9, 3.6), (0.9, 3.7), (0.9, 3.8)],
    [(0.8, 5.0), (0.75, 4.0), (0.7, 3.0), (0.8, 1.0)],
    [(0.5, 1.0), (0.5, 1.1), (0.5, 0.9), (0.5, 1.2), (0.5, 1.3), (0.5, 1.4)],
]


@pytest.mark.parametrize("measurements", ACC_FLOAT_CASES)
def test_pruning_loop_equals_published_control_flow(measurements):
    script = iter(measurements)
    model = tiny_model(3)
    clean = coded_set(CLEAN_CODES)
    best, info = iterative_prune(model, corner_trigger(clean.images), clean.labels, SPEC, lambda m: next(script),
                                 accuracy_threshold=0.1, patience_limit=3, batch_size=16,
                                 generator=torch.Generator().manual_seed(0), bn_mode="eval", zero_next_param=False,
                                 exclude_pruned=True, progress=False)
    rounds, best_round = published_prune_loop(measurements, 0.1, 3)
    assert (len(info["rounds"]), info["best_round"]) == (rounds, best_round)
    zeroed_filters = sum(int((p.flatten(1) == 0).all(1).sum()) for n, p in best.named_parameters() if p.dim() == 4)
    assert zeroed_filters == best_round == len(info["pruned_filters"])


def test_fine_tuning_step_equals_published_two_backward_passes():
    model = tiny_model(4).train()
    clean = coded_set(CLEAN_CODES[:12])
    triggered = corner_trigger(clean.images)
    losses = iter([1.0, 0.5])
    tuned, info = fine_tune(copy.deepcopy(model), clean.images, triggered, clean.labels, SPEC, lambda m: next(losses),
                            patience_limit=5, max_epochs=1, batch_size=64, lr=0.1, momentum=0.9, weight_decay=5e-4,
                            frozen_filters=None, device=torch.device("cpu"), seed=0, precision="fp32", progress=False)
    assert info["best_epoch"] == 0 and info["epochs_run"] == 1
    expected = copy.deepcopy(model)
    optimizer = torch.optim.SGD(expected.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    expected.train()
    optimizer.zero_grad()
    F.cross_entropy(expected(normalize(clean.images, SPEC)), clean.labels).backward()
    F.cross_entropy(expected(normalize(triggered, SPEC)), clean.labels).backward()
    optimizer.step()
    for (name, p), q in zip(tuned.state_dict().items(), expected.state_dict().values()):
        if p.is_floating_point():
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    assert not state_equal(tuned, model)


@pytest.mark.parametrize("keep", [True, False])
def test_pruned_rows_stay_zero_only_when_asked(keep):
    model = tiny_model(5)
    clean = coded_set(CLEAN_CODES[:16])
    rows = zero_filter(model, "layer1.0.conv1.weight", 1) + zero_filter(model, "layer3.1.conv2.weight", 0)
    losses = iter([1.0, 0.9, 0.8])
    tuned, _ = fine_tune(model, clean.images, corner_trigger(clean.images), clean.labels, SPEC, lambda m: next(losses),
                         patience_limit=5, max_epochs=2, batch_size=8, lr=0.05, momentum=0.9, weight_decay=5e-4,
                         frozen_filters=rows if keep else None, device=torch.device("cpu"), seed=0,
                         precision="fp32", progress=False)
    params = dict(tuned.named_parameters())
    still_zero = [bool(torch.all(params[n][r] == 0)) for n, r in rows]
    assert all(still_zero) if keep else not all(still_zero)   # published: pruned rows may regrow


# --------------------------------------------------------------------------------------------------
# behaviour of defend() and of the pruning stage
# --------------------------------------------------------------------------------------------------

FAST = dict(pruning_patience=2, tuning_patience=1, max_tuning_epochs=2, batch_size=16, progress=False)


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_pruning_touches_only_conv_filters(bn_mode):
    model = tiny_model(6)
    reference = copy.deepcopy(model)
    clean, val = coded_set(CLEAN_CODES), coded_set(VAL_CODES)
    measurements = iter([(0.5, 10.0 - k) for k in range(10)] + [(0.5, 5.0)] * 2)
    best, info = iterative_prune(model, corner_trigger(clean.images), clean.labels, SPEC,
                                 lambda m: next(measurements), accuracy_threshold=0.1, patience_limit=2,
                                 batch_size=16, generator=torch.Generator().manual_seed(0), bn_mode=bn_mode,
                                 zero_next_param=False, exclude_pruned=False, progress=False)
    assert info["best_round"] == 9 and len(info["rounds"]) == 11 and info["stop"] == "patience"
    new, old = best.state_dict(), reference.state_dict()
    for key in old:
        if new[key].dim() == 4:
            changed = ~torch.isclose(new[key], old[key], rtol=0, atol=0).flatten(1).all(1)
            assert torch.all(new[key][changed] == 0), key   # conv filters: untouched or zeroed
        elif "running" in key or "num_batches" in key:
            assert bn_mode == "train" or torch.equal(new[key], old[key]), key
        else:
            assert torch.equal(new[key], old[key]), key   # BN affine, linear: never touched
    assert {tuple(z) for r in info["rounds"] for z in r["zeroed"]} == {(r["param"], r["filter"]) for r in info["rounds"]}


def test_gradprune_reads_only_its_splits_and_leaves_input_alone():
    model = tiny_model(7)
    before = copy.deepcopy(model)
    seen = record_forwards(model)
    triggered_codes = []

    def recording_trigger(images, labels):
        triggered_codes.append(set(images[:, 0, 8, 8].long().tolist()))
        return corner_trigger(images)

    def forbidden(m):
        raise AssertionError("selection_split=validation must not evaluate on the test set")

    reads = set()
    data = gradprune_data(evaluate=forbidden, reads=reads)
    data.apply_trigger = recording_trigger
    defended, diagnostics = defend(model, data, seed=0, **FAST)
    assert state_equal(model, before) and not defended.training and type(defended) is type(model)
    assert triggered_codes == [set(CLEAN_CODES), set(VAL_CODES)]
    assert seen["train"] and seen["train"] <= set(CLEAN_CODES)   # gradients and fine-tuning: the budget only
    assert seen["eval"] and seen["eval"] <= set(VAL_CODES)       # selection: the validation split only
    assert reads == {"clean", "validation"}
    json.dumps(diagnostics)
    assert diagnostics["selection_split"] == "validation" and diagnostics["gradprune_seconds"] > 0
    assert diagnostics["pruned_count"] == len(diagnostics["pruning"]["pruned_filters"])
    assert all(torch.isfinite(v).all() for v in defended.state_dict().values() if v.is_floating_point())


def test_gradprune_test_protocol_uses_only_test_metrics():
    calls = []

    def evaluate(m):
        calls.append(1)
        return {"acc": 80.0, "asr": 90.0 - min(len(calls), 3), "ra": 5.0}   # improves for two rounds

    data = gradprune_data(evaluate=evaluate, validation=False)
    _, diagnostics = defend(tiny_model(8), data, selection_split="test", **FAST)
    assert calls and diagnostics["selection_split"] == "test" and diagnostics["validation_samples"] is None
    assert diagnostics["pruning"]["best_round"] == 2 and len(diagnostics["pruning"]["rounds"]) == 4


@pytest.mark.parametrize("make, message", [
    (lambda: None, "gradprune needs clean data: use budget=ratio (the default) or budget=spc"),
    (lambda: coded_defense_data(), "gradprune needs the attack's trigger function"),
    (lambda: gradprune_data(validation=False), "gradprune selection_split=validation needs a validation split"),
])
def test_gradprune_input_errors_are_one_line(make, message):
    with pytest.raises(ValueError) as info:
        defend(tiny_model(), make(), **FAST)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_config_file_matches_the_defense_signature_and_validates():
    import inspect
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from baselines.base import traits_of

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "defense" / "gradprune.yaml")
    hyper = {k: v for k, v in OmegaConf.to_container(cfg).items()
             if not k.startswith("_") and k not in ("seed", "defaults")}  # defaults: its budget choice
    signature = inspect.signature(defend.__wrapped__).parameters
    assert set(hyper) == set(signature) - {"model", "data", "seed", "device", "progress"}
    for key, value in hyper.items():   # the yaml restates the code's defaults
        default = signature[key].default
        assert (list(default) if isinstance(default, tuple) else default) == value, key
    traits = traits_of(instantiate(OmegaConf.merge(cfg, {"seed": 0})))
    assert not traits.data_free
    traits.validate(**hyper)
    with pytest.raises(ValueError, match=r"^gradprune batch_size=0 must be an integer >= 1"):
        traits.validate(**{**hyper, "batch_size": 0})
