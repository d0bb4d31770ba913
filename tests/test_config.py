"""Every config in conf/ composes; presets set what they promise; unknown choices are one-line errors."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import ROOT, run_cli

CONF = ROOT / "conf"
GROUPS = ["dataset", "model", "attack", "train", "budget", "defense", "logger", "experiment"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def compose_with(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_config_option_composes(group, option):
    cfg = compose_with([f"{group}={option}"])
    assert {"dataset", "model", "attack", "train", "budget", "defense", "logger", "seed"} <= set(cfg)


@pytest.mark.parametrize("defense_dataset", sorted(p.stem for p in (CONF / "defense_dataset").glob("*.yaml")))
def test_every_specialisation_applies(defense_dataset):
    defense = next(d for d in (p.stem for p in (CONF / "defense").glob("*.yaml")) if defense_dataset.startswith(d + "_"))
    dataset = defense_dataset[len(defense) + 1:]
    cfg = compose_with([f"defense={defense}", f"dataset={dataset}"])
    assert cfg["defense"]["name"] == defense


def test_train_schedule_follows_the_dataset():
    assert compose_with(["dataset=gtsrb"])["train"]["epochs"] == 50
    tiny = compose_with(["dataset=tiny"])["train"]
    assert tiny["epochs"] == 200 and tiny["scheduler"] == "plateau"
    assert compose_with([])["train"] | {} == compose_with(["dataset=cifar10"])["train"]


def test_paper_defaults():
    cfg = compose_with([])
    assert (cfg["dataset"]["name"], cfg["model"]["name"], cfg["model"]["width"]) == ("cifar10", "preactresnet18", 64)
    assert (cfg["attack"]["poison_ratio"], cfg["attack"]["target"]) == (0.1, 0)
    t = cfg["train"]
    assert (t["epochs"], t["batch_size"], t["lr"], t["momentum"], t["weight_decay"], t["t_max"]) == \
        (100, 128, 0.01, 0.9, 5e-4, 100)


def test_quickstart_is_cpu_sized_and_annealed():
    cfg = compose_with(["experiment=quickstart"])
    assert cfg["dataset"]["name"] == "fashion_mnist" and cfg["model"]["width"] == 16
    assert cfg["train"]["t_max"] == cfg["train"]["epochs"] <= 5


def test_unknown_choice_is_a_one_line_error():
    result = run_cli(["attack=nosuchattack", "defense=none"], timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "choose one of" in lines[0] and "badnet" in lines[0]
