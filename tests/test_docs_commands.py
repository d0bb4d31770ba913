"""Every `python run.py ...` command in a code block of docs/ works as written.

Each command is expanded into its jobs the way Hydra's basic sweeper does (comma lists under `-m`, a
preset's `hydra.sweeper.params`, `experiment=[a,b]` as one list value), and every job is composed with
Hydra's compose API. Each composed job is then checked the way the pipeline checks it before training:
the defense is built and validated (OTBR: `baselines.otbr.validate_options` plus the option names it
accepts), and the data source, attack, budget, train settings and model are instantiated, the model on
the meta device with a forward pass at the data set's shape. A doc command with a misspelt key, an
unknown option, an out-of-range value or a model that cannot take the data fails here.

Two commands also run for real on the synthetic data set (marked slow).
"""
from __future__ import annotations

import functools
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import OmegaConf

from helpers import ROOT, run_cli

DOCS = ROOT / "docs"
CONF = ROOT / "conf"
FLAGS_WITHOUT_VALUE = {"-m", "--multirun", "--info", "--help", "-h", "--hydra-help", "--resolve"}
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-dir", "-cd"}


# --------------------------------------------------------------------------------------------------
# Finding the commands
# --------------------------------------------------------------------------------------------------

def code_block_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line inside a ``` fenced block (fences may be indented)."""
    out, fence = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if fence is None and stripped.startswith("```"):
            fence = line[:len(line) - len(line.lstrip())]
        elif fence is not None and stripped.startswith("```"):
            fence = None
        elif fence is not None:
            out.append((number, stripped))
    return out


def commands_in(text: str, program: str) -> list[tuple[int, str]]:
    """Commands starting with `program` in code blocks; backslash continuations joined."""
    found, pending, start = [], "", 0
    for number, line in code_block_lines(text):
        line = re.sub(r"^\$\s+", "", line)
        if pending:
            pending += " " + line
        elif line.startswith(program):
            pending, start = line, number
        else:
            continue
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        found.append((start, pending))
        pending = ""
    return found


def doc_commands(program: str) -> list[tuple[str, str]]:
    return [(f"{md.relative_to(ROOT)}:{number}", command)
            for md in sorted(DOCS.rglob("*.md"))
            for number, command in commands_in(md.read_text(), program)]


RUN_COMMANDS = doc_commands("python run.py")
STUDY_COMMANDS = doc_commands("python -m experiments.study")


def split_command(command: str) -> tuple[list[str], bool]:
    """(the overrides, whether `-m` was given) of one `python run.py ...` command."""
    words = shlex.split(command, comments=True)[2:]
    overrides, multirun, skip_next = [], False, False
    for word in words:
        if skip_next:
            skip_next = False
        elif word in ("-m", "--multirun"):
            multirun = True
        elif word in FLAGS_WITHOUT_VALUE:
            continue
        elif word in FLAGS_WITH_VALUE:
            skip_next = True
        elif word.startswith("-"):
            raise AssertionError(f"unknown run.py flag {word!r}")
        else:
            overrides.append(word)
    return overrides, multirun


# --------------------------------------------------------------------------------------------------
# Expanding a command into its jobs, as Hydra's basic sweeper does
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hydra_conf():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def first_values(overrides: list[str]) -> list[str]:
    """Every sweep replaced by its first value (what compose accepts)."""
    out = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_sweep_override():
            out.append(f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}")
        else:
            out.append(o.input_line)
    return out


def jobs_of(overrides: list[str], multirun: bool) -> list[list[str]]:
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    probe = compose(config_name="config", overrides=first_values(overrides), return_hydra_config=True)
    multirun = multirun or str(probe.hydra.mode) == "RunMode.MULTIRUN"
    if not multirun:
        sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
        assert not sweeps, f"{sweeps} sweep(s) without -m: Hydra would refuse this command"
        return [overrides]
    params = probe.hydra.sweeper.get("params")
    preset = [f"{k}={v}" for k, v in (OmegaConf.to_container(params) if params is not None else {}).items()]
    # the preset's sweeper params first, the command line after them (a key given twice: the command line wins)
    return BasicSweeper.split_arguments(parser.parse_overrides(preset + overrides), None)[0]


# --------------------------------------------------------------------------------------------------
# Checking one composed job
# --------------------------------------------------------------------------------------------------

