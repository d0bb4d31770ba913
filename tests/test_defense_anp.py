"""ANP (baselines/anp.py) against transcriptions of BackdoorBench's defense/anp.py and NoisyBatchNorm2d."""
from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.init as init

from baselines.anp import (MaskedBatchNorm2d, attach_neuron_masks, defend, mask_update_step,
                           neuron_perturbation_step, prune_and_select, rounded_mask_values,
                           select_by_validation_accuracy, sort_mask_values, sweep_counts)
from bdcore.data import DatasetSpec, DefenseData, ImageSet, normalize, random_crop_flip
from bdcore.models import PreActResNet18

SPEC = DatasetSpec("coded", 4, 3, 16, 16, (0.5,) * 3, (0.25,) * 3)


# --------------------------------------------------------------------------------------------------
# helpers: a tiny model, images whose every pixel encodes their index, recording hooks
# --------------------------------------------------------------------------------------------------

def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = PreActResNet18(num_classes=4, in_channels=3, width=4)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.3 * torch.randn(m.num_features, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    return model.eval()


def coded_set(codes) -> ImageSet:
    """Constant images: every pixel of image i holds codes[i]; label codes[i] % 4."""
    codes = torch.as_tensor(codes)
    images = codes.to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 16, 16).contiguous()
    return ImageSet(images, codes.long() % 4)


def decode(x: torch.Tensor) -> set[int]:
    """Codes of normalised (possibly cropped) coded images: the centre pixel survives any crop."""
    return set(((x[:, 0, 8, 8].detach().float().cpu() * 0.25 + 0.5) * 255).round().long().tolist())


def record_forwards(model: nn.Module) -> dict[str, set]:
    """Codes of every image the model (and every deep copy of it) sees, by train / eval mode."""
    seen = {"train": set(), "eval": set()}

    def hook(module, args):
        seen["train" if module.training else "eval"].update(decode(args[0]))

    model.register_forward_pre_hook(hook)
    return seen


class WatchedImageSet(ImageSet):
    """An ImageSet that notes every read of its images or labels."""

    def __init__(self, images, labels, log: set, name: str):
        super().__init__(images, labels)
        object.__setattr__(self, "_log", log)
        object.__setattr__(self, "_name", name)

    def __getattribute__(self, item):
        if item in ("images", "labels") and "_log" in object.__getattribute__(self, "__dict__"):
            object.__getattribute__(self, "_log").add(object.__getattribute__(self, "_name"))
        return object.__getattribute__(self, item)


CLEAN_CODES, VAL_CODES = list(range(10, 50)), list(range(60, 72))


def coded_defense_data(evaluate=None, validation=True, reads: set | None = None) -> DefenseData:
    reads = set() if reads is None else reads
    clean, val = coded_set(CLEAN_CODES), coded_set(VAL_CODES)
    return DefenseData(clean=WatchedImageSet(clean.images, clean.labels, reads, "clean"), spec=SPEC,
                       clean_indices=torch.tensor(CLEAN_CODES),
                       validation=WatchedImageSet(val.images, val.labels, reads, "validation") if validation else None,
                       augment=lambda x, g: random_crop_flip(x, SPEC, g), evaluate=evaluate)


def zero_gammas(model: nn.Module) -> int:
    return sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def pruning_friendly_metrics(model: nn.Module) -> dict:
    """A fake test evaluation: ASR falls (non-monotonically) with the number of zeroed gammas, ACC slowly."""
    z = zero_gammas(model)
    return {"acc": 90.0 - 0.5 * z, "asr": 95.0 - 7.0 * z + 3.0 * (z % 3), "ra": 1.0}


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------------------------
# transcriptions of the published code
# --------------------------------------------------------------------------------------------------

