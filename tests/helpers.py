"""Helpers shared by tests (import with `from helpers import ...`; pytest puts tests/ on the path)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
