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
    path = main([f"attack={attack}", "dataset=synthetic", "n=5", f"out={out}", f"paths.data_dir={tmp_path}"])
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
        main(["attack=lf", "dataset=synthetic", f"out={tmp_path / 'lf.png'}", f"paths.data_dir={tmp_path}"])


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
