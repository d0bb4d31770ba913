"""WaNet: warping grid, batch-level poisoning (backdoor / cross counts, labels), the batch-wise
PostTensorTransform, bd_test, stored state, oracles against BackdoorBench's computation, a short training run."""
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from attacks.base import AttackConfigError
from attacks.batch_poisoning import (PostTensorParams, batch_poison_count, draw_post_tensor_params,
                                     post_tensor_transform)
from attacks.wanet import WaNet, poison_wanet_batch, warp
from bdcore.data import DatasetSpec, ImageSet, normalize
from bdcore.datasets import make_synthetic
from bdcore.train import TrainSettings, make_scheduler
from helpers import backdoorbench_transforms, random_images, short_batch_poisoning_run

CONF = Path(__file__).resolve().parents[1] / "conf"
SYNTH = DatasetSpec("synthetic", 4, 3, 32, 32, (0.5,) * 3, (0.25,) * 3)
CPU = torch.device("cpu")


def test_grid_stays_inside_the_image_and_is_the_identity_at_s0(cifar_spec):
    attack = WaNet(cifar_spec)
    grid = attack.grid
    assert grid.shape == (1, 32, 32, 2) and grid.min() >= -1 and grid.max() <= 1
    assert not torch.equal(grid, attack.identity_grid)
    # x = column, y = row (grid_sample's convention); corners are the corner pixel centres
    ident = attack.identity_grid[0]
    assert ident[0, 0].tolist() == [-1, -1] and ident[0, -1].tolist() == [1, -1] and ident[-1, 0].tolist() == [-1, 1]
    flat = WaNet(cifar_spec, s=0)
    assert torch.equal(flat.grid, flat.identity_grid)
    x = normalize(random_images(4, cifar_spec), cifar_spec)
    assert torch.allclose(warp(x, flat.grid), x, atol=1e-5)
    images = random_images(4, cifar_spec)
    # at s = 0 only BackdoorBench's normalise -> denormalise -> truncate round trip remains (v or v - 1)
    delta = images.int() - flat.apply_trigger(images).int()
    assert delta.min() >= 0 and delta.max() <= 1
    assert (attack.apply_trigger(images).int() - images.int()).abs().float().mean() > 5  # the warp moves pixels


def test_same_seed_same_grid_other_seed_other_grid(cifar_spec):
    assert torch.equal(WaNet(cifar_spec, seed=3).noise_grid, WaNet(cifar_spec, seed=3).noise_grid)
    assert not torch.equal(WaNet(cifar_spec, seed=3).noise_grid, WaNet(cifar_spec, seed=4).noise_grid)
    images = random_images(6, cifar_spec)
    assert torch.equal(WaNet(cifar_spec, seed=3).apply_trigger(images), WaNet(cifar_spec, seed=3).apply_trigger(images))


def test_poison_counts_per_batch_and_which_labels_change(cifar_spec):
    attack = WaNet(cifar_spec, target=2)
    gen = torch.Generator().manual_seed(0)
    for bs, n_bd, n_cross in [(128, 12, 24), (80, 8, 16)]:  # a full CIFAR batch and the last (50000 % 128)
        x = normalize(random_images(bs, cifar_spec), cifar_spec)
        y = torch.arange(bs) % 10
        num_bd = batch_poison_count(0.1, bs, gen)
        num_cross = int(num_bd * attack.cross_ratio)
        assert (num_bd, num_cross) == (n_bd, n_cross)
        noise = torch.rand(num_cross, 32, 32, 2, generator=gen) * 2 - 1
        out, labels, kind = poison_wanet_batch(x, y, attack.grid, num_bd, noise, attack.backdoor_labels)
        assert [(kind == k).sum().item() for k in (1, 2, 0)] == [n_bd, n_cross, bs - n_bd - n_cross]
        assert (labels[:n_bd] == 2).all() and torch.equal(labels[n_bd:], y[n_bd:])
        assert (y[:n_bd] == 2).any()  # target-class samples in the backdoor slots are poisoned too
        assert torch.equal(out[:n_bd], warp(x[:n_bd], attack.grid))
        cross = out[n_bd:n_bd + n_cross]
        assert not torch.allclose(cross, warp(x[n_bd:n_bd + n_cross], attack.grid), atol=1e-3)
        assert torch.equal(out[n_bd + n_cross:], x[n_bd + n_cross:])


