"""ANP — Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021), as BackdoorBench's ``defense/anp.py`` runs it.

1. Every affine ``BatchNorm2d`` of a copy of the model gets a per-channel mask ``m`` (init 1) and noises
   ``d_w, d_b`` (:class:`MaskedBatchNorm2d`): BN affine = ``gamma * (m + d_w)``, ``beta * (1 + d_b)`` with
   noise on, ``gamma * m``, ``beta`` with noise off. Train mode (batch statistics) throughout.
2. ``iterations`` (2000) steps on batches of 256 clean images drawn with replacement, train transform:
   (a) :func:`neuron_perturbation_step`: noises reset to U[-eps, eps], then ``anp_steps`` ascent steps of
   size ``eps / anp_steps`` along the *sign* of the gradient of CE (no projection back to the eps-ball,
   as published); (b) :func:`mask_update_step`: ``alpha * CE(noise off) + (1 - alpha) * CE(noise on)``,
   SGD on the masks only (lr 0.01, momentum 0.9), masks clipped to [0, 1].
3. Mask values go through BackdoorBench's 4-decimal text round trip and are sorted ascending (stable: ties
   keep BN registration order, then channel).
4. Pruning a neuron = zeroing its BN weight ``gamma`` in a copy of the *original* model (bias, running
   statistics, convs, linear untouched). Thresholds ``0, 0.05, ..., 0.90`` prune cumulatively every
   neuron with mask <= threshold (:func:`sweep_counts`).
5. Selection (:func:`prune_and_select`): ``selection_split: test`` (published) keeps the threshold with the
   lowest test ASR whose relative test-ACC change is < ``acc_ratio`` (the unpruned model if none);
   ``validation`` keeps the largest threshold whose relative validation-accuracy change is < ``acc_ratio``
   (the validation protocol of Dunnett's BackdoorBench fork). ``pruning_number`` set: no sweep, the fixed
   threshold / number is pruned.

The masked BN, the mask-value round trip and the pruning sweep are shared with RNP (baselines/rnp.py).
"""
from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from baselines.base import defense
from bdcore.data import normalize

SELECTION_SPLITS = ("test", "validation")
PRUNING_BY = ("threshold", "number")


# --------------------------------------------------------------------------------------------------
# Shared checks and data helpers (also used by RNP)
# --------------------------------------------------------------------------------------------------

def require_clean_data(name: str, data) -> None:
    if data is None:
        raise ValueError(f"{name} needs clean data: use budget=ratio (the default) or budget=spc")


def check_choice(name: str, key: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} {key}={value!r} is not one of {', '.join(map(str, choices))}; "
                         f"e.g. defense.{key}={choices[0]}")


def check_selection_inputs(name: str, data, selection_split: str) -> None:
    """The split a sweep selects on must be there: test needs data.evaluate, validation data.validation."""
    if selection_split == "test" and data.evaluate is None:
        raise ValueError(f"{name} selection_split=test needs test-set metrics (data.evaluate); "
                         "use defense.selection_split=validation with a budget that has a validation split")
    if selection_split == "validation" and (data.validation is None or len(data.validation) == 0):
        raise ValueError(f"{name} selection_split=validation needs a validation split; use budget=spc or "
                         "budget.validation_ratio=0.1")