class PublishedNoisyBatchNorm2d(nn.BatchNorm2d):
    """BackdoorBench anp_batchnorm.NoisyBatchNorm2d, transcribed (reset takes a generator for the test)."""

    def __init__(self, num_features):
        super().__init__(num_features)
        self.neuron_mask = nn.Parameter(torch.ones(num_features))
        self.neuron_noise = nn.Parameter(torch.zeros(num_features))
        self.neuron_noise_bias = nn.Parameter(torch.zeros(num_features))
        self.is_perturbed = False

    def reset(self, rand_init, eps, generator):
        if rand_init:
            init.uniform_(self.neuron_noise, a=-eps, b=eps, generator=generator)
            init.uniform_(self.neuron_noise_bias, a=-eps, b=eps, generator=generator)
        else:
            init.zeros_(self.neuron_noise)
            init.zeros_(self.neuron_noise_bias)

    def forward(self, input):
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked = self.num_batches_tracked + 1
        bn_training = True if self.training else (self.running_mean is None) and (self.running_var is None)
        if self.is_perturbed:
            coeff_weight = self.neuron_mask + self.neuron_noise
            coeff_bias = 1.0 + self.neuron_noise_bias
        else:
            coeff_weight = self.neuron_mask
            coeff_bias = 1.0
        return F.batch_norm(input, self.running_mean if not self.training or self.track_running_stats else None,
                            self.running_var if not self.training or self.track_running_stats else None,
                            self.weight * coeff_weight, self.bias * coeff_bias, bn_training,
                            exponential_average_factor, self.eps)


def published_anp_network(model: nn.Module) -> nn.Module:
    net = copy.deepcopy(model)
    for name, module in list(net.named_modules()):
        if isinstance(module, nn.BatchNorm2d):
            noisy = PublishedNoisyBatchNorm2d(module.num_features)
            noisy.load_state_dict(module.state_dict(), strict=False)
            parent_name, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent_name) if parent_name else net, child, noisy)
    return net


def published_mask_train(net, batches, *, lr, eps, steps, alpha, generator):
    """defense/anp.py::mask_train over the given batches (clip_mask, sign_grad, reset, include/exclude)."""
    criterion = nn.CrossEntropyLoss()
    parameters = list(net.named_parameters())
    mask_opt = torch.optim.SGD([v for n, v in parameters if "neuron_mask" in n], lr=lr, momentum=0.9)
    noise_opt = torch.optim.SGD([v for n, v in parameters if "neuron_noise" in n], lr=eps / steps)
    noisy = [m for m in net.modules() if isinstance(m, PublishedNoisyBatchNorm2d)]
    net.train()
    noise_after_step1 = []
    for images, labels in batches:
        if eps > 0.0:
            for m in noisy:
                m.reset(rand_init=True, eps=eps, generator=generator)
            for _ in range(steps):
                noise_opt.zero_grad()
                for m in noisy:
                    m.is_perturbed = True
                loss_noise = -criterion(net(images), labels)
                loss_noise.backward()
                for n, p in net.named_parameters():
                    if "neuron_noise" in n:
                        p.grad.data = torch.sign(p.grad.data)
                noise_opt.step()
            noise_after_step1.append([m.neuron_noise.detach().clone() for m in noisy])
        mask_opt.zero_grad()
        if eps > 0.0:
            for m in noisy:
                m.is_perturbed = True
            loss_rob = criterion(net(images), labels)
        else:
            loss_rob = 0.0
        for m in noisy:
            m.is_perturbed = False
        loss_nat = criterion(net(images), labels)
        loss = alpha * loss_nat + (1 - alpha) * loss_rob
        loss.backward()
        mask_opt.step()
        with torch.no_grad():
            for n, p in net.named_parameters():
                if "neuron_mask" in n:
                    p.clamp_(0.0, 1.0)
    return noise_after_step1


def published_mask_file_round_trip(state_dict, path) -> list:
    """save_mask_scores + read_data + the ascending sort of defense/anp.py."""
    lines, count = [], 0
    for name, param in state_dict.items():
        if "neuron_mask" in name:
            for idx in range(param.size(0)):
                lines.append("{} \t {} \t {} \t {:.4f} \n".format(count, ".".join(name.split(".")[:-1]), idx,
                                                                   param[idx].item()))
                count += 1
    with open(path, "w") as f:
        f.write("No \t Layer Name \t Neuron Idx \t Mask Score \n")
        f.writelines(lines)
    table = pd.read_csv(path, sep=r"\s+", skiprows=1, header=None)
    values = list(zip(table.iloc[:, 1], table.iloc[:, 2], table.iloc[:, 3]))
    return sorted(values, key=lambda x: float(x[2]))


