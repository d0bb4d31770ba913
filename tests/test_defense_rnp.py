"""RNP (baselines/rnp.py) against transcriptions of BackdoorBench's defense/rnp.py."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from baselines.anp import attach_neuron_masks, prune_and_select, rounded_mask_values, sort_mask_values
from baselines.rnp import defend, negated_cross_entropy_term, recover_neuron_masks, unlearn
from bdcore.data import DefenseData, ImageSet, normalize
# ANP's test module holds the shared fixtures and the transcription of the published pruning sweep,
# which RNP's code shares verbatim with ANP's (defense/rnp.py evaluate_by_threshold).
from test_defense_anp import (CLEAN_CODES, SPEC, VAL_CODES, coded_defense_data, coded_set, pruning_friendly_metrics,
                              published_evaluate_by_threshold, record_forwards, set_masks, state_equal, tiny_model,
                              zero_gammas)


def random_set(n: int = 24, seed: int = 0) -> ImageSet:
    gen = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 3, 16, 16), generator=gen, dtype=torch.uint8),
                    torch.randint(0, 4, (n,), generator=gen))


# --------------------------------------------------------------------------------------------------
# unlearning
# --------------------------------------------------------------------------------------------------

def test_negated_cross_entropy_term_gives_the_published_ascent_gradient_bit_for_bit():
    model = tiny_model(0).train()
    data = random_set()
    x, y = normalize(data.images, SPEC), data.labels
    reference = copy.deepcopy(model)
    (-F.cross_entropy(reference(x), y)).backward()
    logits = model(x)
    (F.cross_entropy(logits, y) + negated_cross_entropy_term(logits, y)).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name


def published_unlearning(model, x, y, *, epochs, lr, clean_threshold):
    """UnlearnModelTrainer with one full batch: the clip before backward clips nothing; -CE ascent."""
    net = copy.deepcopy(model)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[10, 20], gamma=0.1)
    epochs_run = 0
    for _ in range(epochs):
        net.train()
        log_probs = net(x)
        loss = nn.CrossEntropyLoss()(log_probs, y.long())
        nn.utils.clip_grad_norm_(net.parameters(), max_norm=20, norm_type=2)
        (-loss).backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        epochs_run += 1
        if (log_probs.argmax(1) == y).float().mean().item() <= clean_threshold:
            break
    return net, epochs_run


def test_unlearning_equals_published_trainer():
    """Same batches (one full batch, no augmentation): train_model only reorders the samples in it."""
    model = tiny_model(1)
    data = DefenseData(clean=random_set(), spec=SPEC)
    ours = copy.deepcopy(model)
    history = unlearn(ours, data, epochs=3, batch_size=64, lr=0.01, momentum=0.9, weight_decay=5e-4,
                      schedule=[10, 20], clean_threshold=-1.0, clip_grad_norm=None, device=torch.device("cpu"),
                      seed=0, precision="fp32", progress=False)
    expected, epochs_run = published_unlearning(model, normalize(data.clean.images, SPEC), data.clean.labels,
                                                epochs=3, lr=0.01, clean_threshold=-1.0)
    assert len(history) == epochs_run == 3
    for (name, p), q in zip(ours.state_dict().items(), expected.state_dict().values()):
        if p.is_floating_point():
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    assert not state_equal(ours, model)


@pytest.mark.parametrize("clean_threshold, epochs_run", [(1.0, 1), (-1.0, 4)])
def test_unlearning_stops_after_the_first_epoch_at_or_below_the_threshold(clean_threshold, epochs_run):
    data = DefenseData(clean=random_set(), spec=SPEC)
    history = unlearn(tiny_model(2), data, epochs=4, batch_size=8, lr=0.01, momentum=0.9, weight_decay=5e-4,
                      schedule=[10, 20], clean_threshold=clean_threshold, clip_grad_norm=None,
                      device=torch.device("cpu"), seed=0, precision="fp32", progress=False)
    assert len(history) == epochs_run


# --------------------------------------------------------------------------------------------------
# recovery
# --------------------------------------------------------------------------------------------------

def published_recovery(masked, batches_per_epoch, *, lr, alpha):
    """RecoverModelTrainer.train_one_epoch_on_mix over given batches: alpha * CE, step, zero, clip."""
    masks = [v for n, v in masked.named_parameters() if "neuron_mask" in n]
    optimizer = torch.optim.SGD(masks, lr=lr, momentum=0.9)
    for batches in batches_per_epoch:
        for x, y in batches:
            masked.train()
            loss = alpha * nn.CrossEntropyLoss()(masked(x), y.long())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            with torch.no_grad():
                for p in masks:
                    p.clamp_(0.0, 1.0)


def test_recovery_equals_published_trainer_and_keeps_masks_in_unit_interval():
    model = tiny_model(3)
    data = DefenseData(clean=random_set(20), spec=SPEC)   # no augmentation: the batches are reproducible
    ours = copy.deepcopy(model)
    bns = list(attach_neuron_masks(ours).values())
    recover_neuron_masks(ours, bns, data, epochs=2, batch_size=8, lr=5.0, momentum=0.9, alpha=0.2,
                         generator=torch.Generator().manual_seed(5), device=torch.device("cpu"), progress=False)
    gen = torch.Generator().manual_seed(5)
    x_all, y_all = normalize(data.clean.images, SPEC), data.clean.labels
    epochs = []
    for _ in range(2):
        order = torch.randperm(20, generator=gen)
        epochs.append([(x_all[order[s:s + 8]], y_all[order[s:s + 8]]) for s in range(0, 20, 8)])
    expected = copy.deepcopy(model)
    expected_bns = list(attach_neuron_masks(expected).values())
    published_recovery(expected, epochs, lr=5.0, alpha=0.2)
    masks = torch.cat([bn.neuron_mask.detach() for bn in bns])
    assert torch.equal(masks, torch.cat([bn.neuron_mask.detach() for bn in expected_bns]))
    assert masks.min() >= 0 and masks.max() <= 1 and (masks < 1).any()
    weights = {k: v for k, v in ours.state_dict().items() if "neuron" not in k and "running" not in k
               and "num_batches" not in k}
    reference = model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in weights.items())   # only the masks were trained


# --------------------------------------------------------------------------------------------------
# pruning rule
# --------------------------------------------------------------------------------------------------

def crafted_mask_values(model, seed):
    masked = copy.deepcopy(model)
    bns = attach_neuron_masks(masked)
    set_masks(bns, torch.Generator().manual_seed(seed))
    return sort_mask_values(rounded_mask_values(bns))


def test_published_fixed_threshold_is_the_compatibility_switch():
    """BackdoorBench always returns the 0.70 fixed-threshold pruning (pruning_number=0.7 here)."""
    model = tiny_model(4)
    values = crafted_mask_values(model, 0)
    data = DefenseData(clean=coded_set(CLEAN_CODES), spec=SPEC, evaluate=pruning_friendly_metrics)
    ours, info = prune_and_select(model, values, data, name="rnp", pruning_by="threshold", pruning_max=0.9,
                                  pruning_step=0.05, pruning_number=0.7, acc_ratio=0.1, selection_split="test",
                                  published_number_offset=False, device=torch.device("cpu"), progress=False)
    expected = copy.deepcopy(model)   # the published `model` after evaluate_by_threshold(max=N, step=N)
    published_evaluate_by_threshold(expected, values, 0.7, 0.7, pruning_friendly_metrics, 95.0, 90.0, 0.1)
    assert state_equal(ours, expected)
    assert info["selected_pruned"] == sum(1 for v in values if v[2] <= 0.7) > 0


def test_default_returns_the_sweep_selection_the_published_code_discards():
    model = tiny_model(5)
    values = crafted_mask_values(model, 1)
    data = DefenseData(clean=coded_set(CLEAN_CODES), spec=SPEC, evaluate=pruning_friendly_metrics)
    ours, info = prune_and_select(model, values, data, name="rnp", pruning_by="threshold", pruning_max=0.9,
                                  pruning_step=0.05, pruning_number=None, acc_ratio=0.1, selection_split="test",
                                  published_number_offset=False, device=torch.device("cpu"), progress=False)
    reference = pruning_friendly_metrics(model)
    expected = published_evaluate_by_threshold(copy.deepcopy(model), values, 0.9, 0.05, pruning_friendly_metrics,
                                               reference["asr"], reference["acc"], 0.1)
    assert state_equal(ours, expected) and info["selected_level"] is not None


# --------------------------------------------------------------------------------------------------
# behaviour of defend()
# --------------------------------------------------------------------------------------------------

FAST = dict(unlearning_epochs=2, recovering_epochs=2, batch_size=16, progress=False)


def test_rnp_changes_only_bn_weights_of_the_original_model_and_leaves_input_alone():
    model = tiny_model(6)
    before = copy.deepcopy(model)
    data = coded_defense_data(evaluate=pruning_friendly_metrics, validation=False)
    defended, diagnostics = defend(model, data, seed=0, pruning_by="number", pruning_max=8, pruning_step=4, **FAST)
    assert state_equal(model, before) and not model.training and not defended.training
    new, old = defended.state_dict(), model.state_dict()
    bn_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    for key in old:
        if key in bn_weights:
            assert torch.all(new[key][new[key] != old[key]] == 0), key
        else:
            assert torch.equal(new[key], old[key]), key   # the unlearned weights never reach the result
    assert zero_gammas(defended) - zero_gammas(model) == diagnostics["selected_pruned"] == 8
    json.dumps(diagnostics)
    assert diagnostics["unlearning"]["epochs_run"] >= 1 and diagnostics["recovery"]["epochs_run"] == 2
    assert diagnostics["rnp_seconds"] > 0 and diagnostics["selection_split"] == "test"


def test_rnp_reads_only_its_splits():
    model = tiny_model(7)
    seen = record_forwards(model)
    reads = set()

    def forbidden(m):
        raise AssertionError("selection_split=validation must not evaluate on the test set")

    _, diagnostics = defend(model, coded_defense_data(evaluate=forbidden, reads=reads), seed=1,
                            selection_split="validation", **FAST)
    assert seen["train"] and seen["train"] <= set(CLEAN_CODES)
    assert seen["eval"] and seen["eval"] <= set(VAL_CODES)
    assert reads == {"clean", "validation"} and diagnostics["selection_split"] == "validation"


def test_rnp_without_clean_data_raises_one_line():
    with pytest.raises(ValueError) as info:
        defend(tiny_model(), None)
    assert str(info.value) == "rnp needs clean data: use budget=ratio (the default) or budget=spc"


def test_rnp_published_switch_needs_no_selection_split():
    data = coded_defense_data(evaluate=None, validation=False)
    defended, diagnostics = defend(tiny_model(8), data, pruning_number=0.7, **FAST)
    assert diagnostics["selection_split"] is None and diagnostics["selected_level"] == 0.7
    assert diagnostics["selected_pruned"] == diagnostics["masks"]["at_most_0.7"]


def test_config_file_matches_the_defense_signature_and_validates():
    import inspect
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from baselines.base import traits_of

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "defense" / "rnp.yaml")
    hyper = {k: v for k, v in OmegaConf.to_container(cfg).items() if not k.startswith("_") and k != "seed"}
    signature = inspect.signature(defend.__wrapped__).parameters
    assert set(hyper) == set(signature) - {"model", "data", "seed", "device", "progress"}
    for key, value in hyper.items():   # the yaml restates the code's defaults
        default = signature[key].default
        assert (list(default) if isinstance(default, tuple) else default) == value, key
    traits = traits_of(instantiate(OmegaConf.merge(cfg, {"seed": 0})))
    assert not traits.data_free
    traits.validate(**hyper)
    with pytest.raises(ValueError, match=r"^rnp batch_size=0 must be an integer >= 1"):
        traits.validate(**{**hyper, "batch_size": 0})