def check_otbr_options(hyper: dict, spec) -> None:
    """validate_options, plus the option names and shapes the OTBR functions accept."""
    from baselines.otbr import validate_options
    from otbr.fusion import COST_INPUTS, SOURCE_SUPPORTS, TARGET_DISTRIBUTIONS, FUSION_MODES
    from otbr.unlearning import BN_MODES, LABEL_RANGES

    validate_options(**hyper)
    unlearn, fusion, nwc = hyper.get("unlearn", {}), hyper.get("fusion", {}), hyper.get("nwc", {})
    for key, value, valid in (("unlearn.labels", unlearn.get("labels"), LABEL_RANGES),
                              ("unlearn.bn_mode", unlearn.get("bn_mode"), BN_MODES),
                              ("fusion.mode", fusion.get("mode"), FUSION_MODES),
                              ("fusion.target_dist", fusion.get("target_dist"), TARGET_DISTRIBUTIONS),
                              ("fusion.cost_on", fusion.get("cost_on"), COST_INPUTS),
                              ("fusion.source_support", fusion.get("source_support"), SOURCE_SUPPORTS)):
        assert value in valid, f"defense.{key}={value} is not one of {valid}"
    num_labels = unlearn.get("num_labels")
    assert num_labels is None or 1 <= int(num_labels) <= spec.num_classes, \
        f"defense.unlearn.num_labels={num_labels} must lie in 1..{spec.num_classes}"
    rounding = nwc.get("round_decimals")
    assert rounding is None or int(rounding) >= 0, f"defense.nwc.round_decimals={rounding}"
    shape = list(unlearn.get("noise_shape", [3, 32, 32]))
    assert len(shape) == 3 and shape[0] == spec.channels, \
        f"defense.unlearn.noise_shape={shape} does not fit {spec.name}'s {spec.channels}-channel models"


@functools.lru_cache(maxsize=None)
def check_model(model_json: str, num_classes: int, shape: tuple[int, int, int]) -> None:
    """The model builds for the data set and takes its input size (on the meta device: no memory, no time)."""
    node = OmegaConf.create(json.loads(model_json))
    with torch.device("meta"):
        model = instantiate(node, num_classes=num_classes, in_channels=shape[0])
        out = model.eval()(torch.zeros(2, *shape))
    assert tuple(out.shape) == (2, num_classes)


def check_job(job: list[str]) -> None:
    from experiments.build import build_defense

    cfg = compose(config_name="config", overrides=job)
    plain = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    choice = plain["defense"]["_target_"].split(".")[-2]
    build_defense(cfg, choice)  # instantiates the partial, reads its traits, runs its validate()
    source = instantiate(cfg.dataset)  # reads nothing
    spec = source.spec
    attack = OmegaConf.to_container(cfg.attack, resolve=True)
    if attack.get("pattern_path"):
        attack["pattern_path"] = None  # the user's file, not part of the docs
    instantiate(OmegaConf.create(attack), spec=spec)
    instantiate(cfg.budget)
    instantiate(cfg.train)
    check_model(json.dumps(plain["model"], sort_keys=True), spec.num_classes, spec.shape)
    if plain["defense"]["_target_"] == "baselines.otbr.defend":
        hyper = {k: v for k, v in plain["defense"].items() if not k.startswith("_") and k != "seed"}
        check_otbr_options(hyper, spec)


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------

def test_the_docs_contain_commands():
    assert len(RUN_COMMANDS) >= 15, RUN_COMMANDS
    assert any("experiment=[quickstart,otbr_gamma_sweep]" in c for _, c in RUN_COMMANDS)


@pytest.mark.parametrize("where, command", RUN_COMMANDS, ids=[w for w, _ in RUN_COMMANDS])
def test_doc_command_composes_and_validates(hydra_conf, where, command):
    overrides, multirun = split_command(command)
    jobs = jobs_of(overrides, multirun)
    assert jobs
    for job in jobs:
        try:
            check_job(job)
        except Exception as err:  # noqa: BLE001 - name the doc line and the job
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            pytest.fail(f"{where}: job {' '.join(job)} fails: {type(err).__name__}: {first}")


