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

from bdcore.data import DatasetSpec, ImageSet

ROOT = Path(__file__).resolve().parents[1]
# BackdoorBench's resource files (its trigger images, LF patterns) are not ours to ship: the tests that
# compare against them read a folder of copies named like `badnet__trigger_image.png` from this variable.
BACKDOORBENCH_FILES = "OTBR_BACKDOORBENCH_FILES"


def needs_backdoorbench_file(name: str) -> Path:
    """The path of a BackdoorBench resource file, or skip the test saying which file is missing."""
    folder = os.environ.get(BACKDOORBENCH_FILES)
    if not folder:
        pytest.skip(f"needs BackdoorBench's resource file {name}: set {BACKDOORBENCH_FILES} to a folder holding it")
    path = Path(folder) / name
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


# --------------------------------------------------------------------------------------------------
# the batch-poisoning attacks (WaNet, BPP)
# --------------------------------------------------------------------------------------------------

def random_images(n: int, spec: DatasetSpec, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, spec.channels, spec.height, spec.width), generator=g, dtype=torch.uint8)


def backdoorbench_transforms(spec: DatasetSpec):
    """BackdoorBench's "reversible" test transform (ToTensor, Normalize) and its denormaliser."""
    import torchvision.transforms as T

    normalization = T.Normalize(list(spec.mean), list(spec.std))
    to_input = T.Compose([T.ToTensor(), normalization])
    denormalizer = T.Compose([T.Normalize(mean=[0.0] * spec.channels, std=[1 / s for s in spec.std]),
                              T.Normalize(mean=[-m for m in spec.mean], std=[1.0] * spec.channels)])
    return to_input, denormalizer


def short_batch_poisoning_run(attack, spec: DatasetSpec) -> dict:
    """Backdoor metrics of a width-4 PreAct-ResNet18 trained 20 epochs (batch 32) on 256 synthetic images
    through the one loop with `attack`'s schedule and hooks; the attack poisons per batch, so its
    training set is the clean one."""
    from bdcore.datasets import make_synthetic
    from bdcore.evaluate import backdoor_metrics
    from bdcore.models import PreActResNet18
    from bdcore.train import TrainSettings, train_model

    cpu = torch.device("cpu")
    train, test = make_synthetic(num_classes=spec.num_classes, size=spec.height, train_per_class=64,
                                 test_per_class=32, seed=0)
    poisoned = attack.poison_train(train, seed=0)
    assert poisoned.data is train and len(poisoned.poison_indices) == 0
    torch.manual_seed(0)
    model = PreActResNet18(num_classes=spec.num_classes, in_channels=spec.channels, width=4)
    settings = attack.training_settings(TrainSettings(epochs=20, batch_size=32))
    train_model(model, poisoned.data, spec, settings, device=cpu, seed=0, hooks=attack.training_hooks(model, cpu),
                progress=False)
    bd = attack.bd_test(test)
    return backdoor_metrics(model, test, bd.images, bd.target_labels, bd.true_labels, spec)
