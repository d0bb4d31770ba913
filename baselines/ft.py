"""FT — plain fine-tuning of every parameter on the defender's clean data (BackdoorBench ``defense/ft.py``).

Cross-entropy, SGD (lr 0.01, momentum 0.9, weight decay 5e-4), batch 256, 100 epochs with a cosine
schedule whose T_max is 100 whatever the epochs, stepped once per epoch (Tiny-ImageNet: 200 epochs,
ReduceLROnPlateau on the epoch's mean train loss; conf/defense_dataset/ft_tiny.yaml). The train transform
(random crop, + flip on CIFAR-10) is applied on the fly; the result is the model after the last epoch,
nothing is selected (docs/methods/defenses.md).
"""
from __future__ import annotations

import copy

import torch.nn as nn

from baselines.base import defense
from baselines.finetune import (Stopwatch, finetune_settings, history_summary, require_clean_data,
                                require_finite, resolve_device, train_on_clean, validate_schedule)


def validate(epochs: int = 100, batch_size: int = 256, lr: float = 0.01, momentum: float = 0.9,
             weight_decay: float = 5e-4, scheduler: str = "cosine", t_max: int = 100) -> None:
    validate_schedule(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
                      scheduler=scheduler, t_max=t_max)


@defense(data_free=False, validate=validate)
def defend(model: nn.Module, data, *, seed: int = 0, device=None, progress: bool = True, epochs: int = 100,
           batch_size: int = 256, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4,
           scheduler: str = "cosine", t_max: int = 100) -> tuple[nn.Module, dict]:
    """Fine-tune a deep copy of ``model`` on ``data.clean``; the input model is not modified.

    Diagnostics: the settings, ``history`` (per-epoch loss, final train accuracy and lr) and ``ft_seconds``.
    """
    data = require_clean_data(data, "ft")
    validate(epochs, batch_size, lr, momentum, weight_decay, scheduler, t_max)
    device = resolve_device(model, device)
    tuned = copy.deepcopy(model)
    settings = finetune_settings(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                                 weight_decay=weight_decay, scheduler=scheduler, t_max=t_max,
                                 augment=data.augment is not None)
    with Stopwatch() as clock:
        history = train_on_clean(tuned, data, settings, device=device, seed=seed, progress=progress,
                                 description="ft")
    tuned.eval()
    require_finite(tuned, "ft")
    return tuned, {
        "defense": "ft",
        "clean_samples": len(data.clean),
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "scheduler": scheduler,
        "augment": settings.augment,
        "history": history_summary(history),
        "ft_seconds": clock.seconds,
    }
