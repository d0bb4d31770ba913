"""FT-SAM — fine-tuning with (adaptive) sharpness-aware minimisation (Zhu et al. 2023), as BackdoorBench
runs it (``defense/ft-sam.py`` with ``utils/defense_utils/sam``).

Per batch (the ascent is a ``before_optimizer_step`` hook of the one training loop):

1. gradient ``g`` of the label-smoothed loss at ``w``;
2. ascent step ``e = rho * g / ||g||`` (SAM) or, adaptive (ASAM, BackdoorBench's default because its
   ``--adaptive`` flag is ``store_false``), ``e = rho * w^2 * g / || |w| * g ||`` with no eta; the norm runs
   over every parameter with a gradient, ``+1e-12``;
3. gradient at ``w + e`` with BatchNorm momentum 0 (running statistics untouched by the second pass);
4. optional gradient decomposition with weight ``alpha`` (0 = plain SAM direction);
5. back to ``w``, then the base SGD step with the gradient of step 3.

Loss: KL to a smoothed one-hot (``1 - s`` on the label, ``s / (C - 1)`` on every other class; torch's
label smoothing would use ``s / C``), mean over the batch. ``rho`` follows the learning rate
proportionally between ``rho_min`` and ``rho_max`` (constant when they are equal, the default). The cosine
schedule (T_max 100) is stepped after every *batch* (``scheduler_interval: batch``), not every epoch.

Effective defaults (BackdoorBench's argparse defaults override its per-dataset yamls): rho 2.0, label
smoothing 0.1, adaptive, alpha 0 on every data set; GTSRB 50 epochs; Tiny-ImageNet ReduceLROnPlateau, which
here is stepped per epoch on the mean train loss (the published per-batch call without a metric raises).

Published bug (``published_bugs: true`` restores it; docs/methods/defenses.md): un-perturbing subtracts ``e``
from ``w + e`` instead of restoring ``w``, which leaves a float rounding residue every step. By default the
weights before the ascent are restored exactly.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from baselines.base import defense
from baselines.finetune import (Stopwatch, check, finetune_settings, history_summary,
                                require_clean_data, require_finite, resolve_device, scheduled_learning_rates,
                                steps_per_epoch, train_on_clean, validate_schedule)
from bdcore.train import TrainingHooks

SCHEDULER_INTERVALS = ("batch", "epoch")
PERTURB_EPS = 1e-12  # BackdoorBench's SAM perturb_eps


# --------------------------------------------------------------------------------------------------
# pure pieces
# --------------------------------------------------------------------------------------------------

def smooth_crossentropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Per-sample KL(q || softmax(logits)) with q = 1 - s on the label and s / (C - 1) elsewhere."""
    num_classes = logits.size(1)
    target = torch.full_like(logits, smoothing / (num_classes - 1))
    target.scatter_(1, labels.unsqueeze(1), 1.0 - smoothing)
    return F.kl_div(F.log_softmax(logits, dim=1), target, reduction="none").sum(-1)


def smoothing_correction(smoothing: float):
    """An ``extra_loss`` turning the loop's cross-entropy into the smoothed loss: ``CE + (S - CE) = S``."""
    def extra_loss(model, x, y, logits, epoch):
        logits = logits.float()
        return smooth_crossentropy(logits, y, smoothing).mean() - F.cross_entropy(logits, y)

    return extra_loss


@torch.no_grad()
def weighted_gradient_norm(params: list[torch.Tensor], adaptive: bool) -> torch.Tensor:
    """``|| (|w| if adaptive else 1) * g ||_2`` over all parameters (norm of the per-parameter norms)."""
    return torch.norm(torch.stack([((p.abs() if adaptive else 1.0) * p.grad).norm(p=2) for p in params]), p=2)


@torch.no_grad()
def sam_perturbation(params: list[torch.Tensor], rho: float, adaptive: bool,
                     eps: float = PERTURB_EPS) -> list[torch.Tensor]:
    """The ascent step ``e`` of every parameter (with a gradient): ``rho * g / (norm + eps)``, times ``w^2``
    when adaptive (the norm then weighs g by |w|, so ||e / |w| || = rho)."""
    scale = rho / (weighted_gradient_norm(params, adaptive) + eps)
    steps = []
    for p in params:
        e = p.grad * scale.to(p)
        if adaptive:
            e = e * torch.pow(p, 2)
        steps.append(e)
    return steps