def test_hook_poisons_the_head_of_every_batch(cifar_spec):
    spec = DatasetSpec("s", 10, 3, 32, 32, cifar_spec.mean, cifar_spec.std, hflip=False)
    attack = WaNet(spec, target=1, random_crop=0, random_rotation=0)  # batch transform off: compare pixels
    hook = attack.training_hooks(None, CPU).batch_transform
    x = normalize(random_images(64, spec), spec)
    y = torch.arange(64) % 10
    out, labels = hook(x, y, 0)
    assert out.shape == x.shape and torch.equal(labels[:6], torch.ones(6, dtype=torch.long))
    assert torch.equal(labels[6:], y[6:])
    assert torch.equal(out[:6], warp(x[:6], attack.grid))
    changed = (out != x).flatten(1).any(1)
    assert changed[:18].all() and not changed[18:].any()  # 6 backdoor + 12 cross, the rest untouched
    # tiny ratios: one poisoned sample with probability ratio * bs (BackdoorBench's generalize_to_lower_pratio)
    gen = torch.Generator().manual_seed(0)
    draws = [batch_poison_count(0.001, 128, gen) for _ in range(4000)]
    assert set(draws) == {0, 1} and abs(np.mean(draws) - 0.128) < 0.02


def test_post_tensor_transform_equals_torchvision_transforms(monkeypatch):
    """Oracle: BackdoorBench's PostTensorTransform modules (torchvision RandomCrop(padding=5), RandomRotation(10),
    RandomHorizontalFlip) with their random parameters pinned to ours."""
    x = torch.randn(5, 3, 32, 32)
    for params in [PostTensorParams((3, 8), 7.3, True), PostTensorParams((10, 0), None, False),
                   PostTensorParams(None, -9.1, False), PostTensorParams((0, 10), -2.2, True)]:
        expected = x
        if params.crop_offset is not None:
            top, left = params.crop_offset
            monkeypatch.setattr(T.RandomCrop, "get_params", staticmethod(lambda img, size: (top, left, 32, 32)))
            expected = T.RandomCrop((32, 32), padding=5)(expected)
        if params.angle is not None:
            angle = params.angle
            monkeypatch.setattr(T.RandomRotation, "get_params", staticmethod(lambda degrees: angle))
            expected = T.RandomRotation(10)(expected)
        if params.flip:
            expected = T.RandomHorizontalFlip(p=1.0)(expected)
        assert torch.equal(post_tensor_transform(x, params, crop_padding=5), expected)
    # gates: crop 0.8, rotation 0.5, flip 0.5 only where the data set flips; one draw for the whole batch
    gen = torch.Generator().manual_seed(0)
    draws = [draw_post_tensor_params(gen, 5, 10, True) for _ in range(3000)]
    assert abs(np.mean([d.crop_offset is not None for d in draws]) - 0.8) < 0.03
    assert abs(np.mean([d.angle is not None for d in draws]) - 0.5) < 0.03
    assert abs(np.mean([d.flip for d in draws]) - 0.5) < 0.03
    assert all(0 <= o <= 10 for d in draws if d.crop_offset for o in d.crop_offset)
    assert all(-10 <= d.angle <= 10 for d in draws if d.angle is not None)
    assert not any(draw_post_tensor_params(gen, 5, 10, False).flip for _ in range(200))


