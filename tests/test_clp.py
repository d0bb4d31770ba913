"""CLP (baselines/clp.py) against docs/methods/clp.md and BackdoorBench's CLP_prune."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from baselines.clp import (channel_lipschitz_upper_bounds, conv_bn_pairs, defend,
                           lipschitz_outlier_channels)
from bdcore.models import PreActResNet18, torchvision_model


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def backdoorbench_clp_prune(net: nn.Module, u: float) -> None:
    """BackdoorBench defense/clp.py::CLP_prune, transcribed (in place; docs/methods/clp.md)."""
    params = net.state_dict()
    conv = None
    for name, m in net.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            std = m.running_var.sqrt()
            weight = m.weight
            channel_lips = []
            for idx in range(weight.shape[0]):
                w = conv.weight[idx].reshape(conv.weight.shape[1], -1) * (weight[idx] / std[idx]).abs()
                channel_lips.append(torch.svd(w.cpu())[1].max())
            channel_lips = torch.Tensor(channel_lips)
            index = torch.where(channel_lips > channel_lips.mean() + u * channel_lips.std())[0]
            params[name + ".weight"][index] = 0
            params[name + ".bias"][index] = 0
        elif isinstance(m, nn.Conv2d):
            conv = m
    net.load_state_dict(params)


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial affine parameters and running statistics (fresh BNs are all 1/0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.randn(n, generator=gen))
                m.bias.copy_(torch.randn(n, generator=gen))
                m.running_mean.copy_(torch.randn(n, generator=gen))
                m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.05)
    return model.eval()


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class ConvBN(nn.Module):
    """conv (3 -> channels) -> BN -> ReLU -> global pool -> linear."""

    def __init__(self, channels: int = 32):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, 2)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class RegisteredOutOfOrder(nn.Module):
    """bn is fed by conv_a but registered after conv_b, whose channel count differs."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.conv_b = nn.Conv2d(16, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x):
        return self.conv_b(torch.relu(self.bn(self.conv_a(x))))


@pytest.fixture
def preact():
    torch.manual_seed(0)
    return randomise_bn(PreActResNet18(10, 3, width=4))


@pytest.fixture
def outlier_net():
    """32 channels, channel 5 with weights x100: the only channel above mean + 3 std."""
    torch.manual_seed(0)
    net = randomise_bn(ConvBN(32))
    with torch.no_grad():
        net.conv.weight[5] *= 100
        net.bn.weight.abs_().add_(0.5)  # keep every |gamma| away from 0 so no other channel stands out
    return net


# --------------------------------------------------------------------------------------------------
# scoring and selection
# --------------------------------------------------------------------------------------------------

def test_uclc_matches_numpy_svd(outlier_net):
    conv, bn = outlier_net.conv, outlier_net.bn
    uclc = channel_lipschitz_upper_bounds(conv, bn)
    w = conv.weight.detach().double().numpy()
    scale = np.abs(bn.weight.detach().double().numpy() / np.sqrt(bn.running_var.double().numpy()))
    expected = [np.linalg.svd(w[k].reshape(w.shape[1], -1) * scale[k], compute_uv=False)[0]
                for k in range(w.shape[0])]
    assert uclc.dtype == torch.float32 and uclc.shape == (32,)
    np.testing.assert_allclose(uclc.numpy(), expected, rtol=1e-5)


def test_uclc_bit_identical_to_per_channel_torch_svd(preact):
    for bn_name, conv_name in conv_bn_pairs(preact, "published")[0]:
        conv, bn = preact.get_submodule(conv_name), preact.get_submodule(bn_name)
        std = bn.running_var.sqrt()
        with torch.no_grad():
            reference = torch.Tensor([
                torch.svd(conv.weight[k].reshape(conv.weight.shape[1], -1) * (bn.weight[k] / std[k]).abs())[1].max()
                for k in range(bn.num_features)])
        assert torch.equal(channel_lipschitz_upper_bounds(conv, bn), reference), bn_name


