"""Helpers shared by tests (import with `from helpers import ...`; pytest puts tests/ on the path)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bdcore.data import ImageSet

ROOT = Path(__file__).resolve().parents[1]
# BackdoorBench's resource files, kept beside the repository on the team's machines (never committed)
SHARED_BB = ROOT.parent / "shared" / "data" / "backdoorbench"


def needs_backdoorbench_file(name: str) -> Path:
    """The path of a BackdoorBench resource file, or skip the test saying which file is missing."""
    path = SHARED_BB / name
    if not path.is_file():
        pytest.skip(f"needs BackdoorBench's resource file {path} (not shipped with this repository)")
    return path


def run_cli(args, cwd=ROOT, env_extra=None, timeout=600):
    """Run `python run.py ...` in a subprocess, as a user would."""
    env = {**os.environ, "WANDB_MODE": "disabled", **(env_extra or {})}
    return subprocess.run([sys.executable, "run.py", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def fake_job(root, attack, defense, acc, asr, ref=(90.0, 99.0), overrides=(), seed=0, failed=False):
    """A job directory with a hand-made metrics.json (or failed.json), as the pipeline writes them."""
    ov = [f"attack={attack}", f"defense={defense}", *overrides] + ([f"seed={seed}"] if seed else [])
    job = root / ",".join(sorted(ov))
    job.mkdir(parents=True)
    choices = {"dataset": "cifar10", "model": "preactresnet18", "attack": attack, "defense": defense}
    if failed:
        (job / "failed.json").write_text(json.dumps({"stage": "defense", "reason": "boom", "overrides": ov,
                                                     "choices": choices, "config": {"seed": seed}}))
        return
    record = {"choices": choices, "overrides": ov, "defense": {"name": defense}, "config": {"seed": seed},
              "metrics": {"acc": acc, "asr": asr, "ra": 100 - asr},
              "reference_metrics": {"acc": ref[0], "asr": ref[1], "ra": 1.0},
              "diagnostics": {"pruned_metrics": {"acc": acc - 1, "asr": asr / 2, "ra": 0}},
              "environment": {"precision": "fp32", "threads": 2}}
    (job / "metrics.json").write_text(json.dumps(record))


class FakeResources:
    """attacks.base.AttackResources in memory: `cached` keys on (name, material), round-trips the result
    through torch.save / weights_only loading like the store, and counts what it produced and was asked."""

    device = torch.device("cpu")

    def __init__(self, model=None):
        self.model, self.store, self.produced, self.calls, self.clean_model_calls = model, {}, 0, 0, 0

    def cached(self, name, material, produce):
        self.calls += 1
        key = (name, json.dumps(material, sort_keys=True))  # material must be JSON-able (the store hashes it)
        if key not in self.store:
            self.produced += 1
            result = produce()
            assert all(isinstance(v, torch.Tensor) for v in result.values())
            buffer = io.BytesIO()
            torch.save(result, buffer)
            self.store[key] = buffer.getvalue()
        return torch.load(io.BytesIO(self.store[key]), weights_only=True)

    def clean_model(self):
        if self.model is None:
            raise AssertionError("this attack should not need a clean model")
        self.clean_model_calls += 1
        return self.model


class Guarded(ImageSet):
    """An ImageSet counting reads of its tensors, or forbidding them."""

    def __init__(self, base: ImageSet, forbid: bool = False):
        super().__init__(base.images, base.labels)
        object.__setattr__(self, "_forbid", forbid)
        object.__setattr__(self, "reads", 0)

    def __getattribute__(self, name):
        if name in ("images", "labels"):
            try:
                forbid = object.__getattribute__(self, "_forbid")
            except AttributeError:  # still inside __init__
                return object.__getattribute__(self, name)
            if forbid:
                raise AssertionError(f"the defense read {name} of a set it must not touch")
            object.__setattr__(self, "reads", object.__getattribute__(self, "reads") + 1)
        return object.__getattribute__(self, name)