def test_bd_test_excludes_target_class_and_keeps_both_labels():
    _, test = make_synthetic(num_classes=4, size=32, train_per_class=1, test_per_class=8, seed=0)
    bd = WaNet(SYNTH, target=1).bd_test(test)
    assert len(bd) == 24 and (bd.true_labels != 1).all() and (bd.target_labels == 1).all()
    assert torch.equal(bd.true_labels, test.labels[bd.source_indices]) and bd.images.dtype == torch.uint8


def test_state_dict_rebuilds_identical_bd_test_on_a_fresh_attack(cifar_spec):
    test = ImageSet(random_images(40, cifar_spec, seed=1), torch.arange(40) % 10)
    trained = WaNet(cifar_spec, seed=7, s=0.8, grid_rescale=0.98, k=3)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = WaNet(cifar_spec)
    assert not torch.equal(fresh.bd_test(test).images, trained.bd_test(test).images)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.bd_test(test).images, trained.bd_test(test).images)
    assert torch.equal(WaNet(cifar_spec).restored(state).bd_test(test).images, trained.bd_test(test).images)


def backdoorbench_grids(seed, k, s, grid_rescale, height):
    """attack/wanet.py's warping field, transcribed: (1,2,k,k) U(-1,1), / mean|.|, bicubic upsampling to
    height x height, permuted; identity = meshgrid (ij) stacked as (y, x)."""
    g = torch.Generator().manual_seed(seed)
    ins = torch.rand(1, 2, k, k, generator=g) * 2 - 1
    ins = ins / torch.mean(torch.abs(ins))
    noise_grid = F.interpolate(ins, size=height, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    array1d = torch.linspace(-1, 1, steps=height)
    x, y = torch.meshgrid(array1d, array1d, indexing="ij")
    identity_grid = torch.stack((y, x), 2)[None, ...]
    grid_temps = (identity_grid + s * noise_grid / height) * grid_rescale
    return torch.clamp(grid_temps, -1, 1)


def test_oracle_bd_test_images_equal_backdoorbench_per_sample(cifar_spec):
    """Per image: PIL -> ToTensor -> Normalize -> grid_sample(G) -> denormaliser -> ToPILImage (the PNG)."""
    images = random_images(12, cifar_spec, seed=2)
    images[:2] = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1)  # extremes: no wrap-around
    attack = WaNet(cifar_spec, seed=5, s=0.5, k=4, grid_rescale=1)
    grid = backdoorbench_grids(5, 4, 0.5, 1.0, 32)
    assert torch.equal(grid, attack.grid)
    to_input, denormalizer = backdoorbench_transforms(cifar_spec)
    expected = []
    for img in images:
        x = to_input(Image.fromarray(img.permute(1, 2, 0).numpy()))[None]
        warped = denormalizer(F.grid_sample(x, grid, align_corners=True)[0])
        expected.append(torch.from_numpy(np.array(T.ToPILImage()(warped))).permute(2, 0, 1))
    assert torch.equal(attack.apply_trigger(images), torch.stack(expected))


def test_oracle_training_batch_equals_backdoorbench_train_step(cifar_spec):
    """attack/wanet.py train_step up to the PostTensorTransform, on the same batch and the same cross noise."""
    attack = WaNet(cifar_spec, target=0, seed=1)
    images = random_images(128, cifar_spec, seed=3)
    targets = torch.arange(128) % 10
    to_input, _ = backdoorbench_transforms(cifar_spec)
    inputs = torch.stack([to_input(Image.fromarray(i.permute(1, 2, 0).numpy())) for i in images])
    assert torch.equal(inputs, normalize(images, cifar_spec))  # our normalisation is torchvision's, bit for bit
    ins = torch.rand(24, 32, 32, 2, generator=torch.Generator().manual_seed(9)) * 2 - 1
    # BackdoorBench, transcribed
    grid_temps = backdoorbench_grids(1, 4, 0.5, 1.0, 32)
    num_bd, num_cross = int(0.1 * 128), int(int(0.1 * 128) * 2.0)
    grid_temps2 = torch.clamp(grid_temps.repeat(num_cross, 1, 1, 1) + ins / 32, -1, 1)
    inputs_bd = F.grid_sample(inputs[:num_bd], grid_temps.repeat(num_bd, 1, 1, 1), align_corners=True)
    targets_bd = torch.ones_like(targets[:num_bd]) * 0
    inputs_cross = F.grid_sample(inputs[num_bd:num_bd + num_cross], grid_temps2, align_corners=True)
    total_inputs = torch.cat([inputs_bd, inputs_cross, inputs[num_bd + num_cross:]], dim=0)
    total_targets = torch.cat([targets_bd, targets[num_bd:]], dim=0)
    out, labels, _ = poison_wanet_batch(inputs, targets, attack.grid, num_bd, ins, attack.backdoor_labels)
    assert torch.equal(out, total_inputs) and torch.equal(labels, total_targets)


