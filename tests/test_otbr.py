"""Behaviour of otbr/ (docs/methods/otbr.md): Eq. 1-4, Algorithm 1 and 2, on tiny CPU models."""
from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
import torch.nn as nn

import otbr
from bdcore.models import PreActResNet18, torchvision_model


# --------------------------------------------------------------------------------------------------
# Small models and helpers
# --------------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny ops: one thread is faster, and immune to OpenMP barrier stalls on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TwoConvNet(nn.Module):
    """conv0 (2->2, 1x1) -> conv1 (2->3, 1x1) -> bn1 -> relu -> conv2 (3->2, 3x3) -> pool -> linear."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(2, 2, 1, bias=False)
        self.conv1 = nn.Conv2d(2, 3, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 2, 3, padding=1, bias=False)
        self.linear = nn.Linear(2, 3)

    def forward(self, x):
        out = self.conv2(torch.relu(self.bn1(self.conv1(self.conv0(x)))))
        return self.linear(out.mean(dim=(2, 3)))


def hand_model() -> TwoConvNet:
    """Weights chosen so that both OT plans below are unique (all reduced costs > 0)."""
    torch.manual_seed(0)
    model = TwoConvNet()
    with torch.no_grad():
        model.conv1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]).view(3, 2, 1, 1))
        model.conv2.weight.copy_(torch.from_numpy(
            np.random.default_rng(0).normal(size=(2, 3, 3, 3)).astype(np.float32)))
        model.bn1.running_mean.uniform_(-1, 1)
        model.bn1.running_var.uniform_(0.5, 2)
    return model.eval()


HAND_NWCS = {"conv0.weight": torch.tensor([0.0, 0.0], dtype=torch.float64),
             "conv1.weight": torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64),
             "conv2.weight": torch.tensor([1.0, 3.0], dtype=torch.float64)}
HAND_PRUNED = {"conv1.weight": [0]}


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: nn.Module, b: nn.Module, skip=()):
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        if key not in skip:
            assert torch.equal(sa[key], sb[key]), key


def tiny_preact() -> nn.Module:
    torch.manual_seed(0)
    return PreActResNet18(10, 3, width=4).eval()


FAST_UNLEARN = {"steps": 2, "batch_size": 8}


# --------------------------------------------------------------------------------------------------
# Layer set
# --------------------------------------------------------------------------------------------------

def test_layer_set_matches_official_counts():
    preact = PreActResNet18(10, 3, width=64)
    layers = otbr.prunable_conv_layers(preact)
    assert len(layers) == 17 and layers[0] == "conv1.weight"
    assert not any("shortcut" in layer for layer in layers)
    assert sum(otbr.conv_of(preact, layer).out_channels for layer in layers) == 3904

    vgg = torchvision_model("vgg19_bn", 10, 3)
    layers = otbr.prunable_conv_layers(vgg)
    assert len(layers) == 16
    assert sum(otbr.conv_of(vgg, layer).out_channels for layer in layers) == 5504


def test_layer_set_excludes_depthwise_and_squeeze_excitation():
    model = torchvision_model("mobilenet_v3_large", 10, 3)
    for layer in otbr.prunable_conv_layers(model):
        conv = otbr.conv_of(model, layer)
        assert conv.groups == 1
        assert not layer.split(".")[-2].startswith("fc")  # SqueezeExcitation's fc1/fc2 convs


# --------------------------------------------------------------------------------------------------
# Stage 1: unlearning (Eq. 1) and NWC (Eq. 2)
# --------------------------------------------------------------------------------------------------

def test_nwc_is_rounded_l1_of_filter_change():
    model = TwoConvNet()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    unlearned = copy.deepcopy(model)
    with torch.no_grad():
        unlearned.conv1.weight[0] = torch.tensor([0.5, -1.25]).view(2, 1, 1)   # L1 = 1.75
        unlearned.conv1.weight[1, 0] = 0.00015   # float32 0.000150000007 -> '0.0002' (float64 gives 0.0001)
        unlearned.conv1.weight[2, 1] = -0.00055  # float32 0.000549999997 -> '0.0005' (float64 gives 0.0006)
        unlearned.linear.weight.fill_(3.0)       # not a conv: no NWC
    nwcs = otbr.neuron_weight_changes(model, unlearned)
    assert list(nwcs) == ["conv0.weight", "conv1.weight", "conv2.weight"]
    assert nwcs["conv1.weight"].dtype == torch.float64
    assert nwcs["conv1.weight"].tolist() == [1.75, 0.0002, 0.0005]
    assert nwcs["conv0.weight"].tolist() == [0.0, 0.0]
    raw = otbr.neuron_weight_changes(model, unlearned, round_decimals=None)["conv1.weight"]
    assert raw[1].item() == float(np.float32(0.00015))


def test_same_seed_same_result_different_seed_different_noise():
    model = tiny_preact()
    a = otbr.unlearning_neuron_weight_changes(model, seed=0, unlearn=FAST_UNLEARN, nwc={"round_decimals": None})
    b = otbr.unlearning_neuron_weight_changes(model, seed=0, unlearn=FAST_UNLEARN, nwc={"round_decimals": None})
    c = otbr.unlearning_neuron_weight_changes(model, seed=1, unlearn=FAST_UNLEARN, nwc={"round_decimals": None})
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)

    fused_a, _ = otbr.defend(model, seed=0, unlearn=FAST_UNLEARN, prune={"ratio": 0.1})
    fused_b, _ = otbr.defend(model, seed=0, unlearn=FAST_UNLEARN, prune={"ratio": 0.1})
    assert_same_state(fused_a, fused_b)


def test_injected_noise_batches_replace_generation():
    model = tiny_preact()
    g = torch.Generator().manual_seed(123)
    batches = [(torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 9, (8,), generator=g)) for _ in range(2)]
    a = otbr.unlearning_neuron_weight_changes(model, seed=0, noise_batches=batches, nwc={"round_decimals": None})
    b = otbr.unlearning_neuron_weight_changes(model, seed=5, noise_batches=batches, nwc={"round_decimals": None})
    generated = otbr.unlearning_neuron_weight_changes(model, seed=0, unlearn=FAST_UNLEARN,
                                                      nwc={"round_decimals": None})
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], generated[k]) for k in a)


def _label_frequencies(labels: str, num_labels=None, classes: int = 3) -> np.ndarray:
    """Zero linear model: softmax is uniform, so one plain SGD step on -CE moves bias k by lr*(1/C - freq_k)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, classes))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    unlearned = otbr.random_unlearning(model, steps=1, batch_size=600, lr=1.0, momentum=0.0,
                                       noise_shape=(3, 4, 4), labels=labels, num_labels=num_labels)
    return 1.0 / classes - unlearned[1].bias.detach().double().numpy()


