"""SIG: the sinusoid against a per-pixel transcription of BackdoorBench's loop, amplitude and frequency,
clean-label poisoning (target class only, labels kept), the over-count error, bd_test and the saved state."""
import io

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from attacks.base import AttackConfigError
from attacks.sig import SIG, clean_label_poison_indices
from bdcore.data import DatasetSpec
from bdcore.datasets import make_synthetic
from helpers import ROOT

SYN = DatasetSpec("synthetic", 4, 3, 32, 32, (0.5,) * 3, (0.25,) * 3)


def naive_sig(img_hwc: np.ndarray, delta, f) -> np.ndarray:
    """BackdoorBench's sigTriggerAttack on one H x W x C uint8 image, loop for loop."""
    img = np.float32(img_hwc)
    pattern = np.zeros_like(img)
    m = pattern.shape[1]
    for i in range(int(img.shape[0])):
        for j in range(int(img.shape[1])):
            pattern[i, j] = delta * np.sin(2 * np.pi * j * f / m)
    return np.uint8(np.clip(np.uint32(img) + pattern, 0, 255))


def random_images(n, c, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("shape, delta, f", [((3, 32, 32), 40, 6), ((3, 32, 32), 40, 4), ((1, 28, 28), 40, 6),
                                             ((3, 24, 40), 25, 3)])
def test_sig_is_bit_identical_to_the_published_loop(shape, delta, f):
    c, h, w = shape
    spec = DatasetSpec("x", 10, c, h, w, (0.5,) * c, (0.25,) * c)
    images = random_images(6, c, h, w)
    images[0] = 0
    images[1] = 255
    out = SIG(spec, delta=delta, frequency=f).apply_trigger(images)
    for k in range(len(images)):
        expected = naive_sig(images[k].permute(1, 2, 0).numpy(), delta, f)
        assert np.array_equal(out[k].permute(1, 2, 0).numpy(), expected)


def test_sig_amplitude_frequency_and_the_near_zero_column():
    grey = torch.full((2, 3, 32, 32), 128, dtype=torch.uint8)
    residual = SIG(SYN).apply_trigger(grey).to(torch.int16) - 128
    row = residual[0, 0, 0]
    assert (residual == row).all()  # same for every image, channel and row: a horizontal sinusoid
    exact = 40 * np.sin(2 * np.pi * np.arange(32) * 6 / 32)
    assert np.array_equal(row.numpy(), np.floor(128 + exact.astype(np.float32).astype(np.float64)).astype(int) - 128)
    assert int(row.max()) == int(np.floor(exact.max())) and int(row.min()) == int(np.floor(exact.min()))
    assert 36 <= int(row.max()) <= 40 and -40 <= int(row.min()) <= -36  # amplitude 40
    spectrum = np.abs(np.fft.rfft(row.numpy().astype(float)))
    assert int(spectrum[1:].argmax()) + 1 == 6  # six periods across the width
    # sin(6 pi) is -2.9e-14 in floating point: column 16 truncates to img - 1 (published behaviour)
    assert int(row[16]) == -1 and int(row[0]) == 0


def test_sig_poisons_only_target_class_images_and_keeps_every_label():
    train, _ = make_synthetic(num_classes=4, train_per_class=64, test_per_class=8)
    attack = SIG(SYN, target=2, poison_ratio=0.2)
    poisoned = attack.poison_train(train, seed=3)
    idx = poisoned.poison_indices
    assert len(idx) == round(0.2 * len(train)) == 51 and len(idx.unique()) == 51
    assert (train.labels[idx] == 2).all()
    assert torch.equal(poisoned.data.labels, train.labels)  # clean-label: nothing relabelled
    # BackdoorBench's draw: numpy choice among the target-class indices
    expected = np.random.RandomState(3).choice(np.where(train.labels.numpy() == 2)[0], 51, replace=False)
    assert idx.tolist() == expected.tolist()
    clean = torch.ones(len(train), dtype=torch.bool)
    clean[idx] = False
    assert torch.equal(poisoned.data.images[clean], train.images[clean])
    assert torch.equal(poisoned.data.images[idx], attack.apply_trigger(train.images[idx]))
    assert not torch.equal(poisoned.data.images[idx], train.images[idx])


def test_cifar10_default_poisons_every_target_class_image():
    labels = torch.arange(50000) % 10
    idx = clean_label_poison_indices(labels, target=0, ratio=0.1, seed=0)
    assert len(idx) == 5000 and set(idx.tolist()) == set(range(0, 50000, 10))


def test_count_above_the_target_class_is_a_one_line_error_naming_a_valid_ratio():
    train, _ = make_synthetic(num_classes=4, train_per_class=64, test_per_class=8)
    with pytest.raises(AttackConfigError) as err:
        SIG(SYN, poison_ratio=0.3).poison_train(train, seed=0)
    message = str(err.value)
    assert "\n" not in message and "attack.poison_ratio=0.3" in message and "attack.poison_ratio<=0.25" in message
    SIG(SYN, poison_ratio=0.25).poison_train(train, seed=0)  # the suggested bound works
    with pytest.raises(AttackConfigError, match="= 0 images"):
        SIG(SYN, poison_ratio=0.001).poison_train(train, seed=0)
    with pytest.raises(AttackConfigError, match="all2one"):
        SIG(SYN, label_transform="all2all")


def test_bd_test_excludes_target_and_saved_state_rebuilds_it():
    _, test = make_synthetic(num_classes=4, train_per_class=4, test_per_class=16)
    attack = SIG(SYN, target=1, delta=30, frequency=5)
    bd = attack.bd_test(test)
    assert len(bd) == 48 and (bd.true_labels != 1).all() and (bd.target_labels == 1).all()
    assert torch.equal(bd.images, attack.apply_trigger(test.images[bd.source_indices]))
    buffer = io.BytesIO()
    torch.save(attack.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    rebuilt = SIG(SYN, target=1).restored(state).bd_test(test)  # default delta/f: the state wins
    assert torch.equal(rebuilt.images, bd.images) and torch.equal(rebuilt.target_labels, bd.target_labels)


def test_config_has_backdoorbench_defaults():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["attack=sig"])
    attack = instantiate(cfg.attack, spec=SYN)
    assert isinstance(attack, SIG)
    assert (attack.target, attack.poison_ratio, attack.delta, attack.frequency) == (0, 0.1, 40.0, 6.0)