@torch.no_grad()
def decompose_gradient(params: list[torch.Tensor], old_grads: list[torch.Tensor], alpha: float,
                       eps: float = PERTURB_EPS) -> None:
    """BackdoorBench's ``gradient_decompose``: subtract ``alpha`` times the part of the first gradient
    orthogonal to the second (in place on ``p.grad``); a no-op for ``alpha = 0``."""
    if alpha == 0:
        return
    inner = sum(torch.sum(g0 * p.grad) for p, g0 in zip(params, old_grads))
    new_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in params]), p=2)
    old_norm = torch.norm(torch.stack([g0.norm(p=2) for g0 in old_grads]), p=2)
    cosine = inner / (new_norm * old_norm + eps)
    for p, g0 in zip(params, old_grads):
        vertical = g0 - cosine * old_norm * p.grad / (new_norm + eps)
        p.grad.add_(vertical, alpha=-alpha)


def freeze_bn_running_stats(model: nn.Module) -> dict[nn.Module, float | None]:
    """Set every BatchNorm's momentum to 0 (running statistics stay put); returns the old momenta."""
    saved = {}
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            saved[module] = module.momentum
            module.momentum = 0
    return saved


def restore_bn_momenta(saved: dict[nn.Module, float | None]) -> None:
    for module, momentum in saved.items():
        module.momentum = momentum


def rho_schedule(rates: list[float] | None, lr: float, rho_max: float, rho_min: float):
    """``step -> rho``: BackdoorBench's ProportionScheduler, ``rho_min + (rho_max - rho_min) * lr_t / lr``
    (min lr 0), constant when ``rho_max == rho_min``."""
    if rho_max == rho_min:
        return lambda step: float(rho_max)
    return lambda step: rho_min + (rho_max - rho_min) * rates[step] / lr


class SharpnessAwareAscent:
    """The ``before_optimizer_step`` hook: perturb to ``w + e``, recompute the gradient there (BN momentum 0),
    decompose it, go back to ``w``. ``train_model`` then takes the base optimizer step."""

    def __init__(self, rho_at, adaptive: bool = True, alpha: float = 0.0, published_bugs: bool = False):
        self.rho_at, self.adaptive, self.alpha, self.published_bugs = rho_at, adaptive, alpha, published_bugs
        self.steps = 0
        self.skipped = 0

    def __call__(self, model: nn.Module, recompute_loss) -> None:
        params = [p for p in model.parameters() if p.grad is not None]
        rho = self.rho_at(self.steps)
        self.steps += 1
        if not params:
            return
        perturbation = sam_perturbation(params, rho, self.adaptive)
        if not all(torch.isfinite(e).all() for e in perturbation):
            self.skipped += 1  # a non-finite gradient: no ascent (a scaled fp16 step is skipped anyway)
            return
        old_grads = [p.grad.clone() for p in params] if self.alpha else None
        weights = None if self.published_bugs else [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, perturbation):
                p.add_(e)
        momenta = freeze_bn_running_stats(model)
        try:
            for p in model.parameters():
                p.grad = None
            recompute_loss()
        finally:
            restore_bn_momenta(momenta)
        if self.alpha:
            decompose_gradient(params, old_grads, self.alpha)
        with torch.no_grad():
            for i, p in enumerate(params):
                if self.published_bugs:
                    p.sub_(perturbation[i])
                else:
                    p.copy_(weights[i])


# --------------------------------------------------------------------------------------------------
# defense entry point
# --------------------------------------------------------------------------------------------------

