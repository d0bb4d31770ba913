"""No defense: the backdoored model itself (the reference every table compares against)."""
from __future__ import annotations

import torch.nn as nn

from baselines.base import defense


@defense(data_free=True)
def defend(model: nn.Module, data=None, *, seed: int = 0, device=None) -> tuple[nn.Module, dict]:
    return model, {}
