"""Optional Weights & Biases mirror of metrics.json (lazy import; offline unless WANDB_MODE says otherwise)."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def log_to_wandb(cfg: DictConfig, record: dict, out_dir: Path) -> None:
    try:
        import wandb
    except ImportError:
        raise RuntimeError("logger=wandb needs the wandb package: pip install wandb") from None
    lg = cfg.logger
    name = ",".join(f"{k}={v}" for k, v in record["choices"].items() if k in ("dataset", "attack", "defense"))
    with wandb.init(project=lg.project, entity=lg.entity, mode=lg.mode, dir=str(out_dir), name=name,
                    tags=list(lg.tags), config=OmegaConf.to_container(cfg, resolve=True)) as run:
        run.log({f"test/{k}": v for k, v in record["metrics"].items()}
                | {f"no_defense/{k}": v for k, v in record["reference_metrics"].items()}
                | {f"time/{k}": v for k, v in record["timings"].items()})
