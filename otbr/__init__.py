"""OTBR: Optimal Transport-based data-free Backdoor Removal (Lin et al., AAAI 2025), as small pure functions.

Algorithm 2 (:func:`defend`) chains:

* Stage 1 — random-unlearning NWC pruning:
  :func:`random_unlearning` (Eq. 1) -> :func:`neuron_weight_changes` (Eq. 2)
  [both: :func:`unlearning_neuron_weight_changes`] -> :func:`select_filters_to_prune` -> :func:`prune_filters`;
* Stage 2 — pruned-to-backdoored OT-based fusion: :func:`ot_fusion` (Eq. 3-4, Algorithm 1).

Defaults reproduce the official code (docs/methods/otbr.md). Which convs
take part and how the fusion chain walks other architectures is documented in :mod:`otbr.layers`.
Imports only torch, numpy and POT; never modifies its inputs.
"""
from .defense import DEFAULT_FUSION, DEFAULT_PRUNE, defend, nwc_statistics
from .fusion import (align_incoming, first_pruned_layer, optimal_transport_plan, ot_fusion, reciprocal_masses,
                     surviving_filters, target_masses, transport_outgoing, uniform_masses)
from .layers import conv_of, fusion_chain, prunable_conv_layers
from .nwc import neuron_weight_changes, unlearning_neuron_weight_changes
from .pruning import prune_filters, select_filters_to_prune
from .unlearning import label_upper_bound, random_unlearning

__all__ = [
    "DEFAULT_FUSION", "DEFAULT_PRUNE", "align_incoming", "conv_of", "defend", "first_pruned_layer",
    "fusion_chain", "label_upper_bound", "neuron_weight_changes", "nwc_statistics", "optimal_transport_plan",
    "ot_fusion", "prunable_conv_layers", "prune_filters", "random_unlearning", "reciprocal_masses",
    "select_filters_to_prune", "surviving_filters", "target_masses", "transport_outgoing", "uniform_masses",
    "unlearning_neuron_weight_changes",
]
