"""End to end, as a user types it: a real `-m` sweep in a subprocess, the train-once count, bad inputs."""
import json
from pathlib import Path

import pytest
import torch

from helpers import run_cli

pytestmark = pytest.mark.slow

TINY = ["dataset=synthetic", "model.width=4", "progress=false"]


def metrics_files(root: Path):
    return sorted(root.rglob("metrics.json"))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    defenses = "none,clp,otbr"
    result = run_cli(["-m", *TINY, "attack=badnet,blended", f"defense={defenses}",
                      f"hydra.sweep.dir={root / 'multirun'}", f"paths.store_dir={root / 'store'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return root, result, defenses.split(",")


def test_sweep_writes_one_metrics_file_per_job_in_readable_dirs(sweep):
    root, _, defenses = sweep
    files = metrics_files(root / "multirun")
    assert len(files) == 2 * len(defenses)
    names = {f.parent.name for f in files}
    assert "attack=badnet,dataset=synthetic,defense=none,model.width=4" in names
    rec = json.loads(files[0].read_text())
    for key in ("acc", "asr", "ra"):
        assert 0.0 <= rec["metrics"][key] <= 100.0 and 0.0 <= rec["reference_metrics"][key] <= 100.0
    assert rec["choices"]["dataset"] == "synthetic" and rec["timings"]["total_seconds"] > 0


def test_two_attacks_times_n_defenses_train_exactly_two_models(sweep):
    root, _, defenses = sweep
    sources = [json.loads(f.read_text())["backdoor"]["source"] for f in metrics_files(root / "multirun")]
    assert sources.count("trained") == 2 and sources.count("store") == 2 * len(defenses) - 2
    assert len(list((root / "store" / "backdoor").iterdir())) == 2


def test_no_defense_rows_equal_the_reference_of_the_same_model(sweep):
    root, _, _ = sweep
    for f in metrics_files(root / "multirun"):
        rec = json.loads(f.read_text())
        if rec["defense"]["name"] == "none":
            assert rec["metrics"] == rec["reference_metrics"]


def test_table_is_printed_and_saved_after_the_sweep(sweep):
    root, result, defenses = sweep
    assert "Results (" in result.stdout and "none ASR" in result.stdout
    table = (root / "multirun" / "results.md").read_text()
    for d in defenses:
        assert f"{d} ACC" in table
    assert (root / "multirun" / "results.csv").exists()


def test_rerun_of_a_finished_job_is_skipped_and_changes_nothing(sweep):
    root, _, _ = sweep
    job = root / "multirun" / "attack=badnet,dataset=synthetic,defense=none,model.width=4"
    before = (job / "metrics.json").read_text()
    result = run_cli([*TINY, "attack=badnet", "defense=none", f"hydra.run.dir='{job}'",
                      f"paths.store_dir={root / 'store'}"])
    assert result.returncode == 0 and "skipped" in result.stdout
    assert (job / "metrics.json").read_text() == before


def test_a_different_config_never_overwrites_results(sweep):
    root, _, _ = sweep
    job = root / "multirun" / "attack=badnet,dataset=synthetic,defense=none,model.width=4"
    before = (job / "metrics.json").read_text()
    result = run_cli([*TINY, "attack=badnet", "defense=none", "attack.poison_ratio=0.2", f"hydra.run.dir='{job}'",
                      f"paths.store_dir={root / 'store'}"])
    assert result.returncode == 2 and "different config" in result.stderr
    assert (job / "metrics.json").read_text() == before


def assert_one_line_failure(result, *words):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    for w in words:
        assert w in lines[0]


@pytest.mark.parametrize("overrides, words", [
    (["attack.poison_ratio=1.5"], ["attack.poison_ratio=1.5", "(0, 1]"]),
    (["attack.poison_ratio=0"], ["attack.poison_ratio"]),
    (["attack.target=4"], ["attack.target=4", "between 0 and 3"]),
], ids=["ratio>1", "ratio=0", "target>=classes"])
def test_bad_attack_settings_fail_in_one_line_and_leave_nothing(tmp_path, overrides, words):
    result = run_cli([*TINY, *overrides, f"hydra.run.dir={tmp_path / 'run'}", f"paths.store_dir={tmp_path / 'store'}"])
    assert_one_line_failure(result, *words)
    assert not metrics_files(tmp_path) and not (tmp_path / "store" / "backdoor").exists()


def test_missing_dataset_names_how_to_get_it(tmp_path):
    result = run_cli(["dataset=cifar10", "progress=false", f"paths.data_dir={tmp_path / 'nodata'}",
                      f"hydra.run.dir={tmp_path / 'run'}", f"paths.store_dir={tmp_path / 'store'}"])
    assert_one_line_failure(result, "CIFAR-10", "download")
    assert not metrics_files(tmp_path) and not (tmp_path / "store" / "backdoor").exists()


def test_checkpoint_that_does_not_fit_the_architecture(tmp_path):
    from bdcore.models import PreActResNet18, torchvision_model

    ckpt = tmp_path / "wider.pt"
    torch.save(PreActResNet18(4, 3, width=8).state_dict(), ckpt)
    result = run_cli([*TINY, f"backdoor_checkpoint={ckpt}", f"hydra.run.dir={tmp_path / 'run'}",
                      f"paths.store_dir={tmp_path / 'store'}"])
    assert_one_line_failure(result, "does not fit", "model=preactresnet18")
    assert not metrics_files(tmp_path)


def test_a_fitting_checkpoint_is_defended_without_training(tmp_path):
    from bdcore.models import PreActResNet18, torchvision_model

    ckpt = tmp_path / "bb_record.pt"
    torch.save({"model": PreActResNet18(4, 3, width=4).state_dict(), "model_name": "preactresnet18"}, ckpt)
    result = run_cli([*TINY, f"backdoor_checkpoint={ckpt}", f"hydra.run.dir={tmp_path / 'run'}",
                      f"paths.store_dir={tmp_path / 'store'}"])
    assert result.returncode == 0, result.stderr[-2000:]
    rec = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert rec["backdoor"]["source"] == "checkpoint" and not (tmp_path / "store" / "backdoor").exists()


def test_wandb_logger_needs_no_network_or_account(tmp_path):
    result = run_cli([*TINY, "logger=wandb", f"hydra.run.dir={tmp_path / 'run'}", f"paths.store_dir={tmp_path / 'store'}"],
                     env_extra={"WANDB_MODE": "disabled", "WANDB_API_KEY": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "run" / "metrics.json").exists()


def test_progress_false_silences_the_defenses_bars_and_true_shows_otbr_stage_one(tmp_path):
    store = f"paths.store_dir={tmp_path / 'store'}"
    quiet = run_cli([*TINY, "attack=badnet", "defense=fp", "defense.epochs=1", f"hydra.run.dir={tmp_path / 'fp'}", store])
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "fp prune" not in quiet.stderr and "it/s" not in quiet.stderr
    shown = run_cli(["dataset=synthetic", "model.width=4", "progress=true", "attack=badnet", "defense=otbr",
                     f"hydra.run.dir={tmp_path / 'otbr'}", store])
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "otbr unlearning" in shown.stderr
