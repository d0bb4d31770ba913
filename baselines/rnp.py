"""RNP — Reconstructive Neuron Pruning (Li et al., ICML 2023), as BackdoorBench's ``defense/rnp.py`` runs it.

1. Unlearning (:func:`unlearn`): a copy of the model maximises CE on the clean budget (train mode, SGD lr
   0.01, momentum 0.9, wd 5e-4, MultiStepLR [10, 20] x0.1 per epoch, train transform) for up to 20
   epochs, stopping after the first epoch whose running train accuracy is <= ``clean_threshold`` (0.20).
   BackdoorBench's gradient clipping is called before the backward pass and clips nothing; that is the
   default (``unlearning_clip_grad_norm: null``), a number clips after the backward pass instead.
2. Recovery (:func:`recover_neuron_masks`): the unlearned weights get ANP's per-channel BN masks (noise
   off, baselines/anp.py); only the masks are trained on ``alpha * CE`` (SGD lr 0.2, momentum 0.9, 20
   epochs, train mode), clipped to [0, 1] after every step.
3. Masks pass the 4-decimal text round trip, are sorted ascending, and prune (BN weight gamma = 0) a copy
   of the *original* model: the threshold sweep 0, 0.05, ..., 0.90 with selection on ``selection_split``
   exactly as ANP's (baselines/anp.py ``prune_by_neuron_masks``).

Fidelity: BackdoorBench always returns the fixed-threshold 0.70 model (its argparse default
``pruning_number = 0.70`` exists on every run, so the sweep's choice is discarded). Here the sweep's choice
is returned (``pruning_number: null``); ``pruning_number: 0.7`` reproduces the published model.
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from baselines.anp import (is_number, attach_neuron_masks, check_option, check_pruning_options,
                           check_selection_inputs, clip_masks, prune_by_neuron_masks, require_clean_data,
                           resolve_device, training_batch)
from baselines.base import defense
from bdcore.train import TrainingHooks, TrainSettings, train_model


def negated_cross_entropy_term(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The extra loss that turns train_model's ``CE`` into ``-CE``: ``CE + (-2 CE)``.

    The two gradients meet at the logits as ``g + (-2 g) = -g``, exact in floating point, so every
    parameter gradient equals that of BackdoorBench's ``(-loss).backward()`` bit for bit.
    """
    return -2.0 * F.cross_entropy(logits, y)


def unlearn(model: nn.Module, data, *, epochs: int, batch_size: int, lr: float, momentum: float,
            weight_decay: float, schedule, clean_threshold: float, clip_grad_norm: float | None,
            device: torch.device, seed: int, precision: str, progress: bool = True) -> list[dict]:
    """RNP stage 1 in place on ``model`` with bdcore.train.train_model (loss ``-CE``, train transform).

    Stops after the first epoch whose running train accuracy (fraction) is <= ``clean_threshold``.
    Returns per epoch ``{"epoch", "train_acc"}`` (train accuracy in %).
    """
    epoch_counts = {"correct": 0, "seen": 0}
    history: list[dict] = []

    def extra_loss(m, x, y, logits, epoch):
        epoch_counts["correct"] += int((logits.detach().argmax(1) == y).sum())
        epoch_counts["seen"] += len(y)
        return negated_cross_entropy_term(logits, y)

    def before_optimizer_step(m, recompute_loss):
        if clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm=clip_grad_norm, norm_type=2)

    def on_epoch_end(epoch):
        accuracy = epoch_counts["correct"] / epoch_counts["seen"]
        history.append({"epoch": epoch, "train_acc": 100.0 * accuracy})
        epoch_counts.update(correct=0, seen=0)
        return accuracy <= clean_threshold  # True stops train_model after this epoch

    settings = TrainSettings(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                             weight_decay=weight_decay, scheduler="multistep", milestones=tuple(schedule),
                             gamma=0.1, augment=data.augment is not None, drop_last=False)
    hooks = TrainingHooks(extra_loss=extra_loss, before_optimizer_step=before_optimizer_step,
                          on_epoch_end=on_epoch_end)
    train_model(model, data.clean, data.spec, settings, device=device, seed=seed, hooks=hooks,
                progress=progress, description="rnp unlearn", precision=precision)
    return history


