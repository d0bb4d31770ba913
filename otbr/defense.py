"""Algorithm 2 — the whole data-free OTBR defense in one call (docs/methods/otbr.md).

Stage 1: random unlearning (Eq. 1) -> NWCs (Eq. 2) -> prune the top ``ratio`` of filters.
Stage 2: OT-based fusion of the pruned model into the backdoored one (Eq. 3-4, Algorithm 1).
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn

from bdcore.io import device_of, jsonable

from .fusion import ot_fusion
from .nwc import unlearning_neuron_weight_changes
from .pruning import prune_filters, select_filters_to_prune

#: The official code's defaults (Algorithm 2's hyper-parameters); ``unlearn``/``nwc`` defaults live in the signatures.
DEFAULT_PRUNE = {"ratio": 0.05}
DEFAULT_FUSION = {"mode": "ot", "lambda_": 0.5, "target_dist": "nwc", "cost_on": "raw",
                  "source_support": "all", "num_itermax": 100000}


def nwc_statistics(nwcs: dict[str, torch.Tensor]) -> dict:
    """Summary of all NWCs (min/max/mean/median, zeros) for the diagnostics."""
    values = torch.cat([torch.as_tensor(v, dtype=torch.float64).flatten() for v in nwcs.values()]).numpy()
    if values.size == 0:
        return {"count": 0, "min": None, "max": None, "mean": None, "median": None, "num_zeros": 0}
    return {"count": int(values.size), "min": float(values.min()), "max": float(values.max()),
            "mean": float(values.mean()), "median": float(np.median(values)),
            "num_zeros": int((values == 0).sum())}


def defend(model: nn.Module, data=None, *, seed: int = 0, device=None, unlearn: dict | None = None,
           nwc: dict | None = None, prune: dict | None = None, fusion: dict | None = None,
           neuron_weight_changes: dict[str, torch.Tensor] | None = None, noise_batches=None,
           evaluate: Callable[[nn.Module], dict] | None = None) -> tuple[nn.Module, dict]:
    """Algorithm 2: data-free OTBR on ``model``; returns ``(defended copy in eval mode, diagnostics)``.

    ``data`` is ignored (the common defense interface passes it). ``unlearn`` / ``nwc`` are keyword
    options of :func:`otbr.random_unlearning` / :func:`otbr.neuron_weight_changes`, ``prune`` is
    ``{"ratio": 0.05}`` and ``fusion`` the options of :func:`otbr.ot_fusion`. A precomputed stage 1
    (``neuron_weight_changes``, e.g. from a cache) skips unlearning. ``evaluate`` is called on the
    pruned model only; its result is ``diagnostics["pruned_metrics"]`` (Table 2's "no fusion").
    The defended model is returned on the model's original device; work happens on ``device``.
    """
    del data  # data-free
    original_device = device_of(model)
    device = torch.device(device) if device is not None else original_device
    backdoored = model if device == original_device else copy.deepcopy(model).to(device)
    prune = {**DEFAULT_PRUNE, **(prune or {})}
    fusion = {**DEFAULT_FUSION, **(fusion or {})}

    start = time.perf_counter()
    stage1_given = neuron_weight_changes is not None
    if stage1_given:
        nwcs = neuron_weight_changes
        unlearning_seconds = None
    else:
        nwcs = unlearning_neuron_weight_changes(backdoored, seed=seed, device=device, unlearn=unlearn,
                                                nwc=nwc, noise_batches=noise_batches)
        unlearning_seconds = time.perf_counter() - start

    start = time.perf_counter()
    pruned = select_filters_to_prune(nwcs, **prune)
    pruned_model = prune_filters(backdoored, pruned)
    pruning_seconds = time.perf_counter() - start

    pruned_metrics = evaluate(pruned_model.eval()) if evaluate is not None else None

    start = time.perf_counter()
    fused, fusion_diagnostics = ot_fusion(pruned_model, backdoored, nwcs, pruned, seed=seed, **fusion)
    fusion_seconds = time.perf_counter() - start

    pruned_per_layer = {layer: len(pruned.get(layer, ())) for layer in nwcs}
    diagnostics = {
        "seed": int(seed),
        "stage1_given": stage1_given,
        "prune_ratio": float(prune["ratio"]),
        "num_layers": len(nwcs),
        "num_filters_total": int(sum(len(v) for v in nwcs.values())),
        "num_filters_pruned": int(sum(pruned_per_layer.values())),
        "pruned_per_layer": pruned_per_layer,
        "nwc_stats": nwc_statistics(nwcs),
        **fusion_diagnostics,
        "stage1_unlearning_seconds": unlearning_seconds,
        "stage1_pruning_seconds": pruning_seconds,
        "stage2_fusion_seconds": fusion_seconds,
        "pruned_metrics": pruned_metrics,
    }
    return fused.to(original_device).eval(), jsonable(diagnostics)
