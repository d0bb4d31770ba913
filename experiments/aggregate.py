"""Result tables from the metrics.json files of a sweep (the paper's Table-1 layout).

    python -m experiments.aggregate <sweep dir> [--out DIR]

Rows: dataset / attack. Columns: defense x (ACC, ASR), "none" first. A defense succeeds when its ACC drop
is < 10 points (absolute) and its ASR < 20 %, both strict (OTBR paper, Evaluation Metrics; checked against
every count of its Table 1, specs/defenses.md §0.4). Writes results.md and results.csv.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pandas as pd

DEFENSE_ORDER = ["none", "ft", "ftsam", "fp", "nad", "anp", "ibau", "rnp", "gradprune", "clp", "otbr"]
ROW_KEYS = {"dataset", "attack", "defense", "experiment", "model"}
SUCCESS_MAX_ACC_DROP = 10.0
SUCCESS_MAX_ASR = 20.0


def load_records(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per job: choices, metrics, the same model's no-defense metrics, and the variant: the
    overrides that differ between jobs of the sweep other than dataset / model / attack / defense
    (e.g. defense.params.prune.ratio=0.1 in a gamma sweep)."""
    records = [(path, json.loads(path.read_text())) for path in sorted(Path(sweep_dir).rglob("metrics.json"))]
    overrides = [{k.lstrip("+~"): v for k, v in (o.split("=", 1) for o in rec.get("overrides", []) if "=" in o)}
                 for _, rec in records]
    keys = {k for o in overrides for k in o if k not in ROW_KEYS and not k.startswith("hydra")}
    varying = sorted(k for k in keys if len({o.get(k) for o in overrides}) > 1)
    rows = []
    for (path, rec), ov in zip(records, overrides):
        ch = rec["choices"]
        variant = ",".join(f"{k}={ov[k]}" for k in varying if k in ov)
        rows.append({"dataset": ch.get("dataset"), "model": ch.get("model"), "attack": ch.get("attack"),
                     "defense": rec["defense"]["name"], "variant": variant,
                     "acc": rec["metrics"]["acc"], "asr": rec["metrics"]["asr"], "ra": rec["metrics"]["ra"],
                     "ref_acc": rec["reference_metrics"]["acc"], "ref_asr": rec["reference_metrics"]["asr"],
                     "ref_ra": rec["reference_metrics"]["ra"], "job": str(path.parent)})
    return pd.DataFrame(rows)


def add_success(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["acc_drop"] = df["ref_acc"] - df["acc"]
    df["asr_drop"] = df["ref_asr"] - df["asr"]
    df["success"] = (df["acc_drop"] < SUCCESS_MAX_ACC_DROP) & (df["asr"] < SUCCESS_MAX_ASR)
    return df


def natural_key(text: str) -> tuple:
    """Sort 'ratio=0.1' before 'ratio=0.15' (numbers compared as numbers)."""
    return tuple((0, float(p), "") if re.fullmatch(r"-?\d+(\.\d+)?(e-?\d+)?", p) else (1, 0.0, p)
                 for p in re.split(r"(-?\d+(?:\.\d+)?(?:e-?\d+)?)", text) if p)


def defense_label(row) -> str:
    return row["defense"] if not row["variant"] else f"{row['defense']}[{row['variant']}]"


def result_tables(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(wide ACC/ASR table, per-defense summary with success counts and average drops)."""
    df = add_success(df)
    df["column"] = df.apply(defense_label, axis=1)
    # "none" comes from the reference metrics of every row's backdoored model, so it is always present
    ref = df.drop_duplicates(["dataset", "model", "attack"]).assign(
        column="none", acc=lambda d: d["ref_acc"], asr=lambda d: d["ref_asr"], ra=lambda d: d["ref_ra"])
    rank = {name: i for i, name in enumerate(DEFENSE_ORDER)}
    full = pd.concat([ref, df[df["defense"] != "none"]])
    columns = sorted(full["column"].unique(), key=lambda c: (rank.get(c.split("[")[0], len(rank)), natural_key(c)))
    wide = full.pivot_table(index=["dataset", "model", "attack"], columns="column", values=["acc", "asr"],
                            aggfunc="first")
    wide = wide.swaplevel(0, 1, axis=1).reindex(columns=pd.MultiIndex.from_product([columns, ["acc", "asr"]]))
    defended = df[df["defense"] != "none"]
    summary = defended.groupby("column").agg(successes=("success", "sum"), cells=("success", "size"),
                                             avg_acc_drop=("acc_drop", "mean"), avg_asr_drop=("asr_drop", "mean"))
    summary = summary.reindex([c for c in columns if c in summary.index])
    return wide, summary


def render_markdown(wide: pd.DataFrame, summary: pd.DataFrame, df: pd.DataFrame) -> str:
    flat = wide.copy()
    flat.columns = [f"{d} {m.upper()}" for d, m in flat.columns]
    flat = flat.map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
    lines = [flat.reset_index().to_markdown(index=False), "",
             "Success = ACC drop < 10 points and ASR < 20 % (both strict).", ""]
    if len(summary):
        lines.append(summary.reset_index().rename(columns={"column": "defense"})
                     .to_markdown(index=False, floatfmt=".2f"))
    return "\n".join(lines) + "\n"


def aggregate(sweep_dir: str | Path, out_dir: str | Path | None = None) -> str | None:
    df = load_records(sweep_dir)
    if df.empty:
        return None
    wide, summary = result_tables(df)
    text = render_markdown(wide, summary, df)
    out = Path(out_dir or sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    add_success(df).drop(columns=["job"]).to_csv(out / "results.csv", index=False, float_format="%.4f")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir")
    parser.add_argument("--out", default=None, help="where to write results.md / results.csv (default: sweep dir)")
    args = parser.parse_args(argv)
    if not Path(args.sweep_dir).is_dir():
        print(f"aggregate: {args.sweep_dir} is not a directory; give a Hydra sweep dir (multirun/<date>/<time>)",
              file=sys.stderr)
        return 2
    text = aggregate(args.sweep_dir, args.out)
    if text is None:
        print(f"aggregate: no metrics.json under {args.sweep_dir}; did the sweep finish?", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
