"""Small I/O helpers shared by every package: atomic writes and JSON-safe values.

An atomic write goes to a temporary file in the same directory and is renamed over the target, so a
reader sees either the old file or the complete new one, never a half-written file.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch


def jsonable(value: Any) -> Any:
    """Plain JSON types (str/int/float/bool/None, lists, str-keyed dicts); tensors and numpy values become
    lists or numbers, non-finite floats become None (JSON has no NaN), anything else its str()."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def _temporary_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Write `payload` (made JSON-safe) as indented JSON, atomically."""
    path = Path(path)
    tmp = _temporary_beside(path)
    try:
        tmp.write_text(json.dumps(jsonable(payload), indent=2, sort_keys=True, allow_nan=False))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save, atomically."""
    path = Path(path)
    tmp = _temporary_beside(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def device_of(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU for a module without parameters)."""
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
