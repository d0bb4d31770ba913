"""Our results beside the OTBR paper's, and figures.

    python -m experiments.report <sweep dir> [<sweep dir> ...] [--paper table1|table2] [--format md|csv|latex]
                                 [--plot train.epochs [--with-pruned]] [--out DIR]

`--paper` joins our mean ACC / ASR per (attack, defense) with the paper's numbers (results/paper/, the
paper's CIFAR-10 rows unless `--paper-dataset` says otherwise); our data set may differ from the paper's, so
both are named in the table. `--plot KEY` draws ASR and ACC drop against a varied setting (e.g. the
training length, or OTBR's gamma) with one line per defense, as a PNG; `--with-pruned` adds OTBR's pruned
model (pruning only), which every OTBR job also reports.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from experiments.aggregate import defense_labels, load_records

PAPER_DIR = Path(__file__).resolve().parents[1] / "results" / "paper"


def our_means(df: pd.DataFrame) -> pd.DataFrame:
    """Mean (and seed count) of ACC / ASR per attack and defense label; `none` from the references."""
    df = df[df["status"] == "finished"].assign(column=defense_labels(df[df["status"] == "finished"]))
    reference = df.drop_duplicates(["dataset", "model", "attack", "seed"]).assign(
        column="none", acc=lambda d: d["ref_acc"], asr=lambda d: d["ref_asr"])
    rows = pd.concat([reference, df[df["defense"] != "none"]])
    return rows.groupby(["dataset", "attack", "column"]).agg(acc=("acc", "mean"), asr=("asr", "mean"),
                                                             seeds=("seed", "nunique")).reset_index()


def paper_table(name: str, dataset: str = "cifar10") -> pd.DataFrame:
    """The paper's numbers as (attack, column, acc, asr), `column` in our defense-label vocabulary."""
    table = pd.read_csv(PAPER_DIR / f"{name}.csv")
    table = table[table["dataset"] == dataset]
    if name == "table2":
        table = table.assign(defense=table["fusion_mode"].map(
            lambda m: "otbr" if m == "ot" else f"otbr[fusion.mode={m}]"))
    wide = table.pivot_table(index=["attack", "defense"], columns="metric", values="value").reset_index()
    return wide.rename(columns={"defense": "column"})


def side_by_side(df: pd.DataFrame, paper: str, paper_dataset: str = "cifar10") -> pd.DataFrame:
    ours = our_means(df)
    theirs = paper_table(paper, paper_dataset)
    merged = ours.merge(theirs, on=["attack", "column"], how="inner", suffixes=("", "_paper"))
    merged = merged.rename(columns={"dataset": "our_dataset", "acc": "our_acc", "asr": "our_asr",
                                    "acc_paper": "paper_acc", "asr_paper": "paper_asr"})
    merged.insert(1, "paper_dataset", paper_dataset)
    return merged[["our_dataset", "paper_dataset", "attack", "column", "seeds", "our_acc", "paper_acc",
                   "our_asr", "paper_asr"]].rename(columns={"column": "defense"})


def curve_points(df: pd.DataFrame, key: str, with_pruned: bool = False) -> pd.DataFrame:
    """Mean ASR / ACC drop / no-defense ASR per attack, defense label and value of `key` (the plotted setting is left
    out of the label, so a gamma sweep is one line); `with_pruned` adds a line for OTBR's pruned models."""
    done = df[(df["status"] == "finished") & (df["defense"] != "none")]
    done = done.assign(column=defense_labels(done, leave_out=(key,)))
    if with_pruned and "pruned_asr" in done:
        fused = done.get("defense.fusion.mode", pd.Series(index=done.index, dtype=object)) != "none"
        pruned = done[done["pruned_asr"].notna() & fused]  # a fusion.mode=none job is its own pruned model
        done = pd.concat([done, pruned.assign(column=pruned["column"] + " pruned model", asr=pruned["pruned_asr"],
                                              acc_drop=pruned["ref_acc"] - pruned["pruned_acc"])])
    return done.groupby(["attack", "column", key]).agg(asr=("asr", "mean"), acc_drop=("acc_drop", "mean"),
                                                       ref_asr=("ref_asr", "mean")).reset_index()


def plot_against(df: pd.DataFrame, key: str, out: Path, with_pruned: bool = False) -> Path:
    """ASR and ACC drop against `key` (mean over seeds), one row of panels per attack and one line per
    defense label, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = curve_points(df, key, with_pruned)
    attacks, columns = sorted(means["attack"].unique()), sorted(means["column"].unique())
    colour = dict(zip(columns, plt.get_cmap("tab10" if len(columns) <= 10 else "tab20").colors))
    # one row of panels per attack, a defense keeps its colour in every row
    fig, grid = plt.subplots(len(attacks), 2, figsize=(10, 1.2 + 3.6 * len(attacks)), layout="constrained",
                             squeeze=False)
    for axes, attack in zip(grid, attacks):
        rows_of_attack = means[means["attack"] == attack]
        for column, rows in rows_of_attack.groupby("column"):
            rows = rows.sort_values(key)
            axes[0].plot(rows[key], rows["asr"], marker="o", color=colour[column], label=column)
            axes[1].plot(rows[key], rows["acc_drop"], marker="o", color=colour[column], label=column)
        reference = rows_of_attack.drop_duplicates(key).sort_values(key)
        axes[0].plot(reference[key], reference["ref_asr"], "k--", label="no defense")
        axes[0].axhline(20, color="grey", lw=0.8)
        axes[1].axhline(10, color="grey", lw=0.8)
        axes[0].set(xlabel=key, ylabel="ASR (%)", title=f"{attack}: attack success rate")
        axes[1].set(xlabel=key, ylabel="ACC drop (points)", title=f"{attack}: clean accuracy drop")
    handles = {label: h for axes in grid for h, label in zip(*axes[0].get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=3, fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def render(table: pd.DataFrame, fmt: str) -> str:
    if fmt == "csv":
        return table.to_csv(index=False, float_format="%.2f")
    if fmt == "latex":
        return table.to_latex(index=False, float_format="%.2f")
    return table.to_markdown(index=False, floatfmt=".2f")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dirs", nargs="+")
    parser.add_argument("--paper", choices=["table1", "table2"], default=None)
    parser.add_argument("--paper-dataset", default="cifar10")
    parser.add_argument("--format", choices=["md", "csv", "latex"], default="md")
    parser.add_argument("--plot", default=None, help="a varied setting to plot against, e.g. train.epochs")
    parser.add_argument("--with-pruned", action="store_true",
                        help="also draw OTBR's pruned model (the pruning-only variant) of each job")
    parser.add_argument("--out", default=None, help="where the PNG goes (default: the first sweep dir)")
    args = parser.parse_args(argv)
    df = load_records(*args.sweep_dirs)
    if df.empty:
        print(f"report: no metrics.json under {' '.join(args.sweep_dirs)}", file=sys.stderr)
        return 2
    if args.paper:
        print(render(side_by_side(df, args.paper, args.paper_dataset), args.format))
    if args.plot:
        if args.plot not in df.columns:
            print(f"report: --plot {args.plot} is not a varied setting; choose one of "
                  f"{', '.join(df.attrs.get('settings', [])) or '(none varies)'}", file=sys.stderr)
            return 2
        out = Path(args.out or args.sweep_dirs[0]) / f"{args.plot.replace('.', '_')}.png"
        print(f"wrote {plot_against(df, args.plot, out, args.with_pruned)}")
    if not args.paper and not args.plot:
        print(render(our_means(df), args.format))
    return 0


if __name__ == "__main__":
    sys.exit(main())
