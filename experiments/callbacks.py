"""Hydra callback: print (and save) the result table at the end of every multirun."""
from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class ResultTable(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from experiments.aggregate import aggregate

        sweep_dir = config.hydra.sweep.dir
        text = aggregate(sweep_dir)
        if text:
            print(f"\nResults ({sweep_dir}/results.md):\n\n{text}", flush=True)