@pytest.mark.parametrize("where, command", STUDY_COMMANDS, ids=[w for w, _ in STUDY_COMMANDS])
def test_doc_study_command_names_a_study(where, command):
    name = shlex.split(command, comments=True)[3]
    assert (CONF / "studies" / f"{name}.yaml").is_file(), f"{where}: no conf/studies/{name}.yaml"


def test_expansion_follows_hydra(hydra_conf):
    """The expansion itself: products of comma lists, the preset's sweep, list values kept whole."""
    jobs = jobs_of(["experiment=quickstart", "attack=badnet,blended", "defense=otbr",
                    "defense.fusion.mode=ot,vanilla,none"], multirun=True)
    assert len(jobs) == 6 and ["experiment=quickstart", "attack=blended", "defense=otbr",
                               "defense.fusion.mode=none"] in jobs
    gamma = jobs_of(["experiment=[quickstart,otbr_gamma_sweep]", "attack=badnet"], multirun=False)
    assert sorted(j[0] for j in gamma) == sorted(f"defense.prune.ratio={r}" for r in
                                                 ("0.01", "0.05", "0.1", "0.15", "0.2", "0.25", "0.3"))
    assert all(j[1] == "experiment=[quickstart,otbr_gamma_sweep]" for j in gamma)
    overridden = jobs_of(["experiment=otbr_gamma_sweep", "defense.prune.ratio=0.2"], multirun=False)
    assert [j[0] for j in overridden] == ["defense.prune.ratio=0.2"]


@pytest.mark.parametrize("bad", ["defense.prune.ratoi=0.1", "defense.prune.ratio=1.5", "defense=otbrr",
                                 "defense.fusion.cost_on=alignd", "model=vgg19_bn"])
def test_a_broken_command_fails(hydra_conf, bad):
    """The check is not vacuous: a typo, an out-of-range value, an unknown option, or a model that cannot
    take Fashion-MNIST (VGG19-BN, with the preset's width) each fail."""
    overrides, multirun = split_command(f"python run.py -m experiment=quickstart attack=badnet defense=otbr {bad}")
    with pytest.raises(Exception):
        for job in jobs_of(overrides, multirun):
            check_job(job)


# --------------------------------------------------------------------------------------------------
# Two commands for real, on the synthetic data set
# --------------------------------------------------------------------------------------------------

# cheap enough for CI: the synthetic data set, a width-4 model, one thread, small unlearning batches
SYNTHETIC = ["dataset=synthetic", "dataset.train_size=null", "model.width=4", "progress=false", "threads=1",
             "defense.unlearn.batch_size=32"]


def doc_command_containing(text: str) -> list[str]:
    matches = [c for _, c in RUN_COMMANDS if text in c]
    assert matches, f"no doc command contains {text!r}"
    return shlex.split(matches[0], comments=True)[2:]


def records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("metrics.json"))]


@pytest.mark.slow
def test_table2_command_runs_with_one_training_and_stage1_per_model(tmp_path):
    args = doc_command_containing("defense.fusion.mode=ot,vanilla,none")
    result = run_cli([*args, *SYNTHETIC, f"hydra.sweep.dir={tmp_path / 'multirun'}",
                      f"paths.store_dir={tmp_path / 'store'}"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    recs = records(tmp_path / "multirun")
    assert len(recs) == 6
    assert sorted(r["backdoor"]["source"] for r in recs).count("trained") == 2
    assert sorted(r["diagnostics"]["cached_stage_source"] for r in recs).count("computed") == 2
    for r in recs:  # "no fusion" is the pruned model itself
        if r["diagnostics"]["mode"] == "none":
            assert r["metrics"] == r["diagnostics"]["pruned_metrics"]
    assert (tmp_path / "multirun" / "results.md").is_file()


@pytest.mark.slow
def test_gamma_preset_command_reports_every_ratio_from_one_stage1(tmp_path):
    args = doc_command_containing("experiment=[quickstart,otbr_gamma_sweep]")
    result = run_cli([*args, *SYNTHETIC, f"hydra.sweep.dir={tmp_path / 'multirun'}",
                      f"paths.store_dir={tmp_path / 'store'}"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    recs = records(tmp_path / "multirun")
    assert sorted(r["diagnostics"]["prune_ratio"] for r in recs) == [0.01, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
    assert [r["backdoor"]["source"] for r in recs].count("trained") == 1
    assert [r["diagnostics"]["cached_stage_source"] for r in recs].count("computed") == 1