def test_official_labels_never_use_last_class_paper_labels_do():
    official = _label_frequencies("official")
    assert official[2] == pytest.approx(0.0, abs=1e-6)
    assert official.sum() == pytest.approx(1.0, abs=1e-5) and official[:2].min() > 0.3
    paper = _label_frequencies("paper")
    assert paper[2] > 0.2
    only_zero = _label_frequencies("official", num_labels=1)
    assert only_zero == pytest.approx([1.0, 0.0, 0.0], abs=1e-6)
    assert otbr.label_upper_bound(10) == 9 and otbr.label_upper_bound(10, "paper") == 10


def test_unlearning_does_not_touch_input_model():
    model = tiny_preact()
    before = state(model)
    unlearned = otbr.random_unlearning(model, **FAST_UNLEARN)
    assert all(torch.equal(before[k], v) for k, v in state(model).items())
    assert not torch.equal(state(unlearned)["conv1.weight"], before["conv1.weight"])


# --------------------------------------------------------------------------------------------------
# Stage 1: pruning
# --------------------------------------------------------------------------------------------------

def test_selection_is_global_floor_with_ties_in_network_order():
    nwcs = {"a.weight": torch.tensor([0.3, 0.1, 0.3], dtype=torch.float64),
            "b.weight": torch.tensor([0.3, 0.2], dtype=torch.float64)}
    assert otbr.select_filters_to_prune(nwcs, 0.5) == {"a.weight": [0, 2]}          # int(2.5) = 2
    assert otbr.select_filters_to_prune(nwcs, 0.6) == {"a.weight": [0, 2], "b.weight": [0]}
    assert otbr.select_filters_to_prune(nwcs, 0.1) == {}

    preact = PreActResNet18(10, 3, width=64)
    g = torch.Generator().manual_seed(0)
    sizes = {layer: otbr.conv_of(preact, layer).out_channels for layer in otbr.prunable_conv_layers(preact)}
    nwcs = {layer: torch.rand(n, generator=g, dtype=torch.float64) for layer, n in sizes.items()}
    for ratio, expected in [(0.01, 39), (0.05, 195), (0.25, 976), (0.30, 1171)]:
        assert sum(len(v) for v in otbr.select_filters_to_prune(nwcs, ratio).values()) == expected


