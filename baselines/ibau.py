"""i-BAU — implicit backdoor adversarial unlearning (Zeng et al., ICLR 2022), as BackdoorBench's
``defense/i-bau.py`` runs it.

The model stays in eval mode throughout (BN statistics frozen). The clean budget is batched once with the
train transform and those batches are cached. Then, for each of ``n_rounds`` (5) rounds:

a. :func:`universal_perturbation`: a zero-initialised perturbation ``delta`` (C x H x W, in normalised
   input space) takes one SGD step (lr 10) per batch of a fresh pass over the budget, minimising
   ``-CE(f(x + delta), argmax f(x)) + 0.001 ||delta||^2``. No l2-ball projection (BackdoorBench comments
   the original's ``min(1, 10 / ||delta||)`` out; ``perturbation_l2_bound: 10`` restores it).
b. For every cached batch: the implicit hypergradient (:func:`implicit_hypergradient`) of the outer loss
   ``CE(f(x_b + patch), y_b)`` — ``delta`` added to ``int(0.01 * batch)`` random rows — with the inner
   problem ``min_delta -CE(f(x_0 + delta), y_0) + 0.001 ||delta||^2`` on the *first* cached batch,
   through the fixed-point map ``delta - 0.1 * grad`` and K = 5 Neumann terms; one Adam step
   (lr 1e-4, amsgrad) on all parameters.

No selection: the result is the model after the last round. Batches under 100 images (every
samples-per-class budget, the short last batch of a ratio budget) get no perturbed row, so there i-BAU is
plain fine-tuning; the diagnostics count the perturbed rows (``perturbed_rows``, ``unperturbed_batches``).
"""
from __future__ import annotations

import copy
import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from baselines.base import defense
from bdcore.data import normalize


def require_clean_data(data) -> None:
    if data is None:
        raise ValueError("ibau needs clean data: use budget=ratio (the default) or budget=spc")


def shuffled_batches(data, batch_size: int, generator: torch.Generator, device: torch.device):
    """One pass over ``data.clean`` in a random order (last batch short), train transform, normalised."""
    images, labels = data.clean.images.to(device), data.clean.labels.to(device)
    order = torch.randperm(len(labels), generator=generator)
    for start in range(0, len(labels), batch_size):
        idx = order[start:start + batch_size].to(device)
        x = images[idx]
        if data.augment is not None:
            x = data.augment(x, generator)
        yield normalize(x, data.spec), labels[idx]


def perturbation_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor,
                      l2_weight: float) -> torch.Tensor:
    """``mean(-CE(f(x + delta), y)) + l2_weight * ||delta||^2`` (the inner objective of both stages)."""
    return torch.mean(-F.cross_entropy(model(x + delta), y, reduction="none")) + l2_weight * torch.norm(delta) ** 2


def universal_perturbation(model: nn.Module, batches, shape, *, lr: float, l2_weight: float,
                           l2_bound: float | None, device: torch.device) -> torch.Tensor:
    """Stage a: one SGD step per batch on a universal perturbation; returns it detached, shape ``shape``.

    Targets are the model's own predictions on the clean batch. ``l2_bound`` rescales the result into the
    ball of that radius (the original I-BAU; None = BackdoorBench, no bound).
    """
    delta = torch.zeros((1, *shape), device=device, requires_grad=True)
    optimizer = torch.optim.SGD([delta], lr=lr)
    for x, _ in batches:
        with torch.no_grad():
            targets = model(x).argmax(1)
        loss = -F.cross_entropy(model(x + delta), targets) + l2_weight * torch.norm(delta) ** 2
        optimizer.zero_grad()
        (grad,) = torch.autograd.grad(loss, [delta])
        delta.grad = grad
        optimizer.step()
    delta = delta.detach()
    norm = float(torch.norm(delta))
    if l2_bound is not None and norm > 0:
        delta = delta * min(1.0, l2_bound / norm)
    return delta[0]


