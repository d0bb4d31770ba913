"""Grad-Prune — unlearning backdoors by gradient-based pruning (Dunnett et al., 2024), as its published
``grad-prune.py`` (``iterative_prune`` + ``fine_tuning``) runs it.

The defender holds a few clean images per class and a triggered copy of each (``data.apply_trigger``,
the attack's trigger function), relabelled to the true label; a validation split of both is held out
(samples-per-class budget, ``budget=spc``).

1. Pruning, one filter per round (:func:`iterative_prune`): gradients of the unlearning loss
   ``sum_batches CE(f(x_triggered), y_true)`` (Eq. 2) are accumulated over the training split; every
   4-D parameter (each conv, shortcut convs included) scores its filters by mean |gradient| (Eq. 3,
   :func:`filter_gradient_scores`); the global strict maximum (first in parameter order on ties) is
   pruned: its weights and, if the conv has one, its bias set to 0 (:func:`zero_filter`). After each round
   the validation split gives clean accuracy and the unlearning loss (sum of batch-mean CE on triggered
   images, true labels). Rounds continue while ``acc_0 - acc < accuracy_threshold`` (absolute, fractions)
   and the loss has improved within ``pruning_patience`` rounds; the result is the lowest-loss round within
   the accuracy budget (the unpruned model if none).
2. Fine-tuning (:func:`fine_tune`, bdcore.train.train_model): per batch ``CE(clean) + CE(triggered)``
   (true labels, no augmentation), SGD lr 1e-3, momentum 0.9, wd 5e-4, no scheduler, until the validation
   clean loss (sum of batch-mean CE) has not improved for ``tuning_patience`` epochs; the best epoch wins.

Published-code bugs and their switches (docs/fidelity.md): on bias-free convs (PreAct-ResNet18) the
published code zeroes "the next parameter" (a BN gamma, a shortcut filter or a classifier row):
``zero_next_param: true``. Its gradient pass leaves the model in eval mode after the first batch:
``score_bn_mode: published`` (default ``train``: every batch in train mode, as intended; identical when the
training split fits one batch of 128).

``selection_split: validation`` is the published protocol. ``test`` is an oracle variant for comparison
with BackdoorBench's test-selected baselines: the accuracy budget uses test ACC, the pruning loss is test
ASR and the fine-tuning loss is minus test ACC (all from ``data.evaluate``).
"""
from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from baselines.base import defense
from bdcore.data import ImageSet, normalize
from bdcore.train import TrainingHooks, TrainSettings, train_model

SELECTION_SPLITS = ("validation", "test")
SCORE_BN_MODES = ("train", "published", "eval")


def _check(ok: bool, key: str, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"gradprune {key}={value!r} must be {expected}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate(accuracy_threshold: float = 0.1, pruning_patience: int = 10, tuning_patience: int = 10,
             batch_size: int = 128, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 5e-4,
             max_tuning_epochs: int = 1000, selection_split: str = "validation", zero_next_param: bool = False,
             score_bn_mode: str = "train", exclude_pruned: bool = False, keep_pruned_zero: bool = False) -> None:
    """Raise one ValueError line for a hyper-parameter Grad-Prune cannot run with (before any work)."""
    _check(_is_number(accuracy_threshold) and accuracy_threshold > 0, "accuracy_threshold", accuracy_threshold,
           "> 0, an absolute drop of accuracy fractions (e.g. 0.1)")
    for key, value in (("pruning_patience", pruning_patience), ("tuning_patience", tuning_patience)):
        _check(isinstance(value, int) and value >= 0, key, value, "an integer >= 0 (e.g. 10)")
    _check(isinstance(batch_size, int) and batch_size >= 1, "batch_size", batch_size, "an integer >= 1 (e.g. 128)")
    _check(_is_number(lr) and lr > 0, "lr", lr, "> 0 (e.g. 1.0e-3)")
    _check(_is_number(momentum) and 0 <= momentum < 1, "momentum", momentum, "in [0, 1) (e.g. 0.9)")
    _check(_is_number(weight_decay) and weight_decay >= 0, "weight_decay", weight_decay, ">= 0 (e.g. 5.0e-4)")
    _check(isinstance(max_tuning_epochs, int) and max_tuning_epochs >= 1, "max_tuning_epochs", max_tuning_epochs,
           "an integer >= 1 (e.g. 1000)")
    _check(selection_split in SELECTION_SPLITS, "selection_split", selection_split,
           f"one of {', '.join(SELECTION_SPLITS)} (e.g. validation)")
    _check(score_bn_mode in SCORE_BN_MODES, "score_bn_mode", score_bn_mode,
           f"one of {', '.join(SCORE_BN_MODES)} (e.g. train)")
    for key, value in (("zero_next_param", zero_next_param), ("exclude_pruned", exclude_pruned),
                       ("keep_pruned_zero", keep_pruned_zero)):
        _check(isinstance(value, bool), key, value, "true or false")


