"""The training loop, augmentation and the ACC / ASR / RA evaluation."""
import torch
import torch.nn as nn

from bdcore.data import DatasetSpec, normalize, random_crop_flip
from bdcore.datasets import make_synthetic
from bdcore.evaluate import accuracy, backdoor_metrics
from bdcore.models import PreActResNet18, torchvision_model
from bdcore.train import TrainSettings, train_model

SPEC = DatasetSpec("synthetic", 4, 3, 32, 32, (0.5,) * 3, (0.25,) * 3)
CPU = torch.device("cpu")


def test_crop_is_per_sample_zero_padded_and_flip_only_when_enabled():
    images = torch.full((64, 3, 8, 8), 200, dtype=torch.uint8)
    spec = DatasetSpec("s", 2, 3, 8, 8, (0.5,) * 3, (0.5,) * 3, hflip=False, crop_padding=4)
    out = random_crop_flip(images, spec, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    zeros_per_sample = (out == 0).flatten(1).sum(1)
    assert len(zeros_per_sample.unique()) > 1  # different crop offsets per sample, zero fill
    ramp = torch.arange(8, dtype=torch.uint8).repeat(16, 3, 8, 1)
    no_pad = DatasetSpec("s", 2, 3, 8, 8, (0.5,) * 3, (0.5,) * 3, hflip=False, crop_padding=0)
    assert torch.equal(random_crop_flip(ramp, no_pad, torch.Generator().manual_seed(0)), ramp)
    flips = DatasetSpec("s", 2, 3, 8, 8, (0.5,) * 3, (0.5,) * 3, hflip=True, crop_padding=0)
    flipped = random_crop_flip(ramp, flips, torch.Generator().manual_seed(0))
    n_flipped = sum(torch.equal(f, r.flip(2)) for f, r in zip(flipped, ramp))
    assert 0 < n_flipped < 16 and all(torch.equal(f, r) or torch.equal(f, r.flip(2)) for f, r in zip(flipped, ramp))


def test_normalize_uses_dataset_mean_and_std():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    assert torch.allclose(normalize(x, SPEC), torch.full((1, 3, 2, 2), 2.0))


def tiny_training(seed):
    train, _ = make_synthetic(num_classes=4, size=32, train_per_class=32, test_per_class=8, seed=0)
    torch.manual_seed(seed)
    model = PreActResNet18(4, 3, width=4)
    history = train_model(model, train, SPEC, TrainSettings(epochs=2, batch_size=32, t_max=2), device=CPU,
                          seed=seed, progress=False)
    return model, history


def test_same_seed_gives_identical_weights_on_cpu():
    a, ha = tiny_training(0)
    b, hb = tiny_training(0)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert ha[-1]["loss"] == hb[-1]["loss"]
    c, _ = tiny_training(1)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_loop_learns_and_anneals_cosine_to_zero():
    train, test = make_synthetic(num_classes=4, size=32, train_per_class=64, test_per_class=32, seed=0)
    torch.manual_seed(0)
    model = PreActResNet18(4, 3, width=8)
    history = train_model(model, train, SPEC, TrainSettings(epochs=4, batch_size=32, t_max=4), device=CPU,
                          progress=False)
    assert [round(h["lr"], 5) for h in history] == [0.01, 0.00854, 0.005, 0.00146]
    assert history[-1]["loss"] < history[0]["loss"]
    assert accuracy(model, test, SPEC) > 50.0  # chance is 25 %


class Constant(nn.Module):
    def __init__(self, label, classes=4):
        super().__init__()
        self.label, self.classes = label, classes
        self.p = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = torch.zeros(len(x), self.classes)
        out[:, self.label] = 1.0
        return out + self.p


def test_asr_and_ra_are_measured_on_non_target_images_only():
    from attacks.badnet import BadNet

    _, test = make_synthetic(num_classes=4, size=32, train_per_class=4, test_per_class=10, seed=0)
    attack = BadNet(SPEC, target=1)
    bd = attack.bd_test(test)
    always_target = backdoor_metrics(Constant(1), test, bd.images, bd.target_labels, bd.true_labels, SPEC)
    assert always_target == {"acc": 25.0, "asr": 100.0, "ra": 0.0}
    always_two = backdoor_metrics(Constant(2), test, bd.images, bd.target_labels, bd.true_labels, SPEC)
    assert always_two["asr"] == 0.0 and abs(always_two["ra"] - 100 / 3) < 1e-4  # 10 of the 30 non-target images
