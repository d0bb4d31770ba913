"""FT-SAM (baselines/ftsam.py) against BackdoorBench's defense/ft-sam.py and utils/defense_utils/sam."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import baselines.finetune as finetune
from baselines.ftsam import (SharpnessAwareAscent, decompose_gradient, defend, rho_schedule, sam_perturbation,
                             smooth_crossentropy, smoothing_correction, validate)
from bdcore.data import DatasetSpec, DefenseData, ImageSet, normalize, random_crop_flip
from bdcore.datasets import make_synthetic
from bdcore.models import PreActResNet18
from helpers import Guarded

SPEC = DatasetSpec("synthetic", 4, 3, 32, 32, (0.5,) * 3, (0.25,) * 3, hflip=True)


def tiny_model(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return PreActResNet18(num_classes=4, width=4)


def batch(n=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 4, (n,), generator=gen)


def params_with_grad(model):
    return [p for p in model.parameters() if p.grad is not None]


def bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


# --------------------------------------------------------------------------------------------------
# naive transcriptions of the published arithmetic
# --------------------------------------------------------------------------------------------------

def naive_perturbation(params, rho, adaptive):
    """SAM.perturb_weights: scale = rho / (||(|w| if adaptive) g|| + 1e-12); e = g * scale (* w^2), element by
    element in Python floats."""
    total = 0.0
    for p in params:
        for w, g in zip(p.detach().flatten().tolist(), p.grad.flatten().tolist()):
            total += ((abs(w) if adaptive else 1.0) * g) ** 2
    scale = rho / (math.sqrt(total) + 1e-12)
    out = []
    for p in params:
        values = [g * scale * (w * w if adaptive else 1.0)
                  for w, g in zip(p.detach().flatten().tolist(), p.grad.flatten().tolist())]
        out.append(torch.tensor(values, dtype=torch.float64).view(p.shape))
    return out


def naive_smooth_crossentropy(logits, labels, smoothing):
    """util.smooth_crossentropy, sample by sample: KL(q || p) with q = 1 - s on the label, s/(C-1) elsewhere."""
    rows = []
    for row, label in zip(logits, labels.tolist()):
        log_p = torch.log_softmax(row, dim=0)
        q = [smoothing / (len(row) - 1)] * len(row)
        q[label] = 1.0 - smoothing
        rows.append(sum(qc * (math.log(qc) - log_p[c]) if qc > 0 else 0.0 * log_p[c] for c, qc in enumerate(q)))
    return torch.stack(rows)


def naive_ftsam(model, images, labels, batches, *, lr, momentum, weight_decay, rho, smoothing, adaptive=True):
    """ft-sam.py's _train_sam with SAM.step over the given index batches, the cosine stepped per batch."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100)
    for idx in batches:
        x, y = normalize(images[idx], SPEC), labels[idx]
        optimizer.zero_grad()
        naive_smooth_crossentropy(model(x), y, smoothing).mean().backward()
        params = params_with_grad(model)
        grad_norm = torch.norm(torch.stack([((p.abs() if adaptive else 1.0) * p.grad).norm(p=2) for p in params]))
        steps = []
        with torch.no_grad():
            for p in params:
                e = p.grad * (rho / (grad_norm + 1e-12))
                if adaptive:
                    e *= torch.pow(p, 2)
                p.add_(e)
                steps.append(e)
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in bns:
            m.momentum = 0
        optimizer.zero_grad()
        naive_smooth_crossentropy(model(x), y, smoothing).mean().backward()
        with torch.no_grad():
            for p, e in zip(params, steps):
                p.sub_(e)
        optimizer.step()
        for m in bns:
            m.momentum = 0.1
        cosine.step()
    return model


def record_batches(monkeypatch, images):
    """Indices (into `images`) of every batch the training loop normalises, in order: the oracle replays the
    loop's own shuffle (SAM's second pass at w + e is sensitive enough that summation order shows)."""
    import bdcore.train

    batches = []
    real = bdcore.train.normalize
    flat = images.flatten(1)

    def recording(x, spec):
        batches.append(torch.tensor([int(torch.nonzero((flat == row).all(1))[0]) for row in x.flatten(1)]))
        return real(x, spec)

    monkeypatch.setattr(bdcore.train, "normalize", recording)
    return batches


# --------------------------------------------------------------------------------------------------
# pure pieces
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("adaptive", [False, True])
def test_perturbation_matches_the_published_formula_and_has_radius_rho(adaptive):
    model = tiny_model()
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    params = params_with_grad(model)
    ours = sam_perturbation(params, 0.05, adaptive)
    for e, oracle in zip(ours, naive_perturbation(params, 0.05, adaptive)):
        assert torch.allclose(e.double(), oracle, rtol=1e-5, atol=1e-12)
    if adaptive:  # ASAM's radius is measured in the |w|-scaled metric: || e / |w| || = rho
        radius = torch.sqrt(sum(((e / p.detach().abs()) ** 2)[p != 0].sum() for e, p in zip(ours, params)))
    else:         # SAM: e = rho * g / ||g||
        radius = torch.sqrt(sum((e ** 2).sum() for e in ours))
    assert radius.item() == pytest.approx(0.05, rel=1e-5)


