"""OTBR registered as a defense. The method itself lives in otbr/ (no Hydra, no I/O); this file only declares
the facts the pipeline needs: data-free, a cacheable stage 1 (random unlearning + NWCs, reused across
gamma / lambda / fusion sweeps), and an evaluator for the pruned model's report (Table 2, "no fusion")."""
from __future__ import annotations

import otbr
from baselines.base import CachedStage, defense

defend = defense(
    data_free=True,
    cached_stage=CachedStage(otbr.unlearning_neuron_weight_changes, params=("unlearn", "nwc"),
                             result_arg="neuron_weight_changes"),
    wants_evaluator=True,
)(otbr.defend)
