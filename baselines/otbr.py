"""OTBR registered as a defense. The method itself lives in otbr/ (no Hydra, no I/O); this file only declares
the facts the pipeline needs: data-free, a cacheable stage 1 (random unlearning + NWCs, reused across
gamma / lambda / fusion sweeps), an evaluator for the pruned model's report (Table 2, "no fusion"), and the
ranges its hyper-parameters must lie in, checked before any training."""
from __future__ import annotations

import math

import otbr
from baselines.base import CachedStage, defense
from otbr.fusion import FUSION_MODES, TARGET_DISTRIBUTIONS


def _check(ok: bool, key: str, value, valid: str) -> None:
    if not ok:
        raise ValueError(f"defense.{key}={value} is invalid: it must be {valid}")


def validate_options(unlearn: dict | None = None, nwc: dict | None = None, prune: dict | None = None,
                     fusion: dict | None = None) -> None:
    """One line per problem, naming the key, the value and the valid range (the paper's symbols in docs)."""
    unlearn, prune, fusion = unlearn or {}, prune or {}, fusion or {}
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
    if "mode" in fusion:
        _check(fusion["mode"] in FUSION_MODES, "fusion.mode", fusion["mode"], f"one of {', '.join(FUSION_MODES)}")
    if "target_dist" in fusion:
        _check(fusion["target_dist"] in TARGET_DISTRIBUTIONS, "fusion.target_dist", fusion["target_dist"],
               f"one of {', '.join(TARGET_DISTRIBUTIONS)}")


defend = defense(
    data_free=True,
    cached_stage=CachedStage(otbr.unlearning_neuron_weight_changes, params=("unlearn", "nwc"),
                             result_arg="neuron_weight_changes"),
    wants_evaluator=True,
    validate=validate_options,
)(otbr.defend)
