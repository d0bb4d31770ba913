"""Sweeps that survive faults and bad input: no code execution on load, failure isolation and resume,
validation before any work, job directories that never collide, stage results that are never stored NaN."""
import json
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from baselines.base import CachedStage
from bdcore.models import PreActResNet18
from experiments import stages
from experiments.build import USER_ERRORS, UserError
from experiments.pipeline import prepare
from experiments.store import ArtifactStore
from helpers import ROOT, run_cli

TINY = ["dataset=synthetic", "model.width=4", "progress=false", "threads=1"]


def compose_job(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=False)


def names(overrides):
    picked = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides if "=" in o}
    return {g: picked.get(g, d) for g, d in (("dataset", "cifar10"), ("model", "preactresnet18"),
                                             ("attack", "badnet"), ("defense", "none"))}


# ------------------------------------------------------------------------------------ safe loading
class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {Exploit.marker}",))


@pytest.mark.parametrize("content", ["exploit", "empty", "garbage", "truncated"])
def test_a_checkpoint_can_never_run_code_and_bad_files_are_one_line(tmp_path, content):
    path = tmp_path / "model.pt"
    Exploit.marker = tmp_path / "pwned"
    if content == "exploit":
        torch.save({"model": Exploit()}, path)
    elif content == "empty":
        path.write_bytes(b"")
    elif content == "garbage":
        path.write_bytes(os.urandom(4096))
    else:
        torch.save(PreActResNet18(4, 3, 4).state_dict(), path)
        path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(UserError) as err:
        stages.load_checkpoint_into(PreActResNet18(4, 3, 4), str(path), "preactresnet18")
    assert "\n" not in str(err.value) and "backdoor_checkpoint" in str(err.value)
    assert not Exploit.marker.exists()


def test_a_backdoorbench_record_with_numpy_arrays_loads(tmp_path):
    import numpy as np

    model = PreActResNet18(4, 3, 4)
    torch.save({"model": model.state_dict(), "bd_train": {"poison_indicator": np.zeros(10, dtype=np.int64)}},
               tmp_path / "attack_result.pt")
    fresh = PreActResNet18(4, 3, 4)
    stages.load_checkpoint_into(fresh, str(tmp_path / "attack_result.pt"), "preactresnet18")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


# --------------------------------------------------------------------------- validation before work
BAD_VALUES = [
    ("defense=otbr", "defense.prune.ratio", [1.5, -0.1, 1.0]), ("defense=otbr", "defense.fusion.lambda_", [2, -1]),
    ("defense=otbr", "defense.unlearn.steps", [0, -3]), ("defense=otbr", "defense.unlearn.lr", [1e9, 0]),
    ("defense=otbr", "defense.fusion.mode", ["otx"]), ("defense=none", "model.width", [0, -2]),
    ("defense=none", "dataset.train_size", [0, -1]), ("defense=none", "attack.poison_ratio", [1.5, 0, "abc"]),
    ("defense=none", "attack.target", [4, -1]), ("defense=none", "train.epochs", [0, -1]),
    ("defense=none", "train.batch_size", [0]), ("defense=none", "train.lr", [0, -0.1]),
]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from([(d, k, v) for d, k, vs in BAD_VALUES for v in vs]))
def test_every_bad_value_fails_in_one_line_before_any_data_or_training(case):
    defense, key, value = case
    overrides = ["dataset=synthetic", "model.width=4", defense, f"{key}={value}"]
    cfg = compose_job(overrides)
    with pytest.raises(USER_ERRORS) as err:
        prepare(cfg, names(overrides))
    message = str(err.value)
    assert "\n" not in message and key.split(".")[-1] in message, message


def test_the_default_configs_pass_validation():
    for defense in ("none", "otbr", "clp"):
        overrides = ["dataset=synthetic", "model.width=4", f"defense={defense}"]
        prepare(compose_job(overrides), names(overrides))