def test_outlier_rule_is_strict_mean_plus_u_unbiased_std():
    uclc = torch.tensor([1.0, 1.0, 1.0, 1.0, 10.0])  # mean 2.8, unbiased std 4.02 (biased 3.6)
    assert lipschitz_outlier_channels(uclc, 1.0).tolist() == [4]  # 10 > 6.82
    assert lipschitz_outlier_channels(uclc, 1.9).tolist() == []  # 10 < 10.44 (biased std: 9.64)
    # equal bounds: std 0, threshold == every value, so a strict > flags nothing
    assert lipschitz_outlier_channels(torch.full((4,), 2.0), 0.0).numel() == 0
    # one channel: unbiased std is NaN, nothing flagged (as the original)
    assert lipschitz_outlier_channels(torch.tensor([3.0]), 0.0).numel() == 0


def test_exactly_the_huge_channel_is_pruned(outlier_net):
    pruned, diag = defend(outlier_net, None, u=3.0)
    uclc = channel_lipschitz_upper_bounds(outlier_net.conv, outlier_net.bn).double().numpy()
    expected = np.flatnonzero(uclc > uclc.mean() + 3.0 * uclc.std(ddof=1)).tolist()
    assert expected == [5]
    assert diag["layers"][0]["pruned_channels"] == [5]
    assert diag["pruned_per_layer"] == {"bn": 1} and diag["total_pruned"] == 1
    assert diag["pairs"] == {"bn": "conv"} and diag["total_channels"] == 32
    assert pruned.bn.weight[5].item() == 0 and pruned.bn.bias[5].item() == 0


def test_pruning_zeroes_only_flagged_bn_weight_and_bias(preact):
    pruned, diag = defend(preact, None, u=1.0)
    assert diag["total_pruned"] > 0
    flagged = {layer["bn"]: layer["pruned_channels"] for layer in diag["layers"]}
    before, after = preact.state_dict(), pruned.state_dict()
    for key in before:
        module, _, field = key.rpartition(".")
        expected = before[key].clone()
        if field in ("weight", "bias") and module in flagged:
            expected[flagged[module]] = 0
        assert torch.equal(after[key], expected), key
    for bn_name, channels in flagged.items():
        bn = pruned.get_submodule(bn_name)
        assert torch.all(bn.weight[channels] == 0) and torch.all(bn.bias[channels] == 0)


@pytest.mark.parametrize("u", [0.0, 1.0, 3.0])
def test_published_pairing_reproduces_backdoorbench_bit_for_bit(preact, u):
    reference = copy.deepcopy(preact)
    with torch.no_grad():  # values unchanged; silences the original's grad-to-scalar warning
        backdoorbench_clp_prune(reference, u)
    pruned, diag = defend(preact, None, u=u, pairing="published")
    assert state_equal(pruned, reference)
    assert diag["total_pruned"] > 0  # the comparison is not vacuous


def test_large_u_prunes_nothing(preact):
    pruned, diag = defend(preact, None, u=1e6)
    assert diag["total_pruned"] == 0 and all(n == 0 for n in diag["pruned_per_layer"].values())
    assert state_equal(pruned, preact)


# --------------------------------------------------------------------------------------------------
# pairing
# --------------------------------------------------------------------------------------------------

def test_preact_pairings(preact):
    published = dict(conv_bn_pairs(preact, "published")[0])
    fixed = dict(conv_bn_pairs(preact, "fixed")[0])
    assert len(published) == len(fixed) == 16
    # the published quirk (docs/methods/clp.md) and its fix
    for stage in (2, 3, 4):
        assert published[f"layer{stage}.1.bn1"] == f"layer{stage}.0.shortcut.0"
        assert fixed[f"layer{stage}.1.bn1"] == f"layer{stage}.0.conv2"
    assert published["layer1.0.bn1"] == fixed["layer1.0.bn1"] == "conv1"
    assert published["layer2.0.bn1"] == fixed["layer2.0.bn1"] == "layer1.1.conv2"
    for stage in (1, 2, 3, 4):
        for block in (0, 1):
            prefix = f"layer{stage}.{block}"
            assert published[f"{prefix}.bn2"] == fixed[f"{prefix}.bn2"] == f"{prefix}.conv1"
    differing = {bn for bn in published if published[bn] != fixed[bn]}
    assert differing == {"layer2.1.bn1", "layer3.1.bn1", "layer4.1.bn1"}
    _, diag = defend(preact, None, pairing="fixed")
    assert diag["pairing"] == "fixed" and diag["pairs"] == fixed


