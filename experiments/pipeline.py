"""One job: config -> objects -> backdoored model (trained once, from the store) -> defense -> metrics.json.

This and run.py are the only places where Hydra configs meet the torch-only packages (docs/architecture.md).
A job either writes metrics.json (its result) or failed.json (the stage and the reason) into its own
directory; a sweep goes on after a failed job, and rerunning a sweep skips the jobs that finished.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import time
import traceback
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from baselines.base import takes_keyword
from bdcore.data import DefenseData, random_crop_flip
from bdcore.device import select_device
from bdcore.io import jsonable, write_json_atomic
from bdcore.precision import capabilities, resolve_precision
from experiments import build as B
from experiments import stages as S
from experiments.build import UserError, plain
from experiments.resources import StoreResources
from experiments.store import ArtifactStore, config_key, file_sha256

log = logging.getLogger(__name__)

METRICS, FAILED = "metrics.json", "failed.json"
# settings that never change a result: a rerun that differs only in these is the same job
NOT_RESULT_KEYS = ("progress", "device", "threads", "logger", "paths", "checkpoint_every")


def git_revision() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def pot_version() -> str | None:
    """POT's version: OTBR's transport plans (and their tie-breaks) come from its exact solver."""
    try:
        import ot

        return ot.__version__
    except ImportError:
        return None


def without_progress(node):
    """A method's node minus its own copy of the progress switch (e.g. `attack.progress: ${progress}`)."""
    return {k: v for k, v in node.items() if k != "progress"} if isinstance(node, dict) else node


def without_switches(config: dict) -> dict:
    """A resolved config minus the settings that never change a result (NOT_RESULT_KEYS, progress copies)."""
    return {k: without_progress(v) for k, v in config.items() if k not in NOT_RESULT_KEYS}


def result_config(cfg: DictConfig) -> dict:
    return without_switches(OmegaConf.to_container(cfg, resolve=True))


