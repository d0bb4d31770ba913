"""NAD, Neural Attention Distillation (baselines/nad.py), against BackdoorBench's defense/nad.py."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

import baselines.finetune as finetune
from baselines.nad import (AttentionDistillation, Capture, attention_loss, attention_map, default_attention_layers,
                           defend, student_learning_rate, validate)
from bdcore.data import DatasetSpec, DefenseData, ImageSet, random_crop_flip
from bdcore.datasets import make_synthetic
from bdcore.models import PreActResNet18
from helpers import Guarded

SPEC = DatasetSpec("synthetic", 4, 3, 32, 32, (0.5,) * 3, (0.25,) * 3, hflip=True)


def tiny_model(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return PreActResNet18(num_classes=4, width=4)


def naive_attention_map(features, p=2.0, eps=1e-6):
    """AT.attention_map position by position: a[n, h, w] = sum_c |f|^p, divided by (||a[n]||_2 + eps)."""
    n, c, h, w = features.shape
    out = torch.zeros(n, 1, h, w, dtype=torch.float64)
    for i in range(n):
        sums = [[sum(abs(features[i, k, y, x].item()) ** p for k in range(c)) for x in range(w)] for y in range(h)]
        norm = math.sqrt(sum(v * v for row in sums for v in row))
        for y in range(h):
            for x in range(w):
                out[i, 0, y, x] = sums[y][x] / (norm + eps)
    return out


def naive_published_distillation(student, teacher, x, betas=(500.0, 1000.0, 1000.0), p=2.0):
    """nad.py's PreAct-ResNet18 branch: features of nn.Sequential(children[:-k]) for k = 3, 2, 1 (student in
    train mode, teacher as is), beta-weighted MSE of the attention maps."""
    total = 0.0
    for k, beta in zip((3, 2, 1), betas):
        s = nn.Sequential(*list(student.children())[:-k])(x)
        t = nn.Sequential(*list(teacher.children())[:-k])(x).detach()
        total = total + beta * ((naive_attention_map(s.detach(), p) - naive_attention_map(t, p)) ** 2).mean()
    return total


# --------------------------------------------------------------------------------------------------
# pure pieces
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [2.0, 3.0])
def test_attention_map_matches_the_published_formula(p):
    features = torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(attention_map(features, p).double(), naive_attention_map(features, p), atol=1e-6)
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    oracle = ((naive_attention_map(a, p) - naive_attention_map(b, p)) ** 2).mean()
    assert attention_loss(a, b, p).item() == pytest.approx(oracle.item(), rel=1e-5)


def test_a_1x1_map_normalises_to_one_so_the_published_third_term_vanishes():
    pooled = torch.rand(4, 8, 1, 1) + 0.5
    v = pooled.pow(2).sum(1, keepdim=True)
    assert torch.allclose(attention_map(pooled), v / (v + 1e-6))
    assert attention_loss(pooled, 3 * pooled).item() < 1e-10


def test_student_lr_rule():
    assert [student_learning_rate(e, 0.05) for e in (0, 1, 2, 19, 20, 29, 30)] == \
        [0.05, 0.05, 0.01, 0.01, 0.0001, 0.0001, 0.0001]


def test_default_layers_are_the_last_three_spatial_stages():
    model = tiny_model()
    assert default_attention_layers(model, torch.randn(1, 3, 32, 32)) == ["layer2", "layer3", "layer4"]
    assert default_attention_layers(model, torch.randn(1, 3, 8, 8)) == ["layer1", "layer2", "layer3"]  # layer4 is 1x1


def _distillation(student, teacher, names, published):
    return AttentionDistillation(teacher, Capture(teacher, names), names, [500.0, 1000.0, 1000.0], 2.0,
                                 student_capture=None if published else Capture(student, names),
                                 depths=[3, 2, 1] if published else None)


@pytest.mark.parametrize("published", [False, True])
def test_loss_is_zero_for_identical_teacher_and_student(published):
    student = tiny_model().eval()
    teacher = copy.deepcopy(student).eval()
    names = ["layer3", "layer4", "avgpool"] if published else ["layer2", "layer3", "layer4"]
    distil = _distillation(student, teacher, names, published)
    x = torch.randn(4, 3, 32, 32)
    loss = distil(student, x, None, student(x), 0)
    assert loss.item() == 0.0 and distil.last_terms == [0.0, 0.0, 0.0]


def test_hooked_maps_equal_the_published_extra_passes_and_their_oracle():
    teacher = tiny_model(1).eval()
    student = tiny_model(2).train()
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    names = ["layer3", "layer4", "avgpool"]
    hooked = _distillation(student, teacher, names, published=False)(student, x, None, student(x), 0)
    published = _distillation(student, teacher, names, published=True)(student, x, None, student(x), 0)
    oracle = naive_published_distillation(student, teacher, x)
    assert hooked.item() == pytest.approx(published.item(), rel=1e-6)
    assert hooked.item() == pytest.approx(oracle.item(), rel=1e-5)
    assert hooked.requires_grad  # the student's maps carry gradients


# --------------------------------------------------------------------------------------------------
# the defense
# --------------------------------------------------------------------------------------------------

def clean_data(n_per_class=4, augment=True):
    train, test = make_synthetic(num_classes=4, train_per_class=n_per_class, test_per_class=2)
    return DefenseData(clean=train, spec=SPEC, clean_indices=torch.arange(len(train)),
                       augment=(lambda x, g: random_crop_flip(x, SPEC, g)) if augment else None)


@pytest.mark.parametrize("published_bugs, layers", [(False, ["layer2", "layer3", "layer4"]),
                                                    (True, ["layer3", "layer4", "avgpool"])])
def test_layers_betas_and_bn_updates_per_batch(published_bugs, layers):
    model = tiny_model()
    data = clean_data()  # 16 images, batch 8: 2 student steps per epoch
    out, diag = defend(model, data, seed=0, progress=False, te_epochs=1, batch_size=8, published_bugs=published_bugs)
    assert [layer["name"] for layer in diag["layers"]] == layers
    assert [layer["beta"] for layer in diag["layers"]] == [500.0, 1000.0, 1000.0]
    if published_bugs:
        assert diag["layers"][2]["map"] == [1, 1] and diag["final_attention_terms"][2] < 1e-5
    # BN running statistics move once per batch, or (published) once per extra train-mode pass
    tracked = {k: int(out.state_dict()[k] - model.state_dict()[k]) for k in
               ("layer1.0.bn1.num_batches_tracked", "layer4.0.bn1.num_batches_tracked")}
    expected = {"layer1.0.bn1.num_batches_tracked": 8, "layer4.0.bn1.num_batches_tracked": 6} if published_bugs \
        else {"layer1.0.bn1.num_batches_tracked": 2, "layer4.0.bn1.num_batches_tracked": 2}
    assert tracked == expected


def test_teacher_is_a_fine_tuned_copy_and_the_student_follows_the_lr_rule(monkeypatch):
    calls = []
    real = finetune.train_model

    def spy(model, data, spec, settings, **kwargs):
        calls.append({"model": model, "data": data, "settings": settings, "state": copy.deepcopy(model.state_dict()),
                      **kwargs})
        return real(model, data, spec, settings, **kwargs)

    monkeypatch.setattr(finetune, "train_model", spy)
    model = tiny_model()
    data = clean_data()
    out, diag = defend(model, data, seed=0, progress=False, te_epochs=3, batch_size=8, lr=0.05)
    teacher_call, student_call = calls
    assert teacher_call["description"] == "nad teacher" and teacher_call["hooks"] is None
    assert teacher_call["model"] is not model and teacher_call["data"] is data.clean
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in teacher_call["state"].items())  # a copy
    assert (teacher_call["settings"].epochs, teacher_call["settings"].scheduler) == (3, "cosine")
    assert student_call["model"] is out and student_call["data"] is data.clean
    assert isinstance(student_call["hooks"].extra_loss, AttentionDistillation)
    assert student_call["hooks"].extra_loss.teacher is teacher_call["model"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in student_call["state"].items())  # from the input
    # published: the student trains te_epochs epochs, lr `lr` for epochs 0-1 then 0.01
    assert diag["student_history"]["lr"] == [0.05, 0.05, 0.01]
    assert diag["teacher_history"]["lr"][0] == 0.05 and diag["teacher_history"]["lr"][1] < 0.05
    assert not teacher_call["model"].training  # the teacher is used in eval mode, frozen
    assert not any(p.requires_grad for p in teacher_call["model"].parameters())


def test_reads_only_the_clean_budget_leaves_input_unchanged():
    train, test = make_synthetic(num_classes=4, train_per_class=8, test_per_class=2)
    indices = torch.tensor([0, 1, 5, 6, 10, 14, 22, 29])
    clean = Guarded(train.subset(indices))

    def forbidden(*args):
        raise AssertionError("nad must not use the test set or synthesise triggers")

    data = DefenseData(clean=clean, spec=SPEC, clean_indices=indices, validation=Guarded(test, forbid=True),
                       augment=lambda x, g: random_crop_flip(x, SPEC, g), apply_trigger=forbidden, evaluate=forbidden)
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    out, diag = defend(model, data, seed=0, progress=False, te_epochs=1, batch_size=4)
    assert clean.reads > 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert type(out) is PreActResNet18 and not out.training and out.state_dict().keys() == model.state_dict().keys()
    assert not out._forward_hooks and not out.layer2._forward_hooks  # no hook left behind
    assert all(torch.isfinite(v).all() for v in out.state_dict().values() if v.is_floating_point())
    assert diag["nad_seconds"] > 0 and diag["teacher_seconds"] > 0 and diag["student_seconds"] > 0


def test_budget_none_and_bad_keys_are_one_line_errors():
    with pytest.raises(ValueError, match=r"^nad needs clean data: use budget=ratio \(the default\) or budget=spc$"):
        defend(tiny_model(), None)
    with pytest.raises(ValueError, match=r"^defense\.layers=\['layer3'\] is invalid: it must be null with"):
        validate(layers=["layer3"], published_bugs=True)
    with pytest.raises(ValueError, match=r"does not have"):
        defend(tiny_model(), clean_data(), progress=False, te_epochs=0, layers=["layer9"])


def test_config_defaults_are_backdoorbench_s():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from helpers import ROOT

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cifar = OmegaConf.to_container(compose("config", overrides=["defense=nad"]).defense, resolve=True)
        tiny = OmegaConf.to_container(compose("config", overrides=["defense=nad", "dataset=tiny"]).defense,
                                      resolve=True)
    assert {k: cifar[k] for k in ("te_epochs", "student_epochs", "batch_size", "lr", "beta1", "beta2", "beta3", "p",
                                  "teacher_scheduler", "published_bugs")} == {
        "te_epochs": 10, "student_epochs": None, "batch_size": 256, "lr": 0.01, "beta1": 500, "beta2": 1000,
        "beta3": 1000, "p": 2.0, "teacher_scheduler": "cosine", "published_bugs": False}
    assert (tiny["batch_size"], tiny["teacher_scheduler"]) == (128, "plateau")