def recover_neuron_masks(model: nn.Module, bns, data, *, epochs: int, batch_size: int, lr: float,
                         momentum: float, alpha: float, generator: torch.Generator, device: torch.device,
                         progress: bool = True) -> list[dict]:
    """RNP stage 2: train only the BN masks of the unlearned ``model`` on ``alpha * CE``, clip to [0, 1].

    Its own small loop, not bdcore.train.train_model (whose ``after_optimizer_step`` could do the clip),
    because two things of the published loop cannot go through it bit for bit: the loss ``alpha * CE``
    (train_model's loss is ``CE`` plus extra terms; neither ``CE + (alpha - 1) CE`` nor ``alpha`` times
    the ``CE`` gradient gives the same bits as back-propagating ``alpha * CE``), and the one
    ``generator`` drawing both the batch order and the train transform, in turn (train_model draws them
    from two generators seeded ``seed`` and ``seed + 1``). Shuffled batches (last one short), train
    mode. Returns per epoch ``{"epoch", "loss", "train_acc"}``.
    """
    model.train()
    optimizer = torch.optim.SGD([bn.neuron_mask for bn in bns], lr=lr, momentum=momentum)
    images, labels = data.clean.images.to(device), data.clean.labels.to(device)
    n = len(labels)
    history = []
    for epoch in tqdm(range(epochs), desc="rnp recover", disable=not progress, leave=False):
        order = torch.randperm(n, generator=generator)
        loss_sum, correct, batches = 0.0, 0, 0
        for start in range(0, n, batch_size):
            x, y = training_batch(data, order[start:start + batch_size], images, labels, generator)
            logits = model(x)
            loss = alpha * F.cross_entropy(logits, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            clip_masks(bns)
            loss_sum, batches = loss_sum + loss.item(), batches + 1
            correct += int((logits.detach().argmax(1) == y).sum())
        history.append({"epoch": epoch, "loss": loss_sum / max(batches, 1), "train_acc": 100.0 * correct / n})
    return history


def validate(batch_size: int = 256, unlearning_lr: float = 0.01, unlearning_momentum: float = 0.9,
             unlearning_weight_decay: float = 5e-4, unlearning_epochs: int = 20, schedule=(10, 20),
             clean_threshold: float = 0.2, unlearning_clip_grad_norm: float | None = None,
             recovering_lr: float = 0.2, recovering_momentum: float = 0.9, recovering_epochs: int = 20,
             alpha: float = 0.2, pruning_by: str = "threshold", pruning_max: float = 0.9, pruning_step: float = 0.05,
             pruning_number: float | None = None, acc_ratio: float = 0.1, selection_split: str = "test",
             published_number_offset: bool = False) -> None:
    """Raise one ValueError line for a hyper-parameter RNP cannot run with (before any work)."""
    check_option("rnp", isinstance(batch_size, int) and batch_size >= 1, "batch_size", batch_size,
                 "an integer >= 1 (e.g. 256)")
    for key, value, example in (("unlearning_lr", unlearning_lr, 0.01), ("recovering_lr", recovering_lr, 0.2)):
        check_option("rnp", is_number(value) and value > 0, key, value, f"> 0 (e.g. {example})")
    for key, value in (("unlearning_momentum", unlearning_momentum), ("recovering_momentum", recovering_momentum)):
        check_option("rnp", is_number(value) and 0 <= value < 1, key, value, "in [0, 1) (e.g. 0.9)")
    check_option("rnp", is_number(unlearning_weight_decay) and unlearning_weight_decay >= 0,
                 "unlearning_weight_decay", unlearning_weight_decay, ">= 0 (e.g. 5.0e-4)")
    for key, value in (("unlearning_epochs", unlearning_epochs), ("recovering_epochs", recovering_epochs)):
        check_option("rnp", isinstance(value, int) and value >= 0, key, value, "an integer >= 0 (e.g. 20)")
    check_option("rnp", all(isinstance(m, int) for m in schedule), "schedule", list(schedule),
                 "a list of epochs (e.g. [10, 20])")
    check_option("rnp", is_number(clean_threshold), "clean_threshold", clean_threshold, "a number (e.g. 0.2)")
    clip = unlearning_clip_grad_norm
    check_option("rnp", clip is None or (is_number(clip) and clip > 0), "unlearning_clip_grad_norm", clip,
                 "null (published: no clipping) or > 0 (e.g. 20)")
    check_option("rnp", is_number(alpha) and alpha > 0, "alpha", alpha, "> 0 (e.g. 0.2)")
    check_pruning_options("rnp", pruning_by=pruning_by, pruning_max=pruning_max, pruning_step=pruning_step,
                          pruning_number=pruning_number, acc_ratio=acc_ratio, selection_split=selection_split,
                          published_number_offset=published_number_offset)


@defense(data_free=False, validate=validate)
def defend(model: nn.Module, data, *, seed: int = 0, device=None, batch_size: int = 256,
           unlearning_lr: float = 0.01, unlearning_momentum: float = 0.9, unlearning_weight_decay: float = 5e-4,
           unlearning_epochs: int = 20, schedule=(10, 20), clean_threshold: float = 0.2,
           unlearning_clip_grad_norm: float | None = None, recovering_lr: float = 0.2,
           recovering_momentum: float = 0.9, recovering_epochs: int = 20, alpha: float = 0.2,
           pruning_by: str = "threshold", pruning_max: float = 0.9, pruning_step: float = 0.05,
           pruning_number: float | None = None, acc_ratio: float = 0.1, selection_split: str = "test",
           published_number_offset: bool = False, progress: bool = True) -> tuple[nn.Module, dict]:
    """RNP on ``data.clean``; returns ``(pruned copy of model in eval mode, diagnostics)``.

    Reads ``data.clean`` (unlearning, recovery) and, for the sweep, ``data.evaluate``
    (``selection_split=test``) or ``data.validation``. Unlearning uses ``data.precision``; the mask
    recovery and every selection decision run in fp32. The input model is not modified.

    Diagnostics: the options, ``unlearning`` (per-epoch train accuracy, epochs run), ``recovery``
    (per-epoch loss / accuracy), ``masks`` (summary), then ANP's selection fields (``selection_split``,
    ``selected_level``, ``selected_pruned``, ``pruned_per_layer``, ``pruned_neurons``, ``sweep``) and
    ``rnp_seconds``.
    """
    require_clean_data("rnp", data)
    validate(batch_size, unlearning_lr, unlearning_momentum, unlearning_weight_decay, unlearning_epochs, schedule,
             clean_threshold, unlearning_clip_grad_norm, recovering_lr, recovering_momentum, recovering_epochs,
             alpha, pruning_by, pruning_max, pruning_step, pruning_number, acc_ratio, selection_split,
             published_number_offset)
    if pruning_number is None:
        check_selection_inputs("rnp", data, selection_split)
    device = resolve_device(model, device)
    start = time.perf_counter()
    unlearned = copy.deepcopy(model).to(device)
    for parameter in unlearned.parameters():
        parameter.requires_grad_(True)
    unlearning = unlearn(unlearned, data, epochs=int(unlearning_epochs), batch_size=int(batch_size),
                         lr=unlearning_lr, momentum=unlearning_momentum, weight_decay=unlearning_weight_decay,
                         schedule=list(schedule), clean_threshold=clean_threshold,
                         clip_grad_norm=unlearning_clip_grad_norm, device=device, seed=int(seed),
                         precision=data.precision, progress=progress)
    bns = attach_neuron_masks(unlearned)
    if not bns:
        raise ValueError("rnp needs a model with affine BatchNorm2d layers (it masks their channels); "
                         "use a data-free defense such as defense=otbr for this model")
    generator = torch.Generator().manual_seed(int(seed) + 1)
    recovery = recover_neuron_masks(unlearned, list(bns.values()), data, epochs=int(recovering_epochs),
                                    batch_size=int(batch_size), lr=recovering_lr, momentum=recovering_momentum,
                                    alpha=alpha, generator=generator, device=device, progress=progress)
    del unlearned
    pruned, pruning = prune_by_neuron_masks(model, bns, data, name="rnp", pruning_by=pruning_by,
                                            pruning_max=pruning_max, pruning_step=pruning_step,
                                            pruning_number=pruning_number, acc_ratio=acc_ratio,
                                            selection_split=selection_split,
                                            published_number_offset=published_number_offset, device=device,
                                            progress=progress)
    diagnostics = {
        "defense": "rnp",
        "batch_size": int(batch_size), "clean_threshold": clean_threshold, "alpha": alpha,
        "unlearning_clip_grad_norm": unlearning_clip_grad_norm, "acc_ratio": acc_ratio,
        "published_number_offset": bool(published_number_offset),
        "precision": {"unlearning": data.precision, "recovery": "fp32"},
        "clean_samples": len(data.clean),
        "unlearning": {"epochs_run": len(unlearning), "history": unlearning},
        "recovery": {"epochs_run": len(recovery), "history": recovery},
        **pruning,
        "rnp_seconds": time.perf_counter() - start,
    }
    return pruned, diagnostics
