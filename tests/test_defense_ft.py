"""FT, plain fine-tuning (baselines/ft.py), and the shared fine-tuning helpers (baselines/finetune.py)."""
from __future__ import annotations

import copy

import pytest
import torch

import baselines.finetune as finetune
from baselines.finetune import (finetune_settings, scheduled_learning_rates,
                                steps_per_epoch)
from baselines.ft import defend, validate
from bdcore.data import DatasetSpec, DefenseData, ImageSet, random_crop_flip
from bdcore.datasets import make_synthetic
from bdcore.models import PreActResNet18
from bdcore.train import TrainSettings, train_model
from helpers import Guarded

SPEC = DatasetSpec("synthetic", 4, 3, 32, 32, (0.5,) * 3, (0.25,) * 3, hflip=True)


def forbidden(*args):
    raise AssertionError("fine-tuning must not use the test set or synthesise triggers")


def guarded_data(indices, augment=True):
    train, test = make_synthetic(num_classes=4, train_per_class=8, test_per_class=2)
    clean = Guarded(train.subset(indices))
    data = DefenseData(clean=clean, spec=SPEC, clean_indices=indices, validation=Guarded(test, forbid=True),
                       augment=(lambda x, g: random_crop_flip(x, SPEC, g)) if augment else None,
                       apply_trigger=forbidden, evaluate=forbidden)
    return data, train


def spy_train_model(monkeypatch):
    calls = []
    real = finetune.train_model

    def spy(model, data, spec, settings, **kwargs):
        calls.append({"data": data, "settings": settings, **kwargs})
        return real(model, data, spec, settings, **kwargs)

    monkeypatch.setattr(finetune, "train_model", spy)
    return calls


def test_fine_tunes_exactly_the_clean_budget_with_backdoorbench_s_loop(monkeypatch):
    indices = torch.tensor([0, 3, 4, 7, 10, 11, 17, 18, 25, 30])
    data, train = guarded_data(indices)
    calls = spy_train_model(monkeypatch)
    model = PreActResNet18(num_classes=4, width=4)
    before = copy.deepcopy(model.state_dict())
    out, diag = defend(model, data, seed=3, progress=False, epochs=2, batch_size=4)
    (call,) = calls
    assert call["data"] is data.clean and data.clean.reads > 0
    assert torch.equal(call["data"].images, train.images[indices])
    s = call["settings"]
    assert (s.epochs, s.batch_size, s.lr, s.momentum, s.weight_decay, s.scheduler, s.t_max) == \
        (2, 4, 0.01, 0.9, 5e-4, "cosine", 100)
    assert s.drop_last is False and s.augment is True  # BackdoorBench's loader keeps the last (smaller) batch
    assert call["seed"] == 3 and call["description"] == "ft"
    # input untouched; a different, finite model of the same architecture, in eval mode
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert type(out) is PreActResNet18 and not out.training
    assert out.state_dict().keys() == model.state_dict().keys()
    assert not torch.equal(out.linear.weight, model.linear.weight)
    assert all(torch.isfinite(v).all() for v in out.state_dict().values() if v.is_floating_point())
    assert diag["history"]["epochs"] == 2 and diag["ft_seconds"] > 0 and diag["clean_samples"] == 10


def test_is_train_model_with_the_defense_settings_bit_for_bit():
    indices = torch.arange(0, 32, 3)
    data, _ = guarded_data(indices, augment=False)
    model = PreActResNet18(num_classes=4, width=4)
    out, _ = defend(model, data, seed=1, progress=False, epochs=2, batch_size=4, scheduler="constant")
    reference = copy.deepcopy(model)
    train_model(reference, data.clean, SPEC, TrainSettings(epochs=2, batch_size=4, scheduler="constant",
                                                           augment=False, drop_last=False),
                device=torch.device("cpu"), seed=1, progress=False)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in out.state_dict().items())


def test_budget_none_and_bad_keys_are_one_line_errors():
    model = PreActResNet18(num_classes=4, width=4)
    with pytest.raises(ValueError, match=r"^ft needs clean data: use budget=ratio \(the default\) or budget=spc$"):
        defend(model, None)
    with pytest.raises(ValueError, match=r"^defense\.scheduler=step is invalid: it must be one of cosine"):
        validate(scheduler="step")
    with pytest.raises(ValueError, match=r"^defense\.lr=0 is invalid"):
        validate(lr=0)


# --------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------

def test_settings_and_steps_keep_the_last_batch():
    s = finetune_settings(epochs=3, batch_size=256, lr=0.01, momentum=0.9, weight_decay=5e-4, scheduler="plateau",
                          t_max=100, augment=False)
    assert s.drop_last is False and s.scheduler == "plateau" and not s.augment
    assert steps_per_epoch(2500, 256) == 10 and steps_per_epoch(20, 256) == 1 and steps_per_epoch(512, 256) == 2


def test_per_step_cosine_is_torch_s_cosine_stepped_every_batch():
    rates = scheduled_learning_rates(0.01, "cosine", 100, 1000)
    param = torch.nn.Parameter(torch.zeros(()))
    optimizer = torch.optim.SGD([param], lr=0.01)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100)
    for k in range(1000):
        assert rates[k] == optimizer.param_groups[0]["lr"]
        optimizer.step()
        cosine.step()
    # T_max = 100 over 1000 steps: five full periods (down at 100, 300, ..., back up at 200, 400, ...)
    assert rates[0] == 0.01 and rates[100] < 1e-12 and abs(rates[200] - 0.01) < 1e-12
    assert scheduled_learning_rates(0.02, "constant", 100, 3) == [0.02] * 3


def test_config_defaults_are_backdoorbench_s():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from helpers import ROOT

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cifar = OmegaConf.to_container(compose("config", overrides=["defense=ft"]).defense, resolve=True)
        tiny = OmegaConf.to_container(compose("config", overrides=["defense=ft", "dataset=tiny"]).defense,
                                      resolve=True)
    assert cifar == {"_target_": "baselines.ft.defend", "_partial_": True, "seed": 0, "epochs": 100,
                     "batch_size": 256, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "scheduler": "cosine",
                     "t_max": 100}
    assert (tiny["epochs"], tiny["scheduler"]) == (200, "plateau")
