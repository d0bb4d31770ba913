"""Result tables from the metrics.json (and failed.json) files of one or more sweep directories.

    python -m experiments.aggregate <sweep dir> [<sweep dir> ...] [--out DIR]

* results.csv is long-format: one row per job, a column per varied setting (numbers stay numbers), ACC /
  ASR / RA, the no-defense reference, the pruned model's ACC / ASR (OTBR), timings, the success flags (the
  defense's and, for OTBR, its pruned model's: the pruning-only variant).
* results.md: rows dataset / model / attack (+ any varied setting of the backdoored model, e.g. precision or
  train.epochs), columns defense (+ its varied settings) x ACC / ASR as mean +- std over seeds. A sweep over
  one defense's parameters (e.g. OTBR's gamma, or gamma x fusion mode) is also shown as one row per value.
* A defense succeeds when its ACC drop is < 10 points and its ASR < 20 % (both strict; the OTBR paper's rule,
  docs/results.md). A cell whose no-defense ASR is < 20 % is marked "attack failed" and left out of the
  success counts; a failed job is marked "failed" and never averaged in.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

DEFENSE_ORDER = ["none", "ft", "ftsam", "fp", "nad", "anp", "ibau", "rnp", "gradprune", "clp", "otbr"]
MODEL_KEYS = ["dataset", "model", "attack"]
NOT_SETTINGS = {"dataset", "model", "attack", "defense", "seed", "experiment", "progress", "device", "threads",
                "logger", "paths.store_dir", "paths.data_dir", "hydra.sweep.dir", "hydra.run.dir"}
SUCCESS_MAX_ACC_DROP = 10.0
SUCCESS_MAX_ASR = 20.0
ATTACK_MIN_ASR = 20.0


def parse_value(text: str):
    """'0.1' -> 0.1, '20' -> 20, 'true' -> True; anything else stays a string."""
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if re.fullmatch(r"-?(\d+\.\d*|\.\d+|\d+)(e-?\d+)?", text):
        return float(text)
    return {"true": True, "false": False}.get(text.lower(), text)


def overrides_of(record: dict) -> dict:
    return {k.lstrip("+~"): v for k, v in (o.split("=", 1) for o in record.get("overrides", []) if "=" in o)}


def job_row(path: Path, record: dict, status: str) -> dict:
    ch = record.get("choices", {})
    ov = overrides_of(record)
    config = record.get("config", {})
    row = {"dataset": ch.get("dataset"), "model": ch.get("model"), "attack": ch.get("attack"),
           "defense": ch.get("defense") or record.get("defense", {}).get("name") or "unknown",
           "seed": parse_value(str(ov.get("seed", config.get("seed", 0)))), "status": status, "job": path.parent.name,
           "_overrides": ov}
    if status == "finished":
        m, ref = record["metrics"], record["reference_metrics"]
        row.update(acc=m["acc"], asr=m["asr"], ra=m["ra"], ref_acc=ref["acc"], ref_asr=ref["asr"], ref_ra=ref["ra"])
        pruned = (record.get("diagnostics") or {}).get("pruned_metrics") or {}
        row.update(pruned_acc=pruned.get("acc"), pruned_asr=pruned.get("asr"))
        t, b = record.get("timings", {}), record.get("backdoor", {})
        row.update(train_seconds=b.get("train_seconds"), defense_seconds=t.get("defense_seconds"),
                   total_seconds=t.get("total_seconds"), precision=record.get("environment", {}).get("precision"),
                   threads=record.get("environment", {}).get("threads"))
    else:
        row.update(reason=record.get("reason"), failed_stage=record.get("stage"))
    return row


def load_records(*sweep_dirs: str | Path) -> pd.DataFrame:
    """One row per job (finished or failed), with a column per setting that varies between the jobs."""
    rows = []
    for sweep_dir in sweep_dirs:
        for path in sorted(Path(sweep_dir).rglob("metrics.json")):
            rows.append(job_row(path, json.loads(path.read_text()), "finished"))
        for path in sorted(Path(sweep_dir).rglob("failed.json")):
            if not (path.parent / "metrics.json").exists():
                rows.append(job_row(path, json.loads(path.read_text()), "failed"))
    if not rows:
        return pd.DataFrame()
    keys = sorted({k for r in rows for k in r["_overrides"] if k not in NOT_SETTINGS and not k.startswith("hydra")})
    varying = [k for k in keys if len({r["_overrides"].get(k) for r in rows}) > 1]
    for r in rows:
        ov = r.pop("_overrides")
        for k in varying:
            r[k] = parse_value(ov[k]) if k in ov else None
    df = pd.DataFrame(rows)
    df.attrs["settings"] = varying
    return add_success(df)


def add_success(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for col in ("acc", "asr", "ra", "ref_acc", "ref_asr", "ref_ra"):
        if col not in df:
            df[col] = np.nan
    df["acc_drop"] = df["ref_acc"] - df["acc"]
    df["asr_drop"] = df["ref_asr"] - df["asr"]
    df["attack_failed"] = df["ref_asr"] < ATTACK_MIN_ASR
    df["success"] = is_success(df, "acc", "asr")
    if "pruned_acc" in df:  # OTBR's pruned model is the pruning-only variant: judged by the same rule
        df["pruned_success"] = is_success(df, "pruned_acc", "pruned_asr")
    return df


def is_success(df: pd.DataFrame, acc: str, asr: str) -> pd.Series:
    finished = (df["status"] == "finished") & df[acc].notna() & df[asr].notna()
    return finished & (df["ref_acc"] - df[acc] < SUCCESS_MAX_ACC_DROP) & (df[asr] < SUCCESS_MAX_ASR)


def split_settings(df: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Varied settings of the backdoored model (row keys) and of the defense (column keys)."""
    settings = df.attrs.get("settings", [])
    return [s for s in settings if not s.startswith("defense.")], [s for s in settings if s.startswith("defense.")]