def validate(epochs: int = 100, batch_size: int = 256, lr: float = 0.01, momentum: float = 0.9,
             weight_decay: float = 5e-4, scheduler: str = "cosine", t_max: int = 100,
             scheduler_interval: str = "batch", rho_max: float = 2.0, rho_min: float = 2.0,
             adaptive: bool = True, alpha: float = 0.0, label_smoothing: float = 0.1,
             published_bugs: bool = False) -> None:
    validate_schedule(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
                      scheduler=scheduler, t_max=t_max)
    check(scheduler_interval in SCHEDULER_INTERVALS, "scheduler_interval", scheduler_interval,
          f"one of {', '.join(SCHEDULER_INTERVALS)} (e.g. batch)")
    check(isinstance(rho_max, (int, float)) and rho_max >= 0, "rho_max", rho_max, "a number >= 0 (e.g. 2.0)")
    check(isinstance(rho_min, (int, float)) and 0 <= rho_min <= rho_max, "rho_min", rho_min,
          f"in [0, rho_max={rho_max}] (e.g. 2.0)")
    check(rho_min == rho_max or (scheduler_interval == "batch" and scheduler in ("cosine", "constant")),
          "rho_min", rho_min, "equal to rho_max unless the lr follows a per-batch cosine or constant schedule")
    check(isinstance(adaptive, bool), "adaptive", adaptive, "true (ASAM) or false (SAM)")
    check(isinstance(alpha, (int, float)) and alpha >= 0, "alpha", alpha, "a number >= 0 (e.g. 0.0)")
    check(isinstance(label_smoothing, (int, float)) and 0 <= label_smoothing < 1, "label_smoothing",
          label_smoothing, "in [0, 1) (e.g. 0.1)")
    check(isinstance(published_bugs, bool), "published_bugs", published_bugs, "true or false")


@defense(data_free=False, validate=validate)
def defend(model: nn.Module, data, *, seed: int = 0, device=None, progress: bool = True, epochs: int = 100,
           batch_size: int = 256, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4,
           scheduler: str = "cosine", t_max: int = 100, scheduler_interval: str = "batch", rho_max: float = 2.0,
           rho_min: float = 2.0, adaptive: bool = True, alpha: float = 0.0, label_smoothing: float = 0.1,
           published_bugs: bool = False) -> tuple[nn.Module, dict]:
    """FT-SAM on a deep copy of ``model`` with ``data.clean``; the input model is not modified.

    Diagnostics: the settings, ``ascent_steps`` / ``skipped_ascents``, the history and ``ftsam_seconds``.
    """
    data = require_clean_data(data, "ftsam")
    validate(epochs, batch_size, lr, momentum, weight_decay, scheduler, t_max, scheduler_interval, rho_max,
             rho_min, adaptive, alpha, label_smoothing, published_bugs)
    device = resolve_device(model, device)
    tuned = copy.deepcopy(model)
    per_batch = scheduler_interval == "batch" and scheduler in ("cosine", "constant")
    total_steps = epochs * steps_per_epoch(len(data.clean), batch_size)
    rates = scheduled_learning_rates(lr, scheduler, t_max, total_steps) if per_batch else None
    settings = finetune_settings(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                                 weight_decay=weight_decay, scheduler="constant" if per_batch else scheduler,
                                 t_max=t_max, augment=data.augment is not None)
    ascent = SharpnessAwareAscent(rho_schedule(rates, lr, rho_max, rho_min), adaptive=adaptive, alpha=alpha,
                                  published_bugs=published_bugs)
    hooks = TrainingHooks(before_optimizer_step=ascent, learning_rates=rates,
                          extra_loss=smoothing_correction(label_smoothing) if label_smoothing else None)
    with Stopwatch() as clock:
        history = train_on_clean(tuned, data, settings, device=device, seed=seed, hooks=hooks,
                                 progress=progress, description="ftsam")
    tuned.eval()
    require_finite(tuned, "ftsam")
    return tuned, {
        "defense": "ftsam",
        "clean_samples": len(data.clean),
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "scheduler": scheduler,
        "scheduler_interval": "batch" if per_batch else "epoch",
        "rho_max": rho_max, "rho_min": rho_min, "adaptive": adaptive, "alpha": alpha,
        "label_smoothing": label_smoothing, "published_bugs": published_bugs,
        "augment": settings.augment,
        "ascent_steps": ascent.steps, "skipped_ascents": ascent.skipped,
        "history": history_summary(history),
        "ftsam_seconds": clock.seconds,
    }