def test_prune_filters_zeroes_whole_filters_in_a_copy():
    model = tiny_preact()
    pruned = {"layer1.0.conv1.weight": [1, 3], "layer2.1.conv2.weight": [0]}
    pruned_model = otbr.prune_filters(model, pruned)
    for layer, indices in pruned.items():
        weight = dict(pruned_model.named_parameters())[layer]
        original = dict(model.named_parameters())[layer]
        keep = [i for i in range(weight.shape[0]) if i not in indices]
        assert torch.count_nonzero(weight[indices]) == 0
        assert torch.equal(weight[keep], original[keep])
        assert torch.count_nonzero(original[indices]) > 0
    assert_same_state(model, pruned_model, skip=set(pruned))


# --------------------------------------------------------------------------------------------------
# Stage 2: OT fusion (Eq. 3-4, Algorithm 1)
# --------------------------------------------------------------------------------------------------

def test_ot_plan_marginals_equal_masses():
    rng = np.random.default_rng(0)
    mu = otbr.uniform_masses(4)
    nu = rng.random(6)
    nu /= nu.sum()
    plan, messages = otbr.optimal_transport_plan(mu, nu, rng.random((4, 6)).astype(np.float32))
    assert plan.shape == (4, 6) and plan.dtype == np.float64 and messages == []
    np.testing.assert_allclose(plan.sum(axis=1), mu, atol=1e-12)
    np.testing.assert_allclose(plan.sum(axis=0), nu, atol=1e-12)
    assert (plan >= 0).all()


def expected_hand_fusion(model: TwoConvNet, lambda_: float, source_support: str = "all"):
    """Algorithm 1 by hand on hand_model() with filter 0 of conv1 pruned (official formulas).

    conv1 costs: sources p0=(0,0) (pruned), p1=(0,1), p2=(-1,0); targets b0=(1,0), b1=(0,1), b2=(-1,0);
    mu = 1/3 (or 1/2 over p1, p2 when only surviving filters are sources), nu = [2,1,1]/4.
    """
    w1_b = model.conv1.weight.detach().double().numpy().reshape(3, 2)
    w1_p = w1_b.copy()
    w1_p[0] = 0
    nu1 = np.array([0.5, 0.25, 0.25])
    if source_support == "all":
        plan1 = np.array([[1 / 3, 0, 0], [1 / 12, 1 / 4, 0], [1 / 12, 0, 1 / 4]])
    else:  # rows p1, p2 only; the pruned channel gets a zero row in the next layer's incoming map
        plan1 = np.array([[0, 0, 0], [1 / 4, 1 / 4, 0], [1 / 4, 0, 1 / 4]])
    transported1 = np.diag(1 / nu1) @ plan1.T @ w1_p          # first chain layer: no alignment
    # conv2 (not pruned): P = T1 diag(1/nu1); raw cost has zero diagonal; mu = 1/2, nu = [1,3]/4.
    w2_b = model.conv2.weight.detach().double().numpy()       # (2, 3, 3, 3)
    incoming = plan1 @ np.diag(1 / nu1)
    aligned2 = np.einsum("nmhw,mk->nkhw", w2_b, incoming)
    plan2 = np.array([[0.25, 0.25], [0.0, 0.5]])
    nu2 = np.array([0.25, 0.75])
    transported2 = (np.diag(1 / nu2) @ plan2.T @ aligned2.reshape(2, -1)).reshape(w2_b.shape)
    fused1 = lambda_ * transported1 + (1 - lambda_) * w1_b
    fused2 = lambda_ * transported2 + (1 - lambda_) * w2_b
    return fused1.reshape(3, 2, 1, 1), fused2


