import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_BB = ROOT.parent / "shared" / "data" / "backdoorbench"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # wandb must never need a network or an account in tests
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")


@pytest.fixture
def cifar_spec():
    from bdcore.data import DatasetSpec

    return DatasetSpec("cifar10", 10, 3, 32, 32, (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261), hflip=True)


@pytest.fixture
def gray_spec():
    from bdcore.data import DatasetSpec

    return DatasetSpec("fashion_mnist", 10, 1, 28, 28, (0.286,), (0.353,))


def run_cli(args, cwd=ROOT, env_extra=None, timeout=600):
    """Run `python run.py ...` in a subprocess, as a user would."""
    import subprocess

    env = {**os.environ, "WANDB_MODE": "disabled", **(env_extra or {})}
    return subprocess.run([sys.executable, "run.py", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