def resolve_device(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def training_batch(data, indices: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``indices`` of the (on-device) uint8 clean images with the train transform, normalised."""
    x = images[indices.to(images.device)]
    if data.augment is not None:
        x = data.augment(x, generator)
    return normalize(x, data.spec), labels[indices.to(labels.device)]


@torch.no_grad()
def clean_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, spec, device,
                   batch_size: int = 512) -> float:
    """Top-1 accuracy (%) in eval mode and fp32 (selection decisions never depend on autocast)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        x = normalize(images[start:start + batch_size].to(device), spec)
        correct += int((model(x).argmax(1).cpu() == labels[start:start + batch_size].cpu()).sum())
    model.train(was_training)
    return 100.0 * correct / len(labels) if len(labels) else float("nan")


# --------------------------------------------------------------------------------------------------
# Masked / noisy BatchNorm
# --------------------------------------------------------------------------------------------------

class MaskedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d with ANP's per-channel mask and multiplicative noises (BackdoorBench NoisyBatchNorm2d).

    Noise on: affine weight ``weight * (neuron_mask + neuron_noise)``, bias ``bias * (1 + neuron_noise_bias)``;
    noise off: ``weight * neuron_mask`` and ``bias * 1.0``. RNP's MaskBatchNorm2d is the noise-off case.
    Built from an existing BN (same statistics, affine parameters, eps, momentum).
    """

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                         device=bn.weight.device, dtype=bn.weight.dtype)
        self.load_state_dict(bn.state_dict())
        self.train(bn.training)
        like = dict(device=bn.weight.device, dtype=bn.weight.dtype)
        self.neuron_mask = nn.Parameter(torch.ones(bn.num_features, **like))
        self.neuron_noise = nn.Parameter(torch.zeros(bn.num_features, **like))
        self.neuron_noise_bias = nn.Parameter(torch.zeros(bn.num_features, **like))
        self.perturbed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if self.perturbed:
            weight_scale, bias_scale = self.neuron_mask + self.neuron_noise, 1.0 + self.neuron_noise_bias
        else:
            weight_scale, bias_scale = self.neuron_mask, 1.0
        keep_stats = not self.training or self.track_running_stats
        return F.batch_norm(x, self.running_mean if keep_stats else None, self.running_var if keep_stats else None,
                            self.weight * weight_scale, self.bias * bias_scale, batch_stats, factor, self.eps)


def attach_neuron_masks(model: nn.Module) -> dict[str, MaskedBatchNorm2d]:
    """Replace, in place, every affine BatchNorm2d of ``model`` by a :class:`MaskedBatchNorm2d`.

    Returns ``{bn_name: masked_bn}`` in registration order (the order of BackdoorBench's mask file).
    Only the masks and noises require gradients afterwards.
    """
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    masked = {}
    for name, module in list(model.named_modules()):
        if type(module) is nn.BatchNorm2d and module.affine:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            replacement = MaskedBatchNorm2d(module)
            replacement.weight.requires_grad_(False)
            replacement.bias.requires_grad_(False)
            setattr(parent, child, replacement)
            masked[name] = replacement
    return masked


def set_perturbed(bns, on: bool) -> None:
    for bn in bns:
        bn.perturbed = on


def reset_neuron_noise(bns, eps: float, generator: torch.Generator) -> None:
    """Noises ~ U[-eps, eps] drawn on the CPU generator, per BN: weight noise then bias noise."""
    with torch.no_grad():
        for bn in bns:
            for noise in (bn.neuron_noise, bn.neuron_noise_bias):
                noise.copy_(torch.empty(noise.shape, dtype=noise.dtype).uniform_(-eps, eps, generator=generator))


def clip_masks(bns) -> None:
    with torch.no_grad():
        for bn in bns:
            bn.neuron_mask.clamp_(0.0, 1.0)


def neuron_perturbation_step(model: nn.Module, bns, noise_optimizer: torch.optim.Optimizer, x: torch.Tensor,
                             y: torch.Tensor, eps: float, steps: int, generator: torch.Generator) -> None:
    """ANP step 1 (BackdoorBench ``mask_train``): random start, then ``steps`` signed ascent steps on CE.

    ``noise_optimizer`` is plain SGD over every noise with lr ``eps / steps``; descending ``-CE`` with
    sign gradients moves each noise by ``+-eps/steps``. No projection onto [-eps, eps] (published).
    """
    reset_neuron_noise(bns, eps, generator)
    for _ in range(steps):
        noise_optimizer.zero_grad()
        set_perturbed(bns, True)
        (-F.cross_entropy(model(x), y)).backward()
        for bn in bns:
            for noise in (bn.neuron_noise, bn.neuron_noise_bias):
                noise.grad = torch.sign(noise.grad)
        noise_optimizer.step()


def mask_update_step(model: nn.Module, bns, mask_optimizer: torch.optim.Optimizer, x: torch.Tensor,
                     y: torch.Tensor, alpha: float, eps: float) -> tuple[float, int]:
    """ANP step 2: ``alpha * CE(noise off) + (1 - alpha) * CE(noise on)``, one SGD step on the masks,
    masks clipped to [0, 1]. Returns ``(loss, correct predictions without noise)``."""
    mask_optimizer.zero_grad()
    if eps > 0:
        set_perturbed(bns, True)
        loss_robust = F.cross_entropy(model(x), y)
    else:
        loss_robust = 0.0
    set_perturbed(bns, False)
    logits = model(x)
    loss = alpha * F.cross_entropy(logits, y) + (1 - alpha) * loss_robust
    loss.backward()
    mask_optimizer.step()
    clip_masks(bns)
    return loss.item(), int((logits.detach().argmax(1) == y).sum())


def train_neuron_masks(model: nn.Module, bns, data, *, iterations: int, batch_size: int, mask_lr: float,
                       momentum: float, eps: float, steps: int, alpha: float, generator: torch.Generator,
                       device: torch.device, progress: bool = True) -> dict:
    """ANP's mask optimisation; returns a summary of the run.

    Its own small loop, not bdcore.train.train_model: each mask step needs an inner adversarial step on
    separate parameters (the noises, sign gradients, own optimiser), the masks must be projected onto
    [0, 1] after every step, and batches are drawn with replacement (BackdoorBench's RandomSampler).
    """
    model.train()
    mask_optimizer = torch.optim.SGD([bn.neuron_mask for bn in bns], lr=mask_lr, momentum=momentum)
    noises = [noise for bn in bns for noise in (bn.neuron_noise, bn.neuron_noise_bias)]
    noise_optimizer = torch.optim.SGD(noises, lr=eps / steps if steps > 0 else 0.0)
    images, labels = data.clean.images.to(device), data.clean.labels.to(device)
    loss_sum, correct, seen = 0.0, 0, 0
    for _ in tqdm(range(iterations), desc="anp masks", disable=not progress, mininterval=2.0, leave=False):
        idx = torch.randint(0, len(labels), (batch_size,), generator=generator)
        x, y = training_batch(data, idx, images, labels, generator)
        if eps > 0:
            neuron_perturbation_step(model, bns, noise_optimizer, x, y, eps, steps, generator)
        loss, right = mask_update_step(model, bns, mask_optimizer, x, y, alpha, eps)
        loss_sum, correct, seen = loss_sum + loss, correct + right, seen + len(y)
    return {"iterations": iterations, "mean_loss": loss_sum / max(iterations, 1),
            "train_acc": 100.0 * correct / seen if seen else None}


# --------------------------------------------------------------------------------------------------
# Mask values, pruning schedule, pruning
# --------------------------------------------------------------------------------------------------

def rounded_mask_values(bns: dict[str, MaskedBatchNorm2d], decimals: int = 4) -> list[tuple[str, int, float]]:
    """``(bn_name, channel, mask)`` in registration order, each mask passed through BackdoorBench's
    ``'{:.4f}'`` text file and read back as a float (``mask_values.txt``)."""
    values = []
    for name, bn in bns.items():
        for channel, value in enumerate(bn.neuron_mask.detach().cpu().tolist()):
            values.append((name, channel, float(format(value, f".{decimals}f"))))
    return values


def sort_mask_values(values: list[tuple[str, int, float]]) -> list[tuple[str, int, float]]:
    """Ascending by mask; Python's stable sort keeps file order (BN registration, channel) for ties."""
    return sorted(values, key=lambda v: float(v[2]))


def sweep_counts(sorted_values, pruning_by: str, pruning_max: float, pruning_step: float,
                 published_number_offset: bool = False) -> list[tuple[float, int]]:
    """``[(level, number of leading sorted neurons pruned at that level)]``, cumulative as published.

    threshold: levels ``np.arange(0, max + step, step)`` (0, 0.05, ..., 0.9 with float64 steps such as
    0.15000000000000002); a level prunes every neuron with mask <= level.
    number: levels ``range(0, ceil(max) + 1, ceil(step))``; level k prunes k neurons. The published code
    prunes one step further (``k + step``; a fixed number N therefore prunes 2N):
    ``published_number_offset=True``. Counts are capped at the number of neurons (the original raises).
    """
    total = len(sorted_values)
    rows = []
    if pruning_by == "threshold":
        start = 0
        for level in np.arange(0, pruning_max + pruning_step, pruning_step).tolist():
            while start < total and float(sorted_values[start][2]) <= level:
                start += 1
            rows.append((level, start))
    elif pruning_by == "number":
        step = int(np.ceil(pruning_step))
        for level in range(0, int(np.ceil(pruning_max)) + 1, step):
            rows.append((level, min(total, level + step if published_number_offset else level)))
    else:
        raise ValueError(f"pruning_by={pruning_by!r} is not one of threshold, number; "
                         "e.g. defense.pruning_by=threshold")
    return rows


def fixed_count(sorted_values, pruning_by: str, pruning_number: float, published_number_offset: bool = False) -> int:
    """Neurons pruned by the fixed ``pruning_number`` branch: threshold N prunes every mask <= N (the
    published sweep over [0, N]); number N prunes ceil(N), or 2 ceil(N) with ``published_number_offset``."""
    if pruning_by == "threshold":
        return sum(1 for v in sorted_values if float(v[2]) <= pruning_number)
    number = int(np.ceil(pruning_number))
    return min(len(sorted_values), 2 * number if published_number_offset else number)


@torch.no_grad()
def zero_bn_weights(model: nn.Module, neurons) -> None:
    """Prune in place: BN weight gamma of each ``(bn_name, channel, ...)`` set to 0 (bias kept)."""
    for neuron in neurons:
        model.get_submodule(neuron[0]).weight[int(neuron[1])] = 0.0


def relative_change(value: float, reference: float) -> float:
    """``|value - reference| / reference`` (published); a zero reference counts only equality as no change."""
    if reference == 0:
        return 0.0 if value == reference else math.inf
    return abs(value - reference) / reference


def select_by_test_asr(reference: dict, rows: list[dict], acc_ratio: float) -> int | None:
    """Published rule: the row with the lowest ASR (strictly below the best so far, starting from the
    unpruned model's) among rows whose relative test-ACC change is < acc_ratio; None = unpruned."""
    best, best_asr = None, reference["asr"]
    for i, row in enumerate(rows):
        if relative_change(row["acc"], reference["acc"]) < acc_ratio and row["asr"] < best_asr:
            best, best_asr = i, row["asr"]
    return best


def select_by_validation_accuracy(reference: dict, rows: list[dict], acc_ratio: float) -> int | None:
    """Validation rule: the last (largest) level whose relative validation-accuracy change is < acc_ratio."""
    best = None
    for i, row in enumerate(rows):
        if relative_change(row["val_acc"], reference["val_acc"]) < acc_ratio:
            best = i
    return best


def prune_and_select(model: nn.Module, sorted_values, data, *, name: str, pruning_by: str, pruning_max: float,
                     pruning_step: float, pruning_number, acc_ratio: float, selection_split: str,
                     published_number_offset: bool, device: torch.device,
                     progress: bool = True) -> tuple[nn.Module, dict]:
    """Prune a copy of ``model`` by the sorted mask values: the fixed ``pruning_number`` level, or the
    sweep level chosen on ``selection_split``. Returns ``(pruned eval-mode copy, diagnostics)``."""
    base = copy.deepcopy(model).to(device).eval()
    info = {"pruning_by": pruning_by, "pruning_number": pruning_number}
    if pruning_number is not None:
        count = fixed_count(sorted_values, pruning_by, pruning_number, published_number_offset)
        info.update({"selection_split": None, "selected_level": pruning_number})
    else:
        if selection_split == "test":
            def measure(m):
                return {k: float(v) for k, v in data.evaluate(m).items()}
        else:
            val_images, val_labels = data.validation.images.to(device), data.validation.labels
            def measure(m):
                return {"val_acc": clean_accuracy(m, val_images, val_labels, data.spec, device)}
        levels = sweep_counts(sorted_values, pruning_by, pruning_max, pruning_step, published_number_offset)
        reference = measure(base)
        work, done, rows = copy.deepcopy(base), 0, []
        for level, count in tqdm(levels, desc=f"{name} sweep", disable=not progress, leave=False):
            zero_bn_weights(work, sorted_values[done:count])
            done = count
            rows.append({"level": level, "pruned": count, **measure(work)})
        select = select_by_test_asr if selection_split == "test" else select_by_validation_accuracy
        chosen = select(reference, rows, acc_ratio)
        count = 0 if chosen is None else rows[chosen]["pruned"]
        info.update({"selection_split": selection_split, "unpruned": reference, "sweep": rows,
                     "selected_level": None if chosen is None else rows[chosen]["level"]})
    zero_bn_weights(base, sorted_values[:count])
    pruned = sorted_values[:count]
    per_layer: dict[str, int] = {}
    for layer, _, _ in pruned:
        per_layer[layer] = per_layer.get(layer, 0) + 1
    info.update({"selected_pruned": count, "pruned_per_layer": per_layer,
                 "pruned_neurons": [[layer, int(channel), value] for layer, channel, value in pruned]})
    return base.eval(), info


def mask_summary(values) -> dict:
    masks = np.array([v[2] for v in values], dtype=np.float64)
    if masks.size == 0:
        return {"neurons": 0}
    return {"neurons": int(masks.size), "min": float(masks.min()), "mean": float(masks.mean()),
            "max": float(masks.max()), "at_most_0.2": int((masks <= 0.2).sum()),
            "at_most_0.7": int((masks <= 0.7).sum())}


def prune_by_neuron_masks(model: nn.Module, bns: dict[str, MaskedBatchNorm2d], data, *, name: str, pruning_by: str,
                          pruning_max: float, pruning_step: float, pruning_number, acc_ratio: float,
                          selection_split: str, published_number_offset: bool, device: torch.device,
                          progress: bool = True) -> tuple[nn.Module, dict]:
    """Steps 3-5 (shared with RNP): the trained masks' rounded, sorted values prune a copy of the original
    ``model`` (:func:`prune_and_select`). Returns ``(pruned eval-mode copy, {"masks": summary, **selection})``."""
    values = sort_mask_values(rounded_mask_values(bns))
    pruned, selection = prune_and_select(model, values, data, name=name, pruning_by=pruning_by,
                                         pruning_max=pruning_max, pruning_step=pruning_step,
                                         pruning_number=pruning_number, acc_ratio=acc_ratio,
                                         selection_split=selection_split,
                                         published_number_offset=published_number_offset, device=device,
                                         progress=progress)
    return pruned, {"masks": mask_summary(values), **selection}


def check_option(name: str, ok: bool, key: str, value, expected: str) -> None:
    """One clear line naming the key, the value and what is allowed (with an example)."""
    if not ok:
        raise ValueError(f"{name} {key}={value!r} must be {expected}")


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_pruning_options(name: str, *, pruning_by: str, pruning_max: float, pruning_step: float,
                          pruning_number, acc_ratio: float, selection_split: str,
                          published_number_offset: bool) -> None:
    """The options of the mask-threshold sweep shared by ANP and RNP."""
    check_choice(name, "pruning_by", pruning_by, PRUNING_BY)
    check_option(name, is_number(pruning_max) and pruning_max >= 0, "pruning_max", pruning_max, ">= 0 (e.g. 0.9)")
    check_option(name, is_number(pruning_step) and pruning_step > 0, "pruning_step", pruning_step,
                 "> 0 (e.g. 0.05)")
    check_option(name, pruning_number is None or (is_number(pruning_number) and pruning_number >= 0),
                 "pruning_number", pruning_number, "null (sweep and select) or >= 0 (e.g. 0.7)")
    check_option(name, is_number(acc_ratio) and acc_ratio > 0, "acc_ratio", acc_ratio, "> 0 (e.g. 0.1)")
    check_choice(name, "selection_split", selection_split, SELECTION_SPLITS)
    check_option(name, isinstance(published_number_offset, bool), "published_number_offset",
                 published_number_offset, "true or false")


def validate(mask_lr: float = 0.01, momentum: float = 0.9, anp_eps: float = 0.4, anp_steps: int = 1,
             anp_alpha: float = 0.2, iterations: int = 2000, batch_size: int = 256, pruning_by: str = "threshold",
             pruning_max: float = 0.9, pruning_step: float = 0.05, pruning_number: float | None = None,
             acc_ratio: float = 0.1, selection_split: str = "test", published_number_offset: bool = False) -> None:
    """Raise one ValueError line for a hyper-parameter ANP cannot run with (before any work)."""
    check_option("anp", is_number(mask_lr) and mask_lr > 0, "mask_lr", mask_lr, "> 0 (e.g. 0.01)")
    check_option("anp", is_number(momentum) and 0 <= momentum < 1, "momentum", momentum, "in [0, 1) (e.g. 0.9)")
    check_option("anp", is_number(anp_eps) and anp_eps >= 0, "anp_eps", anp_eps, ">= 0 (e.g. 0.4)")
    check_option("anp", isinstance(anp_steps, int) and anp_steps >= 1, "anp_steps", anp_steps,
                 "an integer >= 1 (e.g. 1)")
    check_option("anp", is_number(anp_alpha) and 0 <= anp_alpha <= 1, "anp_alpha", anp_alpha, "in [0, 1] (e.g. 0.2)")
    check_option("anp", isinstance(iterations, int) and iterations >= 0, "iterations", iterations,
                 "an integer >= 0 (e.g. 2000)")
    check_option("anp", isinstance(batch_size, int) and batch_size >= 1, "batch_size", batch_size,
                 "an integer >= 1 (e.g. 256)")
    check_pruning_options("anp", pruning_by=pruning_by, pruning_max=pruning_max, pruning_step=pruning_step,
                          pruning_number=pruning_number, acc_ratio=acc_ratio, selection_split=selection_split,
                          published_number_offset=published_number_offset)


# --------------------------------------------------------------------------------------------------
# Defense entry point
# --------------------------------------------------------------------------------------------------

@defense(data_free=False, validate=validate)
def defend(model: nn.Module, data, *, seed: int = 0, device=None, mask_lr: float = 0.01, momentum: float = 0.9,
           anp_eps: float = 0.4, anp_steps: int = 1, anp_alpha: float = 0.2, iterations: int = 2000,
           batch_size: int = 256, pruning_by: str = "threshold", pruning_max: float = 0.9,
           pruning_step: float = 0.05, pruning_number: float | None = None, acc_ratio: float = 0.1,
           selection_split: str = "test", published_number_offset: bool = False,
           progress: bool = True) -> tuple[nn.Module, dict]:
    """ANP on ``data.clean``; returns ``(pruned copy of model in eval mode, diagnostics)``.

    Reads ``data.clean`` (mask optimisation, with ``data.augment``), and for the sweep either
    ``data.evaluate`` (``selection_split=test``) or ``data.validation`` (``validation``). The input model is
    not modified. Mask optimisation runs in fp32 (BackdoorBench forces AMP off for ANP).

    Diagnostics: the options, ``masks`` (summary), ``selection_split``, ``selected_level`` (threshold or
    number), ``selected_pruned``, ``pruned_per_layer``, ``pruned_neurons`` ([bn, channel, mask]), ``sweep``
    (per level: pruned count and test metrics or validation accuracy), ``unpruned`` and ``anp_seconds``.
    """
    require_clean_data("anp", data)
    validate(mask_lr, momentum, anp_eps, anp_steps, anp_alpha, iterations, batch_size, pruning_by, pruning_max,
             pruning_step, pruning_number, acc_ratio, selection_split, published_number_offset)
    if pruning_number is None:
        check_selection_inputs("anp", data, selection_split)
    device = resolve_device(model, device)
    start = time.perf_counter()
    masked_model = copy.deepcopy(model).to(device)
    bns = attach_neuron_masks(masked_model)
    if not bns:
        raise ValueError("anp needs a model with affine BatchNorm2d layers (it masks their channels); "
                         "use a data-free defense such as defense=otbr for this model")
    generator = torch.Generator().manual_seed(int(seed))
    training = train_neuron_masks(masked_model, list(bns.values()), data, iterations=int(iterations),
                                  batch_size=int(batch_size), mask_lr=mask_lr, momentum=momentum, eps=anp_eps,
                                  steps=int(anp_steps), alpha=anp_alpha, generator=generator, device=device,
                                  progress=progress)
    del masked_model
    pruned, pruning = prune_by_neuron_masks(model, bns, data, name="anp", pruning_by=pruning_by,
                                            pruning_max=pruning_max, pruning_step=pruning_step,
                                            pruning_number=pruning_number, acc_ratio=acc_ratio,
                                            selection_split=selection_split,
                                            published_number_offset=published_number_offset, device=device,
                                            progress=progress)
    diagnostics = {
        "defense": "anp",
        "mask_lr": mask_lr, "momentum": momentum, "anp_eps": anp_eps, "anp_steps": int(anp_steps),
        "anp_alpha": anp_alpha, "batch_size": int(batch_size), "acc_ratio": acc_ratio,
        "published_number_offset": bool(published_number_offset), "precision": "fp32",
        "clean_samples": len(data.clean), "mask_training": training,
        **pruning,
        "anp_seconds": time.perf_counter() - start,
    }
    return pruned, diagnostics
