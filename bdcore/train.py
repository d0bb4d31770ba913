"""The one training loop (BackdoorBench semantics, docs/methods/training.md), used for backdoor training
and for every fine-tuning defense.

Data stay on the device as uint8; each batch is augmented per sample on the device, normalised and fed
to the model. Attacks that control training (WaNet, Input-aware, BPP) plug in through `TrainingHooks`
instead of writing a second loop.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from bdcore.data import DatasetSpec, ImageSet, normalize, random_crop_flip
from bdcore.precision import autocast, grad_scaler, memory_format, resolve_precision

log = logging.getLogger(__name__)

SCHEDULERS = ("cosine", "plateau", "multistep", "constant")


@dataclass
class TrainSettings:
    """BackdoorBench prototype defaults (CIFAR): SGD 0.01 / 0.9 / 5e-4, batch 128, cosine T_max 100."""

    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scheduler: str = "cosine"  # cosine | plateau | multistep | constant
    t_max: int = 100  # BackdoorBench hard-codes 100 whatever the epochs (docs/methods/training.md)
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    augment: bool = True
    drop_last: bool = True

    def __post_init__(self):
        def check(ok: bool, key: str, value, example: str) -> None:
            if not ok:
                raise ValueError(f"train.{key}={value} is invalid; use e.g. train.{key}={example}")

        check(int(self.epochs) >= 0, "epochs", self.epochs, "100")  # 0 = no training (e.g. FP without fine-tuning)
        check(int(self.batch_size) >= 1, "batch_size", self.batch_size, "128")
        check(math.isfinite(float(self.lr)) and float(self.lr) > 0, "lr", self.lr, "0.01")
        check(0 <= float(self.momentum) < 1, "momentum", self.momentum, "0.9")
        check(float(self.weight_decay) >= 0, "weight_decay", self.weight_decay, "5.0e-4")
        check(self.scheduler in SCHEDULERS, "scheduler", self.scheduler, "cosine (or " + ", ".join(SCHEDULERS[1:]) + ")")
        check(int(self.t_max) >= 1, "t_max", self.t_max, "100")
        self.milestones = tuple(int(m) for m in self.milestones)


@dataclass
class TrainingHooks:
    """Extension points for attacks that control training and for defenses that fine-tune with extra terms.

    batch_transform(x, y, epoch) -> (x, y): called on each normalised, augmented batch (batch-level
        poisoning: WaNet, Input-aware, BPP).
    extra_loss(model, x, y, logits, epoch) -> scalar tensor: added to the cross-entropy (NAD's attention
        distillation, Input-aware's diversity term).
    before_optimizer_step(model, recompute_loss): called after the backward pass, before the optimizer
        steps; `recompute_loss()` runs forward + backward again on the same batch at the current weights and
        returns the loss (FT-SAM's ascent step: perturb, recompute, restore).
    extra_optimizers: stepped (and zeroed) together with the classifier's optimizer.
    on_epoch_end(epoch): called after the scheduler step of each epoch.
    """

    batch_transform: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]] | None = None
    extra_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None
    before_optimizer_step: Callable[[nn.Module, Callable[[], torch.Tensor]], None] | None = None
    extra_optimizers: list[torch.optim.Optimizer] = field(default_factory=list)
    on_epoch_end: Callable[[int], None] | None = None


def make_scheduler(optimizer: torch.optim.Optimizer, settings: TrainSettings):
    if settings.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.t_max)
    if settings.scheduler == "plateau":  # torch defaults, stepped on the epoch's mean train loss
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    if settings.scheduler == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(settings.milestones), settings.gamma)
    if settings.scheduler == "constant":
        return None
    raise ValueError(f"unknown train.scheduler {settings.scheduler!r}; use cosine, plateau, multistep or constant")


def train_model(model: nn.Module, data: ImageSet, spec: DatasetSpec, settings: TrainSettings, *,
                device: torch.device, seed: int = 0, hooks: TrainingHooks | None = None,
                progress: bool = True, description: str = "train", precision: str = "fp32") -> list[dict]:
    """Train `model` in place on `data` (uint8, already poisoned if it is a backdoor training).

    `precision` (bdcore.precision): fp32, or bf16 / fp16 autocast with fp32 weights and optimizer state
    (fp16 with a gradient scaler); `auto` is resolved for `device`. The model and the batches take the
    policy's memory layout while training; the model comes back NCHW. Shuffling and augmentation draw
    from generators seeded by `seed`, so CPU runs repeat exactly; fp32 on a CPU is the exact reference.
    Returns one history row per epoch (loss, train accuracy, lr, seconds, images/s).
    """
    hooks = hooks or TrainingHooks()
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    layout = memory_format(device, precision)
    model.to(device)
    model.to(memory_format=layout)  # also turns a channels_last model back to NCHW for exact fp32
    cuda = device.type == "cuda"
    images, labels = data.images.to(device), data.labels.to(device)
    n = len(labels)
    steps = n // settings.batch_size if settings.drop_last else -(-n // settings.batch_size)
    if steps == 0:
        raise ValueError(f"training set of {n} images is smaller than one batch of {settings.batch_size}")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=settings.lr,
                                momentum=settings.momentum, weight_decay=settings.weight_decay)
    scheduler = make_scheduler(optimizer, settings)
    scaler = grad_scaler(device, precision)  # None unless fp16
    criterion = nn.CrossEntropyLoss()
    shuffle_gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator(device=device if cuda else "cpu").manual_seed(seed + 1)
    history = []
    bar = tqdm(range(settings.epochs), desc=description, disable=not progress, mininterval=2.0, leave=False)
    for epoch in bar:
        model.train()
        start = time.perf_counter()
        order = torch.randperm(n, generator=shuffle_gen).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        for step in range(steps):
            idx = order[step * settings.batch_size:(step + 1) * settings.batch_size]
            x, y = images[idx], labels[idx]
            if settings.augment:
                x = random_crop_flip(x, spec, aug_gen)
            x = normalize(x, spec)
            if hooks.batch_transform is not None:
                x, y = hooks.batch_transform(x, y, epoch)
            if layout is torch.channels_last:
                x = x.contiguous(memory_format=layout)

            def forward_backward():
                with autocast(device, precision):
                    out = model(x)
                    total = criterion(out, y)
                    if hooks.extra_loss is not None:
                        total = total + hooks.extra_loss(model, x, y, out, epoch)
                (total if scaler is None else scaler.scale(total)).backward()
                return out, total

            optimizer.zero_grad(set_to_none=True)
            for extra in hooks.extra_optimizers:
                extra.zero_grad(set_to_none=True)
            logits, loss = forward_backward()
            if hooks.before_optimizer_step is not None:
                hooks.before_optimizer_step(model, lambda: forward_backward()[1])
            if scaler is None:
                optimizer.step()
                for extra in hooks.extra_optimizers:
                    extra.step()
            else:
                scaler.step(optimizer)
                for extra in hooks.extra_optimizers:
                    scaler.step(extra)
                scaler.update()
            loss_sum += loss.detach()
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
        mean_loss = (loss_sum / steps).item()
        lr = optimizer.param_groups[0]["lr"]
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(mean_loss)
        elif scheduler is not None:
            scheduler.step()
        if hooks.on_epoch_end is not None:
            hooks.on_epoch_end(epoch)
        seconds = time.perf_counter() - start
        row = {"epoch": epoch, "loss": mean_loss, "train_acc": 100.0 * correct.item() / seen, "lr": lr,
               "seconds": seconds, "images_per_second": seen / seconds}
        history.append(row)
        bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{row['train_acc']:.1f}", ips=f"{row['images_per_second']:.0f}")
        log.info("%s epoch %d/%d: loss %.4f, train acc %.2f%%, lr %.5f, %.0f img/s", description, epoch + 1,
                 settings.epochs, mean_loss, row["train_acc"], lr, row["images_per_second"])
    model.to(memory_format=torch.contiguous_format)  # callers (OTBR, CLP, stores) always see NCHW weights
    model.eval()
    return history
