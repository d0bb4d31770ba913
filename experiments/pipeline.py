"""One job: data -> attack -> backdoored model (trained once, from the store) -> defense -> metrics.json.

This is the only place where Hydra configs meet the torch-only packages (DESIGN.md §1).
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import platform
import random
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_method, instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf

from attacks.base import AttackConfigError
from bdcore.data import DefenseData, ImageSet, random_crop_flip
from bdcore.datasets import DatasetMissingError, load_dataset
from bdcore.device import select_device
from bdcore.evaluate import backdoor_metrics
from bdcore.models import build_model
from bdcore.train import TrainSettings, train_model
from experiments.store import ArtifactStore, config_key, file_sha256

log = logging.getLogger(__name__)


class UserError(RuntimeError):
    """A problem the user can fix; run.py prints its one-line message and exits with status 2."""


# ---------------------------------------------------------------------------------------------- helpers
def plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def git_revision() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def load_data(cfg: DictConfig):
    ds = plain(cfg.dataset)
    extra = {}
    if ds["name"] == "synthetic":
        extra = {k: ds[k] for k in ("num_classes", "channels", "size", "train_per_class", "test_per_class")}
        extra["seed"] = ds["synthetic_seed"]
    try:
        train, test, spec = load_dataset(ds["name"], to_absolute_path(cfg.paths.data_dir), download=ds["download"],
                                         fashion_mnist_dir=cfg.paths.fashion_mnist_dir, **extra)
    except DatasetMissingError as err:
        raise UserError(str(err)) from None
    if ds.get("train_size"):
        if not 0 < ds["train_size"] <= len(train):
            raise UserError(f"dataset.train_size={ds['train_size']} but {spec.name} has {len(train)} training "
                            "images; pick a smaller value or null")
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))[:ds["train_size"]]
        train = train.subset(keep.sort().values)
    return train, test, spec


def build_attack(cfg: DictConfig, spec):
    node = {k: v for k, v in plain(cfg.attack).items() if k != "name"}
    if node.get("pattern_path"):
        node["pattern_path"] = to_absolute_path(node["pattern_path"])
    try:
        return instantiate(node, spec=spec)
    except AttackConfigError as err:
        raise UserError(str(err)) from None
    except Exception as err:  # Hydra wraps constructor errors; surface ours as one line
        cause = err.__cause__ or err
        if isinstance(cause, AttackConfigError):
            raise UserError(str(cause)) from None
        raise


def backdoor_key_material(cfg: DictConfig) -> dict:
    """The resolved upstream config: everything that can change the backdoored model, nothing that cannot
    (paths, device, logging). Pattern files count by their bytes."""
    attack = plain(cfg.attack)
    if attack.get("pattern_path"):
        attack["pattern_path"] = file_sha256(to_absolute_path(attack["pattern_path"]))
    dataset = {k: v for k, v in plain(cfg.dataset).items() if k != "download"}
    return {"dataset": dataset, "model": plain(cfg.model), "attack": attack,
            "train": plain(cfg.train), "seed": cfg.seed}


def make_model(cfg: DictConfig, spec) -> torch.nn.Module:
    m = plain(cfg.model)
    return build_model(m["name"], spec.num_classes, in_channels=spec.channels, width=m.get("width", 64),
                       timm_name=m.get("timm_name"))


def load_checkpoint_into(model: torch.nn.Module, path: str, cfg: DictConfig) -> None:
    """Accepts a bare state_dict or a BackdoorBench attack_result.pt ({'model': state_dict, ...})."""
    if not Path(path).is_file():
        raise UserError(f"backdoor_checkpoint={path} does not exist; give a state_dict file or null to train one")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise UserError(f"backdoor_checkpoint={path} holds no state_dict; save one with torch.save(model.state_dict())")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = next((ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()), str(err).splitlines()[0])
        raise UserError(f"backdoor_checkpoint={path} does not fit model={cfg.model.name} "
                        f"({sum(1 for _ in model.state_dict())} tensors): {first[:160]}; "
                        "choose the model/dataset it was trained with") from None


def warn_if_cpu_full_size(cfg, device, n_train: int) -> None:
    images = n_train * cfg.train.epochs
    if device.type == "cpu" and images > 2_000_000:
        width = cfg.model.get("width", 64)
        rate = 38.0 * (64 / width) ** 1.5 if cfg.model.name == "preactresnet18" else 38.0
        log.warning("This is a full-size training (%d images x %d epochs) on a CPU: about %.1f hours at "
                    "~%.0f img/s. For a CPU demo use experiment=quickstart.", n_train, cfg.train.epochs,
                    images / rate / 3600, rate)


def clean_budget(cfg: DictConfig, train: ImageSet, seed: int) -> ImageSet | None:
    """The defender's clean data, drawn from the *clean* training set (specs/defenses.md §0.3)."""
    b = plain(cfg.budget)
    if b["kind"] == "none":
        return None
    if b["kind"] == "ratio":
        if not 0 < b["ratio"] <= 1:
            raise UserError(f"budget.ratio={b['ratio']} is outside (0, 1]; use e.g. budget.ratio=0.05")
        return train.subset(sorted(random.Random(seed).sample(range(len(train)), int(len(train) * b["ratio"]))))
    if b["kind"] == "spc":
        rng = np.random.RandomState(seed)
        picks = []
        for c in torch.unique(train.labels).tolist():
            members = torch.nonzero(train.labels == c).flatten().numpy()
            if b["spc"] > len(members):
                raise UserError(f"budget.spc={b['spc']} but class {c} has only {len(members)} images")
            picks.extend(rng.choice(members, b["spc"], replace=False).tolist())
        return train.subset(sorted(picks))
    raise UserError(f"budget.kind={b['kind']!r}; use ratio, spc or none")


