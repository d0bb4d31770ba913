"""TrojanNN: neuron selection and PGD against naive transcriptions of BackdoorBench's code; the trigger stays
in its mask and raises the selected neurons; stamping (saturate / published wrap); the compatibility
switches; poisoning, bd_test, the saved state, caching through the resources, determinism."""
import copy
import io

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from attacks.base import AttackConfigError
from attacks.trojan import (TrojanNN, builtin_apple_mask, layer_input, most_connected_neurons, optimise_trigger,
                            random_head_weight, stamp_trigger)
from bdcore.data import DatasetSpec, normalize
from bdcore.datasets import make_synthetic
from bdcore.models import PreActResNet18
from bdcore.train import TrainSettings, train_model
from helpers import FakeResources, ROOT

SYN = DatasetSpec("synthetic", 4, 3, 32, 32, (0.5,) * 3, (0.25,) * 3)
FAST = dict(iterations=60, progress=False)


@pytest.fixture(scope="module")
def data():
    return make_synthetic(num_classes=4, train_per_class=64, test_per_class=16)


@pytest.fixture(scope="module")
def clean_model(data):
    torch.manual_seed(0)
    model = PreActResNet18(num_classes=4, in_channels=3, width=4)
    train_model(model, data[0], SYN, TrainSettings(epochs=3, batch_size=32, t_max=3), device=torch.device("cpu"),
                seed=0, progress=False)
    return model.eval()


@pytest.fixture(scope="module")
def prepared(data, clean_model):
    resources = FakeResources(clean_model)
    before = copy.deepcopy(clean_model.state_dict())
    attack = TrojanNN(SYN, **FAST)
    attack.prepare(data[0], resources)
    assert all(torch.equal(before[k], v) for k, v in clean_model.state_dict().items())  # not modified
    return attack, resources


# ---------------------------------------------------------------- naive transcriptions of the published code

def naive_most_connected(weight, count):
    w = weight.detach().abs().numpy()
    if w.ndim == 4:
        w = w.reshape(w.shape[0], w.shape[1], -1).sum(2)
    totals = [sum(w[o, i] for o in range(w.shape[0])) for i in range(w.shape[1])]
    return sorted(range(len(totals)), key=lambda i: -totals[i])[:count]


def naive_pgd(model, images, layer, neurons, targets, eps=0.3, alpha=0.1, iters=1000, tolerance=1e-3):
    """pgd_with_mask_to_selected_neuron, raw input, hook on the layer's input, bool mask."""
    keep = images > 0
    ori = images.data
    saved = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: saved.__setitem__("f", i[0]))
    for _ in range(iters):
        images.requires_grad = True
        model(images * keep)
        model.zero_grad()
        cost = 0
        for i, idx in enumerate(neurons):
            cost += ((saved["f"][:, idx] - targets[i]) ** 2).sum()
        cost.backward()
        adv = images - alpha * images.grad.sign()
        eta = torch.clamp(adv - ori, min=-eps, max=eps)
        images = torch.clamp(ori + eta, min=0, max=1).detach_()
        if cost < tolerance:
            break
    handle.remove()
    return images


def test_neuron_selection_matches_published_rule():
    g = torch.Generator().manual_seed(0)
    linear = torch.randn(10, 32, generator=g)
    conv = torch.randn(8, 6, 3, 3, generator=g)
    assert most_connected_neurons(linear, 3).tolist() == naive_most_connected(linear, 3)
    assert most_connected_neurons(conv, 2).tolist() == naive_most_connected(conv, 2)


def test_pgd_is_bit_identical_to_the_published_loop(clean_model):
    model = copy.deepcopy(clean_model)
    mask = torch.from_numpy(np.array(builtin_apple_mask().resize((32, 32), Image.BILINEAR))).permute(2, 0, 1)
    mask = (mask.float() / 255)[None]
    neurons, targets = torch.tensor([5, 17]), torch.tensor([100.0, 100.0])
    with layer_input(model, "linear") as seen:
        def features(x):
            model(x)
            return seen["x"]
        ours, steps = optimise_trigger(features, mask, neurons, targets, iterations=40, progress=False)
    theirs = naive_pgd(copy.deepcopy(clean_model), mask.clone(), "linear", [5, 17], [100.0, 100.0], iters=40)
    assert steps == 40 and torch.equal(ours, theirs)
    assert not torch.equal(ours, mask)


# ---------------------------------------------------------------- the generated trigger

def selected_activation(model, images01, neurons, spec):
    with layer_input(model, "linear") as seen, torch.no_grad():
        model(normalize((images01 * 255).round().to(torch.uint8), spec))
        return seen["x"][:, neurons]


