"""Attacks: trigger pixels, poison counts and indices, bd_test composition, bad settings."""
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from attacks.badnet import BadNet
from attacks.base import AttackConfigError
from attacks.blended import Blended
from experiments.build import build_attack
from helpers import ROOT, needs_backdoorbench_file
from bdcore.data import ImageSet


def random_set(n, spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, spec.channels, spec.height, spec.width), generator=g, dtype=torch.uint8)
    return ImageSet(images, torch.arange(n) % spec.num_classes)


def test_badnet_stamps_exactly_the_bottom_right_3x3_white_square(cifar_spec):
    data = random_set(5, cifar_spec)
    out = BadNet(cifar_spec).apply_trigger(data.images)
    changed = (out != data.images).any(dim=(0, 1))
    assert (out[:, :, 29:32, 29:32] == 255).all()
    assert not changed[:29].any() and not changed[:, :29].any()  # nothing outside the square moved


def test_badnet_builtin_trigger_equals_backdoorbench_resource(cifar_spec):
    png = needs_backdoorbench_file("badnet__trigger_image.png")
    assert torch.equal(BadNet(cifar_spec).pattern, BadNet(cifar_spec, pattern_path=str(png)).pattern)


def test_poison_count_and_indices_follow_backdoorbench(cifar_spec):
    attack = BadNet(cifar_spec, poison_ratio=0.1)
    idx = attack.poison_indices(50000, seed=0)
    # numpy RandomState(0).choice checksum from docs/methods/attacks.md
    assert len(idx) == 5000 and idx[:5].tolist() == [11841, 19602, 45519, 25747, 42642]
    assert int(idx.sum()) == 126459119
    assert len(idx.unique()) == 5000


def test_poison_train_relabels_only_poisoned_samples_and_includes_target_class(cifar_spec):
    data = random_set(200, cifar_spec)
    attack = BadNet(cifar_spec, poison_ratio=0.25, target=3)
    poisoned = attack.poison_train(data, seed=1)
    idx = poisoned.poison_indices
    assert len(idx) == 50
    assert (poisoned.data.labels[idx] == 3).all()
    clean = torch.ones(200, dtype=torch.bool)
    clean[idx] = False
    assert torch.equal(poisoned.data.labels[clean], data.labels[clean])
    assert torch.equal(poisoned.data.images[clean], data.images[clean])
    assert (poisoned.data.images[idx][:, :, 29:, 29:] == 255).all()
    assert torch.equal(data.images, random_set(200, cifar_spec).images)  # the input is not modified
    # the draw is over all indices, so some already-target samples get poisoned too
    big = attack.poison_indices(10000, seed=0)
    assert ((torch.arange(10000) % 10)[big] == 3).any()


def test_bd_test_excludes_target_class_and_keeps_both_labels(cifar_spec):
    test = random_set(100, cifar_spec)
    bd = BadNet(cifar_spec, target=2).bd_test(test)
    assert len(bd) == 90
    assert (bd.true_labels != 2).all() and (bd.target_labels == 2).all()
    assert torch.equal(bd.true_labels, test.labels[bd.source_indices])
    assert (bd.images[:, :, 29:, 29:] == 255).all()


def test_blended_matches_backdoorbench_formula_with_truncation(cifar_spec):
    data = random_set(4, cifar_spec)
    attack = Blended(cifar_spec, alpha=0.2)
    out = attack.apply_trigger(data.images)
    img = data.images.permute(0, 2, 3, 1).numpy()
    k = attack.pattern.permute(1, 2, 0).numpy()
    expected = np.clip((1 - 0.2) * img + 0.2 * k, 0, 255).astype(np.uint8)  # numpy promotion as in BackdoorBench
    assert np.array_equal(out.permute(0, 2, 3, 1).numpy(), expected)


def test_blended_pattern_is_deterministic_and_greyscale_on_one_channel(cifar_spec, gray_spec):
    assert torch.equal(Blended(cifar_spec).pattern, Blended(cifar_spec).pattern)
    gray = Blended(gray_spec)
    assert gray.pattern.shape == (1, 28, 28)
    out = gray.apply_trigger(torch.zeros(1, 1, 28, 28, dtype=torch.uint8))
    assert out.dtype == torch.uint8 and out.max() <= 51  # 0.2 * 255


def test_blended_reads_any_image_file(cifar_spec):
    jpeg = needs_backdoorbench_file("blended__hello_kitty.jpeg")
    attack = Blended(cifar_spec, pattern_path=str(jpeg))
    assert attack.pattern.shape == (3, 32, 32)
    assert not torch.equal(attack.pattern, Blended(cifar_spec).pattern)


def test_attack_state_round_trip_rebuilds_the_same_bd_test(cifar_spec):
    test = random_set(30, cifar_spec)
    a = Blended(cifar_spec)
    b = Blended(cifar_spec, alpha=0.5)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.bd_test(test).images, b.bd_test(test).images)


@pytest.mark.parametrize("kwargs, word", [({"poison_ratio": 0.0}, "poison_ratio"), ({"poison_ratio": 1.5}, "poison_ratio"),
                                          ({"target": 10}, "attack.target"), ({"target": -1}, "attack.target")])
def test_bad_attack_settings_raise_one_line_errors(cifar_spec, kwargs, word):
    with pytest.raises(AttackConfigError) as err:
        BadNet(cifar_spec, **kwargs)
    assert word in str(err.value) and "\n" not in str(err.value)


def test_missing_pattern_file_is_a_one_line_error(cifar_spec, tmp_path):
    with pytest.raises(AttackConfigError, match="pattern_path"):
        Blended(cifar_spec, pattern_path=str(tmp_path / "nope.png"))


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf" / "attack").glob("*.yaml")))
def test_every_configured_attack_reports_its_trigger_as_a_dict(name, cifar_spec):
    """metrics.json's backdoor.attack comes from trigger_report(); no attack attribute may shadow it."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"attack={name}"])
    attack = build_attack(cfg, cifar_spec)
    assert isinstance(attack.trigger_report(), dict)
