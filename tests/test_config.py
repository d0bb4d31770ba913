"""Every config in conf/ composes; presets set what they promise; unknown choices are one-line errors."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from helpers import ROOT, run_cli

CONF = ROOT / "conf"
GROUPS = ["dataset", "model", "attack", "train", "budget", "defense", "logger", "experiment"]
BUILT_GROUPS = ["dataset", "model", "attack", "train", "budget", "defense", "logger"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def compose_with(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_config_option_composes(group, option):
    cfg = compose_with([f"{group}={option}"])
    assert {"dataset", "model", "attack", "train", "budget", "defense", "logger", "seed", "precision"} <= set(cfg)


@pytest.mark.parametrize("group, option", [(g, o) for g, o in OPTIONS if g in BUILT_GROUPS],
                         ids=[f"{g}={o}" for g, o in OPTIONS if g in BUILT_GROUPS])
def test_every_group_uses_hydra_target(group, option):
    """One convention: `_target_` (with `_partial_: true` for defenses, which are functions)."""
    node = compose_with([f"{group}={option}"])[group]
    assert "_target_" in node
    if group != "model":  # torchvision / timm models take the architecture's name as an argument
        assert "name" not in node  # a choice's name comes from Hydra's runtime choices
    assert node.get("_partial_", False) is (group == "defense")


def test_defense_hyper_parameters_sit_directly_under_the_group():
    cfg = compose_with(["defense=otbr", "defense.prune.ratio=0.1", "defense.fusion.lambda_=0.3"])
    assert cfg["defense"]["prune"]["ratio"] == 0.1 and cfg["defense"]["fusion"]["lambda_"] == 0.3
    assert cfg["defense"]["_target_"] == "baselines.otbr.defend"


def test_presets_compose_as_a_list():
    cfg = compose_with(["experiment=[quickstart,otbr_gamma_sweep]"])
    assert cfg["model"]["width"] == 16 and cfg["defense"]["_target_"] == "baselines.otbr.defend"


@pytest.mark.parametrize("defense_dataset", sorted(p.stem for p in (CONF / "defense_dataset").glob("*.yaml")))
def test_every_specialisation_applies(defense_dataset):
    defense = next(d for d in (p.stem for p in (CONF / "defense").glob("*.yaml")) if defense_dataset.startswith(d + "_"))
    dataset = defense_dataset[len(defense) + 1:]
    cfg = compose_with([f"defense={defense}", f"dataset={dataset}"])
    assert cfg["defense"]["_target_"] == f"baselines.{defense}.defend"


SCALED = [(group, p.stem.split("_", 1)[1]) for group in ("attack", "defense")
          for p in sorted((CONF / f"scaled_{group}").glob("cpu_*.yaml"))]


@pytest.mark.parametrize("group, option", SCALED, ids=[f"{g}={o}" for g, o in SCALED])
def test_cpu_scale_applies_only_under_the_cpu_presets(group, option):
    """scale=cpu (the CPU presets) merges scaled_<group>/cpu_<option>.yaml; published keeps the group's file;
    the command line still wins."""
    scaled = OmegaConf.to_container(OmegaConf.load(CONF / f"scaled_{group}" / f"cpu_{option}.yaml"))
    published = compose_with([f"{group}={option}"])[group]
    for preset in ("quickstart", "fmnist"):
        node = compose_with([f"{group}={option}", f"experiment={preset}"])[group]
        assert all(node[k] == v for k, v in scaled.items()), preset
    assert any(published[k] != v for k, v in scaled.items())
    key, value = next(iter(scaled.items()))
    assert compose_with([f"{group}={option}", "experiment=quickstart", "scale=published"])[group][key] == published[key]
    assert compose_with([f"{group}={option}", "experiment=quickstart", f"{group}.{key}={published[key]}"]
                        )[group][key] == published[key]


def test_cpu_scale_leaves_the_converged_study_unchanged():
    """BadNets, Blended, OTBR and CLP have no CPU-sized file: the fmnist study's configs are the published ones."""
    for attack in ("badnet", "blended"):
        for defense in ("none", "otbr", "clp"):
            args = [f"attack={attack}", f"defense={defense}", "experiment=fmnist"]
            assert compose_with(args) == compose_with(args + ["scale=published"])


@pytest.mark.parametrize("defense, budget", [("ftsam", "class_balanced"), ("gradprune", "spc")])
def test_defense_picks_its_published_budget(defense, budget):
    """FT-SAM draws class-balanced (BackdoorBench's choose_by_class), Grad-Prune samples per class with a
    validation split; the other defenses keep the job's default; the command line still wins."""
    expected = OmegaConf.to_container(OmegaConf.load(CONF / "budget" / f"{budget}.yaml"))
    for preset in ([], ["experiment=quickstart"]):
        assert compose_with([f"defense={defense}", *preset])["budget"] == expected
    ratio = OmegaConf.to_container(OmegaConf.load(CONF / "budget" / "ratio.yaml"))
    assert compose_with([f"defense={defense}", "budget=ratio"])["budget"] == ratio
    assert compose_with(["defense=ft"])["budget"] == ratio
    if budget == "class_balanced":
        assert compose_with(["defense=ftsam", "budget.ratio=0.1"])["budget"] == expected | {"ratio": 0.1}


def test_train_schedule_follows_the_dataset():
    assert compose_with(["dataset=gtsrb"])["train"]["epochs"] == 50
    tiny = compose_with(["dataset=tiny"])["train"]
    assert tiny["epochs"] == 200 and tiny["scheduler"] == "plateau"
    assert compose_with([])["train"] | {} == compose_with(["dataset=cifar10"])["train"]


def test_paper_defaults():
    cfg = compose_with([])
    assert (cfg["dataset"]["_target_"], cfg["model"]["_target_"], cfg["model"]["width"]) == \
        ("bdcore.datasets.CIFAR10", "bdcore.models.PreActResNet18", 64)
    assert cfg["precision"] == "fp32"  # BackdoorBench trains in fp32 (docs/precision.md)
    assert (cfg["attack"]["poison_ratio"], cfg["attack"]["target"]) == (0.1, 0)
    t = cfg["train"]
    assert (t["epochs"], t["batch_size"], t["lr"], t["momentum"], t["weight_decay"], t["t_max"]) == \
        (100, 128, 0.01, 0.9, 5e-4, 100)


def test_quickstart_is_cpu_sized_and_annealed():
    cfg = compose_with(["experiment=quickstart"])
    assert cfg["dataset"]["_target_"] == "bdcore.datasets.FashionMNIST" and cfg["model"]["width"] == 16
    assert cfg["train"]["t_max"] == cfg["train"]["epochs"] <= 5


def test_unknown_choice_is_a_one_line_error():
    result = run_cli(["attack=nosuchattack", "defense=none"], timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "choose one of" in lines[0] and "badnet" in lines[0]
