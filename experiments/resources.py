"""The artifact store seen by an attack that generates a resource (attacks.base.AttackResources).

Resources are keyed by the attack's own material plus the data set and seed; the clean model is keyed by
(dataset, model, train, seed, precision), so LF and TrojanNN on the same cell share one clean training.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from experiments.store import ArtifactStore, config_key


class StoreResources:
    def __init__(self, store: ArtifactStore, device: torch.device, base_material: dict,
                 clean_model: Callable[[], torch.nn.Module]):
        self.store, self.device, self.base_material = store, device, base_material
        self._clean_model = clean_model
        self.used: list[dict] = []  # what this job generated or loaded, for metrics.json

    def cached(self, name: str, material: dict, produce: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        full = {"resource": name, "material": material, **self.base_material}

        def write(tmp: Path) -> dict:
            torch.save(produce(), tmp / "resource.pt")
            return {}

        path, _, created = self.store.get_or_create("resource", config_key(full), write, description=full)
        self.used.append({"name": name, "source": "generated" if created else "store"})
        return torch.load(path / "resource.pt", map_location="cpu", weights_only=True)

    def clean_model(self) -> torch.nn.Module:
        return self._clean_model()
