"""Aggregation: Table-1 layout, the strict success rule, mean +- std over seeds, varied settings kept apart,
attack-failed cells and failed jobs left out of the counts."""
import pandas as pd

from experiments.aggregate import aggregate, load_records, main, result_tables
from helpers import fake_job


def test_success_rule_is_strict_on_both_inequalities(tmp_path):
    fake_job(tmp_path, "badnet", "none", 90.0, 99.0)
    fake_job(tmp_path, "badnet", "otbr", 80.01, 19.99)   # drop 9.99, ASR 19.99: success
    fake_job(tmp_path, "badnet", "clp", 80.0, 5.0)       # drop exactly 10: failure
    fake_job(tmp_path, "blended", "otbr", 89.0, 20.0)    # ASR exactly 20: failure
    fake_job(tmp_path, "blended", "clp", 89.0, 1.0)      # success
    wide, summary = result_tables(load_records(tmp_path))
    assert summary.loc["otbr", "successes"] == 1 and summary.loc["clp", "successes"] == 1
    assert summary.loc["otbr", "jobs"] == 2
    assert abs(summary.loc["clp", "avg_acc_drop"] - (10.0 + 1.0) / 2) < 1e-9
    assert abs(summary.loc["otbr", "avg_asr_drop"] - ((99 - 19.99) + (99 - 20)) / 2) < 1e-9
    assert [c for c, _ in wide.columns][::2] == ["none", "clp", "otbr"]
    assert wide.loc[("cifar10", "preactresnet18", "badnet"), ("none", "asr")] == "99.00"


def test_defense_variants_get_their_own_columns_and_numeric_csv_columns(tmp_path):
    fake_job(tmp_path, "badnet", "otbr", 85.0, 3.0, overrides=("defense.prune.ratio=0.1",))
    fake_job(tmp_path, "badnet", "otbr", 88.0, 50.0, overrides=("defense.prune.ratio=0.05",))
    df = load_records(tmp_path)
    assert df["defense.prune.ratio"].tolist() == [0.05, 0.1]  # a number per job, not a "variant" string
    wide, _ = result_tables(df)
    assert {c for c, _ in wide.columns} == {"none", "otbr[prune.ratio=0.05]", "otbr[prune.ratio=0.1]"}


def test_seeds_are_averaged_with_their_spread(tmp_path):
    for seed, (acc, asr, ref_asr) in enumerate([(81.0, 2.0, 99.0), (83.0, 4.0, 97.0), (85.0, 6.0, 98.0)]):
        fake_job(tmp_path, "badnet", "otbr", acc, asr, ref=(90.0, ref_asr), seed=seed)
    df = load_records(tmp_path)
    assert "seed" not in df.attrs["settings"]  # seeds are replicates, not a setting
    wide, summary = result_tables(df)
    row = ("cifar10", "preactresnet18", "badnet")
    assert wide.loc[row, ("otbr", "acc")] == "83.00 ± 2.00" and wide.loc[row, ("otbr", "asr")] == "4.00 ± 2.00"
    assert wide.loc[row, ("none", "asr")] == "98.00 ± 1.00"  # one reference per seed's model
    assert summary.loc["otbr", "successes"] == 3 and summary.loc["otbr", "jobs"] == 3


def test_model_settings_become_rows(tmp_path):
    fake_job(tmp_path, "badnet", "otbr", 85.0, 3.0, overrides=("precision=fp32",))
    fake_job(tmp_path, "badnet", "otbr", 84.0, 30.0, overrides=("precision=bf16",))
    wide, _ = result_tables(load_records(tmp_path))
    assert list(wide.index.names) == ["dataset", "model", "attack", "precision"] and len(wide) == 2


