"""OTBR registered as a defense. The method itself lives in otbr/ (no Hydra, no I/O); this file only declares
the facts the pipeline needs: data-free, a cacheable stage 1 (random unlearning + NWCs, reused across
gamma / lambda / fusion sweeps), an evaluator for the pruned model's report (Table 2, "no fusion"), and the
ranges its hyper-parameters must lie in, checked before any training."""
from __future__ import annotations

import math

import otbr
from baselines.base import CachedStage, defense
from otbr.fusion import COST_INPUTS, FUSION_MODES, SOURCE_SUPPORTS, TARGET_DISTRIBUTIONS
from otbr.unlearning import BN_MODES, LABEL_RANGES


def _check(ok: bool, key: str, value, valid: str) -> None:
    if not ok:
        raise ValueError(f"defense.{key}={value} is invalid: it must be {valid}")


def validate_options(unlearn: dict | None = None, nwc: dict | None = None, prune: dict | None = None,
                     fusion: dict | None = None) -> None:
    """One line per problem, naming the key, the value and the valid range (the paper's symbols in docs)."""
    unlearn, nwc, prune, fusion = unlearn or {}, nwc or {}, prune or {}, fusion or {}
    choices = [(unlearn, "unlearn.labels", "labels", LABEL_RANGES), (unlearn, "unlearn.bn_mode", "bn_mode", BN_MODES),
               (fusion, "fusion.mode", "mode", FUSION_MODES), (fusion, "fusion.target_dist", "target_dist",
                                                               TARGET_DISTRIBUTIONS),
               (fusion, "fusion.cost_on", "cost_on", COST_INPUTS),
               (fusion, "fusion.source_support", "source_support", SOURCE_SUPPORTS)]
    for group, key, name, valid in choices:
        if name in group:
            _check(group[name] in valid, key, group[name], f"one of {', '.join(valid)}")
    if unlearn.get("num_labels") is not None:
        _check(int(unlearn["num_labels"]) >= 1, "unlearn.num_labels", unlearn["num_labels"],
               ">= 1 (G, the number of random labels) or null")
    if "noise_shape" in unlearn:
        shape = unlearn["noise_shape"]
        _check(len(shape) == 3 and all(int(d) >= 1 for d in shape), "unlearn.noise_shape", shape,
               "[channels, height, width], e.g. [3, 32, 32]")
    if nwc.get("round_decimals") is not None:
        _check(int(nwc["round_decimals"]) >= 0, "nwc.round_decimals", nwc["round_decimals"], ">= 0 or null")
    if "steps" in unlearn:
        _check(int(unlearn["steps"]) >= 1, "unlearn.steps", unlearn["steps"], "an integer >= 1 (I; default 20)")
    if "batch_size" in unlearn:
        _check(int(unlearn["batch_size"]) >= 1, "unlearn.batch_size", unlearn["batch_size"], ">= 1 (default 256)")
    if "lr" in unlearn:
        lr = float(unlearn["lr"])
        _check(math.isfinite(lr) and 0 < lr <= 1, "unlearn.lr", unlearn["lr"], "in (0, 1] (default 1e-4)")
    if "ratio" in prune:
        _check(0 <= float(prune["ratio"]) < 1, "prune.ratio", prune["ratio"], "in [0, 1) (gamma; default 0.05)")
    if "lambda_" in fusion:
        _check(0 <= float(fusion["lambda_"]) <= 1, "fusion.lambda_", fusion["lambda_"], "in [0, 1] (default 0.5)")


defend = defense(
    data_free=True,
    cached_stage=CachedStage(otbr.unlearning_neuron_weight_changes, params=("unlearn", "nwc"),
                             result_arg="neuron_weight_changes"),
    wants_evaluator=True,
    validate=validate_options,
)(otbr.defend)