def patched_batch(x: torch.Tensor, delta: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``x`` with ``delta`` added to the given rows only (the outer loss's patching)."""
    patch = torch.zeros_like(x)
    patch[rows] = delta
    return x + patch


def _grads_or_zeros(output, inputs, **kw):
    grads = torch.autograd.grad(output, inputs, allow_unused=True, **kw)
    return [torch.zeros_like(v) if g is None else g for g, v in zip(grads, inputs)]


def implicit_hypergradient(model: nn.Module, delta: torch.Tensor, inner_batch, outer_batch, patched_rows: list[int],
                           *, fixed_point_steps: int, inner_step: float, l2_weight: float,
                           tol: float = 1e-10) -> tuple[list[torch.Tensor], int, float]:
    """i-BAU's hypergradient ``dL_out/dtheta`` (BackdoorBench ``fixed_point``) for every parameter.

    ``L_out(delta, theta) = CE(f(x_b + patch(delta)), y_b)``; the inner fixed-point map is
    ``Phi(delta) = delta - inner_step * d/d delta [ -CE(f(x_0 + delta), y_0) + l2 ||delta||^2 ]``.
    ``v`` runs ``v <- J^T v + dL_out/d delta`` (J = dPhi/d delta) for up to ``fixed_point_steps`` steps
    (stopping early when ``||v_k - v_{k-1}|| < tol``, which in practice never happens), then
    ``grad = dL_out/dtheta + (dPhi/dtheta)^T v``. Returns ``(grads, steps run, outer loss)``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    d = delta.detach().requires_grad_(True)
    x_out, y_out = outer_batch
    outer = F.cross_entropy(model(patched_batch(x_out, d, patched_rows)), y_out)
    (outer_grad_delta,) = _grads_or_zeros(outer, [d], retain_graph=True)
    outer_grad_params = _grads_or_zeros(outer, params, retain_graph=True)
    x_in, y_in = inner_batch
    inner = perturbation_loss(model, x_in, y_in, d, l2_weight)
    (inner_grad,) = torch.autograd.grad(inner, [d], create_graph=True)
    mapped = d - inner_step * inner_grad
    v = torch.zeros_like(d)
    steps = 0
    for _ in range(fixed_point_steps):
        previous = v
        (v,) = torch.autograd.grad(mapped, [d], grad_outputs=v, retain_graph=True)
        v = v + outer_grad_delta
        steps += 1
        if float(torch.norm(v - previous)) < tol:
            break
    mapped_grads = torch.autograd.grad(mapped, params, grad_outputs=v, allow_unused=True)
    grads = [g_out if g is None else g + g_out for g, g_out in zip(mapped_grads, outer_grad_params)]
    return grads, steps, outer.item()


def _check(ok: bool, key: str, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"ibau {key}={value!r} must be {expected}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate(n_rounds: int = 5, fixed_point_steps: int = 5, batch_size: int = 256, lr: float = 1e-4,
             betas=(0.9, 0.999), weight_decay: float = 0.0, amsgrad: bool = True, inner_step: float = 0.1,
             perturbation_lr: float = 10.0, perturbation_l2_weight: float = 0.001,
             perturbation_l2_bound: float | None = None, patched_fraction: float = 0.01,
             fixed_point_tol: float = 1e-10) -> None:
    """Raise one ValueError line for a hyper-parameter i-BAU cannot run with (before any work)."""
    _check(isinstance(n_rounds, int) and n_rounds >= 0, "n_rounds", n_rounds, "an integer >= 0 (e.g. 5)")
    _check(isinstance(fixed_point_steps, int) and fixed_point_steps >= 1, "fixed_point_steps", fixed_point_steps,
           "an integer >= 1 (e.g. 5)")
    _check(isinstance(batch_size, int) and batch_size >= 1, "batch_size", batch_size, "an integer >= 1 (e.g. 256)")
    for key, value, example in (("lr", lr, "1.0e-4"), ("inner_step", inner_step, "0.1"),
                                ("perturbation_lr", perturbation_lr, "10")):
        _check(_is_number(value) and value > 0, key, value, f"> 0 (e.g. {example})")
    _check(len(list(betas)) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas), "betas", list(betas),
           "two numbers in [0, 1) (e.g. [0.9, 0.999])")
    for key, value in (("weight_decay", weight_decay), ("perturbation_l2_weight", perturbation_l2_weight),
                       ("fixed_point_tol", fixed_point_tol)):
        _check(_is_number(value) and value >= 0, key, value, ">= 0")
    _check(isinstance(amsgrad, bool), "amsgrad", amsgrad, "true or false")
    _check(perturbation_l2_bound is None or (_is_number(perturbation_l2_bound) and perturbation_l2_bound > 0),
           "perturbation_l2_bound", perturbation_l2_bound, "null (BackdoorBench: unbounded) or > 0 (e.g. 10)")
    _check(_is_number(patched_fraction) and 0 <= patched_fraction <= 1, "patched_fraction", patched_fraction,
           "in [0, 1] (e.g. 0.01)")


@defense(data_free=False, validate=validate)
def defend(model: nn.Module, data, *, seed: int = 0, device=None, n_rounds: int = 5, fixed_point_steps: int = 5,
           batch_size: int = 256, lr: float = 1e-4, betas=(0.9, 0.999), weight_decay: float = 0.0,
           amsgrad: bool = True, inner_step: float = 0.1, perturbation_lr: float = 10.0,
           perturbation_l2_weight: float = 0.001, perturbation_l2_bound: float | None = None,
           patched_fraction: float = 0.01, fixed_point_tol: float = 1e-10,
           progress: bool = True) -> tuple[nn.Module, dict]:
    """i-BAU on ``data.clean``; returns ``(unlearned copy of model in eval mode, diagnostics)``.

    Reads only ``data.clean`` (with ``data.augment``); no selection, so neither ``data.evaluate`` nor
    ``data.validation``. Runs in fp32 (second-order gradients). The input model is not modified.

    Its own small loop, not bdcore.train.train_model: the update direction is an implicit hypergradient
    (fixed-point vector-Jacobian products through an inner perturbation problem), not the backward pass
    of a loss, with Adam (amsgrad) in eval mode over batches cached once.

    Diagnostics: the options, ``rounds`` (per round: ``delta_l2``, perturbed rows, mean outer loss),
    ``perturbed_rows`` / ``unperturbed_batches`` in total, ``fixed_point_steps_run`` and ``ibau_seconds``.
    """
    require_clean_data(data)
    validate(n_rounds, fixed_point_steps, batch_size, lr, betas, weight_decay, amsgrad, inner_step, perturbation_lr,
             perturbation_l2_weight, perturbation_l2_bound, patched_fraction, fixed_point_tol)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    start = time.perf_counter()
    unlearned = copy.deepcopy(model).to(device).eval()
    for parameter in unlearned.parameters():
        parameter.requires_grad_(True)
    generator = torch.Generator().manual_seed(int(seed))
    rows_rng = random.Random(int(seed))
    optimizer = torch.optim.Adam(unlearned.parameters(), lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                 amsgrad=amsgrad)
    cached = list(shuffled_batches(data, int(batch_size), generator, device))
    shape = tuple(data.clean.images.shape[1:])
    rounds, total_rows, unperturbed, steps_run = [], 0, 0, []
    bar = tqdm(total=int(n_rounds) * len(cached), desc="ibau", disable=not progress, mininterval=2.0, leave=False)
    for round_index in range(int(n_rounds)):
        delta = universal_perturbation(unlearned, shuffled_batches(data, int(batch_size), generator, device), shape,
                                       lr=perturbation_lr, l2_weight=perturbation_l2_weight,
                                       l2_bound=perturbation_l2_bound, device=device)
        round_rows, outer_losses = 0, []
        for x, y in cached:
            rows = rows_rng.sample(range(len(y)), int(len(y) * patched_fraction))
            round_rows += len(rows)
            unperturbed += not rows
            optimizer.zero_grad()
            grads, steps, outer_loss = implicit_hypergradient(unlearned, delta, cached[0], (x, y), rows,
                                                  fixed_point_steps=int(fixed_point_steps), inner_step=inner_step,
                                                  l2_weight=perturbation_l2_weight, tol=fixed_point_tol)
            for parameter, grad in zip(unlearned.parameters(), grads):
                parameter.grad = grad
            optimizer.step()
            steps_run.append(steps)
            outer_losses.append(outer_loss)
            bar.update(1)
        total_rows += round_rows
        rounds.append({"round": round_index, "delta_l2": float(torch.norm(delta)), "perturbed_rows": round_rows,
                       "mean_outer_loss": sum(outer_losses) / max(len(outer_losses), 1)})
    bar.close()
    unlearned.eval()
    for parameter, original in zip(unlearned.parameters(), model.parameters()):
        parameter.requires_grad_(original.requires_grad)
    diagnostics = {
        "defense": "ibau",
        "n_rounds": int(n_rounds), "fixed_point_steps": int(fixed_point_steps), "batch_size": int(batch_size),
        "lr": lr, "amsgrad": bool(amsgrad), "inner_step": inner_step, "perturbation_lr": perturbation_lr,
        "perturbation_l2_weight": perturbation_l2_weight, "perturbation_l2_bound": perturbation_l2_bound,
        "patched_fraction": patched_fraction, "precision": "fp32", "clean_samples": len(data.clean),
        "cached_batches": len(cached), "rounds": rounds, "perturbed_rows": total_rows,
        "unperturbed_batches": unperturbed,
        "perturbation_never_applied": total_rows == 0,
        "fixed_point_steps_run": sorted(set(steps_run)),
        "ibau_seconds": time.perf_counter() - start,
    }
    return unlearned, diagnostics
