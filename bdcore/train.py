"""The one training loop (BackdoorBench semantics, docs/methods/training.md), used for backdoor training
and for every fine-tuning defense.

Data stay on the device as uint8; each batch is augmented per sample on the device, normalised and fed
to the model. Attacks that control training (WaNet, Input-aware, BPP) plug in through `TrainingHooks`
instead of writing a second loop.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from bdcore.data import DatasetSpec, ImageSet, normalize, random_crop_flip
from bdcore.io import torch_save_atomic
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
    after_optimizer_step(model): called after every optimizer step (projections, e.g. masks clipped to [0, 1]).
    extra_optimizers: stepped (and zeroed) together with the classifier's optimizer.
    learning_rates: the classifier optimizer's learning rate for each optimizer step, in order (a schedule no
        per-epoch torch scheduler expresses: FT-SAM's per-batch cosine, NAD's student); it replaces the
        scheduler's value, so use it with scheduler "constant". Training stops with an error if it runs out.
    on_epoch_end(epoch) -> bool | None: called after the scheduler step of each epoch; returning True ends
        training after that epoch (early stopping: RNP's unlearning threshold, Grad-Prune's patience).
    resumable_state() -> dict / load_resumable_state(dict): the hooks' own state (random generators, extra
        networks and schedulers) for a training checkpoint; hooks with callbacks but without these are
        never checkpointed, since resuming them would not repeat the uninterrupted run.
    """

    batch_transform: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]] | None = None
    extra_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None
    before_optimizer_step: Callable[[nn.Module, Callable[[], torch.Tensor]], None] | None = None
    after_optimizer_step: Callable[[nn.Module], None] | None = None
    extra_optimizers: list[torch.optim.Optimizer] = field(default_factory=list)
    learning_rates: Sequence[float] | None = None
    on_epoch_end: Callable[[int], bool | None] | None = None
    resumable_state: Callable[[], dict] | None = None
    load_resumable_state: Callable[[dict], None] | None = None

    def resumable(self) -> bool:
        stateful = (self.batch_transform, self.extra_loss, self.before_optimizer_step, self.after_optimizer_step,
                    self.on_epoch_end)
        return self.resumable_state is not None or (all(f is None for f in stateful) and not self.extra_optimizers)


@dataclass
class EpochCheckpoint:
    """Where `train_model` saves its complete state every `every` epochs, atomically, so that a killed run
    resumes from the last saved epoch and ends with the weights of an uninterrupted one (docs/checkpoints.md).
    The file holds tensors and plain containers only and loads with `weights_only=True`."""

    path: Path
    every: int = 1

    def __post_init__(self):
        self.path = Path(self.path)
        if int(self.every) < 1:
            raise ValueError(f"checkpoint_every={self.every} is invalid; use e.g. checkpoint_every=1 (epochs)")

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # a corrupt or foreign file is never trusted: train from the start
            log.warning("ignoring unreadable training checkpoint %s (%s); training from epoch 1", self.path, err)
            return None

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torch_save_atomic(state, self.path)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


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
                progress: bool = True, description: str = "train", precision: str = "fp32",
                checkpoint: EpochCheckpoint | None = None) -> list[dict]:
    """Train `model` in place on `data` (uint8, already poisoned if it is a backdoor training).

    `precision` (bdcore.precision): fp32, or bf16 / fp16 autocast with fp32 weights and optimizer state
    (fp16 with a gradient scaler); `auto` is resolved for `device`. The model and the batches take the
    policy's memory layout while training; the model comes back NCHW. Shuffling and augmentation draw
    from generators seeded by `seed`, so CPU runs repeat exactly; fp32 on a CPU is the exact reference.
    With `checkpoint`, the state is saved every `checkpoint.every` epochs and a saved state is resumed
    from (the caller keys the file by everything that determines the result); hooks that cannot be
    resumed exactly (`TrainingHooks.resumable`) are trained without one.
    Returns one history row per epoch (loss, train accuracy, lr, seconds, images/s; `resumed` on the rows
    restored from a checkpoint).
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
    rates, optimizer_steps = hooks.learning_rates, 0
    if checkpoint is not None and not hooks.resumable():
        log.info("%s: not checkpointed (its training hooks keep no resumable state)", description)
        checkpoint = None

    def full_state() -> dict:
        return {"epoch": len(history), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": None if scheduler is None else scheduler.state_dict(),
                "scaler": None if scaler is None else scaler.state_dict(),
                "extra_optimizers": [extra.state_dict() for extra in hooks.extra_optimizers],
                "hooks": None if hooks.resumable_state is None else hooks.resumable_state(),
                "shuffle_gen": shuffle_gen.get_state(), "aug_gen": aug_gen.get_state(),
                "torch_rng": torch.get_rng_state(), "optimizer_steps": optimizer_steps, "history": history}

    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None and saved["epoch"] <= settings.epochs:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
        if scaler is not None:
            scaler.load_state_dict(saved["scaler"])
        for extra, state in zip(hooks.extra_optimizers, saved["extra_optimizers"]):
            extra.load_state_dict(state)
        if hooks.load_resumable_state is not None:
            hooks.load_resumable_state(saved["hooks"])
        shuffle_gen.set_state(saved["shuffle_gen"])
        aug_gen.set_state(saved["aug_gen"])
        torch.set_rng_state(saved["torch_rng"])
        optimizer_steps = saved["optimizer_steps"]
        history = [{**row, "resumed": True} for row in saved["history"]]  # epochs trained by the killed run
        log.info("%s: resumed from the checkpoint after epoch %d of %d", description, saved["epoch"], settings.epochs)
    bar = tqdm(range(len(history), settings.epochs), desc=description, disable=not progress, mininterval=2.0,
               leave=False, initial=len(history), total=settings.epochs)
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
            if rates is not None:
                if optimizer_steps >= len(rates):
                    raise RuntimeError(f"learning-rate schedule of {len(rates)} steps exhausted at step "
                                       f"{optimizer_steps + 1}")
                for group in optimizer.param_groups:
                    group["lr"] = float(rates[optimizer_steps])
            if scaler is None:
                optimizer.step()
                for extra in hooks.extra_optimizers:
                    extra.step()
            else:
                scaler.step(optimizer)
                for extra in hooks.extra_optimizers:
                    scaler.step(extra)
                scaler.update()
            optimizer_steps += 1
            if hooks.after_optimizer_step is not None:
                hooks.after_optimizer_step(model)
            loss_sum += loss.detach()
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
        mean_loss = (loss_sum / steps).item()
        lr = optimizer.param_groups[0]["lr"]
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(mean_loss)
        elif scheduler is not None:
            scheduler.step()
        stop = bool(hooks.on_epoch_end(epoch)) if hooks.on_epoch_end is not None else False
        seconds = time.perf_counter() - start
        row = {"epoch": epoch, "loss": mean_loss, "train_acc": 100.0 * correct.item() / seen, "lr": lr,
               "seconds": seconds, "images_per_second": seen / seconds}
        history.append(row)
        bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{row['train_acc']:.1f}", ips=f"{row['images_per_second']:.0f}")
        log.info("%s epoch %d/%d: loss %.4f, train acc %.2f%%, lr %.5f, %.0f img/s", description, epoch + 1,
                 settings.epochs, mean_loss, row["train_acc"], lr, row["images_per_second"])
        if stop:
            break
        if checkpoint is not None and (epoch + 1) % checkpoint.every == 0 and epoch + 1 < settings.epochs:
            checkpoint.save(full_state())
    model.to(memory_format=torch.contiguous_format)  # callers (OTBR, CLP, stores) always see NCHW weights
    model.eval()
    return history
