"""Device selection: GPU first, CPU as the fallback that must always work."""
from __future__ import annotations

import torch


def select_device(preference: str = "auto", job_index: int = 0) -> torch.device:
    """'auto' picks CUDA (job_index modulo the GPU count, so parallel sweep jobs spread over GPUs),
    then Apple MPS, then CPU. Any explicit torch device string is honoured as given."""
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda", job_index % torch.cuda.device_count())
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