def set_threads(cfg: DictConfig, device: torch.device) -> int:
    """Intra-op threads: `threads`, else the usable cores divided by the launcher's parallel jobs."""
    if cfg.threads is not None:
        threads = int(cfg.threads)
        if threads < 1:
            raise UserError(f"threads={cfg.threads} must be >= 1 (or null for cores / parallel jobs)")
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        launcher = HydraConfig.get().launcher
        parallel = int(launcher.get("n_jobs", 1) or 1) if "n_jobs" in launcher else 1
        if parallel <= 0:  # joblib's -1: as many parallel jobs as cores
            parallel = cores
        threads = max(1, cores // parallel)
    torch.set_num_threads(threads)
    return threads


def backdoor_material(cfg: DictConfig, data: B.Data, precision: str, threads: int, device) -> dict:
    """Everything that can change the backdoored model, nothing that cannot (paths, device kind, logging).
    Pattern files count by their bytes; CPU results depend on the thread count, so it counts on CPUs."""
    attack = without_progress(plain(cfg.attack))
    if attack.get("pattern_path"):
        attack["pattern_path"] = file_sha256(attack["pattern_path"])
    material = {"dataset": {"_target_": cfg.dataset._target_, **B.dataset_identity(cfg, data.source)},
                "model": plain(cfg.model), "attack": attack, "train": plain(cfg.train), "seed": cfg.seed,
                "precision": precision}
    if device.type == "cpu":
        material["cpu_threads"] = threads
    return material


def attack_resources(cfg: DictConfig, store: ArtifactStore, material: dict, data: B.Data,
                     make_model, settings, device: torch.device, precision: str) -> StoreResources:
    """What an attack's `prepare` generates or loads, keyed by the backdoored model's material minus the attack:
    a resource (LF pattern, TrojanNN trigger) is made against the clean model of this exact cell."""
    clean_material = {k: material[k] for k in material if k != "attack"}
    return StoreResources(store, device, clean_material,
                          lambda: S.train_clean_model(store, clean_material, train=data.train, spec=data.spec,
                                                      make_model=make_model, settings=settings, seed=cfg.seed,
                                                      device=device, precision=precision, progress=cfg.progress,
                                                      checkpoint_every=cfg.get("checkpoint_every", 1)))


def previous_result(out_dir: Path, cfg: DictConfig) -> dict | None:
    """The job's metrics.json if it finished with this config; refuses to overwrite another config's result."""
    path = out_dir / METRICS
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{path} exists but is unreadable; move it away to rerun this job") from None
    if result_config_of(record) != jsonable(result_config(cfg)):
        raise UserError(f"{path} already holds results of a different config; choose a new hydra.sweep.dir / "
                        "hydra.run.dir instead of overwriting them")
    return record


def result_config_of(record: dict) -> dict:
    return without_switches(record.get("config", {}))


def run(cfg: DictConfig) -> dict:
    """Run one job and return its record; a failure writes failed.json and re-raises."""
    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    done = previous_result(out_dir, cfg)
    if done is not None:
        log.info("%s: already finished with this config, skipped (delete it to rerun)", out_dir / METRICS)
        print(f"skipped (finished earlier): {out_dir.name}", flush=True)
        return done
    progress = {"stage": "setup"}
    try:
        record = run_stages(cfg, hc, progress)
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt):
            raise
        out_dir.mkdir(parents=True, exist_ok=True)
        user = isinstance(err, B.USER_ERRORS)
        write_json_atomic(out_dir / FAILED, {
            "stage": progress["stage"], "reason": str(err).strip().splitlines()[0] if str(err).strip() else
            type(err).__name__, "kind": "user" if user else type(err).__name__,
            "traceback": None if user else traceback.format_exc(), "overrides": list(hc.overrides.task),
            "choices": {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra")},
            "config": OmegaConf.to_container(cfg, resolve=True), "time": time.time()})
        raise
    write_json_atomic(out_dir / METRICS, record)
    (out_dir / FAILED).unlink(missing_ok=True)  # an earlier failure of this job, now redone
    return record


def prepare(cfg: DictConfig, names: dict) -> dict:
    """Build every object a job needs from its config, without reading data or training: a bad value fails
    here, in one line, before any work (the data source knows its spec before loading)."""
    every = cfg.get("checkpoint_every", 1)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise UserError(f"checkpoint_every={every} is invalid; use an epoch count >= 1, e.g. checkpoint_every=5")
    defense = B.build_defense(cfg, names["defense"])
    budget = None if defense.traits.data_free else B.build_budget(cfg)
    settings = B.train_settings(cfg)
    source = B.build_source(cfg)
    attack = B.build_attack(cfg, source.spec)
    make_model = B.model_factory(cfg, source.spec)
    return {"defense": defense, "budget": budget, "settings": settings, "source": source, "attack": attack,
            "make_model": make_model}


def run_stages(cfg: DictConfig, hc, progress: dict) -> dict:
    t0 = time.perf_counter()
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra")}
    names = {g: choices.get(g) for g in ("dataset", "model", "attack", "defense")}
    job_num = hc.job.get("num", 0) or 0

    # ---- config -> objects, all checked before any data is read or any model trained
    device = select_device(cfg.device, job_num)
    try:
        precision = resolve_precision(str(cfg.precision), device)
        eval_precision = resolve_precision(str(cfg.eval_precision), device)
    except ValueError as err:
        raise UserError(str(err)) from None
    threads = set_threads(cfg, device)
    setup = prepare(cfg, names)
    store = ArtifactStore(cfg.paths.store_dir)
    defense, settings = setup["defense"], setup["settings"]
    timings = {}

    progress["stage"] = "data"
    start = time.perf_counter()
    data = B.load_data(setup["source"])
    attack, make_model = setup["attack"], setup["make_model"]
    if settings.batch_size > len(data.train) and not cfg.backdoor_checkpoint:
        raise UserError(f"train.batch_size={settings.batch_size} is larger than the {len(data.train)} training "
                        f"images; use e.g. train.batch_size={min(128, len(data.train))}")
    timings["data_seconds"] = time.perf_counter() - start

    # ---- the backdoored model and the attack state it was trained with
    progress["stage"] = "backdoor"
    start = time.perf_counter()
    if cfg.backdoor_checkpoint:
        model = make_model()
        S.load_checkpoint_into(model, str(cfg.backdoor_checkpoint), names["model"])
        model.to(device).eval()
        trained_attack, backdoor_key = attack, None
        backdoor_info = {"source": "checkpoint", "path": str(cfg.backdoor_checkpoint),
                         "sha256": file_sha256(cfg.backdoor_checkpoint)}
    else:
        material = backdoor_material(cfg, data, precision, threads, device)
        backdoor_key = config_key(material)
        resources = attack_resources(cfg, store, material, data, make_model, settings, device, precision)
        model, state, meta, created = S.train_backdoored_model(
            store, backdoor_key, material, attack=attack, train=data.train, spec=data.spec, make_model=make_model,
            settings=settings, seed=cfg.seed, device=device, precision=precision, progress=cfg.progress,
            resources=resources, description=f"backdoor {names['attack']}", checkpoint_every=cfg.get("checkpoint_every", 1))
        trained_attack = attack.restored(state)
        history = meta["history"]
        backdoor_info = {"source": "trained" if created else "store", "key": backdoor_key,
                         "poisoned": meta["poisoned"], "train_size": meta["train_size"],
                         "train_seconds": meta["train_seconds"], "resource_seconds": meta.get("resource_seconds"),
                         "resumed_from_epoch": meta.get("resumed_from_epoch", 0),
                         "resources": resources.used, "attack": trained_attack.trigger_report(),
                         "final_train_loss": history[-1]["loss"] if history else None,
                         "train_images_per_second": (sum(h["images_per_second"] for h in history) / len(history)
                                                     if history else None)}
    timings["backdoor_seconds"] = time.perf_counter() - start

    evaluate = S.Evaluator(trained_attack, data.test, data.spec, device, eval_precision, store=store,
                           context=backdoor_key)
    progress["stage"] = "evaluate backdoored model"
    start = time.perf_counter()
    reference = evaluate(model)
    timings["reference_evaluate_seconds"] = time.perf_counter() - start

    # ---- the defense
    progress["stage"] = "defense"
    kwargs = {}
    stage_info = {}
    stage = defense.traits.cached_stage
    if stage is not None and backdoor_key is not None:
        try:
            kwargs[stage.result_arg], stage_info = S.cached_stage_result(
                store, stage, backdoor_key, model, defense.hyper_parameters, defense.seed, device, defense.name,
                progress=bool(cfg.progress))
        except ValueError as err:
            raise UserError(f"defense={defense.name}: {str(err).strip().splitlines()[0]}") from None
    if defense.traits.wants_evaluator:
        kwargs["evaluate"] = evaluate
    if takes_keyword(defense.fn, "progress"):  # progress=false silences every defense's bars
        kwargs["progress"] = bool(cfg.progress)
    defense_data = None
    if not defense.traits.data_free:
        budget = setup["budget"]
        indices = budget.indices(data.train.labels)
        if indices is None:
            raise UserError(f"defense={defense.name} needs clean data: use budget=ratio (the default) or budget=spc")
        validation = budget.validation_indices(data.train.labels)
        defense_data = DefenseData(
            clean=data.train.subset(indices), spec=data.spec, clean_indices=indices,
            validation=None if validation is None else data.train.subset(validation),
            augment=lambda x, g: random_crop_flip(x, data.spec, g), apply_trigger=trained_attack.apply_trigger,
            evaluate=evaluate, precision=precision)
    start = time.perf_counter()
    try:
        defended, diagnostics = defense.fn(model, defense_data, device=device, **kwargs)
    except ValueError as err:  # defenses raise ValueError for settings a user can fix (baselines/base.py)
        raise UserError(f"defense={defense.name}: {str(err).strip().splitlines()[0]}") from None
    timings["defense_seconds"] = time.perf_counter() - start

    progress["stage"] = "evaluate defended model"
    start = time.perf_counter()
    # a defense returns a new model (never edits its input); getting the same object back means "unchanged"
    metrics = dict(reference) if defended is model else evaluate(defended)
    timings["evaluate_seconds"] = time.perf_counter() - start
    timings["evaluations_computed"] = evaluate.computed
    timings["total_seconds"] = time.perf_counter() - t0

    record = {
        "choices": choices,
        "overrides": list(hc.overrides.task),
        "metrics": metrics,
        "reference_metrics": reference,
        "defense": {"name": defense.name, "hyper_parameters": defense.hyper_parameters, "seed": defense.seed,
                    "data_free": defense.traits.data_free,
                    "budget": None if defense.traits.data_free else plain(cfg.budget),
                    "clean_samples": None if defense_data is None else len(defense_data.clean),
                    "validation_samples": None if defense_data is None or defense_data.validation is None
                    else len(defense_data.validation)},
        "diagnostics": {**stage_info, **(diagnostics or {})},
        "backdoor": backdoor_info,
        "dataset": {"name": data.spec.name, "train_size": len(data.train), "test_size": len(data.test)},
        "timings": timings,
        "environment": {"device": str(device), "precision": precision, "precision_requested": str(cfg.precision),
                        "eval_precision": eval_precision,
                        "capabilities": capabilities(device), "threads": threads, "torch": torch.__version__,
                        "pot": pot_version(),
                        "python": platform.python_version(), "git": git_revision()},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    progress["stage"] = "log"
    B.build(cfg.logger, "logger").log(record, Path(hc.runtime.output_dir))
    log.info("%s / %s / %s: ACC %.2f ASR %.2f RA %.2f (no defense: ACC %.2f ASR %.2f RA %.2f)",
             data.spec.name, names["attack"], defense.name, metrics["acc"], metrics["asr"], metrics["ra"],
             reference["acc"], reference["asr"], reference["ra"])
    return record