def test_trigger_is_confined_to_its_mask_and_raises_the_selected_neurons(prepared, clean_model):
    attack, _ = prepared
    trigger, mask = attack.trigger, attack.mask
    assert trigger.dtype == torch.uint8 and trigger.shape == (3, 32, 32)
    assert not bool(trigger[mask == 0].any())  # nothing outside the mask
    assert bool((trigger[mask > 0] != (mask[mask > 0] * 255).to(torch.uint8)).any())  # PGD moved it
    neurons = torch.tensor(attack.diagnostics["neurons"])
    assert len(neurons) == 2 and neurons.tolist() == most_connected_neurons(clean_model.linear.weight, 2).tolist()
    # recomputed independently from the final uint8 trigger, against the starting mask
    before = selected_activation(clean_model, mask[None], neurons, SYN)
    after = selected_activation(clean_model, trigger[None].float() / 255, neurons, SYN)
    assert (after > before).all()
    assert all(a > b for a, b in zip(attack.diagnostics["activation_after"], attack.diagnostics["activation_before"]))
    assert attack.generation_seconds > 0


def test_stamp_saturates_by_default_and_wraps_like_backdoorbench_when_asked():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 8, 8), generator=g, dtype=torch.uint8)
    trigger = torch.randint(0, 256, (3, 8, 8), generator=g, dtype=torch.uint8)
    saturated = stamp_trigger(images, trigger)
    assert torch.equal(saturated, (images.int() + trigger.int()).clamp(max=255).to(torch.uint8))
    wrapped = stamp_trigger(images, trigger, "wrap")
    for k in range(5):
        published = np.clip((trigger.numpy().astype(float) + images[k].numpy().astype(float)).astype("uint8"), 0, 255)
        assert np.array_equal(wrapped[k].numpy(), published)
    assert bool(((images.int() + trigger.int()) > 255).any())  # the case that differs was exercised


def test_random_head_switch_selects_from_a_seeded_random_1000_row_matrix(data, clean_model):
    attack = TrojanNN(SYN, neuron_selection="random_head", seed=3, **FAST)
    attack.prepare(data[0], FakeResources(clean_model))
    expected = most_connected_neurons(random_head_weight(clean_model.linear.in_features, 3), 2)
    assert attack.diagnostics["neurons"] == expected.tolist()
    assert random_head_weight(32, 3).shape == (1000, 32)
    assert torch.equal(random_head_weight(32, 3), random_head_weight(32, 3))