def published_pruning(net, neuron):
    state_dict = net.state_dict()
    state_dict["{}.{}".format(neuron[0], "weight")][int(neuron[1])] = 0.0
    net.load_state_dict(state_dict)


def published_evaluate_by_threshold(model, mask_values, pruning_max, pruning_step, test, best_asr, acc_ori,
                                    acc_ratio):
    thresholds = np.arange(0, pruning_max + pruning_step, pruning_step)
    start = 0
    model_best = copy.deepcopy(model)
    for threshold in thresholds:
        idx = start
        for idx in range(start, len(mask_values)):
            if float(mask_values[idx][2]) <= threshold:
                published_pruning(model, mask_values[idx])
                start += 1
            else:
                break
        metrics = test(model)
        if abs(metrics["acc"] - acc_ori) / acc_ori < acc_ratio:
            if metrics["asr"] < best_asr:
                model_best = copy.deepcopy(model)
                best_asr = metrics["asr"]
    return model_best


def published_evaluate_by_number(model, mask_values, pruning_max, pruning_step, test, best_asr, acc_ori, acc_ratio):
    nb_max, nb_step = int(np.ceil(pruning_max)), int(np.ceil(pruning_step))
    model_best = copy.deepcopy(model)
    for start in range(0, nb_max + 1, nb_step):
        for i in range(start, start + nb_step):
            published_pruning(model, mask_values[i])
        metrics = test(model)
        if abs(metrics["acc"] - acc_ori) / acc_ori < acc_ratio:
            if metrics["asr"] < best_asr:
                model_best = copy.deepcopy(model)
                best_asr = metrics["asr"]
    return model_best


def set_masks(bns: dict, generator: torch.Generator) -> None:
    """Crafted mask values: a spread over [0, 1] with BackdoorBench's edge cases and ties."""
    specials = [0.05, 0.70004, 0.70006, 0.15, 0.15, 0.0, 1.0, 0.89999]
    k = 0
    with torch.no_grad():
        for bn in bns.values():
            values = torch.rand(bn.num_features, generator=generator)
            for i in range(min(2, bn.num_features)):
                values[i] = specials[k % len(specials)]
                k += 1
            bn.neuron_mask.copy_(values)