@pytest.mark.parametrize("lambda_, source_support", [(0.5, "all"), (1.0, "all"), (0.3, "all"), (0.5, "surviving")])
def test_two_layer_chain_matches_hand_computation(lambda_, source_support):
    model = hand_model()
    pruned_model = otbr.prune_filters(model, HAND_PRUNED)
    fused, diagnostics = otbr.ot_fusion(pruned_model, model, HAND_NWCS, HAND_PRUNED, lambda_=lambda_,
                                        source_support=source_support)
    expected1, expected2 = expected_hand_fusion(model, lambda_, source_support)
    np.testing.assert_allclose(fused.conv1.weight.detach().double().numpy(), expected1, atol=1e-6)
    np.testing.assert_allclose(fused.conv2.weight.detach().double().numpy(), expected2, atol=1e-6)
    assert diagnostics["chain_layers"] == ["conv1.weight", "conv2.weight"]
    assert diagnostics["first_pruned_layer"] == "conv1.weight"
    assert diagnostics["zero_mass_guard"] == [] and diagnostics["ot_warnings"] == []
    # conv0 (before the first pruned layer), BN, linear: the backdoored model's, bit for bit
    assert_same_state(fused, model, skip={"conv1.weight", "conv2.weight"})
    assert_same_state(pruned_model, otbr.prune_filters(model, HAND_PRUNED))  # inputs untouched


def test_lambda_zero_is_backdoored_model():
    model = hand_model()
    pruned_model = otbr.prune_filters(model, HAND_PRUNED)
    fused, _ = otbr.ot_fusion(pruned_model, model, HAND_NWCS, HAND_PRUNED, lambda_=0.0)
    assert_same_state(fused, model)


def test_cost_on_aligned_only_changes_layers_after_the_first():
    model = hand_model()
    pruned_model = otbr.prune_filters(model, HAND_PRUNED)
    raw, _ = otbr.ot_fusion(pruned_model, model, HAND_NWCS, HAND_PRUNED, cost_on="raw")
    aligned, _ = otbr.ot_fusion(pruned_model, model, HAND_NWCS, HAND_PRUNED, cost_on="aligned")
    assert torch.equal(raw.conv1.weight, aligned.conv1.weight)


def test_fusion_modes_none_and_vanilla():
    model = hand_model()
    pruned_model = otbr.prune_filters(model, HAND_PRUNED)
    none, diagnostics = otbr.ot_fusion(pruned_model, model, HAND_NWCS, HAND_PRUNED, mode="none")
    assert_same_state(none, pruned_model)
    assert diagnostics["chain_layers"] == []

    vanilla, _ = otbr.ot_fusion(pruned_model, model, HAND_NWCS, HAND_PRUNED, mode="vanilla", lambda_=0.3)
    for layer in ("conv1", "conv2"):
        expected = 0.3 * getattr(pruned_model, layer).weight + 0.7 * getattr(model, layer).weight
        assert torch.equal(getattr(vanilla, layer).weight, expected)
    assert_same_state(vanilla, model, skip={"conv1.weight", "conv2.weight"})


def test_untouched_layers_are_bit_identical_on_preact():
    model = tiny_preact()
    g = torch.Generator().manual_seed(0)
    nwcs = {layer: torch.rand(otbr.conv_of(model, layer).out_channels, generator=g, dtype=torch.float64)
            for layer in otbr.prunable_conv_layers(model)}
    pruned = {"layer1.1.conv1.weight": [0, 2], "layer3.0.conv2.weight": [1]}
    fused, diagnostics = otbr.ot_fusion(otbr.prune_filters(model, pruned), model, nwcs, pruned)
    layers = otbr.prunable_conv_layers(model)
    chain = layers[layers.index("layer1.1.conv1.weight"):]
    assert diagnostics["chain_layers"] == chain and diagnostics["alignment_restarts"] == []
    assert_same_state(fused, model, skip=set(chain))  # BN params + buffers, shortcuts, linear, early convs
    assert not torch.equal(fused.layer1[1].conv1.weight, model.layer1[1].conv1.weight)


