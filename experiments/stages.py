"""The stages of one job, each a function of what the previous one returned (docs/architecture.md):

    backdoored model (trained once per upstream config, from the artifact store)
      -> the attack's stored state -> evaluator -> defense (its cacheable first stage from the store) -> metrics

Nothing here reads Hydra's runtime; the pipeline passes plain values in.
"""
from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from attacks.base import Attack
from baselines.base import takes_keyword
from bdcore.data import DatasetSpec, ImageSet
from bdcore.evaluate import backdoor_metrics
from bdcore.io import torch_save_atomic
from bdcore.train import EpochCheckpoint, TrainSettings, train_model
from experiments.build import UserError
from experiments.store import ArtifactStore, config_key

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _numpy_globals() -> list:
    """numpy's array reconstruction, which BackdoorBench records need (they hold numpy poison indicators):
    it rebuilds arrays and cannot call anything else."""
    import numpy._core.multiarray as multiarray

    dtypes = [type(np.dtype(t)) for t in ("b", "B", "h", "H", "i", "I", "l", "L", "q", "Q", "e", "f", "d", "?")]
    return [multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


def safe_load(path: str | Path, what: str):
    """torch.load that can never execute code (weights_only=True, plus numpy arrays); anything else is
    refused in one line."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refused, truncated, empty or foreign file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{what}={path} cannot be loaded safely ({reason[:160]}); give a file saved with "
                        "torch.save(model.state_dict()) (plain tensors only)") from None


def all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over a model's state_dict (names, dtypes, shapes, bytes): equal digests = the same model."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class Evaluator:
    """ACC on the clean test set, ASR / RA on the attack's bd_test, in the job's precision. bd_test is built
    once, from the attack state the backdoored model was trained with.

    With a store and a `context` (what fixes the test and bd_test sets: the backdoored model's store key),
    every distinct model is evaluated once across jobs: a gamma x lambda sweep evaluates the backdoored model
    and each pruned model once, not once per job."""

    def __init__(self, attack: Attack, test: ImageSet, spec: DatasetSpec, device: torch.device,
                 precision: str = "fp32", store: ArtifactStore | None = None, context: str | None = None):
        self.test, self.spec, self.device, self.precision = test, spec, device, precision
        self.store, self.context = store, context
        self.bd = attack.bd_test(test)
        self.computed = 0  # evaluations actually run (the rest came from the store)

    def measure(self, model: torch.nn.Module) -> dict:
        self.computed += 1
        metrics = backdoor_metrics(model, self.test, self.bd.images, self.bd.target_labels, self.bd.true_labels,
                                   self.spec, device=self.device, precision=self.precision)
        if not all(math.isfinite(v) for v in metrics.values()):
            raise UserError(f"evaluation gave non-finite metrics {metrics}; the model's weights are not usable")
        return metrics

    def __call__(self, model: torch.nn.Module) -> dict:
        if self.store is None or self.context is None:
            return self.measure(model)
        material = {"context": self.context, "weights": weights_digest(model), "precision": self.precision}
        _, marker, _ = self.store.get_or_create("metrics", config_key(material), lambda tmp: self.measure(model),
                                                description=material)
        return dict(marker["meta"])


@dataclass
class Backdoored:
    model: torch.nn.Module
    attack: Attack            # carrying the state the model was trained with
    key: str | None           # the store key (None for a user's checkpoint)
    info: dict                # for metrics.json


def load_checkpoint_into(model: torch.nn.Module, path: str, model_name: str) -> None:
    """A bare state_dict or a BackdoorBench attack_result.pt ({'model': state_dict, ...}), loaded safely."""
    if not Path(path).is_file():
        raise UserError(f"backdoor_checkpoint={path} does not exist; give a state_dict file or null to train one")
    state = safe_load(path, "backdoor_checkpoint")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"backdoor_checkpoint={path} holds no state_dict; save one with torch.save(model.state_dict())")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = next((ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()), str(err).splitlines()[0])
        raise UserError(f"backdoor_checkpoint={path} does not fit model={model_name} "
                        f"({sum(1 for _ in model.state_dict())} tensors): {first[:160]}; "
                        "choose the model/dataset it was trained with (docs/checkpoints.md)") from None


def resumed_epochs(history: list[dict]) -> int:
    """Epochs restored from a killed earlier run's checkpoint (0 = trained afresh)."""
    return sum(1 for row in history if row.get("resumed"))


def train_backdoored_model(store: ArtifactStore, key: str, material: dict, *, attack: Attack, train: ImageSet,
                           spec: DatasetSpec, make_model: Callable[[], torch.nn.Module], settings: TrainSettings,
                           seed: int, device: torch.device, precision: str, progress: bool,
                           resources, description: str, checkpoint_every: int = 1
                           ) -> tuple[torch.nn.Module, dict, dict, bool]:
    """Train once per key; later calls load the model and the attack state from the store. The training
    saves a checkpoint every `checkpoint_every` epochs under the same key, so a killed job resumes it.
    Returns (model on device in eval mode, attack state, marker meta, created_now)."""
    checkpoint = EpochCheckpoint(store.checkpoint_path("backdoor", key), checkpoint_every)

    def produce(tmp: Path) -> dict:
        attack.prepare(train, resources)
        seed_everything(seed)
        poisoned = attack.poison_train(train, seed)
        model = make_model()  # initialised right after seeding, so the init is reproducible
        start = time.perf_counter()
        history = train_model(model, poisoned.data, spec, attack.training_settings(settings), device=device,
                              seed=seed, hooks=attack.training_hooks(model, device), progress=progress,
                              description=description, precision=precision, checkpoint=checkpoint)
        resumed = resumed_epochs(history)
        seconds = time.perf_counter() - start + sum(h["seconds"] for h in history[:resumed])
        weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if not all_finite(weights) or not all(math.isfinite(h["loss"]) for h in history):
            raise UserError("training diverged (NaN/Inf loss or weights); lower train.lr or check the attack settings")
        torch.save(weights, tmp / "model.pt")
        torch.save(attack.state_dict(), tmp / "attack.pt")
        torch.save(poisoned.poison_indices, tmp / "poison_indices.pt")
        return {"train_seconds": seconds, "history": history, "poisoned": len(poisoned.poison_indices),
                "train_size": len(train), "resumed_from_epoch": resumed,
                "resource_seconds": getattr(attack, "generation_seconds", None)}

    path, marker, created = store.get_or_create("backdoor", key, produce, description=material)
    checkpoint.discard()
    model = make_model()
    model.load_state_dict(safe_load(path / "model.pt", "store artifact"))
    state = safe_load(path / "attack.pt", "store artifact")
    return model.to(device).eval(), state, marker["meta"], created


def train_clean_model(store: ArtifactStore, material: dict, *, train: ImageSet, spec: DatasetSpec,
                      make_model: Callable[[], torch.nn.Module], settings: TrainSettings, seed: int,
                      device: torch.device, precision: str, progress: bool,
                      checkpoint_every: int = 1) -> torch.nn.Module:
    """A clean model (no poisoning) trained once per (dataset, model, train, seed, precision) and shared by every
    attack that needs one (LF's perturbation search, TrojanNN's trigger); resumable like the backdoored one."""
    key = config_key(material)
    checkpoint = EpochCheckpoint(store.checkpoint_path("clean", key), checkpoint_every)

    def produce(tmp: Path) -> dict:
        seed_everything(seed)
        model = make_model()
        start = time.perf_counter()
        history = train_model(model, train, spec, settings, device=device, seed=seed, progress=progress,
                              description="clean model", precision=precision, checkpoint=checkpoint)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp / "model.pt")
        resumed = resumed_epochs(history)
        return {"train_seconds": time.perf_counter() - start + sum(h["seconds"] for h in history[:resumed]),
                "history": history, "resumed_from_epoch": resumed}

    path, _, _ = store.get_or_create("clean", key, produce, description=material)
    checkpoint.discard()
    model = make_model()
    model.load_state_dict(safe_load(path / "model.pt", "store artifact"))
    return model.to(device).eval()


def cached_stage_result(store: ArtifactStore, stage, backdoor_key: str, model: torch.nn.Module,
                        hyper_parameters: dict, seed: int, device: torch.device, name: str,
                        progress: bool = True) -> tuple[dict, dict]:
    """A defense's expensive first stage, computed once per backdoored model and its own parameters."""
    params = {p: hyper_parameters[p] for p in stage.params}
    fn_name = f"{stage.fn.__module__}.{stage.fn.__qualname__}"
    material = {"backdoor": backdoor_key, "fn": fn_name, "params": params, "seed": seed}

    def produce(tmp: Path) -> dict:
        log.info("%s: computing %s (cached afterwards for this backdoored model)", name, fn_name)
        start = time.perf_counter()
        extra = {"progress": progress} if takes_keyword(stage.fn, "progress") else {}
        result = stage.fn(model, seed=seed, device=device, **params, **extra)
        if isinstance(result, dict) and not all_finite(result):
            raise UserError(f"defense={name}: its first stage gave NaN/Inf values (e.g. unlearn.lr too large); "
                            "nothing was stored")
        torch_save_atomic(result, tmp / "stage.pt")
        return {"seconds": time.perf_counter() - start}

    path, marker, created = store.get_or_create("defense_stage", config_key(material), produce, material)
    info = {"cached_stage": fn_name, "cached_stage_source": "computed" if created else "store",
            "cached_stage_seconds": marker["meta"]["seconds"]}
    return safe_load(path / "stage.pt", "store artifact"), info
