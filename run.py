"""Entry point: `python run.py -m attack=badnet,blended defense=otbr,clp` (Hydra, version_base 1.3)."""
from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent / "conf"


def check_group_choices(argv: list[str]) -> str | None:
    """Hydra's own message for an unknown choice spans many lines; give one line naming the options."""
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    for arg in argv:
        m = re.fullmatch(r"\+?([a-z_]+)=\[?([A-Za-z0-9_.,\-]+)\]?", arg)
        if not m or m.group(1) not in groups:
            continue
        group, values = m.groups()
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        for value in values.split(","):
            if value not in options and value != "null":
                return f"run.py: unknown {group} '{value}'; choose one of: {', '.join(options)}"
    return None


def register_resolvers() -> None:
    from experiments.build import job_dir_name

    if not OmegaConf.has_resolver("job_dir_name"):
        OmegaConf.register_new_resolver("job_dir_name", job_dir_name)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from experiments.build import USER_ERRORS
    from experiments.pipeline import run

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        return run(cfg)
    except USER_ERRORS as err:
        logging.getLogger("run").error("%s", err)
        print(f"error: {err}", file=sys.stderr, flush=True)
        if not multirun:
            sys.exit(2)
    except Exception as err:  # noqa: BLE001 - recorded in failed.json with its traceback
        if not multirun:
            raise
        logging.getLogger("run").exception("job failed: %s", err)
        print(f"error: job failed ({type(err).__name__}: {err}); see failed.json", file=sys.stderr, flush=True)
    return None  # in a sweep a failed job does not stop the others; the final summary counts it


if __name__ == "__main__":
    problem = check_group_choices(sys.argv[1:])
    if problem:
        print(problem, file=sys.stderr)
        sys.exit(2)
    register_resolvers()
    main()