def test_short_training_reaches_high_asr():
    """The hooks inside the one training loop plant a working backdoor. A width-4 net on 256 synthetic images
    learns neither the default warp (s = 0.5, noise-mode samples: ASR 0 % after 20 epochs) nor a strong one under
    the batch-wise crop / rotation (ASR 35-90 % by seed) in seconds, so this run uses a stronger field (s = 4),
    ratio 0.2, no noise-mode samples and no batch-wise transform (both have their own tests above)."""
    attack = WaNet(SYNTH, poison_ratio=0.2, cross_ratio=0, s=4, random_crop=0, random_rotation=0, seed=0,
                   train_overrides={"scheduler": "cosine", "t_max": 20, "augment": False, "drop_last": False})
    metrics = short_batch_poisoning_run(attack, SYNTH)
    assert metrics["acc"] >= 80 and metrics["asr"] >= 80, metrics


def test_config_has_backdoorbench_defaults_and_a_constant_lr_for_100_epochs():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["attack=wanet", "seed=3"])
    attack = instantiate(cfg.attack, spec=SYNTH)
    assert isinstance(attack, WaNet) and attack.seed == 3
    assert (attack.target, attack.poison_ratio, attack.cross_ratio, attack.s, attack.k, attack.grid_rescale,
            attack.random_crop, attack.random_rotation) == (0, 0.1, 2.0, 0.5, 4, 1.0, 5, 10.0)
    settings = attack.training_settings(TrainSettings())
    assert (settings.scheduler, settings.milestones, settings.augment, settings.drop_last) == \
        ("multistep", (100, 200, 300, 400), False, False)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=settings.lr)
    scheduler = make_scheduler(optimizer, settings)
    lrs = []
    for _ in range(settings.epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == [0.01] * 100


@pytest.mark.parametrize("kwargs, key", [({"k": 0}, "attack.k"), ({"cross_ratio": 12}, "attack.cross_ratio"),
                                         ({"s": -1}, "attack.s"), ({"random_crop": -1}, "attack.random_crop")])
def test_bad_settings_are_one_line_errors(cifar_spec, kwargs, key):
    with pytest.raises(AttackConfigError, match=key) as err:
        WaNet(cifar_spec, **kwargs)
    assert "\n" not in str(err.value)


def test_one_channel_28px_data_sets_work(gray_spec):
    """Beyond BackdoorBench (it never ran 1-channel data): the same arithmetic on C = 1, 28 x 28."""
    attack = WaNet(gray_spec)
    images = random_images(3, gray_spec)
    out = attack.apply_trigger(images)
    assert out.shape == images.shape and out.dtype == torch.uint8 and attack.grid.shape == (1, 28, 28, 2)
    x = normalize(random_images(40, gray_spec), gray_spec)
    batch, labels = attack.training_hooks(None, CPU).batch_transform(x, torch.full((40,), 3), 0)
    assert batch.shape == x.shape and (labels[:4] == 0).all() and (labels[4:] == 3).all()