def column_label(row, defense_keys) -> str:
    parts = [f"{k.removeprefix('defense.')}={row[k]}" for k in defense_keys if pd.notna(row.get(k))]
    return row["defense"] if not parts else f"{row['defense']}[{','.join(parts)}]"


def defense_labels(df: pd.DataFrame, leave_out: tuple[str, ...] = ()) -> pd.Series:
    """Each job's results.md column label (`otbr[fusion.mode=none]`), without the `leave_out` keys."""
    keys = [k for k in split_settings(df)[1] if k not in leave_out]
    return pd.Series([column_label(row, keys) for _, row in df.iterrows()], index=df.index, dtype=object)


def mean_std(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return ""
    return f"{values.mean():.2f}" if len(values) == 1 else f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def natural_key(text: str) -> tuple:
    return tuple((0, float(p), "") if re.fullmatch(r"-?\d+(\.\d+)?(e-?\d+)?", p) else (1, 0.0, p)
                 for p in re.split(r"(-?\d+(?:\.\d+)?(?:e-?\d+)?)", str(text)) if p)


def result_tables(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(wide table of strings: rows model cells, columns defense x ACC/ASR, mean +- std over seeds;
    per-defense summary: successes, jobs, average ACC / ASR drops; attack-failed and failed jobs left out)."""
    rows = MODEL_KEYS + split_settings(df)[0]
    df = df.assign(column=defense_labels(df))
    finished = df[df["status"] == "finished"]
    # "none" is every job's reference: the same backdoored model's no-defense metrics, once per seed
    reference = finished.drop_duplicates(rows + ["seed"]).assign(column="none", acc=lambda d: d["ref_acc"],
                                                                 asr=lambda d: d["ref_asr"])
    full = pd.concat([reference, df[df["defense"] != "none"]])
    rank = {name: i for i, name in enumerate(DEFENSE_ORDER)}
    columns = sorted(full["column"].unique(), key=lambda c: (rank.get(c.split("[")[0], len(rank)), natural_key(c)))
    cells = {}
    for key, group in full.groupby(rows + ["column"], dropna=False, sort=False):
        ok = group[group["status"] == "finished"]
        failed = (group["status"] == "failed").sum()
        for metric in ("acc", "asr"):
            text = mean_std(ok[metric])
            if failed:
                text = f"{text} ({failed} failed)" if text else "failed"
            cells[(key[:-1], (key[-1], metric))] = text
    index = sorted({k for k, _ in cells}, key=lambda k: tuple(natural_key(v) for v in k))
    wide = pd.DataFrame(index=pd.MultiIndex.from_tuples(index, names=rows),
                        columns=pd.MultiIndex.from_product([columns, ["acc", "asr"]]), dtype=object).fillna("")
    for (r, c), text in cells.items():
        wide.loc[r, c] = text
    attack_failed = finished.groupby(rows)["attack_failed"].any()
    for r, bad in attack_failed.items():
        if bad:
            r = r if isinstance(r, tuple) else (r,)
            wide.loc[r, ("none", "asr")] = f"{wide.loc[r, ('none', 'asr')]} (attack failed)"
    counted = df[(df["defense"] != "none") & (df["status"] == "finished") & ~df["attack_failed"]]
    summary = counted.groupby("column").agg(successes=("success", "sum"), jobs=("success", "size"),
                                            avg_acc_drop=("acc_drop", "mean"), avg_asr_drop=("asr_drop", "mean"))
    summary = summary.reindex([c for c in columns if c in summary.index])
    return wide, summary


def parameter_sweep_view(df: pd.DataFrame) -> str | None:
    """A sweep over parameters of one defense: one row per value (e.g. OTBR's gamma), or per combination of
    values when several vary (gamma x fusion mode), in numeric order."""
    model_keys, defense_keys = split_settings(df)
    defended = df[df["defense"] != "none"]
    if not defense_keys or model_keys or defended["defense"].nunique() != 1:
        return None
    has_pruned = defended.get("pruned_acc", pd.Series(dtype=float)).notna().any()
    table = defended.groupby(MODEL_KEYS + defense_keys, dropna=False).agg(
        acc=("acc", mean_std), asr=("asr", mean_std), ra=("ra", mean_std), pruned_acc=("pruned_acc", mean_std),
        pruned_asr=("pruned_asr", mean_std), successes=("success", "sum"), jobs=("success", "size"),
        **({"pruned_successes": ("pruned_success", "sum")} if has_pruned else {}))
    table = table.reset_index().sort_values(MODEL_KEYS + defense_keys, key=lambda s: s.map(natural_key))
    return table.rename(columns={k: k.removeprefix("defense.") for k in defense_keys}).to_markdown(index=False)


def render_markdown(wide: pd.DataFrame, summary: pd.DataFrame, df: pd.DataFrame) -> str:
    flat = wide.copy()
    flat.columns = [f"{d} {m.upper()}" for d, m in flat.columns]
    seeds = df.groupby(MODEL_KEYS + split_settings(df)[0], dropna=False)["seed"].nunique()
    lines = [flat.reset_index().to_markdown(index=False), ""]
    if seeds.min() > 1 and seeds.nunique() == 1:
        lines += [f"Mean ± std over {seeds.max()} seeds.", ""]
    elif seeds.max() > 1:  # a study in progress: say so rather than claim every row's count
        lines += [f"Mean ± std over each row's seeds ({seeds.min()}–{seeds.max()}); a row without ± has one seed.", ""]
    lines += ["Success = ACC drop < 10 points and ASR < 20 % (both strict); attack-failed cells "
              "(no-defense ASR < 20 %) and failed jobs are not counted.", ""]
    if len(summary):
        lines.append(summary.reset_index().rename(columns={"column": "defense"}).to_markdown(index=False, floatfmt=".2f"))
    sweep = parameter_sweep_view(df)
    if sweep:
        lines += ["", sweep]
    precisions = sorted(str(p) for p in df.get("precision", pd.Series(dtype=object)).dropna().unique())
    threads = sorted(str(t) for t in df.get("threads", pd.Series(dtype=object)).dropna().unique())
    if precisions or threads:
        lines += ["", f"Precision: {', '.join(precisions) or 'n/a'}; CPU threads: {', '.join(threads) or 'n/a'}."]
    return "\n".join(lines) + "\n"


def aggregate(*sweep_dirs: str | Path, out_dir: str | Path | None = None) -> str | None:
    df = load_records(*sweep_dirs)
    if df.empty:
        return None
    wide, summary = result_tables(df)
    text = render_markdown(wide, summary, df)
    out = Path(out_dir or sweep_dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    df.drop(columns=["job"]).to_csv(out / "results.csv", index=False, float_format="%.4f")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dirs", nargs="+")
    parser.add_argument("--out", default=None, help="where to write results.md / results.csv (default: first sweep dir)")
    args = parser.parse_args(argv)
    for d in args.sweep_dirs:
        if not Path(d).is_dir():
            print(f"aggregate: {d} is not a directory; give a Hydra sweep dir (multirun/<date>/<time>)", file=sys.stderr)
            return 2
    text = aggregate(*args.sweep_dirs, out_dir=args.out)
    if text is None:
        print(f"aggregate: no metrics.json under {' '.join(args.sweep_dirs)}; did the sweep finish?", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
