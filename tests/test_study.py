"""The study runner's cell order and `--only` filter, on the committed fmnist study (no job is run)."""
import pytest

from experiments.study import check_only, commands, cells, load_study


@pytest.fixture(scope="module")
def fmnist():
    return load_study("fmnist")


def test_cells_run_seed_outermost_and_only_keeps_matching_cells(fmnist):
    every = cells(fmnist)
    assert every[0] == ["seed=0", "attack=badnet", "precision=fp32"]
    blended = cells(fmnist, ["attack=blended"])
    assert blended and all("attack=blended" in cell for cell in blended)
    badnet = cells(fmnist, ["attack=badnet"])
    assert len(blended) + len(badnet) == len(every)  # two lanes split the study without overlap


def test_only_with_two_items_needs_both(fmnist):
    chosen = cells(fmnist, ["seed=2", "precision=bf16"])
    assert chosen == [["seed=2", "attack=badnet", "precision=bf16"]]


def test_disjoint_lanes_never_share_a_job_dir(fmnist):
    def jobs(only):
        return {job for _, names in commands(fmnist, only) for job in names}

    assert not jobs(["attack=badnet"]) & jobs(["attack=blended"])
    assert jobs(["attack=badnet"]) | jobs(["attack=blended"]) == jobs([])


def test_only_that_matches_no_cell_fails_in_one_line_naming_the_choices(fmnist):
    with pytest.raises(SystemExit, match="--only attack=wanet matches no cell; use one of: .*attack=blended"):
        check_only(fmnist, ["attack=wanet"])


def test_machine_settings_replace_the_base_and_leave_job_dirs_alone(fmnist):
    overrides, jobs = commands(fmnist, machine=["threads=2"])[0]
    assert "threads=2" in overrides and "threads=1" not in overrides
    assert jobs == commands(fmnist)[0][1]


def test_a_setting_that_would_change_the_study_is_refused(fmnist):
    with pytest.raises(SystemExit, match="'seed=5' is not a machine setting; only .*threads"):
        commands(fmnist, machine=["seed=5"])


@pytest.mark.parametrize("name, jobs_per_cell", [("fmnist_gamma", 7), ("fmnist_fusion", 8)])
def test_defense_studies_defend_the_fmnist_models_instead_of_training_new_ones(fmnist, name, jobs_per_cell):
    # Same base and a subset of fmnist's cells: its backdoored models are store hits wherever fmnist ran;
    # its sweeps vary the defense only, which is not part of the backdoored model's key.
    study = load_study(name)
    assert study["base"] == fmnist["base"]
    assert all(cell in cells(fmnist) for cell in cells(study))
    for sweep in study["defense_sweeps"]:
        assert all(item.startswith("defense") for item in sweep)
    overrides, jobs = commands(study)[0]
    assert len(jobs) == jobs_per_cell and len(set(jobs)) == jobs_per_cell  # every setting its own dir


def test_machine_settings_may_follow_only_on_the_command_line(capsys):
    from experiments.study import main

    assert main(["fmnist", "--only", "seed=2", "threads=2", "--only", "attack=blended", "--status"]) == 0
    out = capsys.readouterr().out
    assert "seed=2" in out and "seed=0" not in out and "attack=badnet" not in out