def check_inputs(data, selection_split: str) -> None:
    if data is None:
        raise ValueError("gradprune needs clean data: use budget=ratio (the default) or budget=spc")
    if data.apply_trigger is None:
        raise ValueError("gradprune needs the attack's trigger function (data.apply_trigger) to make triggered "
                         "copies of the clean images; the pipeline passes attack.apply_trigger")
    if selection_split == "validation" and (data.validation is None or len(data.validation) == 0):
        raise ValueError("gradprune selection_split=validation needs a validation split: use budget=spc "
                         "(Grad-Prune's budgets) or budget.validation_ratio=0.1")
    if selection_split == "test" and data.evaluate is None:
        raise ValueError("gradprune selection_split=test needs test-set metrics (data.evaluate); "
                         "use defense.selection_split=validation")


def triggered_copies(apply_trigger, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The defender's backdoor copies of ``images`` (uint8), same shape; labels stay the true ones."""
    triggered = apply_trigger(images.clone(), labels.clone())
    if triggered.dtype != torch.uint8 or triggered.shape != images.shape:
        raise ValueError(f"gradprune: apply_trigger returned {triggered.dtype} {tuple(triggered.shape)}, expected "
                         f"uint8 {tuple(images.shape)}")
    return triggered


# --------------------------------------------------------------------------------------------------
# Scoring and pruning
# --------------------------------------------------------------------------------------------------

def accumulate_unlearning_gradients(model: nn.Module, triggered: torch.Tensor, labels: torch.Tensor, spec, *,
                                    batch_size: int, generator: torch.Generator, bn_mode: str) -> float:
    """``.grad`` of every parameter = gradient of the sum over shuffled batches of the batch-mean
    ``CE(f(x_triggered), y_true)`` (Eq. 2). ``bn_mode``: train = every batch in train mode; published =
    only the first (the original leaves the model in eval mode after it); eval = none. Returns the loss."""
    model.zero_grad(set_to_none=True)
    order = torch.randperm(len(labels), generator=generator)
    total = 0.0
    for number, start in enumerate(range(0, len(labels), batch_size)):
        model.train(bn_mode == "train" or (bn_mode == "published" and number == 0))
        idx = order[start:start + batch_size].to(labels.device)
        loss = F.cross_entropy(model(normalize(triggered[idx], spec)), labels[idx])
        loss.backward()
        total += loss.item()
    model.eval()
    return total


def filter_gradient_scores(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Eq. 3 for every 4-D parameter with a gradient, in parameter order: ``(name, mean |grad| per filter)``."""
    scored = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and parameter.grad is not None and parameter.grad.dim() == 4:
            scored.append((name, parameter.grad.detach().abs().reshape(parameter.shape[0], -1).mean(dim=1)))
    return scored


def select_filter(scored, excluded: set[tuple[str, int]] | frozenset = frozenset()) -> tuple[str, int, float] | None:
    """The published choice: the strict global maximum score above 0, scanning parameters in order, so the
    first parameter (then the first filter) wins a tie. ``excluded`` filters are skipped. None if no
    score is positive (the original then fails with a TypeError)."""
    best_value, best = 0.0, None
    for name, scores in scored:
        scores = torch.nan_to_num(scores.float().cpu(), nan=-math.inf)
        for f in (f for (n, f) in excluded if n == name):
            scores[f] = -math.inf
        value, index = torch.max(scores, dim=0)
        if value.item() > best_value:
            best_value, best = value.item(), (name, int(index), value.item())
    return best


@torch.no_grad()
def zero_filter(model: nn.Module, name: str, filter_index: int,
                zero_next_param: bool = False) -> list[tuple[str, int]]:
    """Prune filter ``filter_index`` of parameter ``name``; returns the zeroed ``(parameter, row)`` pairs.

    Default (the paper): the filter's weights and, when its module has one, its bias. ``zero_next_param``
    (the published code): the filter and row ``filter_index`` of the *next* parameter in registration order,
    whatever it is (skipped when that parameter has too few rows; the original raises IndexError).
    """
    zeroed = [(name, filter_index)]
    parameters = list(model.named_parameters())
    position = next(i for i, (n, _) in enumerate(parameters) if n == name)
    parameters[position][1][filter_index] = 0.0
    if zero_next_param:
        if position + 1 < len(parameters) and filter_index < parameters[position + 1][1].shape[0]:
            next_name, next_param = parameters[position + 1]
            next_param[filter_index] = 0.0
            zeroed.append((next_name, filter_index))
        return zeroed
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    bias = getattr(module, "bias", None)
    if attribute == "weight" and isinstance(bias, torch.Tensor) and bias.shape[:1] == parameters[position][1].shape[:1]:
        bias[filter_index] = 0.0
        zeroed.append((f"{module_name + '.' if module_name else ''}bias", filter_index))
    return zeroed


@torch.no_grad()
def split_losses(model: nn.Module, clean: torch.Tensor, triggered: torch.Tensor | None, labels: torch.Tensor, spec,
                 batch_size: int) -> dict:
    """Eval-mode fp32 pass over a split in stored order: ``accuracy`` (fraction, float64 as published),
    ``clean_loss`` and ``unlearning_loss`` (each the sum of batch-mean CE, the published loss)."""
    model.eval()
    correct, clean_loss, unlearning_loss = 0, 0.0, 0.0
    for start in range(0, len(labels), batch_size):
        y = labels[start:start + batch_size]
        logits = model(normalize(clean[start:start + batch_size], spec))
        correct += int((logits.argmax(1) == y).sum())
        clean_loss += F.cross_entropy(logits, y).item()
        if triggered is not None:
            unlearning_loss += F.cross_entropy(model(normalize(triggered[start:start + batch_size], spec)), y).item()
    return {"accuracy": correct / len(labels), "clean_loss": clean_loss,
            "unlearning_loss": unlearning_loss if triggered is not None else None}


def iterative_prune(model: nn.Module, train_triggered: torch.Tensor, train_labels: torch.Tensor, spec, measure, *,
                    accuracy_threshold: float, patience_limit: int, batch_size: int, generator: torch.Generator,
                    bn_mode: str, zero_next_param: bool, exclude_pruned: bool,
                    progress: bool = True) -> tuple[nn.Module, dict]:
    """Grad-Prune stage 1 on ``model`` (modified in place); returns ``(best pruned copy, info)``.

    ``measure(model) -> (accuracy fraction, loss)`` is the selection split's view (validation: clean
    accuracy and unlearning loss). The loop and the keep-best rule are the published ones, float
    comparisons included: continue while ``acc_0 - acc < threshold and patience < limit``; a round is the
    new best iff its loss is below the best so far and ``acc_0 - acc < threshold``.
    """
    acc_0, loss_0 = measure(model)
    best_loss, best_state, best_round = loss_0, copy.deepcopy(model.state_dict()), 0
    accuracy, patience, rounds, stop = acc_0, 0, [], None
    pruned: set[tuple[str, int]] = set()
    bar = tqdm(desc="gradprune prune", disable=not progress, mininterval=2.0, leave=False)
    while accuracy_0_drop(acc_0, accuracy) < accuracy_threshold and patience < patience_limit:
        unlearning_loss = accumulate_unlearning_gradients(model, train_triggered, train_labels, spec,
                                                          batch_size=batch_size, generator=generator, bn_mode=bn_mode)
        choice = select_filter(filter_gradient_scores(model), pruned if exclude_pruned else frozenset())
        model.zero_grad(set_to_none=True)
        if choice is None:
            stop = "no positive gradient score"
            break
        name, filter_index, score = choice
        zeroed = zero_filter(model, name, filter_index, zero_next_param)
        pruned.add((name, filter_index))
        accuracy, loss = measure(model)
        improved = loss < best_loss and accuracy_0_drop(acc_0, accuracy) < accuracy_threshold
        if improved:
            best_loss, best_state, best_round, patience = loss, copy.deepcopy(model.state_dict()), len(rounds) + 1, 0
        else:
            patience += 1
        rounds.append({"round": len(rounds) + 1, "param": name, "filter": filter_index, "score": score,
                       "zeroed": [list(z) for z in zeroed], "train_unlearning_loss": unlearning_loss,
                       "accuracy": accuracy, "loss": loss, "best": improved})
        bar.update(1)
        bar.set_postfix(acc=f"{accuracy:.3f}", loss=f"{loss:.3f}")
    bar.close()
    if stop is None:
        stop = "patience" if patience >= patience_limit else "accuracy"
    best = copy.deepcopy(model)
    best.load_state_dict(best_state)
    best_filters = sorted({(r["param"], r["filter"]) for r in rounds[:best_round]})
    best_zeroed = sorted({tuple(z) for r in rounds[:best_round] for z in r["zeroed"]})
    return best.eval(), {"initial": {"accuracy": acc_0, "loss": loss_0}, "rounds": rounds, "best_round": best_round,
                         "best_loss": best_loss, "stop": stop, "pruned_filters": [list(f) for f in best_filters],
                         "zeroed_rows": [list(z) for z in best_zeroed]}


def accuracy_0_drop(acc_0: float, accuracy: float) -> float:
    """The published absolute drop ``acc_0 - acc`` of accuracy fractions (float64, compared as is)."""
    return acc_0 - accuracy


def fine_tune(model: nn.Module, clean: torch.Tensor, triggered: torch.Tensor, labels: torch.Tensor, spec,
              loss_fn, *, patience_limit: int, max_epochs: int, batch_size: int, lr: float, momentum: float,
              weight_decay: float, frozen_filters, device: torch.device, seed: int, precision: str,
              progress: bool = True) -> tuple[nn.Module, dict]:
    """Grad-Prune stage 2 with bdcore.train.train_model; returns ``(best-epoch copy, info)``.

    Per batch the loss is ``CE(clean) + CE(triggered)`` with true labels, each its own forward pass (own
    BN batch statistics), summed gradients, one step, as published. The one loop sees one image per
    sample, so each clean image and its triggered copy travel stacked along the height; ``batch_transform``
    splits them again. ``loss_fn(model)`` (lower is better) is checked after every epoch; training stops
    when it has not improved for ``patience_limit`` epochs (or after ``max_epochs``). ``frozen_filters``:
    ``(param, row)`` pairs whose gradient is zeroed so pruned rows stay exactly 0 (zero weight, zero
    gradient: weight decay and momentum add nothing); None = published, they may regrow.
    """
    height = clean.shape[2]
    paired = ImageSet(torch.cat([clean, triggered], dim=2), labels)
    stash: dict[str, torch.Tensor] = {}
    best = {"loss": loss_fn(model), "state": copy.deepcopy(model.state_dict()), "epoch": None}
    history, patience = [], [0]
    named = dict(model.named_parameters())

    def split_pair(x, y, epoch):
        stash["triggered"] = x[:, :, height:]
        return x[:, :, :height], y

    def triggered_loss(m, x, y, logits, epoch):
        return F.cross_entropy(m(stash["triggered"]), y)

    def freeze_pruned(m, recompute_loss):
        for name, f in frozen_filters or ():
            if named[name].grad is not None:
                named[name].grad[f] = 0.0

    def after_epoch(epoch):
        loss = loss_fn(model)
        history.append({"epoch": epoch, "loss": loss})
        if loss < best["loss"]:
            best.update(loss=loss, state=copy.deepcopy(model.state_dict()), epoch=epoch)
            patience[0] = 0
        else:
            patience[0] += 1
        return patience[0] >= patience_limit  # True stops train_model after this epoch

    settings = TrainSettings(epochs=max_epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                             weight_decay=weight_decay, scheduler="constant", augment=False,
                             drop_last=False)
    hooks = TrainingHooks(batch_transform=split_pair, extra_loss=triggered_loss,
                          before_optimizer_step=freeze_pruned if frozen_filters else None, on_epoch_end=after_epoch)
    if patience_limit > 0:
        train_model(model, paired, spec, settings, device=device, seed=seed, hooks=hooks, progress=progress,
                    description="gradprune fine-tune", precision=precision)
    exhausted = patience_limit > 0 and patience[0] >= patience_limit
    tuned = copy.deepcopy(model)
    tuned.load_state_dict(best["state"])
    return tuned.eval(), {"epochs_run": len(history), "best_epoch": best["epoch"], "best_loss": best["loss"],
                          "stopped_by_patience": exhausted, "history": history}


# --------------------------------------------------------------------------------------------------
# Defense entry point
# --------------------------------------------------------------------------------------------------

@defense(data_free=False, validate=validate)
def defend(model: nn.Module, data, *, seed: int = 0, device=None, accuracy_threshold: float = 0.1,
           pruning_patience: int = 10, tuning_patience: int = 10, batch_size: int = 128, lr: float = 1e-3,
           momentum: float = 0.9, weight_decay: float = 5e-4, max_tuning_epochs: int = 1000,
           selection_split: str = "validation", zero_next_param: bool = False, score_bn_mode: str = "train",
           exclude_pruned: bool = False, keep_pruned_zero: bool = False,
           progress: bool = True) -> tuple[nn.Module, dict]:
    """Grad-Prune on ``data.clean`` + its triggered copies; returns ``(defended copy in eval mode, diagnostics)``.

    Reads ``data.clean`` (gradients, fine-tuning), ``data.apply_trigger`` (triggered copies of the clean
    and validation images) and ``data.validation`` (``selection_split=validation``) or ``data.evaluate``
    (``test``). Fine-tuning uses ``data.precision``; scoring and selection run in fp32. The input model
    is not modified. ``exclude_pruned``: never re-select a pruned filter (published: may, wasting a round);
    ``keep_pruned_zero``: pruned filters stay 0 during fine-tuning (published: they may regrow).

    Diagnostics: the options, ``pruning`` (initial split metrics, per round the pruned filter, its score,
    what was zeroed, split accuracy and loss; ``best_round``, ``stop`` reason, ``pruned_filters``),
    ``fine_tuning`` (epochs, best epoch, per-epoch split loss), ``gradprune_seconds``.
    """
    check_inputs(data, selection_split)
    validate(accuracy_threshold, pruning_patience, tuning_patience, batch_size, lr, momentum, weight_decay,
             max_tuning_epochs, selection_split, zero_next_param, score_bn_mode, exclude_pruned, keep_pruned_zero)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    start = time.perf_counter()
    spec = data.spec
    train_clean = data.clean.images.to(device)
    train_labels = data.clean.labels.to(device)
    train_triggered = triggered_copies(data.apply_trigger, data.clean.images, data.clean.labels).to(device)
    if selection_split == "validation":
        val_clean, val_labels = data.validation.images.to(device), data.validation.labels.to(device)
        val_triggered = triggered_copies(data.apply_trigger, data.validation.images, data.validation.labels).to(device)

        def prune_measure(m):
            metrics = split_losses(m, val_clean, val_triggered, val_labels, spec, batch_size)
            return metrics["accuracy"], metrics["unlearning_loss"]

        def tune_loss(m):
            return split_losses(m, val_clean, None, val_labels, spec, batch_size)["clean_loss"]
    else:
        def prune_measure(m):
            metrics = data.evaluate(m)
            return metrics["acc"] / 100.0, metrics["asr"] / 100.0

        def tune_loss(m):
            return -data.evaluate(m)["acc"] / 100.0

    working = copy.deepcopy(model).to(device).eval()
    for parameter in working.parameters():
        parameter.requires_grad_(True)
    generator = torch.Generator().manual_seed(int(seed))
    pruned, pruning = iterative_prune(working, train_triggered, train_labels, spec, prune_measure,
                                      accuracy_threshold=accuracy_threshold, patience_limit=int(pruning_patience),
                                      batch_size=int(batch_size), generator=generator, bn_mode=score_bn_mode,
                                      zero_next_param=zero_next_param, exclude_pruned=exclude_pruned,
                                      progress=progress)
    del working
    frozen = [tuple(z) for z in pruning["zeroed_rows"]] if keep_pruned_zero else None
    tuned, tuning = fine_tune(pruned, train_clean, train_triggered, train_labels, spec, tune_loss,
                              patience_limit=int(tuning_patience), max_epochs=int(max_tuning_epochs),
                              batch_size=int(batch_size), lr=lr, momentum=momentum, weight_decay=weight_decay,
                              frozen_filters=frozen, device=device, seed=int(seed), precision=data.precision,
                              progress=progress)
    for parameter, original in zip(tuned.parameters(), model.parameters()):
        parameter.requires_grad_(original.requires_grad)
    diagnostics = {
        "defense": "gradprune",
        "selection_split": selection_split, "accuracy_threshold": accuracy_threshold,
        "pruning_patience": int(pruning_patience), "tuning_patience": int(tuning_patience),
        "batch_size": int(batch_size), "lr": lr, "zero_next_param": bool(zero_next_param),
        "score_bn_mode": score_bn_mode, "exclude_pruned": bool(exclude_pruned),
        "keep_pruned_zero": bool(keep_pruned_zero),
        "precision": {"fine_tuning": data.precision, "scoring": "fp32"},
        "clean_samples": len(data.clean),
        "validation_samples": None if data.validation is None else len(data.validation),
        "pruning": pruning, "fine_tuning": tuning,
        "selected_round": pruning["best_round"], "pruned_count": len(pruning["pruned_filters"]),
        "gradprune_seconds": time.perf_counter() - start,
    }
    return tuned, diagnostics