# ---------------------------------------------------------------------------------------------- stages
def backdoored_model(cfg, store: ArtifactStore, attack, train: ImageSet, test: ImageSet, spec, device,
                     evaluate) -> tuple[torch.nn.Module, dict]:
    """Train the backdoored model once per upstream config; later jobs load it from the store."""
    model = make_model(cfg, spec)
    if cfg.backdoor_checkpoint:
        load_checkpoint_into(model, to_absolute_path(cfg.backdoor_checkpoint), cfg)
        model.to(device).eval()
        return model, {"source": "checkpoint", "path": str(cfg.backdoor_checkpoint),
                       "reference_metrics": evaluate(model)}
    material = backdoor_key_material(cfg)
    key = config_key(material)

    def produce(tmp: Path) -> dict:
        seed_everything(cfg.seed)
        poisoned = attack.poison_train(train, cfg.seed)
        fresh = make_model(cfg, spec)  # initialised right after seeding, so the init is reproducible
        warn_if_cpu_full_size(cfg, device, len(train))
        start = time.perf_counter()
        history = train_model(fresh, poisoned.data, spec, TrainSettings(**plain(cfg.train)), device=device,
                              seed=cfg.seed, hooks=attack.training_hooks(fresh, device),
                              progress=cfg.progress, description=f"backdoor {cfg.attack.name}")
        seconds = time.perf_counter() - start
        torch.save({k: v.cpu() for k, v in fresh.state_dict().items()}, tmp / "model.pt")
        torch.save(attack.state_dict(), tmp / "attack.pt")
        torch.save(poisoned.poison_indices, tmp / "poison_indices.pt")
        return {"train_seconds": seconds, "history": history, "poisoned": len(poisoned.poison_indices),
                "train_size": len(train), "reference_metrics": evaluate(fresh)}

    path, marker, created = store.get_or_create("backdoor", key, produce, description=material)
    model.load_state_dict(torch.load(path / "model.pt", map_location="cpu"))
    attack.load_state_dict(torch.load(path / "attack.pt", map_location="cpu", weights_only=False))
    model.to(device).eval()
    meta = marker["meta"]
    info = {"source": "trained" if created else "store", "key": key, "poisoned": meta["poisoned"],
            "train_size": meta["train_size"], "train_seconds": meta["train_seconds"],
            "final_train_loss": meta["history"][-1]["loss"] if meta["history"] else None,
            "train_images_per_second": float(np.mean([h["images_per_second"] for h in meta["history"]])),
            "reference_metrics": meta["reference_metrics"]}
    return model, info


