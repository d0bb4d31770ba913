"""Trigger preview: the PNG grid is written through the project's Hydra config for data-poisoning attacks,
and for attacks that generate their trigger when given resources; without them, a one-line error."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from attacks.base import AttackConfigError
from attacks.badnet import BadNet
from bdcore.datasets import make_synthetic
from bdcore.models import PreActResNet18
from experiments.preview import main, preview_images, residual_view
from helpers import ROOT


class FakeResources:
    device = torch.device("cpu")

    def __init__(self, model):
        self.model, self.produced = model, 0

    def cached(self, name, material, produce):
        json.dumps(material)
        self.produced += 1
        return produce()

    def clean_model(self):
        return self.model


def read_png(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


@pytest.mark.parametrize("attack", ["badnet", "blended"])
def test_preview_png_is_written_for_data_poisoning_attacks(tmp_path, attack):
    out = tmp_path / f"{attack}.png"
    path = main([f"attack={attack}", "dataset=synthetic", "n=5", f"out={out}", f"paths.data_dir={tmp_path}",
                 f"paths.store_dir={tmp_path / 'store'}"])
    assert path == out and out.is_file()
    pixels = read_png(out)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 400 and pixels.std() > 10  # a real picture, not blank


def test_preview_of_a_generated_trigger_uses_the_given_resources(tmp_path):
    torch.manual_seed(0)
    resources = FakeResources(PreActResNet18(num_classes=4, in_channels=3, width=4).eval())
    out = tmp_path / "trojan.png"
    main(["attack=trojan", "dataset=synthetic", "n=3", f"out={out}", "attack.iterations=3",
          f"paths.data_dir={tmp_path}"], resources=resources)
    assert out.is_file() and resources.produced == 1
    with pytest.raises(AttackConfigError, match="attack=lf generates its trigger from a clean model"):
        main(["attack=lf", "dataset=synthetic", f"out={tmp_path / 'lf.png'}", f"paths.data_dir={tmp_path}",
              "store=false"])


SSBA_TINY = ["attack=ssba", "attack.width=4", "attack.steps=2", "attack.batch_size=16", "attack.code_length=50",
             "attack.secret=abcd", "dataset=synthetic", "dataset.train_per_class=8", "dataset.test_per_class=4",
             "threads=1", "progress=false", "n=2"]


def test_preview_generates_resources_in_the_store_under_the_jobs_key(tmp_path):
    store = tmp_path / "store"
    common = SSBA_TINY + [f"paths.data_dir={tmp_path}", f"paths.store_dir={store}"]
    main(common + [f"out={tmp_path / 'a.png'}"])
    resources = list((store / "resource").iterdir())
    assert len(resources) == 1  # the SSBA encoder, keyed like a job's
    main(common + [f"out={tmp_path / 'b.png'}"])  # loaded, not generated again
    assert list((store / "resource").iterdir()) == resources
    assert np.array_equal(read_png(tmp_path / "a.png"), read_png(tmp_path / "b.png"))


def test_preview_shows_the_stored_backdoored_models_attack_state(tmp_path, monkeypatch):
    """With the job's backdoored model in the store, its attack state is previewed, not a fresh prepare."""
    from experiments import build as B
    from experiments import pipeline as P
    from experiments import preview as preview_module
    from experiments.store import ArtifactStore, config_key
    from hydra import compose, initialize_config_dir

    store = tmp_path / "store"
    overrides = ["attack=badnet", "dataset=synthetic", "dataset.train_per_class=8", "dataset.test_per_class=4",
                 "threads=1", f"paths.data_dir={tmp_path}", f"paths.store_dir={store}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    data = B.load_data(B.build_source(cfg))
    key = config_key(P.backdoor_material(cfg, data, "fp32", 1, torch.device("cpu")))
    stored = BadNet(data.spec).state_dict()
    ArtifactStore(store).get_or_create("backdoor", key, lambda tmp: torch.save(stored, tmp / "attack.pt"))
    seen = {}

    def spy(attack, train, test, **kwargs):
        seen.update(kwargs)
        return tmp_path / "x.png"

    monkeypatch.setattr(preview_module, "preview", spy)
    main(overrides + ["n=2"])
    assert seen["state"] is not None and set(seen["state"]) == set(stored)
    main(overrides + ["n=2", "attack.target=1"])  # another config: another key, nothing stored
    assert seen["state"] is None


def test_preview_rows_are_non_target_images_and_the_residual_is_magnified():
    _, test = make_synthetic(num_classes=4, train_per_class=1, test_per_class=8)
    from bdcore.data import DatasetSpec
    attack = BadNet(DatasetSpec("synthetic", 4, 3, 32, 32, (0.5,) * 3, (0.25,) * 3), target=1)
    clean, poisoned = preview_images(attack, test, 6)
    expected = torch.nonzero(test.labels != 1).flatten()[:6]
    assert torch.equal(clean, test.images[expected]) and torch.equal(poisoned, attack.apply_trigger(clean))
    view, gain = residual_view(clean, poisoned)
    assert float(view.max()) == 1.0 or float(view.min()) == 0.0  # the largest change reaches an edge
    untouched = (poisoned == clean)
    assert bool((view[untouched] == 0.5).all()) and gain >= 127.5 / 255


def test_cli_reports_bad_input_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "experiments.preview", "attack=nosuchattack", "dataset=synthetic",
                             f"out={tmp_path / 'x.png'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nosuchattack" in lines[0]

