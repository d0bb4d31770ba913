"""BPP: colour squeezing levels, dithering, batch-level poisoning with residual negatives, bd_test, stored state,
oracles against BackdoorBench's computation, a short training run."""
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from attacks.base import AttackConfigError
from attacks.batch_poisoning import denormalize_like_backdoorbench
from attacks.bpp import BPP, PUBLISHED_CIFAR100_STATS, clean_png_uint8, floyd_steinberg_squeeze, poison_bpp_batch
from bdcore.data import DatasetSpec, ImageSet, normalize
from bdcore.datasets import CIFAR10, CIFAR100, GTSRB, FashionMNIST, Synthetic, TinyImageNet, make_synthetic
from bdcore.train import TrainSettings
from helpers import backdoorbench_transforms, random_images, short_batch_poisoning_run

CONF = Path(__file__).resolve().parents[1] / "conf"
SYNTH = DatasetSpec("synthetic", 4, 3, 32, 32, (0.5,) * 3, (0.25,) * 3)
SMALL = DatasetSpec("small", 10, 3, 12, 12, (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))
CPU = torch.device("cpu")


def ramp(spec):
    """Every uint8 value on every channel."""
    values = torch.arange(256, dtype=torch.uint8).repeat(spec.height * spec.width // 256 + 1)
    return values[:spec.height * spec.width].view(1, 1, spec.height, spec.width).repeat(1, spec.channels, 1, 1)


@pytest.mark.parametrize("squeeze_num", [8, 4, 2])
def test_squeezing_gives_exactly_squeeze_num_levels_per_channel(cifar_spec, squeeze_num):
    out = BPP(cifar_spec, squeeze_num=squeeze_num).apply_trigger(ramp(cifar_spec))
    assert out.dtype == torch.uint8
    for c in range(3):
        assert len(out[:, c].unique()) == squeeze_num
    if squeeze_num == 8:  # BackdoorBench's PNG levels after the truncation
        assert out.unique().tolist() == [0, 36, 72, 109, 145, 182, 218, 255]
    # every value goes to its nearest level (before the PNG truncation)
    levels = torch.arange(squeeze_num) * 255 / (squeeze_num - 1)
    nearest = levels[(ramp(cifar_spec).float().unsqueeze(-1) - levels).abs().argmin(-1)]
    assert (out.float() - nearest).abs().max() < 1


def test_dithering_keeps_the_levels_and_the_local_mean(cifar_spec):
    flat = torch.full((1, 3, 32, 32), 100, dtype=torch.uint8)  # between the levels 72.9 and 109.3
    plain = BPP(cifar_spec).apply_trigger(flat)
    dithered = BPP(cifar_spec, dithering=True).apply_trigger(flat)
    assert plain.unique().tolist() == [109]
    # error diffusion mixes the two neighbouring levels; BackdoorBench rounds dithered levels to integers
    assert set(dithered.unique().tolist()) == {73, 109} and abs(dithered.float().mean().item() - 100) < 1.5
    out = BPP(cifar_spec, dithering=True).apply_trigger(random_images(2, cifar_spec))
    assert set(out.unique().tolist()) <= {0, 36, 73, 109, 146, 182, 219, 255}


def naive_floyd(image, squeeze_num):
    """BackdoorBench's floydDitherspeed, one pixel and one channel at a time, with the numba routine's types:
    float32 storage, float64 arithmetic."""
    img = image.astype(np.float32).copy()
    channels, h, w = img.shape
    for y in range(h):
        for x in range(w):
            for c in range(channels):
                old = np.float64(img[c, y, x])
                new = np.round(old / 255.0 * (squeeze_num - 1)) / (squeeze_num - 1) * 255
                error = old - new
                img[c, y, x] = np.float32(new)
                for dy, dx, weight in ((0, 1, 0.4375), (1, 1, 0.0625), (1, 0, 0.3125), (1, -1, 0.1875)):
                    if 0 <= x + dx < w and y + dy < h:
                        img[c, y + dy, x + dx] = np.float32(np.float64(img[c, y + dy, x + dx]) + error * weight)
    return img


def pil_of(chw_uint8):
    return Image.fromarray(chw_uint8.permute(1, 2, 0).numpy())


def as_png(x01):
    """ToPILImage of a float tensor, read back as uint8 C x H x W."""
    return torch.from_numpy(np.array(T.ToPILImage()(x01))).permute(2, 0, 1)


def backdoorbench_bd_png(img, spec, squeeze_num, dithering):
    """attack/bpp.py's bd_test / bd_train_dataset_Save PNG of one image."""
    to_input, denormalizer = backdoorbench_transforms(spec)
    inputs_bd = torch.round(denormalizer(to_input(pil_of(img))) * 255)
    if dithering:
        inputs_bd = torch.round(torch.from_numpy(naive_floyd(inputs_bd.numpy(), float(squeeze_num))))
    else:
        inputs_bd = torch.round(inputs_bd / 255.0 * (squeeze_num - 1)) / (squeeze_num - 1) * 255
    return as_png(inputs_bd.div(255.0))


@pytest.mark.parametrize("dithering", [False, True])
def test_oracle_bd_test_images_equal_backdoorbench_per_sample(dithering):
    images = random_images(5, SMALL, seed=1)
    images[0] = 0
    images[1] = 255
    images[2] = torch.arange(144, dtype=torch.uint8).view(1, 12, 12) + 50
    expected = torch.stack([backdoorbench_bd_png(img, SMALL, 8, dithering) for img in images])
    assert torch.equal(BPP(SMALL, dithering=dithering).apply_trigger(images), expected)
    assert np.array_equal(floyd_steinberg_squeeze(images.float().numpy(), 8),
                          np.stack([naive_floyd(i.float().numpy(), 8.0) for i in images]))


def test_oracle_training_batch_equals_backdoorbench_train_step():
    """attack/bpp.py train_step up to the PostTensorTransform: same batch, same donors r; BackdoorBench's stored
    clean / squeezed PNGs of the donors rebuilt through torchvision."""
    bs, num_bd, num_neg = 40, int(0.1 * 40), int(40 * 0.1)
    images, targets = random_images(bs, SMALL, seed=2), torch.arange(bs) % 10
    pool = random_images(30, SMALL, seed=3)
    donors = torch.tensor([4, 17, 4, 29])
    to_input, denormalizer = backdoorbench_transforms(SMALL)
    inputs = torch.stack([to_input(pil_of(i)) for i in images])
    mean, std = SMALL.mean, SMALL.std

    def back_to_np_4d(x):
        out = x.clone()
        for c in range(3):
            out[:, c] = out[:, c] * std[c] + mean[c]
        return out * 255

    def np_4d_to_tensor(x):
        out = x.clone().div(255.0)
        for c in range(3):
            out[:, c] = (out[:, c] - mean[c]).div(std[c])
        return out

    clean_png = {int(r): as_png(denormalizer(to_input(pil_of(pool[r])))) for r in donors}
    bd_png = {int(r): backdoorbench_bd_png(pool[r], SMALL, 8, False) for r in donors}
    inputs_bd = back_to_np_4d(inputs[:num_bd])
    inputs_bd = np_4d_to_tensor(torch.round(inputs_bd / 255.0 * (8 - 1)) / (8 - 1) * 255)
    targets_bd = torch.ones_like(targets[:num_bd]) * 3
    inputs_negative = torch.zeros_like(inputs[num_bd:num_bd + num_neg])
    inputs_d = back_to_np_4d(inputs)
    for i in range(num_neg):
        r = int(donors[i])
        inputs_negative[i] = (inputs_d[num_bd + i] + T.functional.to_tensor(pil_of(bd_png[r])) * 255
                              - T.functional.to_tensor(pil_of(clean_png[r])) * 255)
    inputs_negative = np_4d_to_tensor(torch.clamp(inputs_negative, 0, 255))
    total_inputs = torch.cat([inputs_bd, inputs_negative, inputs[num_bd + num_neg:]], dim=0)
    total_targets = torch.cat([targets_bd, targets[num_bd:]], dim=0)

    attack = BPP(SMALL, target=3)
    ours_clean, ours_bd = clean_png_uint8(pool[donors], SMALL), attack.apply_trigger(pool[donors])
    assert torch.equal(ours_clean, torch.stack([clean_png[int(r)] for r in donors]))
    assert (ours_clean != pool[donors]).any()  # the stored clean image is the original - 1 at some pixels
    out, labels, kind = poison_bpp_batch(normalize(images, SMALL), targets, num_bd, ours_bd, ours_clean, 8, False,
                                         mean, std, attack.backdoor_labels)
    assert torch.equal(out, total_inputs) and torch.equal(labels, total_targets)
    assert [(kind == k).sum().item() for k in (1, 2, 0)] == [4, 4, 32]


def test_hook_poisons_the_head_of_every_batch_with_negatives_after_it(cifar_spec):
    spec = DatasetSpec("s", 10, 3, 32, 32, cifar_spec.mean, cifar_spec.std, hflip=False)
    attack = BPP(spec, target=1, random_crop=0, random_rotation=0)  # batch transform off: compare pixels
    with pytest.raises(RuntimeError, match="poison_train"):
        attack.training_hooks(None, CPU)
    train = ImageSet(random_images(300, spec, seed=4), torch.arange(300) % 10)
    assert attack.poison_train(train, seed=0).data is train
    hook = attack.training_hooks(None, CPU).batch_transform
    for bs, n_bd, n_neg in [(128, 12, 12), (44, 4, 4)]:
        images, y = random_images(bs, spec, seed=bs), torch.arange(bs) % 10
        x = normalize(images, spec)
        out, labels = hook(x, y, 0)
        assert (labels[:n_bd] == 1).all() and torch.equal(labels[n_bd:], y[n_bd:])
        changed = (out - x).abs().flatten(1).amax(1) > 1e-4
        assert changed[:n_bd + n_neg].all() and torch.equal(out[n_bd + n_neg:], x[n_bd + n_neg:])
        pixels = (out[:n_bd] * torch.tensor(spec.std).view(1, 3, 1, 1) + torch.tensor(spec.mean).view(1, 3, 1, 1)) * 255
        levels = torch.arange(8) * 255 / 7
        assert (pixels.unsqueeze(-1) - levels).abs().amin(-1).max() < 1e-3  # backdoor samples sit on the levels
    # no backdoor sample in a batch (ratio * bs < 1 and the draw says 0): no negatives either
    rare = BPP(spec, poison_ratio=0.001, random_crop=0, random_rotation=0)
    rare.poison_train(train, seed=0)
    rare_hook = rare.training_hooks(None, CPU).batch_transform
    x = normalize(random_images(64, spec, seed=5), spec)
    poisoned = [not torch.equal(rare_hook(x, torch.zeros(64, dtype=torch.long), 0)[0], x) for _ in range(300)]
    assert 0.03 < np.mean(poisoned) < 0.11  # P(one poisoned sample) = 0.064 per batch


def test_same_seed_same_batches_other_seed_other_donors(cifar_spec):
    train = ImageSet(random_images(200, cifar_spec, seed=6), torch.arange(200) % 10)
    x, y = normalize(random_images(64, cifar_spec, seed=7), cifar_spec), torch.arange(64) % 10

    def first_batch(seed):
        attack = BPP(cifar_spec, seed=seed)
        attack.poison_train(train, seed=0)
        return attack.training_hooks(None, CPU).batch_transform(x, y, 0)[0]

    assert torch.equal(first_batch(2), first_batch(2)) and not torch.equal(first_batch(2), first_batch(3))


def test_bd_test_excludes_target_class_and_keeps_both_labels():
    _, test = make_synthetic(num_classes=4, size=32, train_per_class=1, test_per_class=8, seed=0)
    bd = BPP(SYNTH, target=2).bd_test(test)
    assert len(bd) == 24 and (bd.true_labels != 2).all() and (bd.target_labels == 2).all()
    assert torch.equal(bd.true_labels, test.labels[bd.source_indices]) and bd.images.dtype == torch.uint8


def test_state_dict_rebuilds_identical_bd_test_on_a_fresh_attack(cifar_spec):
    test = ImageSet(random_images(10, cifar_spec, seed=8), torch.arange(10))
    trained = BPP(cifar_spec, squeeze_num=5, dithering=True)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = BPP(cifar_spec)
    assert not torch.equal(fresh.bd_test(test).images, trained.bd_test(test).images)
    assert torch.equal(fresh.restored(state).bd_test(test).images, trained.bd_test(test).images)


def test_published_cifar100_constants_switch_changes_only_cifar100():
    cifar100 = DatasetSpec("cifar100", 100, 3, 32, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    assert BPP(cifar100).pixel_stats() == (cifar100.mean, cifar100.std)
    assert BPP(cifar100, published_cifar100_constants=True).pixel_stats() == PUBLISHED_CIFAR100_STATS
    assert BPP(SYNTH, published_cifar100_constants=True).pixel_stats() == (SYNTH.mean, SYNTH.std)


def test_short_training_reaches_high_asr():
    """The hooks inside the one training loop plant a working backdoor. A width-4 net on 256 synthetic images
    does not learn the default 8-level squeezing in seconds (ASR 0 % after 20 epochs), so this run squeezes
    harder (3 levels) at ratio 0.2, with the residual negatives and the batch-wise transform kept on."""
    attack = BPP(SYNTH, poison_ratio=0.2, squeeze_num=3, seed=0,
                 train_overrides={"scheduler": "cosine", "t_max": 20, "augment": False, "drop_last": False})
    metrics = short_batch_poisoning_run(attack, SYNTH)
    assert metrics["acc"] >= 80 and metrics["asr"] >= 80, metrics


def test_config_has_backdoorbench_defaults():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["attack=bpp", "seed=4"])
    attack = instantiate(cfg.attack, spec=SYNTH)
    assert isinstance(attack, BPP) and attack.seed == 4
    assert (attack.target, attack.poison_ratio, attack.neg_ratio, attack.squeeze_num, attack.dithering,
            attack.random_crop, attack.random_rotation, attack.published_cifar100_constants) == \
        (0, 0.1, 0.1, 8, False, 5, 10.0, False)
    settings = attack.training_settings(TrainSettings())
    assert (settings.scheduler, settings.milestones, settings.gamma, settings.augment, settings.drop_last) == \
        ("multistep", (100, 200, 300, 400), 0.1, False, False)


@pytest.mark.parametrize("kwargs, key", [({"squeeze_num": 1}, "attack.squeeze_num"),
                                         ({"neg_ratio": 0.95}, "attack.neg_ratio"),
                                         ({"random_rotation": -3}, "attack.random_rotation")])
def test_bad_settings_are_one_line_errors(cifar_spec, kwargs, key):
    with pytest.raises(AttackConfigError, match=key) as err:
        BPP(cifar_spec, **kwargs)
    assert "\n" not in str(err.value)


def test_one_channel_28px_data_sets_work(gray_spec):
    """Beyond BackdoorBench (it never ran 1-channel data): the same arithmetic on C = 1, 28 x 28."""
    attack = BPP(gray_spec)
    images = random_images(3, gray_spec)
    out = attack.apply_trigger(images)
    assert out.shape == images.shape and out.unique().tolist() == [0, 36, 72, 109, 145, 182, 218, 255]
    attack.poison_train(ImageSet(random_images(50, gray_spec, seed=1), torch.arange(50) % 10), seed=0)
    x = normalize(random_images(40, gray_spec), gray_spec)
    batch, labels = attack.training_hooks(None, CPU).batch_transform(x, torch.full((40,), 3), 0)
    assert batch.shape == x.shape and (labels[:4] == 0).all() and (labels[4:] == 3).all()


def test_pixels_survive_the_normalisation_round_trip_on_every_data_set():
    """apply_trigger squeezes v directly: BackdoorBench's round(denormalise(normalise(v)) * 255) is v for every
    uint8 v with every data set's constants (only the truncated CLEAN PNG loses 1 here and there)."""
    for spec in [CIFAR10.spec, CIFAR100.spec, GTSRB.spec, TinyImageNet.spec, FashionMNIST.spec, SYNTH,
                 Synthetic(channels=1).spec]:
        values = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).repeat(1, spec.channels, 1, 1)
        round_trip = torch.round(denormalize_like_backdoorbench(normalize(values, spec), spec) * 255)
        assert torch.equal(round_trip, values.float()), spec.name