def test_attack_failed_cells_and_failed_jobs_are_not_counted(tmp_path):
    fake_job(tmp_path, "badnet", "otbr", 89.0, 1.0, ref=(90.0, 6.0))     # the model was never backdoored
    fake_job(tmp_path, "blended", "otbr", 89.0, 1.0)                      # a real success
    fake_job(tmp_path, "blended", "clp", 0, 0, failed=True)               # a failed job
    df = load_records(tmp_path)
    wide, summary = result_tables(df)
    assert "attack failed" in wide.loc[("cifar10", "preactresnet18", "badnet"), ("none", "asr")]
    assert summary.loc["otbr", "jobs"] == 1 and summary.loc["otbr", "successes"] == 1
    assert "clp" not in summary.index
    assert wide.loc[("cifar10", "preactresnet18", "blended"), ("clp", "acc")] == "failed"


def test_one_parameter_sweep_reads_as_rows(tmp_path):
    for ratio in ("0.2", "0.15", "0.1", "0.05"):
        fake_job(tmp_path, "badnet", "otbr", 85.0, 3.0, overrides=(f"defense.prune.ratio={ratio}",))
    text = aggregate(tmp_path)
    sweep = text[text.rindex("| dataset"):]
    assert sweep.splitlines()[0].split("|")[4].strip() == "prune.ratio"
    ratios = [line.split("|")[4].strip() for line in sweep.splitlines()[2:6]]
    assert ratios == ["0.05", "0.1", "0.15", "0.2"]  # numbers sort as numbers
    assert "pruned_asr" in sweep


def test_two_parameter_sweep_reads_as_one_row_per_combination_with_seeds_averaged(tmp_path):
    for seed, asr in ((0, 10.0), (1, 30.0)):
        for ratio in ("0.1", "0.05"):
            for mode in ("ot", "none"):
                fake_job(tmp_path, "badnet", "otbr", 85.0, asr, seed=seed,
                         overrides=(f"defense.prune.ratio={ratio}", f"defense.fusion.mode={mode}"))
    text = aggregate(tmp_path)
    sweep = text[text.rindex("| dataset"):].split("\n\n")[0].splitlines()
    header = [h.strip() for h in sweep[0].split("|")]
    assert header[4:6] == ["fusion.mode", "prune.ratio"]
    rows = [[c.strip() for c in line.split("|")] for line in sweep[2:]]
    assert [(r[4], r[5]) for r in rows] == [("none", "0.05"), ("none", "0.1"), ("ot", "0.05"), ("ot", "0.1")]
    assert all(r[header.index("asr")] == "20.00 ± 14.14" for r in rows)  # two seeds per combination
    assert all(r[header.index("jobs")] == "2" and r[header.index("successes")] == "1" for r in rows)
    # the pruned model (ASR 5 and 15 %, ACC drop 6) is judged by the same rule: pruning only succeeds twice
    assert all(r[header.index("pruned_successes")] == "2" for r in rows)


def test_cli_writes_markdown_and_csv(tmp_path, capsys):
    fake_job(tmp_path, "badnet", "otbr", 85.0, 3.0)
    assert main([str(tmp_path)]) == 0
    assert "otbr ASR" in capsys.readouterr().out
    csv = pd.read_csv(tmp_path / "results.csv")
    assert csv.loc[0, "success"] == True  # noqa: E712
    assert {"pruned_acc", "pruned_asr", "ra", "precision"} <= set(csv.columns)
    assert (tmp_path / "results.md").read_text().startswith("| dataset")


def test_cli_rejects_a_dir_without_results(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert aggregate(tmp_path) is None
    assert main([str(tmp_path / "missing")]) == 2


def test_seed_count_line_is_true_for_every_row(tmp_path):
    for seed in range(3):
        fake_job(tmp_path, "badnet", "otbr", 85.0 + seed, 3.0, seed=seed)
    fake_job(tmp_path, "blended", "otbr", 85.0, 3.0, seed=0)  # a study in progress: one seed so far
    text = aggregate(tmp_path)
    assert "over each row's seeds (1–3); a row without ± has one seed" in text and "over 3 seeds" not in text
    fake_job(tmp_path, "blended", "otbr", 86.0, 3.0, seed=1)
    fake_job(tmp_path, "blended", "otbr", 87.0, 3.0, seed=2)
    assert "Mean ± std over 3 seeds." in aggregate(tmp_path)
