"""The defense interface shared by OTBR and every baseline (docs/interfaces.md).

A defense is a function

    defend(model, data, *, seed, device, **hyper_parameters) -> (defended_model, diagnostics)

that returns a new model (never edits its input) and a plain dict of diagnostics. `data` is None for a
data-free defense, else a `bdcore.data.DefenseData`. Facts about a defense that are not hyper-parameters
are declared beside it with the `@defense(...)` decorator; the config (conf/defense/<name>.yaml) holds only
`_target_`, `_partial_: true` and the hyper-parameters.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class CachedStage:
    """An expensive first stage that depends only on the backdoored model, `params` and the seed.

    The pipeline computes `fn(model, seed=, device=, **{p: hyper_parameters[p] for p in params})` once per
    backdoored model, keeps it in the artifact store, and passes it to the defense as `result_arg=...`, so a
    sweep over the later stages (OTBR's gamma / lambda / fusion) does not repeat it. The result must be
    tensors in plain containers (it is loaded with torch.load(weights_only=True)).
    """

    fn: Callable[..., Any]
    params: tuple[str, ...]
    result_arg: str


@dataclass(frozen=True)
class DefenseTraits:
    data_free: bool                          # True: receives data=None and never needs a budget
    cached_stage: CachedStage | None = None
    wants_evaluator: bool = False            # receives evaluate=callable(model) -> metrics, for report-only numbers
    validate: Callable[..., None] | None = None  # validate(**hyper_parameters) raises ValueError before any work


def defense(*, data_free: bool, cached_stage: CachedStage | None = None, wants_evaluator: bool = False,
            validate: Callable[..., None] | None = None) -> Callable[[Callable], Callable]:
    """Declare a function a defense. Returns a wrapper carrying `.traits`; the wrapped function is unchanged,
    so a module outside baselines/ (otbr/) needs no import of ours to be registered."""
    traits = DefenseTraits(data_free=data_free, cached_stage=cached_stage, wants_evaluator=wants_evaluator,
                           validate=validate)

    def register(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def method(*args, **kwargs):
            return fn(*args, **kwargs)

        method.traits = traits
        return method

    return register


def takes_keyword(fn: Callable, name: str) -> bool:
    """Whether `fn` (a function, a defense wrapper or a functools.partial of either) accepts keyword `name`."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def traits_of(fn: Callable) -> DefenseTraits:
    """The traits of a defense function (or of a functools.partial of one, as Hydra's `_partial_` makes)."""
    target = fn.func if isinstance(fn, functools.partial) else fn
    traits = getattr(target, "traits", None)
    if not isinstance(traits, DefenseTraits):
        name = getattr(target, "__qualname__", repr(target))
        raise TypeError(f"{name} is not declared a defense; decorate it with baselines.base.defense(...)")
    return traits