def test_mismatched_or_unpairable_bns_are_skipped_and_recorded():
    torch.manual_seed(0)
    net = randomise_bn(RegisteredOutOfOrder())
    pairs, skipped = conv_bn_pairs(net, "published")
    assert pairs == [] and skipped[0]["bn"] == "bn" and skipped[0]["conv"] == "conv_b"
    assert "channels" in skipped[0]["reason"]
    pruned, diag = defend(net, None, u=0.0, pairing="published")
    assert diag["total_pruned"] == 0 and diag["skipped"] == skipped and state_equal(pruned, net)
    assert conv_bn_pairs(net, "fixed") == ([("bn", "conv_a")], [])

    head_bn = randomise_bn(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    for pairing in ("published", "fixed"):
        pairs, skipped = conv_bn_pairs(head_bn, pairing)
        assert pairs == [("2", "1")] and [s["bn"] for s in skipped] == ["0"]
    assert conv_bn_pairs(head_bn, "fixed")[1][0]["reason"] == "fed by the model input"


def test_unknown_pairing_and_untraceable_model_raise_clear_errors(preact):
    with pytest.raises(ValueError, match="pairing"):
        defend(preact, None, pairing="nearest")

    class DataDependent(ConvBN):
        def forward(self, x):
            return super().forward(x) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="pairing='published'"):
        conv_bn_pairs(DataDependent(4), "fixed")


# --------------------------------------------------------------------------------------------------
# interface
# --------------------------------------------------------------------------------------------------

def test_input_model_untouched_and_output_in_eval_mode(preact):
    preact.train()
    snapshot = copy.deepcopy(preact.state_dict())
    pruned, diag = defend(preact, None, u=0.5)
    assert diag["total_pruned"] > 0
    assert preact.training and all(torch.equal(v, snapshot[k]) for k, v in preact.state_dict().items())
    assert pruned is not preact and not pruned.training
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(pruned.parameters(), preact.parameters()))
    assert next(pruned.parameters()).device == next(preact.parameters()).device


def test_thread_count_restored(preact):
    threads = torch.get_num_threads()
    defend(preact)
    assert torch.get_num_threads() == threads


def test_diagnostics_are_json_serialisable():
    torch.manual_seed(0)
    single = randomise_bn(nn.Sequential(nn.Conv2d(3, 1, 3), nn.BatchNorm2d(1)))  # NaN std
    for net in (randomise_bn(PreActResNet18(10, 3, width=4)), single,
                randomise_bn(RegisteredOutOfOrder())):
        for pairing in ("published", "fixed"):
            _, diag = defend(net, None, u=2.0, pairing=pairing)
            round_trip = json.loads(json.dumps(diag, allow_nan=False))
            assert round_trip == diag
            assert {"u", "pairing", "pairs", "pruned_per_layer", "layers", "skipped", "total_pruned",
                    "total_channels", "clp_seconds"} <= diag.keys()
            assert diag["u"] == 2.0 and isinstance(diag["clp_seconds"], float) and diag["clp_seconds"] >= 0


@pytest.mark.parametrize("name", ["vgg19_bn", "resnet18"])
def test_torchvision_models_at_32x32(name):
    torch.manual_seed(0)
    model = randomise_bn(torchvision_model(name, 10, 3))
    published, skipped = conv_bn_pairs(model, "published")
    assert skipped == [] and conv_bn_pairs(model, "fixed") == (published, [])
    pruned, diag = defend(model, None, u=1.0)
    assert diag["total_pruned"] > 0 and diag["skipped"] == []
    assert diag["total_channels"] == sum(m.num_features for m in model.modules()
                                         if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        out = pruned(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
