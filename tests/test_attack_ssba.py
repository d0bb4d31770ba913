"""SSBA: BackdoorBench's BCH code (oracle against bchlib), StegaStamp's architecture and loss schedule, the
encoder trained in `prepare` (cached), sample-specific bounded residuals, poisoning, determinism, stored state."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import save_image

from attacks.badnet import BadNet
from attacks.base import AttackConfigError
from attacks.ssba import (SSBA, StegaStampDecoder, StegaStampEncoder, bch_generator_polynomial, fingerprint_bits,
                          l2_loss_weight, round_to_uint8)
from bdcore.data import DatasetSpec
from bdcore.datasets import make_synthetic

SPEC16 = DatasetSpec("synthetic", 4, 3, 16, 16, (0.5,) * 3, (0.25,) * 3)

# bchlib 2.1.3, bchlib.BCH(5, 137) / BCH(2, 137), packet = data + ecc as BackdoorBench's generate_fingerprints
BCHLIB_STEGA_100 = ("0111001101110100011001010110011101100001001000010010000100110100"
                    "100011001100000111100101011000000000")
BCHLIB_ABCD_100 = ("0110000101100010011000110110010000100000001000000010000001011000"
                   "101101011111001010011010111000000000")
BCHLIB_ABCD_50 = "01100001011000100110001101100100110000001000100000"


class FakeResources:
    """In-memory AttackResources: `cached` produces once per (name, material) and counts the productions."""

    device = torch.device("cpu")

    def __init__(self):
        self.store, self.produced, self.names = {}, 0, []

    def cached(self, name, material, produce):
        self.names.append(name)
        key = (name, json.dumps(material, sort_keys=True))
        if key not in self.store:
            self.produced += 1
            self.store[key] = {k: v.clone() for k, v in produce().items()}
        return {k: v.clone() for k, v in self.store[key].items()}

    def clean_model(self):
        raise AssertionError("SSBA needs no clean model")


# a few steps of the published schedule at a tiny width: enough for the pipeline, caching and state tests
SHORT = dict(width=4, steps=5, batch_size=16, code_length=50, secret="abcd", progress=False)


@pytest.fixture(scope="module")
def data16():
    return make_synthetic(num_classes=4, size=16, train_per_class=24, test_per_class=8, seed=0)


@pytest.fixture(scope="module")
def prepared(data16):
    attack = SSBA(SPEC16, seed=0, **SHORT)
    resources = FakeResources()
    attack.prepare(data16[0], resources)
    return attack, resources


# ---------------------------------------------------------------- the code

@pytest.mark.parametrize("secret, length, expected", [("stega!!", 100, BCHLIB_STEGA_100),
                                                      ("abcd", 100, BCHLIB_ABCD_100),
                                                      ("abcd", 50, BCHLIB_ABCD_50)])
def test_fingerprint_equals_bchlib_packet(secret, length, expected):
    bits = fingerprint_bits(secret, length)
    assert bits.shape == (length,) and "".join(str(int(b)) for b in bits) == expected


def test_bch_generator_polynomial_has_the_designed_roots():
    g5 = bch_generator_polynomial(5)
    assert len(g5) - 1 == 35 and len(bch_generator_polynomial(2)) - 1 == 14  # m * t parity bits, m = 7
    # evaluate g at alpha^1..alpha^10 in GF(2^7) (primitive x^7 + x^3 + 1): all zero
    exp, v = [], 1
    for _ in range(127):
        exp.append(v)
        v = (v << 1) ^ (137 if v & 64 else 0)
    log = {e: i for i, e in enumerate(exp)}
    for i in range(1, 11):
        value = 0
        for degree, c in enumerate(g5):
            if c:
                value ^= exp[(i * degree) % 127]
        assert value == 0
    assert set(log) == set(range(1, 128))  # 137 is primitive: alpha generates the whole field


def test_bad_code_settings_are_config_errors():
    with pytest.raises(AttackConfigError, match="attack.code_length=64"):
        SSBA(SPEC16, code_length=64)
    with pytest.raises(AttackConfigError, match="attack.secret='stega!!'.*'abcd'"):
        SSBA(SPEC16, code_length=50)
    with pytest.raises(AttackConfigError, match="attack.steps=0"):
        SSBA(SPEC16, steps=0)
    with pytest.raises(RuntimeError, match="prepare"):
        SSBA(SPEC16).apply_trigger(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


# ---------------------------------------------------------------- StegaStamp as published

def test_networks_carry_backdoorbench_names_and_shapes_at_width_32():
    enc = StegaStampEncoder(3, 32, 32, 100, 32).state_dict()
    dec = StegaStampDecoder(3, 32, 32, 100, 32).state_dict()
    expected_encoder = {"secret_dense.weight": (768, 100), "conv1.weight": (32, 6, 3, 3),
                        "conv5.weight": (256, 128, 3, 3), "up6.weight": (128, 256, 2, 2),
                        "conv6.weight": (128, 256, 3, 3), "up9.weight": (32, 32, 2, 2),
                        "conv9.weight": (32, 70, 3, 3), "conv10.weight": (32, 32, 3, 3),
                        "residual.weight": (3, 32, 1, 1)}
    for key, shape in expected_encoder.items():
        assert tuple(enc[key].shape) == shape
    assert len(enc) == 2 * 16  # 16 layers with weight and bias
    expected_decoder = {"decoder.0.weight": (32, 3, 3, 3), "decoder.12.weight": (128, 128, 3, 3),
                        "dense.0.weight": (512, 128), "dense.2.weight": (100, 512)}
    for key, shape in expected_decoder.items():
        assert tuple(dec[key].shape) == shape
    out = StegaStampEncoder(3, 32, 32, 100, 4)(torch.rand(2, 100), torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 3, 32, 32) and out.min() > 0 and out.max() < 1  # sigmoid: the encoded image
    gray = StegaStampEncoder(1, 28, 28, 50, 4)(torch.rand(2, 50), torch.rand(2, 1, 28, 28))  # padded to 32, cropped
    assert gray.shape == (2, 1, 28, 28) and StegaStampDecoder(1, 28, 28, 50, 4)(gray).shape == (2, 50)


def test_l2_weight_schedule_equals_published_formula():
    def published(since, await_, ramp, weight):
        return min(max(0, weight * (since - await_) / ramp), weight)

    for since in (-1, 0, 500, 1000, 1001, 2500, 4000, 4001, 9999):
        assert l2_loss_weight(since, 1000, 3000, 10.0) == pytest.approx(published(since, 1000, 3000, 10.0))
    assert l2_loss_weight(-1, 1000, 3000, 10.0) == 0 and l2_loss_weight(4000, 1000, 3000, 10.0) == 10.0


def test_rounding_equals_torchvision_save_image_png():
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    x[0, 0, :4] = torch.tensor([0.0, 1.0, 0.5 / 255, 1.5 / 255])
    buffer = io.BytesIO()
    save_image(x, buffer, format="png", padding=0)
    png = torch.from_numpy(np.asarray(Image.open(buffer).convert("RGB")).copy()).permute(2, 0, 1)
    assert torch.equal(round_to_uint8(x.clone()), png)


# ---------------------------------------------------------------- the trained encoder

def test_prepare_trains_once_through_the_resource_cache(prepared, data16):
    attack, resources = prepared
    assert resources.names == ["ssba_encoder"] and resources.produced == 1
    assert attack.generation_seconds > 0 and 0 <= attack.code_bit_accuracy <= 1
    again = SSBA(SPEC16, seed=0, **SHORT)
    again.prepare(data16[0], resources)  # same material: loaded, not retrained
    assert resources.produced == 1 and again.generation_seconds == attack.generation_seconds
    images = data16[1].images
    assert torch.equal(again.apply_trigger(images), attack.apply_trigger(images))


def test_an_encoder_that_hides_no_code_is_reported_and_warned_about(prepared, data16, caplog):
    attack, resources = prepared  # 5 steps: the decoder reads about half of the bits
    assert attack.code_bit_accuracy < SSBA.WORKING_BIT_ACCURACY
    assert attack.trigger_report() == {"code_bit_accuracy": attack.code_bit_accuracy}
    assert attack.restored(attack.state_dict()).trigger_report() == attack.trigger_report()  # metrics.json on a store hit
    with caplog.at_level("WARNING", logger="attacks.ssba"):
        SSBA(SPEC16, seed=0, **SHORT).prepare(data16[0], resources)
    assert "has not learnt to hide the code" in caplog.text


def test_triggers_are_uint8_replacements_with_per_image_residuals(prepared, data16):
    attack, _ = prepared
    images = data16[1].images
    encoded = attack.apply_trigger(images)
    residual = attack.residuals(images)
    assert encoded.dtype == torch.uint8 and encoded.shape == images.shape
    assert torch.equal(residual, encoded.to(torch.int16) - images.to(torch.int16))
    assert not torch.equal(residual[0], residual[1])  # two images, two different triggers
    assert torch.equal(attack.apply_trigger(images[:3]), encoded[:3])  # per image: the batch does not matter


def test_poisoning_uses_backdoorbench_indices_labels_and_replacement(prepared, data16):
    attack, _ = prepared
    train = data16[0]
    poisoned = attack.poison_train(train, seed=3)
    idx = poisoned.poison_indices
    assert len(idx) == round(0.1 * len(train)) and torch.equal(idx, BadNet(SPEC16).poison_indices(len(train), 3))
    assert (poisoned.data.labels[idx] == 0).all()
    clean = torch.ones(len(train), dtype=torch.bool)
    clean[idx] = False
    assert torch.equal(poisoned.data.images[clean], train.images[clean])
    assert torch.equal(poisoned.data.labels[clean], train.labels[clean])
    assert torch.equal(poisoned.data.images[idx], attack.apply_trigger(train.images[idx]))
    bd = attack.bd_test(data16[1])
    assert (bd.true_labels != 0).all() and len(bd) == int((data16[1].labels != 0).sum())


def test_same_seed_same_triggers_other_seed_differs(data16):
    train, test = data16
    a, b, c = SSBA(SPEC16, seed=1, **SHORT), SSBA(SPEC16, seed=1, **SHORT), SSBA(SPEC16, seed=2, **SHORT)
    for attack in (a, b, c):
        attack.prepare(train, FakeResources())
    assert torch.equal(a.apply_trigger(test.images), b.apply_trigger(test.images))
    assert not torch.equal(a.apply_trigger(test.images), c.apply_trigger(test.images))


def test_saved_state_rebuilds_identical_bd_test(prepared, data16):
    attack, _ = prepared
    test = data16[1]
    expected = attack.bd_test(test)
    buffer = io.BytesIO()
    torch.save(attack.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = SSBA(SPEC16, seed=0, **SHORT)  # a new job, never prepared
    rebuilt = fresh.restored(state).bd_test(test)
    assert torch.equal(rebuilt.images, expected.images) and torch.equal(rebuilt.source_indices, expected.source_indices)
    assert fresh.encoder is None  # restored() copies; the configured attack is untouched
    assert fresh.restored(state).generation_seconds == attack.generation_seconds


def test_config_instantiates_with_backdoorbench_defaults(cifar_spec):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from helpers import ROOT

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["attack=ssba", "seed=4"])
    attack = instantiate(cfg.attack, spec=cifar_spec)
    assert isinstance(attack, SSBA) and attack.seed == 4 and (attack.poison_ratio, attack.target) == (0.1, 0)
    assert (attack.width, attack.batch_size, attack.lr, attack.training_steps(50000)) == (32, 64, 1e-4, 20 * 782)
    assert "".join(str(int(b)) for b in attack.code) == BCHLIB_STEGA_100