@pytest.mark.parametrize("published_bugs", [False, True])
def test_ascent_hook_perturbs_recomputes_with_frozen_bn_and_restores(published_bugs):
    model = tiny_model().train()
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    params = params_with_grad(model)
    assert len(params) == len(list(model.parameters()))
    weights = [p.detach().clone() for p in params]
    grads = [p.grad.clone() for p in params]
    buffers = bn_buffers(model)
    at_perturbed = copy.deepcopy(model)
    seen = {}

    def recompute_loss():
        seen["weights"] = [p.detach().clone() for p in params]
        seen["grads_cleared"] = all(p.grad is None for p in model.parameters())
        seen["momenta"] = {m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    SharpnessAwareAscent(lambda step: 0.05, adaptive=False, published_bugs=published_bugs)(model, recompute_loss)
    # 1. the second pass ran at w + e with e = rho * g / ||g||, grads cleared, BN momentum 0
    g_norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    for w, w_e, g in zip(weights, seen["weights"], grads):
        assert torch.allclose(w_e - w, 0.05 * g / g_norm, atol=1e-7)
    assert seen["grads_cleared"] and seen["momenta"] == {0}
    # 2. BN momentum is back and the second pass did not move the running statistics
    assert {m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)} == {0.1}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())
    # 3. the gradient left for the optimizer is the one at w + e
    with torch.no_grad():
        for p, w_e in zip(at_perturbed.parameters(), seen["weights"]):
            p.copy_(w_e)
    at_perturbed.zero_grad()
    F.cross_entropy(at_perturbed(x), y).backward()
    for p, q in zip(params, at_perturbed.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    # 4. back at w before the optimizer step: exactly (default) or up to (w + e) - e rounding (published)
    if published_bugs:
        residue = max((p.detach() - w).abs().max().item() for p, w in zip(params, weights))
        assert 0 < residue < 1e-6
    else:
        assert all(torch.equal(p.detach(), w) for p, w in zip(params, weights))


def test_label_smoothing_is_the_published_kl_form():
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(6, 5, generator=gen), torch.randint(0, 5, (6,), generator=gen)
    ours = smooth_crossentropy(logits, labels, 0.1)
    assert torch.allclose(ours, naive_smooth_crossentropy(logits, labels, 0.1), atol=1e-6)
    # q has s / (C - 1) on the wrong classes, unlike torch's label_smoothing (s / C): the gradients differ
    assert not torch.allclose(ours.mean(), F.cross_entropy(logits, labels, label_smoothing=0.1), atol=1e-4)
    # the loop adds CE; the correction makes the total the smoothed loss
    total = F.cross_entropy(logits, labels) + smoothing_correction(0.1)(None, None, labels, logits, 0)
    assert total.item() == pytest.approx(ours.mean().item(), abs=1e-6)
    assert torch.allclose(smooth_crossentropy(logits, labels, 0.0), F.cross_entropy(logits, labels, reduction="none"),
                          atol=1e-6)


def test_rho_follows_the_lr_proportionally():
    rates = [0.01, 0.005, 0.0]
    assert [rho_schedule(rates, 0.01, 4.0, 1.0)(k) for k in range(3)] == [4.0, 2.5, 1.0]
    assert rho_schedule(None, 0.01, 2.0, 2.0)(123) == 2.0


def test_gradient_decomposition():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    p.grad = torch.tensor([1.0, 0.0, 0.0])
    old = [torch.tensor([1.0, 1.0, 0.0])]
    decompose_gradient([p], old, 0.0)
    assert torch.equal(p.grad, torch.tensor([1.0, 0.0, 0.0]))  # alpha 0: plain SAM direction
    decompose_gradient([p], old, 1.0)
    # subtracts alpha x (the part of the first gradient orthogonal to the second): [0, 1, 0]
    assert torch.allclose(p.grad, torch.tensor([1.0, -1.0, 0.0]), atol=1e-6)


# --------------------------------------------------------------------------------------------------
# the defense
# --------------------------------------------------------------------------------------------------

def test_defense_matches_the_published_training_loop(monkeypatch):
    # published_bugs=true: the same arithmetic as ft-sam.py step for step (4 SAM steps over 2 epochs)
    train, _ = make_synthetic(num_classes=4, train_per_class=4, test_per_class=1)
    assert len(torch.unique(train.images.flatten(1), dim=0)) == len(train)  # batches can be matched back
    model = tiny_model(1)
    data = DefenseData(clean=train, spec=SPEC, clean_indices=torch.arange(len(train)))
    batches = record_batches(monkeypatch, train.images)
    out, diag = defend(model, data, seed=0, progress=False, epochs=2, batch_size=8, published_bugs=True)
    assert len(batches) == 4
    oracle = naive_ftsam(copy.deepcopy(model), train.images, train.labels, batches, lr=0.01, momentum=0.9,
                         weight_decay=5e-4, rho=2.0, smoothing=0.1, adaptive=True)
    for key, value in oracle.state_dict().items():
        assert torch.allclose(out.state_dict()[key].float(), value.float(), rtol=1e-5, atol=1e-6), key
    assert diag["ascent_steps"] == 4 and diag["scheduler_interval"] == "batch"
    cosine = [0.01 * (1 + math.cos(math.pi * k / 100)) / 2 for k in range(4)]
    assert diag["history"]["lr"] == [pytest.approx(cosine[1]), pytest.approx(cosine[3])]  # stepped per batch


def test_default_differs_from_the_published_loop_only_by_the_exact_restore(monkeypatch):
    # one SAM step: restoring w instead of computing (w + e) - e changes the result by float rounding only.
    # (Over several steps SAM's second pass amplifies such 1e-7 differences to ~1e-3 on this tiny model,
    # as it does any 1e-7 change of the weights, so only the first step is compared.)
    train, _ = make_synthetic(num_classes=4, train_per_class=4, test_per_class=1)
    model = tiny_model(1)
    data = DefenseData(clean=train, spec=SPEC, clean_indices=torch.arange(len(train)))
    batches = record_batches(monkeypatch, train.images)
    out, _ = defend(model, data, seed=0, progress=False, epochs=1, batch_size=len(train))
    oracle = naive_ftsam(copy.deepcopy(model), train.images, train.labels, batches, lr=0.01, momentum=0.9,
                         weight_decay=5e-4, rho=2.0, smoothing=0.1, adaptive=True)
    for key, value in oracle.state_dict().items():
        assert torch.allclose(out.state_dict()[key].float(), value.float(), rtol=1e-5, atol=1e-6), key


def test_reads_only_the_clean_budget_leaves_input_unchanged(monkeypatch):
    train, test = make_synthetic(num_classes=4, train_per_class=8, test_per_class=2)
    indices = torch.tensor([2, 3, 8, 13, 14, 19, 27, 31])
    clean = Guarded(train.subset(indices))

    def forbidden(*args):
        raise AssertionError("ftsam must not use the test set or synthesise triggers")

    data = DefenseData(clean=clean, spec=SPEC, clean_indices=indices, validation=Guarded(test, forbid=True),
                       augment=lambda x, g: random_crop_flip(x, SPEC, g), apply_trigger=forbidden,
                       evaluate=forbidden)
    seen = []
    real = finetune.train_model
    monkeypatch.setattr(finetune, "train_model",
                        lambda m, d, spec, settings, **k: seen.append((d, settings, k)) or real(m, d, spec, settings,
                                                                                               **k))
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    out, diag = defend(model, data, seed=0, progress=False, epochs=1, batch_size=4)
    ((used, settings, kwargs),) = seen
    assert used is clean and clean.reads > 0 and torch.equal(used.images, train.images[indices])
    assert settings.augment and not settings.drop_last and settings.scheduler == "constant"  # lr set per batch
    assert kwargs["hooks"].before_optimizer_step is not None and kwargs["hooks"].extra_loss is not None
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert type(out) is PreActResNet18 and not out.training and out.state_dict().keys() == model.state_dict().keys()
    assert all(torch.isfinite(v).all() for v in out.state_dict().values() if v.is_floating_point())
    assert diag["ftsam_seconds"] > 0 and diag["ascent_steps"] == 2


def test_budget_none_and_bad_keys_are_one_line_errors():
    with pytest.raises(ValueError, match=r"^ftsam needs clean data: use budget=ratio \(the default\) or budget=spc$"):
        defend(tiny_model(), None)
    with pytest.raises(ValueError, match=r"^defense\.scheduler_interval=step is invalid"):
        validate(scheduler_interval="step")
    with pytest.raises(ValueError, match=r"^defense\.rho_min=1\.0 is invalid"):
        validate(rho_min=1.0, scheduler="plateau")


def test_config_effective_defaults():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from helpers import ROOT

    def defense_cfg(*overrides):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return OmegaConf.to_container(compose("config", overrides=["defense=ftsam", *overrides]).defense,
                                          resolve=True)

    cifar, gtsrb, tiny = defense_cfg(), defense_cfg("dataset=gtsrb"), defense_cfg("dataset=tiny")
    assert {k: cifar[k] for k in ("epochs", "rho_max", "rho_min", "adaptive", "alpha", "label_smoothing",
                                  "scheduler", "scheduler_interval")} == {
        "epochs": 100, "rho_max": 2.0, "rho_min": 2.0, "adaptive": True, "alpha": 0.0, "label_smoothing": 0.1,
        "scheduler": "cosine", "scheduler_interval": "batch"}
    assert gtsrb["epochs"] == 50 and gtsrb["rho_max"] == 2.0 and gtsrb["label_smoothing"] == 0.1
    assert tiny["scheduler"] == "plateau" and tiny["epochs"] == 100
    validate(**{k: v for k, v in tiny.items() if not k.startswith("_") and k != "seed"})  # plateau is valid
