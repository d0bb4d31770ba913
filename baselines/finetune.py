"""Shared pieces of the fine-tuning defenses (FT, FP, NAD, FT-SAM): settings, checks, learning-rate schedules.

Every defense here fine-tunes with the one training loop, ``bdcore.train.train_model``, on the defender's
clean budget ``data.clean`` and in the job's precision ``data.precision``. BackdoorBench's defense loaders
shuffle and keep the last, smaller batch (``drop_last=False``); its train transform is the random crop (+ flip
on CIFAR-10) that ``train_model`` applies when ``settings.augment`` is set, the same function the pipeline
hands over as ``data.augment`` (docs/methods/defenses.md).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn as nn

from bdcore.data import DefenseData, ImageSet
from bdcore.evaluate import accuracy
from bdcore.io import device_of
from bdcore.train import TrainingHooks, TrainSettings, train_model

SCHEDULERS = ("cosine", "plateau", "multistep", "constant")


# --------------------------------------------------------------------------------------------------
# checks (one line naming the key, the value and a valid example)
# --------------------------------------------------------------------------------------------------

def require_clean_data(data: DefenseData | None, name: str) -> DefenseData:
    if data is None:
        raise ValueError(f"{name} needs clean data: use budget=ratio (the default) or budget=spc")
    if len(data.clean) == 0:
        raise ValueError(f"{name} got an empty clean budget; raise budget.ratio (e.g. 0.05) or budget.spc")
    return data


def check(ok: bool, key: str, value, valid: str) -> None:
    if not ok:
        raise ValueError(f"defense.{key}={value} is invalid: it must be {valid}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_schedule(*, epochs, batch_size, lr, momentum, weight_decay, scheduler, t_max,
                      prefix: str = "") -> None:
    """The optimiser / schedule keys every fine-tuning defense shares."""
    check(isinstance(epochs, int) and epochs >= 0, f"{prefix}epochs", epochs, "an integer >= 0 (e.g. 100)")
    check(isinstance(batch_size, int) and batch_size >= 1, f"{prefix}batch_size", batch_size,
          "an integer >= 1 (e.g. 256)")
    check(_is_number(lr) and lr > 0, f"{prefix}lr", lr, "a number > 0 (e.g. 0.01)")
    check(_is_number(momentum) and 0 <= momentum < 1, f"{prefix}momentum", momentum, "in [0, 1) (e.g. 0.9)")
    check(_is_number(weight_decay) and weight_decay >= 0, f"{prefix}weight_decay", weight_decay,
          "a number >= 0 (e.g. 5.0e-4)")
    check(scheduler in SCHEDULERS, f"{prefix}scheduler", scheduler, f"one of {', '.join(SCHEDULERS)}")
    check(isinstance(t_max, int) and t_max >= 1, f"{prefix}t_max", t_max, "an integer >= 1 (e.g. 100)")


# --------------------------------------------------------------------------------------------------
# settings and schedules
# --------------------------------------------------------------------------------------------------

def finetune_settings(*, epochs: int, batch_size: int, lr: float, momentum: float, weight_decay: float,
                      scheduler: str, t_max: int, augment: bool) -> TrainSettings:
    """TrainSettings of a BackdoorBench defense: its SGD, its scheduler stepped once per epoch (cosine
    T_max fixed whatever the epochs, plateau on the epoch's mean train loss) and its loader, which keeps
    the last, smaller batch."""
    return TrainSettings(epochs=int(epochs), batch_size=int(batch_size), lr=float(lr), momentum=float(momentum),
                         weight_decay=float(weight_decay), scheduler=scheduler, t_max=int(t_max),
                         augment=bool(augment), drop_last=False)


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Optimizer steps per epoch of a loader that keeps the last batch."""
    return -(-int(num_samples) // int(batch_size))


def scheduled_learning_rates(lr: float, scheduler: str, t_max: int, steps: int) -> list[float]:
    """The learning rate of each of `steps` optimizer steps when torch's scheduler is stepped after every
    step (FT-SAM steps its cosine per batch). Computed with torch's own scheduler on a dummy parameter, so
    the values are exactly the ones BackdoorBench's run sees (torch's recursive cosine, not the closed form)."""
    if scheduler == "constant":
        return [float(lr)] * int(steps)
    if scheduler != "cosine":
        raise ValueError(f"a per-step learning-rate schedule needs scheduler cosine or constant, got {scheduler!r}")
    dummy = torch.nn.Parameter(torch.zeros(()))
    optimizer = torch.optim.SGD([dummy], lr=float(lr))
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(t_max))
    rates = []
    for _ in range(int(steps)):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        cosine.step()
    return rates


# --------------------------------------------------------------------------------------------------
# the calls into bdcore
# --------------------------------------------------------------------------------------------------

def train_on_clean(model: nn.Module, data: DefenseData, settings: TrainSettings, *, device: torch.device,
                   seed: int, hooks: TrainingHooks | None = None, progress: bool = True,
                   description: str = "fine-tune") -> list[dict]:
    """``train_model`` on the defender's budget ``data.clean`` in the job's precision; returns its history."""
    return train_model(model, data.clean, data.spec, settings, device=device, seed=seed, hooks=hooks,
                       progress=progress, description=description, precision=data.precision)


def clean_accuracy(model: nn.Module, images: ImageSet, data: DefenseData, device: torch.device) -> float:
    """Top-1 accuracy (%) on a held-out clean split, in the job's precision."""
    return accuracy(model, images, data.spec, device=device, precision=data.precision)


def resolve_device(model: nn.Module, device) -> torch.device:
    return torch.device(device) if device is not None else device_of(model)


def require_finite(model: nn.Module, name: str) -> None:
    """The returned weights must be usable: NaN/Inf means the fine-tuning diverged."""
    for key, value in model.state_dict().items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"{name} diverged: {key} holds NaN/Inf after fine-tuning; lower defense.lr "
                             "(e.g. defense.lr=0.001)")


def history_summary(history: list[dict]) -> dict:
    """JSON-able digest of a ``train_model`` history."""
    if not history:
        return {"epochs": 0, "final_loss": None, "final_train_acc": None, "seconds": 0.0}
    return {"epochs": len(history), "final_loss": history[-1]["loss"], "final_train_acc": history[-1]["train_acc"],
            "final_lr": history[-1]["lr"], "seconds": sum(h["seconds"] for h in history),
            "loss": [h["loss"] for h in history], "lr": [h["lr"] for h in history]}


class Stopwatch:
    """``with Stopwatch() as t: ...; t.seconds``."""

    def __enter__(self):
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        return False
