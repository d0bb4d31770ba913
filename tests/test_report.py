"""The report: ours beside the paper's numbers, and the training-length figure, on hand-made metrics files."""
from experiments.aggregate import load_records
from experiments.report import curve_points, main, side_by_side
from helpers import fake_job


def test_side_by_side_joins_our_means_with_the_papers_table2(tmp_path):
    for seed, asr in enumerate((2.0, 4.0)):
        fake_job(tmp_path, "badnet", "otbr", 85.0, asr, seed=seed)
        fake_job(tmp_path, "badnet", "otbr", 80.0, 1.0, overrides=("defense.fusion.mode=none",), seed=seed)
    table = side_by_side(load_records(tmp_path), "table2")
    ot = table[table["defense"] == "otbr"].iloc[0]
    assert (ot["our_asr"], ot["paper_acc"], ot["paper_asr"], ot["seeds"]) == (3.0, 90.11, 1.08, 2)
    pruned = table[table["defense"] == "otbr[fusion.mode=none]"].iloc[0]
    assert (pruned["paper_acc"], pruned["paper_asr"]) == (84.98, 1.56)
    assert set(table["our_dataset"]) == {"cifar10"} and set(table["paper_dataset"]) == {"cifar10"}


def test_cli_prints_latex_and_draws_the_curve(tmp_path, capsys):
    for epochs, asr in ((2, 90.0), (5, 40.0), (20, 3.0)):
        fake_job(tmp_path, "badnet", "otbr", 85.0, asr, overrides=(f"train.epochs={epochs}",))
    assert main([str(tmp_path), "--paper", "table1", "--format", "latex", "--plot", "train.epochs"]) == 0
    out = capsys.readouterr().out
    assert "\\begin{tabular}" in out and "90.11" in out
    png = tmp_path / "train_epochs.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([str(tmp_path), "--plot", "nosuch"]) == 2


def test_a_gamma_curve_is_one_line_per_attack_and_defense_with_the_pruned_model_beside_it(tmp_path):
    for attack in ("badnet", "blended"):
        for seed, asr in ((0, 40.0), (1, 60.0)):
            for ratio in ("0.05", "0.1"):
                fake_job(tmp_path, attack, "otbr", 85.0, asr, seed=seed, overrides=(f"defense.prune.ratio={ratio}",))
    points = curve_points(load_records(tmp_path), "defense.prune.ratio", with_pruned=True)
    assert set(points["column"]) == {"otbr", "otbr pruned model"}  # gamma is the x axis, not a label
    line = points[(points["attack"] == "badnet") & (points["column"] == "otbr pruned model")]
    assert line["defense.prune.ratio"].tolist() == [0.05, 0.1]
    assert line["asr"].tolist() == [25.0, 25.0]  # the pruned model's ASR (half the job's), mean over 2 seeds
    assert line["acc_drop"].tolist() == [6.0, 6.0]
    assert len(curve_points(load_records(tmp_path), "defense.prune.ratio")) == 4  # without: OTBR lines only
    assert main([str(tmp_path), "--plot", "defense.prune.ratio", "--with-pruned"]) == 0
    assert (tmp_path / "defense_prune_ratio.png").read_bytes()[:4] == b"\x89PNG"


def test_pruned_lines_skip_jobs_that_are_already_the_pruned_model(tmp_path):
    for epochs in (2, 5):
        fake_job(tmp_path, "badnet", "otbr", 85.0, 40.0, overrides=(f"train.epochs={epochs}",))
        fake_job(tmp_path, "badnet", "otbr", 80.0, 10.0, overrides=(f"train.epochs={epochs}", "defense.fusion.mode=none"))
    points = curve_points(load_records(tmp_path), "train.epochs", with_pruned=True)
    assert sorted(set(points["column"])) == ["otbr", "otbr pruned model", "otbr[fusion.mode=none]"]