# ------------------------------------------------------------------------------- never store NaN
def test_a_nan_stage_result_is_never_stored_as_complete(tmp_path):
    store = ArtifactStore(tmp_path)

    def diverging_stage(model, *, seed, device, unlearn):
        return {"conv1.weight": torch.full((4,), float("nan"))}

    stage = CachedStage(diverging_stage, params=("unlearn",), result_arg="x")
    with pytest.raises(UserError, match="NaN"):
        stages.cached_stage_result(store, stage, "k" * 64, PreActResNet18(4, 3, 4), {"unlearn": {}}, 0, "cpu", "otbr")
    assert not (tmp_path / "defense_stage").exists() or not any((tmp_path / "defense_stage").iterdir())


# ------------------------------------------------------------------------- sweeps: isolation, resume
@pytest.mark.slow
def test_a_failed_job_does_not_stop_the_sweep_and_a_rerun_redoes_only_it(tmp_path):
    sweep = tmp_path / "multirun"
    args = ["-m", *TINY, "attack=badnet", "attack.poison_ratio=1.5,0.1", "defense=none",
            f"hydra.sweep.dir={sweep}", f"paths.store_dir={tmp_path / 'store'}"]
    first = run_cli(args)
    assert first.returncode == 1, first.stderr[-2000:]
    bad = sweep / "attack.poison_ratio=1.5,attack=badnet,dataset=synthetic,defense=none,model.width=4"
    good = sweep / "attack.poison_ratio=0.1,attack=badnet,dataset=synthetic,defense=none,model.width=4"
    failed = json.loads((bad / "failed.json").read_text())
    assert failed["kind"] == "user" and "poison_ratio=1.5" in failed["reason"] and not (bad / "metrics.json").exists()
    assert (good / "metrics.json").exists() and "Results (" in first.stdout
    assert "1 job(s) failed" in first.stderr.strip().splitlines()[-1]
    assert "failed" in (sweep / "results.md").read_text()
    before = (good / "metrics.json").read_text()
    second = run_cli(args)
    assert second.returncode == 1 and "skipped (finished earlier)" in second.stdout
    assert (good / "metrics.json").read_text() == before and (bad / "failed.json").exists()


@pytest.mark.slow
def test_sweeping_files_never_shares_a_job_directory(tmp_path):
    from PIL import Image

    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        torch.save(PreActResNet18(4, 3, 4).state_dict(), d / "model.pt")
        Image.new("RGB", (32, 32), (255, 255, 255)).save(d / "pattern.png")
    sweep = tmp_path / "multirun"
    result = run_cli(["-m", *TINY, "defense=none", f"backdoor_checkpoint={a / 'model.pt'},{b / 'model.pt'}",
                      f"hydra.sweep.dir={sweep}", f"paths.store_dir={tmp_path / 'store'}"])
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_cli(["-m", *TINY, "defense=none", "train.epochs=1", "attack=blended",
                      f"attack.pattern_path={a / 'pattern.png'},{b / 'pattern.png'}",
                      f"hydra.sweep.dir={sweep}", f"paths.store_dir={tmp_path / 'store'}"])
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = sorted(p.parent.name for p in sweep.rglob("metrics.json"))
    assert len(jobs) == 4 and len(set(jobs)) == 4 and not any("/" in j for j in jobs)
    assert sum("backdoor_checkpoint=model-" in j for j in jobs) == 2
    assert sum("attack.pattern_path=pattern-" in j for j in jobs) == 2


@pytest.mark.slow
def test_every_distinct_model_is_evaluated_once_across_jobs(tmp_path):
    sweep = tmp_path / "multirun"
    result = run_cli(["-m", *TINY, "attack=badnet", "defense=otbr", "defense.fusion.lambda_=0.3,0.7",
                      "defense.unlearn.batch_size=16", f"hydra.sweep.dir={sweep}", f"paths.store_dir={tmp_path / 'store'}"])
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(p.read_text()) for p in sorted(sweep.rglob("metrics.json"))]
    # job 1: reference + pruned + fused; job 2: only its own fused model is new
    assert sorted(r["timings"]["evaluations_computed"] for r in records) == [1, 3]
    assert records[0]["diagnostics"]["pruned_metrics"] == records[1]["diagnostics"]["pruned_metrics"]
