"""Long studies in pieces: run the missing jobs of a study, one backdoored model (cell) at a time.

    python -m experiments.study fmnist            # run what is missing, in order; finished jobs are skipped
    python -m experiments.study fmnist --status   # which jobs are finished, failed, missing
    python -m experiments.study fmnist --report   # the mean +- std table of what is committed
    python -m experiments.study fmnist --only attack=blended   # just the cells with these values (a second lane)
    python -m experiments.study fmnist threads=2  # machine settings (keys left out of job dir names) replace the base's

A study (conf/studies/<name>.yaml) is a sweep dir, base overrides, grids of cells (each cell = one
backdoored model, the first key outermost) and the defense sweeps that run right after each cell's model is
trained. Each job's metrics.json lands in `<sweep_dir>/<job>/` as it finishes, so a study may stop at any
point and a later session continues from what is committed.
"""
from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ROOT / "conf" / "studies"


def excluded_from_dir_names() -> set[str]:
    """The keys Hydra leaves out of job directory names, read from conf/config.yaml."""
    config = yaml.safe_load((ROOT / "conf" / "config.yaml").read_text())
    return set(config["hydra"]["job"]["config"]["override_dirname"]["exclude_keys"])


def load_study(name: str) -> dict:
    path = STUDIES / f"{name}.yaml"
    if not path.is_file():
        options = ", ".join(sorted(p.stem for p in STUDIES.glob("*.yaml")))
        raise SystemExit(f"study: unknown study '{name}'; choose one of: {options}")
    return yaml.safe_load(path.read_text())


def cells(study: dict, only: list[str] = ()) -> list[list[str]]:
    """Every cell's overrides, in run order; with `only` (`key=value` items), just the cells that have them all."""
    out = []
    for grid in study["grids"]:
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            cell = [f"{k}={v}" for k, v in zip(keys, values)]
            if all(item in cell for item in only):
                out.append(cell)
    return out


def check_only(study: dict, only: list[str]) -> None:
    """A filter that names no cell is a typo, not an empty study."""
    for item in only:
        if not cells(study, [item]):
            known = sorted({o for cell in cells(study) for o in cell})
            raise SystemExit(f"study: --only {item} matches no cell; use one of: {', '.join(known)}")


def expand(overrides: list[str]) -> list[list[str]]:
    """The jobs of one `-m` command: comma-separated values expand as a product."""
    choices = []
    for item in overrides:
        key, _, value = item.partition("=")
        choices.append([f"{key}={v}" for v in value.split(",")])
    return [list(job) for job in itertools.product(*choices)]


def job_dir_name(overrides: list[str]) -> str:
    """The directory Hydra gives a job: its override_dirname (sorted `key=value` pairs joined by ',', the
    excluded keys left out), shortened like conf/config.yaml's `job_dir_name` resolver does."""
    from experiments.build import job_dir_name as shorten

    excluded = excluded_from_dir_names()
    return shorten(",".join(sorted(o for o in overrides if o.split("=", 1)[0] not in excluded)))


def with_machine_settings(base: list[str], machine: list[str]) -> list[str]:
    """The study's base overrides with `machine` items (threads=2, device=cuda, ...) replacing same-key ones.
    Only keys Hydra leaves out of job dir names are allowed: anything else would change which jobs a study has."""
    allowed = excluded_from_dir_names() - {"hydra.sweep.dir"}  # the study's own sweep_dir decides that
    for item in machine:
        key, sep, _ = item.partition("=")
        if not sep or key not in allowed:
            raise SystemExit(f"study: '{item}' is not a machine setting; only {', '.join(sorted(allowed))} "
                             "may be set here (edit conf/studies/ to change the study itself)")
    keys = {item.partition("=")[0] for item in machine}
    return [o for o in base if o.partition("=")[0] not in keys] + list(machine)


def commands(study: dict, only: list[str] = (), machine: list[str] = ()) -> list[tuple[list[str], list[str]]]:
    """(the `-m` overrides, the job dir names it makes) for every cell x defense sweep, in run order."""
    out = []
    base = with_machine_settings(study["base"], machine)
    for cell in cells(study, only):
        for sweep in study["defense_sweeps"]:
            overrides = [*base, *cell, *sweep]
            out.append((overrides, [job_dir_name(job) for job in expand(overrides)]))
    return out


def status(study: dict, only: list[str] = ()) -> dict[str, list[str]]:
    sweep_dir = ROOT / study["sweep_dir"]
    state = {"finished": [], "failed": [], "missing": []}
    for _, jobs in commands(study, only):
        for job in jobs:
            d = sweep_dir / job
            key = "finished" if (d / "metrics.json").exists() else "failed" if (d / "failed.json").exists() else "missing"
            state[key].append(job)
    return state


def run(study: dict, only: list[str] = (), machine: list[str] = ()) -> int:
    sweep_dir = ROOT / study["sweep_dir"]
    failures = 0
    for overrides, jobs in commands(study, only, machine):
        missing = [j for j in jobs if not (sweep_dir / j / "metrics.json").exists()]
        if not missing:
            continue
        print(f"study: running {len(missing)} missing job(s): {' '.join(overrides)}", flush=True)
        result = subprocess.run([sys.executable, "run.py", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"],
                                cwd=ROOT)
        failures += result.returncode != 0
    left = status(study, only)
    print(f"study: {len(left['finished'])} finished, {len(left['failed'])} failed, {len(left['missing'])} missing",
          flush=True)
    return 1 if failures or left["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study")
    parser.add_argument("machine", nargs="*", metavar="KEY=VALUE",
                        help="machine settings that replace the study's base ones (threads=2, device=cuda); "
                             "they never change which jobs (dirs) a study has")
    parser.add_argument("--status", action="store_true", help="list finished / failed / missing jobs and exit")
    parser.add_argument("--report", action="store_true", help="print the mean +- std table of finished jobs")
    parser.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                        help="just the cells with this grid value (repeatable); two lanes with disjoint --only "
                             "filters can run one study at once")
    # intermixed: `--only seed=2 threads=2` works as well as `threads=2 --only seed=2`
    args = parser.parse_intermixed_args(argv)
    study = load_study(args.study)
    check_only(study, args.only)
    with_machine_settings(study["base"], args.machine)  # a bad setting fails before anything runs
    if args.status:
        for key, jobs in status(study, args.only).items():
            print(f"{key} ({len(jobs)}):")
            for job in jobs:
                print(f"  {job}")
        return 0
    if args.report:
        from experiments.aggregate import aggregate

        text = aggregate(ROOT / study["sweep_dir"], out_dir=ROOT / Path(study["sweep_dir"]).parent)
        print(text or "study: nothing finished yet")
        return 0
    return run(study, args.only, args.machine)


if __name__ == "__main__":
    sys.exit(main())