def training_batches(count: int, batch: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        x = torch.randint(0, 256, (batch, 3, 16, 16), generator=gen, dtype=torch.uint8)
        out.append((normalize(x, SPEC), torch.randint(0, 4, (batch,), generator=gen)))
    return out


# --------------------------------------------------------------------------------------------------
# oracle tests
# --------------------------------------------------------------------------------------------------

def test_masked_batchnorm_is_the_plain_batchnorm_at_mask_one():
    model = tiny_model()
    bn = model.layer2[0].bn1
    masked = MaskedBatchNorm2d(bn)
    x = torch.randn(8, bn.num_features, 4, 4)
    for mode in (False, True):
        reference, candidate = copy.deepcopy(bn).train(mode), copy.deepcopy(masked).train(mode)
        assert torch.equal(reference(x), candidate(x))
        assert torch.equal(reference.running_mean, candidate.running_mean)


@pytest.mark.parametrize("eps, steps", [(0.4, 1), (0.4, 2), (0.0, 1)])
def test_perturbation_and_mask_steps_equal_published_mask_train(eps, steps):
    """Three iterations of ANP's noise ascent + mask update, bit for bit against the transcription."""
    model = tiny_model(1)
    batches = training_batches(3)
    lr, alpha = 0.5, 0.2   # a large lr so the masks move visibly (and some clip)

    net = published_anp_network(model)
    published_noise = published_mask_train(net, batches, lr=lr, eps=eps, steps=steps, alpha=alpha,
                                           generator=torch.Generator().manual_seed(7))

    ours = copy.deepcopy(model)
    bns = list(attach_neuron_masks(ours).values())
    ours.train()
    mask_opt = torch.optim.SGD([bn.neuron_mask for bn in bns], lr=lr, momentum=0.9)
    noise_opt = torch.optim.SGD([p for bn in bns for p in (bn.neuron_noise, bn.neuron_noise_bias)],
                                lr=eps / steps)
    gen = torch.Generator().manual_seed(7)
    for k, (x, y) in enumerate(batches):
        if eps > 0:
            neuron_perturbation_step(ours, bns, noise_opt, x, y, eps, steps, gen)
            for bn, expected in zip(bns, published_noise[k]):
                assert torch.equal(bn.neuron_noise.detach(), expected)
        mask_update_step(ours, bns, mask_opt, x, y, alpha, eps)

    published_masks = [m.neuron_mask.detach() for m in net.modules() if isinstance(m, PublishedNoisyBatchNorm2d)]
    assert len(published_masks) == len(bns) == 16
    for bn, expected in zip(bns, published_masks):
        assert torch.equal(bn.neuron_mask.detach(), expected)
    assert any(not torch.all(bn.neuron_mask == 1) for bn in bns)


def test_masks_stay_in_unit_interval_and_only_masks_and_noise_train():
    model = tiny_model(2)
    ours = copy.deepcopy(model)
    bns = list(attach_neuron_masks(ours).values())
    ours.train()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    mask_opt = torch.optim.SGD([bn.neuron_mask for bn in bns], lr=50.0, momentum=0.9)
    noise_opt = torch.optim.SGD([p for bn in bns for p in (bn.neuron_noise, bn.neuron_noise_bias)], lr=0.4)
    gen = torch.Generator().manual_seed(0)
    for x, y in training_batches(3, seed=3):
        neuron_perturbation_step(ours, bns, noise_opt, x, y, 0.4, 1, gen)
        mask_update_step(ours, bns, mask_opt, x, y, 0.2, 0.4)
        masks = torch.cat([bn.neuron_mask.detach() for bn in bns])
        assert masks.min() >= 0 and masks.max() <= 1
    assert (masks == 0).any() and (masks == 1).any()   # the huge lr hits both bounds: the clip acted
    after = ours.state_dict()
    for key, value in before.items():
        if key.endswith(("weight", "bias")) and "neuron" not in key:
            assert torch.equal(after[key], value), key   # conv / BN affine / linear never trained


def test_mask_values_round_trip_and_sort_equal_published_file(tmp_path):
    model = tiny_model(3)
    masked = copy.deepcopy(model)
    bns = attach_neuron_masks(masked)
    set_masks(bns, torch.Generator().manual_seed(0))
    ours = sort_mask_values(rounded_mask_values(bns))
    published = published_mask_file_round_trip(masked.state_dict(), tmp_path / "mask_values.txt")
    assert [(str(a), int(b), float(c)) for a, b, c in published] == ours
    by_value = {(layer, channel): value for layer, channel, value in ours}
    assert by_value[("layer1.0.bn1", 0)] == 0.05 and by_value[("layer1.0.bn1", 1)] == 0.7
    # ties keep file order: the two 0.15 masks come out in registration order
    ties = [(layer, channel) for layer, channel, value in ours if value == 0.15]
    assert ties == sorted(ties, key=lambda t: (list(bns).index(t[0]), t[1]))


def test_threshold_sweep_is_cumulative_with_published_float_thresholds():
    values = sort_mask_values([("a", 0, 0.05), ("a", 1, 0.7), ("b", 0, 0.7001), ("b", 1, 0.15), ("c", 0, 0.9),
                               ("c", 1, 0.0), ("c", 2, 0.95)])
    rows = sweep_counts(values, "threshold", 0.9, 0.05)
    levels = [level for level, _ in rows]
    assert len(rows) == 19 and levels[0] == 0.0 and levels[3] == 0.15000000000000002
    counts = [count for _, count in rows]
    assert counts == sorted(counts)   # cumulative: a level prunes everything the previous one did
    assert [c for level, c in rows if level in (0.0, 0.05, 0.15000000000000002)] == [1, 2, 3]
    assert dict(rows)[levels[14]] == 4   # 0.7000000000000001 prunes 0.7, not 0.7001
    assert counts[-1] == 6               # 0.9 pruned, 0.95 never
    assert [c for _, c in sweep_counts(values, "number", 4, 2)] == [0, 2, 4]
    assert [c for _, c in sweep_counts(values, "number", 4, 2, published_number_offset=True)] == [2, 4, 6]


@pytest.mark.parametrize("pruning_by, pruning_max, pruning_step, offset",
                         [("threshold", 0.9, 0.05, False), ("number", 40, 7, True), ("threshold", 0.5, 0.1, False)])
def test_sweep_selection_equals_published_evaluate_by(pruning_by, pruning_max, pruning_step, offset):
    model = tiny_model(4)
    masked = copy.deepcopy(model)
    bns = attach_neuron_masks(masked)
    set_masks(bns, torch.Generator().manual_seed(1))
    values = sort_mask_values(rounded_mask_values(bns))
    reference = pruning_friendly_metrics(model)
    data = DefenseData(clean=coded_set(CLEAN_CODES), spec=SPEC, evaluate=pruning_friendly_metrics)
    ours, info = prune_and_select(model, values, data, name="anp", pruning_by=pruning_by, pruning_max=pruning_max,
                                  pruning_step=pruning_step, pruning_number=None, acc_ratio=0.1,
                                  selection_split="test", published_number_offset=offset,
                                  device=torch.device("cpu"), progress=False)
    sweep = published_evaluate_by_threshold if pruning_by == "threshold" else published_evaluate_by_number
    expected = sweep(copy.deepcopy(model), values, pruning_max, pruning_step, pruning_friendly_metrics,
                     reference["asr"], reference["acc"], 0.1)
    assert state_equal(ours, expected)
    assert info["selected_pruned"] == zero_gammas(expected) - zero_gammas(model) > 0
    assert info["selection_split"] == "test" and info["selected_level"] is not None


def test_fixed_pruning_number_equals_published_fixed_branch():
    model = tiny_model(5)
    masked = copy.deepcopy(model)
    bns = attach_neuron_masks(masked)
    set_masks(bns, torch.Generator().manual_seed(2))
    values = sort_mask_values(rounded_mask_values(bns))
    data = DefenseData(clean=coded_set(CLEAN_CODES), spec=SPEC)   # no evaluate: the fixed branch needs none
    ours, info = prune_and_select(model, values, data, name="anp", pruning_by="threshold", pruning_max=0.9,
                                  pruning_step=0.05, pruning_number=0.7, acc_ratio=0.1, selection_split="test",
                                  published_number_offset=False, device=torch.device("cpu"), progress=False)
    expected = copy.deepcopy(model)
    published_evaluate_by_threshold(expected, values, 0.7, 0.7, pruning_friendly_metrics, 100.0, 90.0, 0.1)
    assert state_equal(ours, expected) and info["selection_split"] is None
    doubled, _ = prune_and_select(model, values, data, name="anp", pruning_by="number", pruning_max=0.9,
                                  pruning_step=0.05, pruning_number=5, acc_ratio=0.1, selection_split="test",
                                  published_number_offset=True, device=torch.device("cpu"), progress=False)
    assert zero_gammas(doubled) - zero_gammas(model) == 10   # the published fixed number N prunes 2N


def test_validation_selection_keeps_the_largest_level_within_the_budget():
    reference = {"val_acc": 80.0}
    rows = [{"val_acc": 79.0}, {"val_acc": 70.0}, {"val_acc": 73.0}, {"val_acc": 60.0}]
    assert select_by_validation_accuracy(reference, rows, 0.1) == 2   # |73 - 80| / 80 < 0.1, not contiguous
    assert select_by_validation_accuracy(reference, [{"val_acc": 50.0}], 0.1) is None


# --------------------------------------------------------------------------------------------------
# behaviour of defend()
# --------------------------------------------------------------------------------------------------

FAST = dict(iterations=4, batch_size=16, progress=False)


def test_anp_changes_nothing_but_zeroed_bn_weights_and_leaves_input_alone():
    model = tiny_model(6)
    before = copy.deepcopy(model)
    data = coded_defense_data(evaluate=pruning_friendly_metrics, validation=False)
    defended, diagnostics = defend(model, data, seed=0, pruning_by="number", pruning_max=12, pruning_step=4, **FAST)
    assert state_equal(model, before) and not model.training and defended is not model
    assert type(defended) is type(model) and not defended.training
    new, old = defended.state_dict(), model.state_dict()
    assert new.keys() == old.keys()
    bn_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    for key in old:
        if key in bn_weights:
            changed = new[key] != old[key]
            assert torch.all(new[key][changed] == 0), key
        else:
            assert torch.equal(new[key], old[key]), key
    assert zero_gammas(defended) - zero_gammas(model) == diagnostics["selected_pruned"] == 12
    assert all(torch.isfinite(p).all() for p in defended.state_dict().values() if p.is_floating_point())
    json.dumps(diagnostics)
    assert diagnostics["selection_split"] == "test" and diagnostics["anp_seconds"] > 0
    assert sum(diagnostics["pruned_per_layer"].values()) == 12


def test_anp_test_protocol_reads_only_the_clean_budget():
    model = tiny_model(7)
    seen = record_forwards(model)
    reads = set()
    calls = []
    data = coded_defense_data(evaluate=lambda m: calls.append(1) or {"acc": 50.0, "asr": 50.0, "ra": 0.0},
                              reads=reads)
    _, diagnostics = defend(model, data, seed=1, **FAST)
    assert seen["train"] and seen["train"] <= set(CLEAN_CODES)
    assert not seen["eval"]                   # the stub evaluation runs no forward pass
    assert reads == {"clean"} and len(calls) == 20   # unpruned + 19 thresholds
    assert len(diagnostics["sweep"]) == 19


def test_anp_validation_protocol_never_touches_the_test_set():
    model = tiny_model(8)
    seen = record_forwards(model)
    reads = set()

    def forbidden(m):
        raise AssertionError("selection_split=validation must not evaluate on the test set")

    data = coded_defense_data(evaluate=forbidden, reads=reads)
    _, diagnostics = defend(model, data, seed=2, selection_split="validation", **FAST)
    assert seen["train"] <= set(CLEAN_CODES) and seen["eval"] and seen["eval"] <= set(VAL_CODES)
    assert reads == {"clean", "validation"}
    assert diagnostics["selection_split"] == "validation" and "val_acc" in diagnostics["unpruned"]


def test_anp_without_clean_data_raises_one_line():
    with pytest.raises(ValueError) as info:
        defend(tiny_model(), None)
    assert str(info.value) == "anp needs clean data: use budget=ratio (the default) or budget=spc"


@pytest.mark.parametrize("kwargs, data_kwargs, needle", [
    ({"selection_split": "validation"}, {"validation": False}, "selection_split=validation needs a validation"),
    ({"selection_split": "test"}, {"evaluate": None}, "selection_split=test needs test-set metrics"),
    ({"selection_split": "train"}, {}, "selection_split='train'"),
    ({"pruning_by": "magnitude"}, {}, "pruning_by='magnitude'"),
])
def test_anp_option_errors_are_one_line(kwargs, data_kwargs, needle):
    data = coded_defense_data(**{"evaluate": pruning_friendly_metrics, **data_kwargs})
    with pytest.raises(ValueError) as info:
        defend(tiny_model(), data, **{**FAST, **kwargs})
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_config_file_matches_the_defense_signature_and_validates():
    import inspect
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from baselines.base import traits_of

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "defense" / "anp.yaml")
    hyper = {k: v for k, v in OmegaConf.to_container(cfg).items() if not k.startswith("_") and k != "seed"}
    signature = inspect.signature(defend.__wrapped__).parameters
    assert set(hyper) == set(signature) - {"model", "data", "seed", "device", "progress"}
    assert all(signature[k].default == v for k, v in hyper.items())   # the yaml restates the code's defaults
    traits = traits_of(instantiate(OmegaConf.merge(cfg, {"seed": 0})))
    assert not traits.data_free
    traits.validate(**hyper)
    with pytest.raises(ValueError, match=r"^anp anp_eps=-1 must be >= 0 \(e.g. 0.4\)$"):
        traits.validate(**{**hyper, "anp_eps": -1})
