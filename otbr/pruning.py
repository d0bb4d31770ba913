"""Stage 1c — NWC pruning (docs/methods/otbr.md).

One global ranking of all filters of all prunable layers by (rounded) NWC, descending, with Python's
stable sort, so ties keep network order then filter index. The top ``int(total * ratio)`` (floor) are
pruned: their whole output filter ``W[k, :, :, :]`` is set to 0 in a copy. Nothing else changes (the
following BN, shortcut convs and the classifier stay as they are).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn


def select_filters_to_prune(nwcs: dict[str, torch.Tensor], ratio: float) -> dict[str, list[int]]:
    """The top ``int(total * ratio)`` filters by NWC: ``{layer: ascending filter indices}``.

    Only layers with at least one pruned filter appear, in network (``nwcs``) order; the first key
    is therefore Algorithm 1's first pruned layer.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"prune.ratio must be in [0, 1], got {ratio}")
    ranking = [(layer, index, value)
               for layer, values in nwcs.items()
               for index, value in enumerate(torch.as_tensor(values).tolist())]
    if not all(math.isfinite(value) for _, _, value in ranking):
        raise ValueError("some neuron weight changes are NaN or infinite: random unlearning diverged; "
                         "lower unlearn.lr or unlearn.steps")
    ranking.sort(key=lambda entry: entry[2], reverse=True)  # stable: ties stay in network order
    chosen: dict[str, set[int]] = {}
    for layer, index, _ in ranking[:int(len(ranking) * ratio)]:
        chosen.setdefault(layer, set()).add(index)
    return {layer: sorted(chosen[layer]) for layer in nwcs if layer in chosen}


@torch.no_grad()
def prune_filters(model: nn.Module, pruned: dict[str, list[int]]) -> nn.Module:
    """A copy of ``model`` whose listed output filters (whole ``W[k]``) are zero; biases untouched."""
    pruned_model = copy.deepcopy(model)
    parameters = dict(pruned_model.named_parameters())
    for layer, indices in pruned.items():
        if layer not in parameters:
            raise KeyError(f"cannot prune {layer!r}: the model has no such parameter")
        if len(indices):
            parameters[layer][torch.as_tensor(list(indices), dtype=torch.long)] = 0.0
    return pruned_model
