"""Hydra callback: print (and save) the result table at the end of every multirun, and say how many jobs
failed; a sweep with failed jobs exits with status 1 after its table."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class ResultTable(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from experiments.aggregate import aggregate

        sweep_dir = Path(config.hydra.sweep.dir)
        text = aggregate(sweep_dir)
        if text:
            print(f"\nResults ({sweep_dir}/results.md):\n\n{text}", flush=True)
        failed = sorted(p.parent.name for p in sweep_dir.rglob("failed.json"))
        done = len(list(sweep_dir.rglob("metrics.json")))
        if failed:
            print(f"{len(failed)} job(s) failed (see failed.json in each): {', '.join(failed)}; "
                  f"{done} finished. Rerun the same command to redo only the failed ones.", file=sys.stderr, flush=True)
            sys.exit(1)
        print(f"all {done} job(s) finished.", flush=True)
