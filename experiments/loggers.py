"""Loggers mirror metrics.json (always written, the source of truth); wandb is imported lazily and runs offline
unless WANDB_MODE says otherwise."""
from __future__ import annotations

from pathlib import Path


class NoLogger:
    def log(self, record: dict, out_dir: Path) -> None:
        pass


class WandbLogger:
    def __init__(self, mode: str = "offline", project: str = "otbr-suite", entity: str | None = None,
                 tags: list[str] | tuple[str, ...] = ()):
        self.mode, self.project, self.entity, self.tags = mode, project, entity, list(tags)

    @staticmethod
    def run_name(record: dict) -> str:
        """The job's choices and its own overrides, e.g. `badnet/otbr/prune.ratio=0.1`: two runs of a sweep
        never share a name."""
        ch = record["choices"]
        base = "/".join(str(ch.get(k)) for k in ("dataset", "attack", "defense"))
        extra = [o for o in record["overrides"] if o.split("=", 1)[0].lstrip("+~") not in ("dataset", "attack", "defense")]
        return ",".join([base, *extra])

    def log(self, record: dict, out_dir: Path) -> None:
        try:
            import wandb
        except ImportError:
            raise RuntimeError("logger=wandb needs the wandb package: pip install wandb") from None
        group = out_dir.parent.name if out_dir.parent != out_dir else None  # the sweep dir groups its jobs
        with wandb.init(project=self.project, entity=self.entity, mode=self.mode, dir=str(out_dir),
                        name=self.run_name(record), group=group, tags=self.tags, config=record["config"]) as run:
            flat = {f"test/{k}": v for k, v in record["metrics"].items()}
            flat |= {f"no_defense/{k}": v for k, v in record["reference_metrics"].items()}
            flat |= {f"time/{k}": v for k, v in record["timings"].items()}
            flat |= {f"diagnostics/{k}": v for k, v in record["diagnostics"].items() if isinstance(v, (int, float))}
            run.log(flat)