def run_defense(cfg, store: ArtifactStore, model, backdoor_info: dict, data, device, evaluate):
    d = plain(cfg.defense)
    try:
        fn = get_method(d["fn"])
    except Exception as err:
        raise UserError(f"defense.fn={d['fn']} cannot be imported ({err}); check conf/defense/{d['name']}.yaml") from None
    params = dict(d.get("params") or {})
    kwargs = {}
    cache = d.get("cache_stage")
    if cache and backdoor_info.get("key"):
        # an expensive first stage that depends only on (model, a few params, seed): computed once per
        # backdoored model and reused across sweeps of the later stages (e.g. OTBR's gamma / lambda)
        stage_fn = get_method(cache["fn"])
        stage_params = {p: params[p] for p in cache["params"]}
        material = {"backdoor": backdoor_info["key"], "fn": cache["fn"], "params": stage_params, "seed": d["seed"]}

        def produce(tmp: Path) -> dict:
            log.info("%s: computing %s (cached afterwards for this backdoored model)", d["name"], cache["fn"])
            start = time.perf_counter()
            torch.save(stage_fn(model, seed=d["seed"], device=device, **stage_params), tmp / "stage.pt")
            return {"seconds": time.perf_counter() - start}

        path, marker, created = store.get_or_create("defense_stage", config_key(material), produce, material)
        kwargs[cache["result_arg"]] = torch.load(path / "stage.pt", map_location="cpu", weights_only=False)
        stage_info = {"cached_stage": cache["fn"], "cached_stage_source": "computed" if created else "store",
                      "cached_stage_seconds": marker["meta"]["seconds"]}
    else:
        stage_info = {}
    if "evaluate" in inspect.signature(fn).parameters:
        kwargs["evaluate"] = evaluate  # report-only (e.g. OTBR's pruned model, Table 2 "no fusion")
    start = time.perf_counter()
    defended, diagnostics = fn(model, data, seed=d["seed"], device=device, **params, **kwargs)
    diagnostics = {**stage_info, **(diagnostics or {})}
    return defended, diagnostics, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- the job
def run(cfg: DictConfig) -> dict:
    t0 = time.perf_counter()
    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    metrics_path = out_dir / "metrics.json"
    if metrics_path.exists():
        raise UserError(f"{metrics_path} already holds results; choose a new hydra.sweep.dir / hydra.run.dir "
                        "instead of overwriting them")
    job_num = hc.job.get("num", 0) or 0
    device = select_device(cfg.device, job_num)
    store = ArtifactStore(to_absolute_path(cfg.paths.store_dir))
    timings = {}

    start = time.perf_counter()
    train, test, spec = load_data(cfg)
    attack = build_attack(cfg, spec)
    timings["data_seconds"] = time.perf_counter() - start

    bd_test_cache = {}  # built on first use, from the attack's current state

    def evaluate(m: torch.nn.Module) -> dict:
        if "bd" not in bd_test_cache:
            bd_test_cache["bd"] = attack.bd_test(test)
        bd = bd_test_cache["bd"]
        return backdoor_metrics(m, test, bd.images, bd.target_labels, bd.true_labels, spec, device=device)

    start = time.perf_counter()
    model, backdoor_info = backdoored_model(cfg, store, attack, train, test, spec, device, evaluate)
    timings["backdoor_seconds"] = time.perf_counter() - start
    bd_test_cache.clear()  # the attack state may have been reloaded from the store: rebuild bd_test from it

    data = None
    if not cfg.defense.data_free:
        clean = clean_budget(cfg, train, cfg.defense.seed)
        data = DefenseData(clean=clean, spec=spec, augment=lambda x, g: random_crop_flip(x, spec, g),
                           apply_trigger=attack.apply_trigger, evaluate=evaluate)
    defended, diagnostics, timings["defense_seconds"] = run_defense(cfg, store, model, backdoor_info, data,
                                                                    device, evaluate)
    start = time.perf_counter()
    reference = backdoor_info["reference_metrics"]
    # a defense returns a new model (never edits its input); getting the same object back means "unchanged"
    metrics = dict(reference) if defended is model else evaluate(defended)
    timings["evaluate_seconds"] = time.perf_counter() - start
    timings["total_seconds"] = time.perf_counter() - t0

    record = {
        "choices": {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra")},
        "overrides": list(hc.overrides.task),
        "metrics": metrics,
        "reference_metrics": reference,
        "defense": {"name": cfg.defense.name, "params": plain(cfg.defense.params), "seed": cfg.defense.seed,
                    "data_free": bool(cfg.defense.data_free),
                    "budget": "none" if cfg.defense.data_free else plain(cfg.budget),
                    "clean_samples": None if data is None else len(data.clean)},
        "diagnostics": diagnostics,
        "backdoor": backdoor_info,
        "dataset": {"name": spec.name, "train_size": len(train), "test_size": len(test)},
        "timings": timings,
        "environment": {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
                        "git": git_revision()},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(metrics_path, record)
    if cfg.logger.kind == "wandb":
        from experiments.loggers import log_to_wandb

        log_to_wandb(cfg, record, out_dir)
    log.info("%s / %s / %s: ACC %.2f ASR %.2f RA %.2f (no defense: ACC %.2f ASR %.2f RA %.2f)",
             spec.name, cfg.attack.name, cfg.defense.name, metrics["acc"], metrics["asr"], metrics["ra"],
             reference["acc"], reference["asr"], reference["ra"])
    return record