def test_zero_mass_guard_and_all_zero_layer_fallback(caplog):
    model = hand_model()
    pruned_model = otbr.prune_filters(model, HAND_PRUNED)
    nwcs = {**HAND_NWCS, "conv1.weight": torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64),
            "conv2.weight": torch.tensor([0.0, 0.0], dtype=torch.float64)}
    with caplog.at_level(logging.WARNING, logger="otbr"):
        fused, diagnostics = otbr.ot_fusion(pruned_model, model, nwcs, HAND_PRUNED)
    assert all(torch.isfinite(p).all() for p in fused.parameters())
    # target 1 of conv1 gets no mass: its transported row is 0, so fused = (1 - lambda) W_b
    assert torch.equal(fused.conv1.weight[1], 0.5 * model.conv1.weight[1])
    events = [(e["layer"], e["event"]) for e in diagnostics["zero_mass_guard"]]
    assert events == [("conv1.weight", "zero_target_mass"), ("conv2.weight", "all_zero_nwc_uniform_target")]
    assert diagnostics["zero_mass_guard"][0]["filters"] == [1]
    assert len(caplog.records) == 2
    # the all-zero layer behaves exactly like a uniform target
    uniform, _ = otbr.ot_fusion(pruned_model, model, {**nwcs, "conv2.weight": torch.ones(2, dtype=torch.float64)},
                                HAND_PRUNED)
    assert torch.equal(fused.conv2.weight, uniform.conv2.weight)


def test_surviving_source_support_and_random_target_are_deterministic():
    model = tiny_preact()
    nwcs = otbr.unlearning_neuron_weight_changes(model, unlearn=FAST_UNLEARN)
    pruned = otbr.select_filters_to_prune(nwcs, 0.1)
    pruned_model = otbr.prune_filters(model, pruned)
    surviving, _ = otbr.ot_fusion(pruned_model, model, nwcs, pruned, source_support="surviving")
    assert all(torch.isfinite(p).all() for p in surviving.parameters())
    r0, _ = otbr.ot_fusion(pruned_model, model, nwcs, pruned, target_dist="random", seed=0)
    r0b, _ = otbr.ot_fusion(pruned_model, model, nwcs, pruned, target_dist="random", seed=0)
    r1, _ = otbr.ot_fusion(pruned_model, model, nwcs, pruned, target_dist="random", seed=1)
    assert_same_state(r0, r0b)
    assert any(not torch.equal(a, b) for a, b in zip(r0.parameters(), r1.parameters()))


# --------------------------------------------------------------------------------------------------
# Algorithm 2 and other architectures
# --------------------------------------------------------------------------------------------------

def test_defend_diagnostics_are_json_and_complete():
    model = tiny_preact()
    before = state(model)
    calls = []

    def evaluate(m):
        calls.append(m)
        return {"acc": 12.5, "asr": 3.0}

    fused, diagnostics = otbr.defend(model, None, seed=0, unlearn=FAST_UNLEARN, evaluate=evaluate)
    json.dumps(diagnostics)
    for key in ("pruned_per_layer", "num_filters_total", "num_filters_pruned", "first_pruned_layer", "nwc_stats",
                "chain_layers", "ot_warnings", "zero_mass_guard", "stage1_unlearning_seconds",
                "stage1_pruning_seconds", "stage2_fusion_seconds", "stage1_given", "pruned_metrics"):
        assert key in diagnostics, key
    assert diagnostics["num_filters_total"] == 244 and diagnostics["num_filters_pruned"] == int(244 * 0.05)
    assert sum(diagnostics["pruned_per_layer"].values()) == diagnostics["num_filters_pruned"]
    assert set(diagnostics["nwc_stats"]) >= {"min", "max", "mean", "median", "num_zeros"}
    assert diagnostics["pruned_metrics"] == {"acc": 12.5, "asr": 3.0} and len(calls) == 1
    assert diagnostics["stage1_given"] is False
    assert all(torch.equal(before[k], v) for k, v in state(model).items())
    assert not fused.training

    # a precomputed stage 1 skips unlearning and gives the same model
    nwcs = otbr.unlearning_neuron_weight_changes(model, seed=0, unlearn=FAST_UNLEARN)
    again, diagnostics2 = otbr.defend(model, neuron_weight_changes=nwcs)
    assert diagnostics2["stage1_given"] is True and diagnostics2["stage1_unlearning_seconds"] is None
    assert_same_state(fused, again)


@pytest.mark.parametrize("name", ["resnet18", "vgg19_bn", "efficientnet_b3", "mobilenet_v3_large"])
def test_other_architectures_never_fail_on_shapes(name):
    torch.manual_seed(0)
    model = torchvision_model(name, 10, 3).eval()
    fused, diagnostics = otbr.defend(model, unlearn={"steps": 1, "batch_size": 2})
    json.dumps(diagnostics)
    assert diagnostics["chain_layers"]
    with torch.no_grad():
        out = fused(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
