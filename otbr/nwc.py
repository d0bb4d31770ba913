"""Stage 1b — neuron weight changes (paper Eq. 2; docs/methods/otbr.md).

``NWC_{l,k} = || W_u^l[k] - W_b^l[k] ||_1``: the L1 norm of output filter k's change during random
unlearning, summed over all input channels and kernel positions, with no normalisation. The official
code writes the float32 values to a text file with ``'{:.4f}'`` and reads them back, so the values it
ranks and turns into OT target masses are rounded to 4 decimals; ``round_decimals`` reproduces that.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .layers import prunable_conv_layers
from .unlearning import random_unlearning


def _rounded(values: torch.Tensor, round_decimals: int | None) -> torch.Tensor:
    """float32 -> Python float -> ``format(v, '.{d}f')`` -> float, like the official file round-trip."""
    floats = values.detach().cpu().tolist()
    if round_decimals is not None:
        floats = [float(format(v, f".{int(round_decimals)}f")) for v in floats]
    return torch.tensor(floats, dtype=torch.float64)


@torch.no_grad()
def neuron_weight_changes(backdoored: nn.Module, unlearned: nn.Module, *,
                          round_decimals: int | None = 4) -> dict[str, torch.Tensor]:
    """Eq. 2 per prunable conv layer: ``{layer weight name: float64 CPU tensor of per-filter L1 changes}``.

    Keys follow network order (:func:`prunable_conv_layers`). The L1 sums are taken in float32, as
    the official code does; ``round_decimals=None`` keeps them unrounded.
    """
    backdoored_params = dict(backdoored.named_parameters())
    unlearned_params = dict(unlearned.named_parameters())
    changes = {}
    for layer in prunable_conv_layers(backdoored):
        original = backdoored_params[layer].detach()
        change = unlearned_params[layer].detach().to(original.device) - original
        changes[layer] = _rounded(change.reshape(change.shape[0], -1).abs().sum(dim=-1), round_decimals)
    return changes


def unlearning_neuron_weight_changes(model: nn.Module, *, seed: int = 0, device=None,
                                     unlearn: dict | None = None, nwc: dict | None = None,
                                     noise_batches=None, progress: bool = False) -> dict[str, torch.Tensor]:
    """Stage 1 up to the ranking: Eq. 1 (:func:`random_unlearning`) then Eq. 2 (:func:`neuron_weight_changes`).

    Depends only on the model, ``unlearn`` / ``nwc`` options and ``seed`` (or the injected
    ``noise_batches``), so a caller can cache it and reuse it for every pruning ratio and fusion setting.
    """
    unlearned = random_unlearning(model, seed=seed, device=device, noise_batches=noise_batches, progress=progress,
                                  **(unlearn or {}))
    return neuron_weight_changes(model, unlearned, **(nwc or {}))