class InputSpy(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.lows = model, []

    def forward(self, x):
        self.lows.append(float(x.detach().min()))
        return self.model(x)


@pytest.mark.parametrize("pgd_input", ["normalized", "raw"])
def test_pgd_input_switch(data, pgd_input):
    torch.manual_seed(0)
    spy = InputSpy(PreActResNet18(num_classes=4, in_channels=3, width=4).eval())
    TrojanNN(SYN, pgd_input=pgd_input, iterations=3, progress=False).prepare(data[0], FakeResources(spy))
    # raw: masked [0, 1] images; normalised: the black background becomes (0 - 0.5) / 0.25 = -2
    assert min(spy.lows) == (0.0 if pgd_input == "raw" else -2.0)


def test_second_prepare_with_same_material_does_not_recompute(prepared, data, clean_model):
    attack, resources = prepared
    produced, calls = resources.produced, resources.clean_model_calls
    again = TrojanNN(SYN, **FAST)
    again.prepare(data[0], resources)
    assert (resources.produced, resources.clean_model_calls) == (produced, calls)
    assert torch.equal(again.trigger, attack.trigger)
    TrojanNN(SYN, num_neurons=3, **FAST).prepare(data[0], resources)
    assert resources.produced == produced + 1


def test_same_seed_same_trigger_whatever_the_global_rng(prepared, data, clean_model):
    attack, _ = prepared
    torch.manual_seed(99)
    fresh = TrojanNN(SYN, **FAST)
    fresh.prepare(data[0], FakeResources(clean_model))
    assert torch.equal(fresh.trigger, attack.trigger)
    a = TrojanNN(SYN, neuron_selection="random_head", seed=5, **FAST)
    b = TrojanNN(SYN, neuron_selection="random_head", seed=5, **FAST)
    a.prepare(data[0], FakeResources(clean_model))
    b.prepare(data[0], FakeResources(clean_model))
    assert torch.equal(a.trigger, b.trigger)


@pytest.mark.parametrize("mode", ["saturate", "wrap"])
def test_poisoning_bd_test_and_saved_state(prepared, data, mode):
    base, _ = prepared
    attack = base.restored({"trigger": base.trigger, "wrap": torch.tensor(mode == "wrap")})
    train, test = data
    poisoned = attack.poison_train(train, seed=2)
    idx = poisoned.poison_indices
    assert len(idx) == 26
    assert idx.tolist() == np.random.RandomState(2).choice(np.arange(256), 26, replace=False).tolist()
    assert (poisoned.data.labels[idx] == 0).all()
    clean = torch.ones(len(train), dtype=torch.bool)
    clean[idx] = False
    assert torch.equal(poisoned.data.images[clean], train.images[clean])
    assert torch.equal(poisoned.data.labels[clean], train.labels[clean])
    assert torch.equal(poisoned.data.images[idx], stamp_trigger(train.images[idx], attack.trigger, mode))
    bd = attack.bd_test(test)
    assert len(bd) == 48 and (bd.true_labels != 0).all() and (bd.target_labels == 0).all()
    buffer = io.BytesIO()
    torch.save(attack.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for k, v in state.items() if k != "diagnostics")
    rebuilt = TrojanNN(SYN, progress=False).restored(state)  # never prepared, default stamp: the state wins
    assert torch.equal(rebuilt.bd_test(test).images, bd.images)
    with pytest.raises(RuntimeError, match="prepare"):
        TrojanNN(SYN).apply_trigger(test.images[:1])


def test_trigger_report_survives_the_store_round_trip(prepared):
    attack, _ = prepared
    buffer = io.BytesIO()
    torch.save(attack.state_dict(), buffer)
    buffer.seek(0)
    rebuilt = TrojanNN(SYN, progress=False).restored(torch.load(buffer, weights_only=True))
    report = rebuilt.trigger_report()  # metrics.json's backdoor.attack on a store hit
    assert report == attack.trigger_report()
    assert set(report) == {"neurons", "steps", "activation_before", "activation_after"} and report["steps"] >= 1


def test_mask_file_and_builtin_mask(tmp_path, data):
    square = np.zeros((224, 224, 3), dtype=np.uint8)
    square[145:204, 145:204] = 255  # BackdoorBench's square.png
    path = tmp_path / "square.png"
    Image.fromarray(square).save(path)
    torch.manual_seed(0)
    model = PreActResNet18(num_classes=4, in_channels=3, width=4).eval()
    attack = TrojanNN(SYN, pattern_path=str(path), iterations=5, progress=False)
    attack.prepare(data[0], FakeResources(model))
    inside = attack.mask[0] > 0
    rows, cols = torch.nonzero(inside, as_tuple=True)
    assert 20 <= int(rows.min()) <= 21 and int(rows.max()) == 29 and 20 <= int(cols.min()) <= 21
    assert not bool(attack.trigger[:, ~inside].any())
    builtin = TrojanNN(SYN).mask[0]
    rows, cols = torch.nonzero(builtin > 0, as_tuple=True)
    assert 100 <= int((builtin > 0).sum()) <= 130 and int(rows.min()) >= 15 and int(rows.max()) <= 30
    assert int(cols.min()) >= 16 and int(cols.max()) <= 29  # lower right of centre, like apple4.png
    grey = TrojanNN(DatasetSpec("g", 10, 1, 28, 28, (0.3,), (0.35,))).mask
    assert grey.shape == (1, 28, 28) and bool((grey > 0).any())


def test_bad_settings_are_one_line_errors(tmp_path, data, clean_model):
    black = tmp_path / "black.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(black)
    for kwargs in (dict(pattern_path=str(black)), dict(stamp="clip"), dict(num_neurons=2, neuron_target=[1.0]),
                   dict(pgd_input="x"), dict(iterations=0)):
        with pytest.raises(AttackConfigError) as err:
            TrojanNN(SYN, **kwargs)
        assert "\n" not in str(err.value) and "attack." in str(err.value)
    assert TrojanNN(SYN, neuron_target=[50, 80]).settings["neuron_target"] == [50.0, 80.0]  # published: crashes
    with pytest.raises(AttackConfigError, match="attack.selected_layer='nope'"):
        TrojanNN(SYN, selected_layer="nope", **FAST).prepare(data[0], FakeResources(clean_model))


def test_config_has_backdoorbench_defaults():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["attack=trojan", "seed=4"])
    attack = instantiate(cfg.attack, spec=SYN)
    assert isinstance(attack, TrojanNN) and attack.seed == 4 and attack.trigger is None
    assert (attack.target, attack.poison_ratio, attack.stamp_mode, attack.selected_layer) == (0, 0.1, "saturate", None)
    assert attack.settings == {"num_neurons": 2, "neuron_target": [100.0, 100.0], "iterations": 1000, "step": 0.1,
                               "eps": 0.3, "tolerance": 1e-3, "neuron_selection": "trained",
                               "pgd_input": "normalized"}
