"""Aggregation: Table-1 layout, the strict success rule, success counts and average drops."""
import json

import pandas as pd

from experiments.aggregate import aggregate, load_records, main, result_tables


def fake_job(root, attack, defense, acc, asr, ref=(90.0, 99.0), overrides=()):
    job = root / f"attack={attack},defense={defense},{'_'.join(overrides)}"
    job.mkdir(parents=True)
    record = {"choices": {"dataset": "cifar10", "model": "preactresnet18", "attack": attack, "defense": defense},
              "overrides": [f"attack={attack}", f"defense={defense}", *overrides],
              "defense": {"name": defense},
              "metrics": {"acc": acc, "asr": asr, "ra": 100 - asr},
              "reference_metrics": {"acc": ref[0], "asr": ref[1], "ra": 1.0}}
    (job / "metrics.json").write_text(json.dumps(record))


def test_success_rule_is_strict_on_both_inequalities(tmp_path):
    fake_job(tmp_path, "badnet", "none", 90.0, 99.0)
    fake_job(tmp_path, "badnet", "otbr", 80.01, 19.99)   # drop 9.99, ASR 19.99: success
    fake_job(tmp_path, "badnet", "clp", 80.0, 5.0)       # drop exactly 10: failure
    fake_job(tmp_path, "blended", "otbr", 89.0, 20.0)    # ASR exactly 20: failure
    fake_job(tmp_path, "blended", "clp", 89.0, 1.0)      # success
    wide, summary = result_tables(load_records(tmp_path))
    assert summary.loc["otbr", "successes"] == 1 and summary.loc["clp", "successes"] == 1
    assert summary.loc["otbr", "cells"] == 2
    assert abs(summary.loc["clp", "avg_acc_drop"] - (10.0 + 1.0) / 2) < 1e-9
    assert abs(summary.loc["otbr", "avg_asr_drop"] - ((99 - 19.99) + (99 - 20)) / 2) < 1e-9
    assert [c for c, _ in wide.columns][::2] == ["none", "clp", "otbr"]
    assert wide.loc[("cifar10", "preactresnet18", "badnet"), ("none", "asr")] == 99.0


def test_variants_get_their_own_columns(tmp_path):
    fake_job(tmp_path, "badnet", "otbr", 85.0, 3.0, overrides=("defense.params.prune.ratio=0.1",))
    fake_job(tmp_path, "badnet", "otbr", 88.0, 50.0)
    wide, _ = result_tables(load_records(tmp_path))
    assert {c for c, _ in wide.columns} == {"none", "otbr", "otbr[defense.params.prune.ratio=0.1]"}


def test_cli_writes_markdown_and_csv(tmp_path, capsys):
    fake_job(tmp_path, "badnet", "otbr", 85.0, 3.0)
    assert main([str(tmp_path)]) == 0
    assert "otbr ASR" in capsys.readouterr().out
    csv = pd.read_csv(tmp_path / "results.csv")
    assert csv.loc[0, "success"] == True  # noqa: E712
    assert (tmp_path / "results.md").read_text().startswith("| dataset")


def test_cli_rejects_a_dir_without_results(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert aggregate(tmp_path) is None
    assert main([str(tmp_path / "missing")]) == 2


def test_numeric_variants_sort_as_numbers(tmp_path):
    for ratio in ("0.2", "0.15", "0.1", "0.05"):
        fake_job(tmp_path, "badnet", "otbr", 85.0, 3.0, overrides=(f"defense.params.prune.ratio={ratio}",))
    wide, summary = result_tables(load_records(tmp_path))
    assert [c.split("=")[-1].rstrip("]") for c in summary.index] == ["0.05", "0.1", "0.15", "0.2"]
