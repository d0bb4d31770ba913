"""FP — Fine-Pruning (Liu et al., RAID 2018) as BackdoorBench runs it (``defense/fp.py``).

1. Mean activation, over the clean budget, of the input of the model's last child module (for
   PreAct-ResNet18 the pooled layer4 feature entering ``linear``; it can be negative). The budget passes
   through the train transform in a shuffled order, the model in eval mode; the sum of each batch is
   divided by the budget size and accumulated. Channels are ranked by ``argsort`` (least active first).
2. Pruning zeroes *columns* of the first ``nn.Linear`` of that last child (the classifier inputs), never
   conv filters. Levels ``num_pruned = 0, s, 2s, ...`` below the channel count, ``s = ceil(D *
   once_prune_ratio)``; at each level the accuracy is measured and pruning stops at the first level whose
   relative change ``|acc - acc_0| / acc_0`` reaches ``acc_ratio`` (a rise counts too).
3. The masked model is fine-tuned (the mask stays applied, pruned columns stay zero) with FT's schedule;
   the mask is then folded into the weight, so the result has the input's architecture and state-dict keys.

Selection (``selection_split``): ``test`` (BackdoorBench's, the default) measures the accuracy with
``data.evaluate`` (clean test ACC; ASR / RA recorded beside it); ``validation`` measures clean accuracy on
``data.validation``, a split held out of the budget.

Published bugs (``published_bugs: true`` restores them; docs/methods/defenses.md):
* off-by-one: a level ``num_pruned`` zeroes only ``num_pruned - 1`` columns;
* aliasing: the model it fine-tunes is the same object it keeps pruning, so it carries the mask of the
  first level that *violated* the rule (or of the last level if none did), not the last acceptable one.
By default a level prunes exactly ``num_pruned`` columns and the last acceptable level is fine-tuned.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune
from tqdm.auto import tqdm

from baselines.base import defense
from baselines.finetune import (Stopwatch, check, clean_accuracy, finetune_settings, history_summary,
                                require_clean_data, require_finite, resolve_device, train_on_clean,
                                validate_schedule)
from bdcore.data import DatasetSpec, ImageSet, normalize

SELECTION_SPLITS = ("test", "validation")


# --------------------------------------------------------------------------------------------------
# pure pieces
# --------------------------------------------------------------------------------------------------

def last_child_linear(model: nn.Module) -> tuple[str, nn.Module, str, nn.Linear]:
    """``(last_child_name, last_child, linear_name, linear)``: FP hooks the input of the model's last child
    and prunes the first ``nn.Linear`` inside it (the child itself for PreAct-ResNet18's ``linear``)."""
    children = list(model.named_children())
    if not children:
        raise ValueError("fp needs a model with child modules ending in a classifier (nn.Linear)")
    child_name, child = children[-1]
    for name, module in child.named_modules():
        if isinstance(module, nn.Linear):
            return child_name, child, f"{child_name}.{name}" if name else child_name, module
    raise ValueError(f"fp prunes the first nn.Linear of the model's last child, but {child_name} "
                     f"({type(child).__name__}) holds none; FP supports classifiers ending in a Linear")


@torch.no_grad()
def mean_last_child_input(model: nn.Module, clean: ImageSet, spec: DatasetSpec, *, batch_size: int,
                          device: torch.device, seed: int, augment=None) -> torch.Tensor:
    """Mean over ``clean`` of the last child's input, per channel (BackdoorBench's accumulation: each
    batch's sum divided by the budget size, added up in a shuffled order). Model in eval mode."""
    _, child, _, _ = last_child_linear(model)
    captured = {}
    handle = child.register_forward_hook(lambda module, inputs, output: captured.__setitem__("x", inputs[0]))
    was_training = model.training
    model.eval()
    try:
        n = len(clean)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        aug_gen = torch.Generator().manual_seed(seed + 1)
        activation = None
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            x = clean.images[idx].to(device)
            if augment is not None:
                x = augment(x, aug_gen)
            model(normalize(x, spec))
            batch_sum = captured["x"].float().sum(dim=0) / n
            activation = batch_sum if activation is None else activation + batch_sum
    finally:
        handle.remove()
        model.train(was_training)
    return activation


def activation_order(activation: torch.Tensor) -> torch.Tensor:
    """Channels, least active first (``torch.argsort``, as published: not stable, ties in argsort's order)."""
    return torch.argsort(activation)


def pruning_levels(num_channels: int, once_prune_ratio: float) -> list[int]:
    """``num_pruned`` of every level tried: ``range(0, D, ceil(D * once_prune_ratio))`` (0 = unpruned)."""
    step = math.ceil(num_channels * once_prune_ratio)
    return list(range(0, num_channels, step))


def channels_to_prune(order: torch.Tensor, num_pruned: int, published_bugs: bool = False) -> torch.Tensor:
    """The channels a level zeroes: the ``num_pruned`` least active ones, or (published off-by-one)
    ``order[0 : num_pruned - 1]`` for ``num_pruned > 0``."""
    if num_pruned <= 0:
        return order[:0]
    return order[:num_pruned - 1] if published_bugs else order[:num_pruned]


def column_mask(weight: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask of ``weight``'s shape with the given input columns zeroed."""
    mask = torch.ones_like(weight)
    mask[:, channels.to(weight.device)] = 0
    return mask


def accuracy_kept(acc: float, reference: float, acc_ratio: float) -> bool:
    """BackdoorBench's rule: ``|acc - acc_0| / acc_0 < acc_ratio`` (strict; a rise also counts). With
    ``acc_0 = 0`` (where it would divide by zero) only an accuracy of exactly 0 is kept."""
    if reference == 0:
        return acc == 0
    return abs(acc - reference) / reference < acc_ratio


def final_level(kept: list[bool], published_bugs: bool = False) -> int:
    """Index of the level the fine-tuned model carries, given ``kept`` of every level evaluated (the loop
    stops after the first ``False``). Default: the last kept level. Published (aliasing): the last level
    evaluated, i.e. the first violating one, or the last level when none violated."""
    if published_bugs:
        return len(kept) - 1
    last = 0
    for index, ok in enumerate(kept):
        if not ok:
            break
        last = index
    return last


# --------------------------------------------------------------------------------------------------
# validation of the hyper-parameters
# --------------------------------------------------------------------------------------------------

def validate(acc_ratio: float = 0.1, once_prune_ratio: float = 0.01, selection_split: str = "test",
             published_bugs: bool = False, epochs: int = 100, batch_size: int = 256, lr: float = 0.01,
             momentum: float = 0.9, weight_decay: float = 5e-4, scheduler: str = "cosine",
             t_max: int = 100) -> None:
    check(isinstance(acc_ratio, (int, float)) and 0 < acc_ratio, "acc_ratio", acc_ratio, "a number > 0 (e.g. 0.1)")
    check(isinstance(once_prune_ratio, (int, float)) and 0 < once_prune_ratio <= 1, "once_prune_ratio",
          once_prune_ratio, "in (0, 1] (e.g. 0.01)")
    check(selection_split in SELECTION_SPLITS, "selection_split", selection_split,
          f"one of {', '.join(SELECTION_SPLITS)} (e.g. test)")
    check(isinstance(published_bugs, bool), "published_bugs", published_bugs, "true or false")
    validate_schedule(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
                      scheduler=scheduler, t_max=t_max)


def _measure(data, selection_split: str, device: torch.device):
    """The accuracy probe of the pruning search: ``model -> {"acc": ...}`` (+ asr / ra on the test split)."""
    if selection_split == "test":
        if data.evaluate is None:
            raise ValueError("fp selection_split=test needs the test evaluator (data.evaluate is None); "
                             "use defense.selection_split=validation")
        return lambda model: {k: float(v) for k, v in data.evaluate(model).items() if k in ("acc", "asr", "ra")}
    if data.validation is None or len(data.validation) == 0:
        raise ValueError("fp selection_split=validation needs a validation split held out of the budget "
                         "(data.validation is empty); use defense.selection_split=test")
    return lambda model: {"acc": clean_accuracy(model, data.validation, data, device)}


# --------------------------------------------------------------------------------------------------
# defense entry point
# --------------------------------------------------------------------------------------------------

@defense(data_free=False, validate=validate)
def defend(model: nn.Module, data, *, seed: int = 0, device=None, progress: bool = True, acc_ratio: float = 0.1,
           once_prune_ratio: float = 0.01, selection_split: str = "test", published_bugs: bool = False,
           epochs: int = 100, batch_size: int = 256, lr: float = 0.01, momentum: float = 0.9,
           weight_decay: float = 5e-4, scheduler: str = "cosine", t_max: int = 100) -> tuple[nn.Module, dict]:
    """Fine-Pruning of a deep copy of ``model``; the input model is not modified.

    Diagnostics: ``selection_split``, ``selected_num_pruned`` (the level fine-tuned) and ``pruned`` (columns
    actually zeroed), ``pruned_channels``, ``levels`` (every level evaluated with its metrics and whether
    it kept the accuracy), ``stopped`` (``accuracy`` or ``all levels kept``), the fine-tuning history and
    ``prune_seconds`` / ``finetune_seconds`` / ``fp_seconds``.
    """
    data = require_clean_data(data, "fp")
    validate(acc_ratio, once_prune_ratio, selection_split, published_bugs, epochs, batch_size, lr, momentum,
             weight_decay, scheduler, t_max)
    device = resolve_device(model, device)
    measure = _measure(data, selection_split, device)
    pruned = copy.deepcopy(model).to(device).eval()
    _, _, linear_name, linear = last_child_linear(pruned)

    with Stopwatch() as prune_clock:
        activation = mean_last_child_input(pruned, data.clean, data.spec, batch_size=batch_size, device=device,
                                           seed=seed, augment=data.augment)
        order = activation_order(activation)
        if len(order) != linear.in_features:
            raise ValueError(f"fp: the last child's input has {len(order)} channels but {linear_name} takes "
                             f"{linear.in_features} inputs; FP needs the Linear to read that input directly")
        original = linear.weight.detach().clone()
        levels, kept = [], []
        for num_pruned in tqdm(pruning_levels(len(order), once_prune_ratio), desc="fp prune", leave=False,
                               disable=not progress, mininterval=2.0):
            channels = channels_to_prune(order, num_pruned, published_bugs)
            with torch.no_grad():
                linear.weight.copy_(original * column_mask(original, channels))
            metrics = measure(pruned)
            reference = metrics["acc"] if not levels else levels[0]["acc"]
            ok = accuracy_kept(metrics["acc"], reference, acc_ratio)
            levels.append({"num_pruned": num_pruned, "pruned": int(channels.numel()), **metrics, "kept": ok})
            kept.append(ok)
            if not ok:
                break
        chosen = final_level(kept, published_bugs)
        num_pruned = levels[chosen]["num_pruned"]
        channels = channels_to_prune(order, num_pruned, published_bugs)
        mask = column_mask(original, channels)
        with torch.no_grad():
            linear.weight.copy_(original)
        # the mask stays applied while fine-tuning (weight = weight_orig * weight_mask), as published
        torch_prune.custom_from_mask(linear, name="weight", mask=mask)

    settings = finetune_settings(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                                 weight_decay=weight_decay, scheduler=scheduler, t_max=t_max,
                                 augment=data.augment is not None)
    with Stopwatch() as tune_clock:
        history = train_on_clean(pruned, data, settings, device=device, seed=seed + 2, progress=progress,
                                 description="fp fine-tune")
    torch_prune.remove(linear, "weight")  # fold the mask in: same architecture and keys as the input
    pruned.eval()
    require_finite(pruned, "fp")

    return pruned, {
        "defense": "fp",
        "clean_samples": len(data.clean),
        "selection_split": selection_split,
        "published_bugs": published_bugs,
        "pruned_layer": linear_name,
        "channels": len(order),
        "step": math.ceil(len(order) * once_prune_ratio),
        "acc_ratio": acc_ratio,
        "selected_num_pruned": num_pruned,
        "pruned": int(channels.numel()),
        "pruned_channels": [int(c) for c in channels.tolist()],
        "stopped": "accuracy" if not kept[-1] else "all levels kept",
        "levels": levels,
        "history": history_summary(history),
        "prune_seconds": prune_clock.seconds,
        "finetune_seconds": tune_clock.seconds,
        "fp_seconds": prune_clock.seconds + tune_clock.seconds,
    }
