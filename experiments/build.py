"""Config -> objects. Every group node is built with Hydra's `instantiate` from its `_target_`; the names of
the chosen options come from Hydra's runtime choices. Nothing here trains or writes anything.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from attacks.base import Attack, AttackConfigError
from baselines.base import DefenseTraits, traits_of
from bdcore.budget import BudgetConfigError
from bdcore.data import DatasetSpec, ImageSet
from bdcore.datasets import DataSource, DatasetConfigError, DatasetMissingError
from bdcore.train import TrainSettings


class UserError(RuntimeError):
    """A problem the user can fix; its message is one line naming the key, the value and what to do."""


USER_ERRORS = (UserError, AttackConfigError, BudgetConfigError, DatasetConfigError, DatasetMissingError)


def plain(node) -> Any:
    """A resolved plain container of a config node (dicts and lists), or the value itself."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def build(node: DictConfig, what: str, **kwargs) -> Any:
    """`instantiate(node, **kwargs)`, turning a constructor's ValueError / TypeError into one UserError line.

    Hydra wraps a constructor's exception in a multi-line InstantiationException; a user sees only the
    constructor's own one-line message (prefixed with the group) instead."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, USER_ERRORS):
            raise UserError(str(cause)) from None
        if isinstance(cause, (ValueError, TypeError)):
            first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            raise UserError(f"{what}: {first}") from None
        raise


@dataclass
class Data:
    train: ImageSet
    test: ImageSet
    spec: DatasetSpec
    source: DataSource


def build_source(cfg: DictConfig) -> DataSource:
    return build(cfg.dataset, "dataset")


def load_data(source: DataSource) -> Data:
    try:
        train, test = source.load()
    except USER_ERRORS as err:
        raise UserError(str(err)) from None
    return Data(train, test, source.spec, source)


def dataset_identity(cfg: DictConfig, source: DataSource) -> dict:
    """The dataset config minus the keys that only say where the data lives (the source declares them)."""
    return {k: v for k, v in plain(cfg.dataset).items() if k not in source.location_args}


def build_attack(cfg: DictConfig, spec: DatasetSpec) -> Attack:
    # instantiate() would turn the DatasetSpec dataclass into a DictConfig: bind the config first, then pass it
    make = build(cfg.attack, "attack", _partial_=True)
    try:
        return make(spec=spec)
    except USER_ERRORS as err:
        raise UserError(str(err)) from None
    except (ValueError, TypeError) as err:
        raise UserError(f"attack: {str(err).strip().splitlines()[0]}") from None


def model_factory(cfg: DictConfig, spec: DatasetSpec) -> Callable[[], torch.nn.Module]:
    """A function that builds a fresh, randomly initialised model of the configured architecture."""
    def make() -> torch.nn.Module:
        return build(cfg.model, "model", num_classes=spec.num_classes, in_channels=spec.channels)

    make()  # fail now, before any data work, if the architecture cannot be built
    return make


def train_settings(cfg: DictConfig) -> TrainSettings:
    settings = build(cfg.train, "train")
    if settings.epochs < 1 and not cfg.backdoor_checkpoint:
        raise UserError(f"train.epochs={settings.epochs}: a backdoored model needs at least one epoch; "
                        "use e.g. train.epochs=100")
    return settings


@dataclass
class DefenseChoice:
    name: str
    fn: functools.partial          # the configured defend(model, data, *, seed, device, **hyper-parameters)
    traits: DefenseTraits
    hyper_parameters: dict
    seed: int


def build_defense(cfg: DictConfig, name: str) -> DefenseChoice:
    fn = build(cfg.defense, "defense")
    if not isinstance(fn, functools.partial):
        raise UserError(f"conf/defense/{name}.yaml must set `_partial_: true` (a defense is a function)")
    try:
        traits = traits_of(fn)
    except TypeError as err:
        raise UserError(f"defense={name}: {err}") from None
    hyper = {k: v for k, v in plain(cfg.defense).items() if not k.startswith("_") and k != "seed"}
    if traits.validate is not None:
        try:
            traits.validate(**hyper)
        except (ValueError, TypeError) as err:
            raise UserError(str(err).strip().splitlines()[0]) from None
    return DefenseChoice(name, fn, traits, hyper, int(cfg.defense.seed))


def build_budget(cfg: DictConfig):
    return build(cfg.budget, "budget")


def job_dir_name(override_dirname: str) -> str:
    """Hydra's override_dirname with file paths shortened to `stem-<hash>`: two checkpoints or pattern files
    never share a job directory, and no directory name holds a '/'."""
    import hashlib

    parts = []
    for item in override_dirname.split(","):
        key, sep, value = item.partition("=")
        if sep and ("/" in value or "\\" in value):
            value = f"{Path(value).stem}-{hashlib.sha256(value.encode()).hexdigest()[:6]}"
        parts.append(f"{key}{sep}{value}")
    return ",".join(parts)
