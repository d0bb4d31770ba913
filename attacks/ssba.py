"""SSBA, the sample-specific invisible backdoor (Li et al., ICCV 2021), with a StegaStamp encoder that this
suite trains itself (docs/methods/attacks.md).

Poisoning is BackdoorBench's data poisoning (same round(ratio * N) indices as BadNets, labels -> target,
bd_test = every non-target test image): a poisoned image is replaced by its *encoded* copy, the output of
a StegaStamp encoder that hides one fixed code in the image. The code is BackdoorBench's: the secret
('stega!!') padded to 7 bytes, its BCH(t=5, primitive polynomial 137) parity (5 bytes) and 4 zero bits,
100 bits (or 4 bytes + BCH t=2 + 2 zero bits = 50). Encoded images are rounded to uint8 as
torchvision's save_image does. The residual (encoded - clean) differs per image: the trigger is
sample-specific.

How this differs from BackdoorBench (fidelity row "SSBA trigger source"): BackdoorBench ships no
generator; it reads pre-generated poisoned arrays (resource/ssba/<dataset>_ssba_{train,test}_b1.npy,
downloaded separately) made offline by its resource/ssba scripts: StegaStamp trained once (seed 0, 20
epochs, batch 64, Adam 1e-4; the readme trains at 128x128 with CelebA preprocessing yet embeds at 32x32),
then one identical fingerprint embedded in every train and test image. Here `prepare` trains the same
architecture (`width` = 32 is BackdoorBench's) with the same loss and schedule (BCE on random bits; the
image MSE weight stays 0 until a batch decodes > 90 % of bits, then waits 1000 steps and ramps to 10 over
3000) on the job's own training set at its own resolution, per job seed, cached as the resource
"ssba_encoder", and embeds with it on the fly; so triggers are not pixel-identical to the shipped arrays,
and `steps` / `width` can be lowered for a CPU. Sizes not divisible by 16 (28x28) are zero-padded at the
bottom/right for the encoder and cropped back, and 1-channel data use 1-channel networks: BackdoorBench's
StegaStamp runs neither.
"""
from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from attacks.base import Attack, AttackConfigError, AttackResources
from bdcore.data import DatasetSpec, ImageSet

log = logging.getLogger(__name__)

BCH_PRIMITIVE_POLYNOMIAL = 137  # x^7 + x^3 + 1: GF(2^7), codes of length up to 127
FINGERPRINT_LAYOUTS = {100: (7, 5, 4), 50: (4, 2, 2)}  # code length -> (secret bytes, BCH t, zero bits)


# ---------------------------------------------------------------- the code: BCH over GF(2^7)

def bch_generator_polynomial(t: int, primitive: int = BCH_PRIMITIVE_POLYNOMIAL) -> list[int]:
    """GF(2) coefficients (lowest degree first) of the BCH generator: the product of the distinct minimal
    polynomials of alpha^1 .. alpha^(2t), alpha a root of `primitive`."""
    m = primitive.bit_length() - 1
    n = (1 << m) - 1
    exp = [0] * (2 * n)
    value = 1
    for i in range(n):
        exp[i] = value
        value <<= 1
        if value >> m:
            value ^= primitive
    for i in range(n, 2 * n):
        exp[i] = exp[i - n]
    log = {exp[i]: i for i in range(n)}

    def gf_mul(a: int, b: int) -> int:
        return 0 if a == 0 or b == 0 else exp[log[a] + log[b]]

    covered: set[int] = set()
    generator = [1]
    for i in range(1, 2 * t + 1):
        if i % n in covered:
            continue
        coset, j = [], i % n
        while j not in coset:  # cyclotomic coset {i, 2i, 4i, ...} mod n
            coset.append(j)
            j = 2 * j % n
        covered.update(coset)
        minimal = [1]  # prod (x - alpha^j) over the coset, GF(2^m) coefficients, lowest first
        for j in coset:
            shifted = [0] + minimal
            for k, c in enumerate(minimal):
                shifted[k] ^= gf_mul(c, exp[j])
            minimal = shifted
        product = [0] * (len(generator) + len(minimal) - 1)
        for a, ca in enumerate(generator):
            if ca:
                for b, cb in enumerate(minimal):
                    product[a + b] ^= cb
        generator = product
    return generator


def bch_parity_bits(data_bits: list[int], generator: list[int]) -> list[int]:
    """Systematic BCH parity: data(x) * x^deg(g) mod g(x), data's first bit the highest degree; returned
    highest degree first (the bit order of the kernel BCH library that bchlib wraps)."""
    degree = len(generator) - 1
    register = list(data_bits) + [0] * degree
    high_first = generator[::-1]
    for i in range(len(data_bits)):
        if register[i]:
            for k in range(degree + 1):
                register[i + k] ^= high_first[k]
    return register[len(data_bits):]


def fingerprint_bits(secret: str = "stega!!", length: int = 100) -> torch.Tensor:
    """BackdoorBench's `generate_fingerprints_from_bch`: secret bytes (space-padded), BCH parity bytes
    (parity bits left-aligned, zero-padded), then zero bits; float32 0/1 of shape (length,)."""
    if length not in FINGERPRINT_LAYOUTS:
        raise AttackConfigError(f"attack.code_length={length}; BackdoorBench's BCH codes have 100 or 50 bits, "
                                "e.g. attack.code_length=100")
    num_bytes, t, zeros = FINGERPRINT_LAYOUTS[length]
    data = str(secret).encode("utf-8")
    if len(data) > num_bytes:
        raise AttackConfigError(f"attack.secret={secret!r} is {len(data)} bytes; a {length}-bit code holds "
                                f"{num_bytes}, e.g. attack.secret={'stega!!' if num_bytes == 7 else 'abcd'!r}")
    data += b" " * (num_bytes - len(data))
    bits = [int(b) for byte in data for b in format(byte, "08b")]
    parity = bch_parity_bits(bits, bch_generator_polynomial(t))
    parity += [0] * (-len(parity) % 8)
    return torch.tensor(bits + parity + [0] * zeros, dtype=torch.float32)


# ---------------------------------------------------------------- StegaStamp (BackdoorBench's module names)

def _halvings(size: int, times: int) -> int:
    for _ in range(times):  # a 3x3, stride-2, pad-1 conv maps n to ceil(n / 2)
        size = -(-size // 2)
    return size


class StegaStampEncoder(nn.Module):
    """Code -> dense 3x16x16 map (ReLU) -> nearest upsample to the image size -> concat with the image ->
    U-Net (4 stride-2 downs, 4 ups with skip merges, the last also merging the input) -> 1x1 conv ->
    sigmoid (the encoded image) or, with `residual_output`, the raw residual."""

    def __init__(self, channels: int = 3, height: int = 32, width: int = 32, code_length: int = 100,
                 base: int = 32, residual_output: bool = False):
        super().__init__()
        self.channels, self.height, self.width = channels, height, width
        self.padded = (-(-height // 16) * 16, -(-width // 16) * 16)
        self.residual_output = residual_output
        b = base
        self.secret_dense = nn.Linear(code_length, 16 * 16 * channels)
        self.conv1 = nn.Conv2d(2 * channels, b, 3, 1, 1)
        self.conv2 = nn.Conv2d(b, b, 3, 2, 1)
        self.conv3 = nn.Conv2d(b, 2 * b, 3, 2, 1)
        self.conv4 = nn.Conv2d(2 * b, 4 * b, 3, 2, 1)
        self.conv5 = nn.Conv2d(4 * b, 8 * b, 3, 2, 1)
        self.up6 = nn.Conv2d(8 * b, 4 * b, 2, 1)
        self.conv6 = nn.Conv2d(8 * b, 4 * b, 3, 1, 1)
        self.up7 = nn.Conv2d(4 * b, 2 * b, 2, 1)
        self.conv7 = nn.Conv2d(4 * b, 2 * b, 3, 1, 1)
        self.up8 = nn.Conv2d(2 * b, b, 2, 1)
        self.conv8 = nn.Conv2d(2 * b, b, 3, 1, 1)
        self.up9 = nn.Conv2d(b, b, 2, 1)
        self.conv9 = nn.Conv2d(2 * b + 2 * channels, b, 3, 1, 1)
        self.conv10 = nn.Conv2d(b, b, 3, 1, 1)
        self.residual = nn.Conv2d(b, channels, 1)

    @staticmethod
    def _up(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """Upsample x2 (nearest), pad one row/column at the bottom/right, 2x2 conv, ReLU."""
        return F.relu(conv(F.pad(F.interpolate(x, scale_factor=2, mode="nearest"), (0, 1, 0, 1))))

    def forward(self, code: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        hp, wp = self.padded
        if (hp, wp) != (self.height, self.width):
            image = F.pad(image, (0, wp - self.width, 0, hp - self.height))
        code_map = F.relu(self.secret_dense(code)).view(-1, self.channels, 16, 16)
        code_map = F.interpolate(code_map, size=(hp, wp), mode="nearest")
        inputs = torch.cat([code_map, image], dim=1)
        conv1 = F.relu(self.conv1(inputs))
        conv2 = F.relu(self.conv2(conv1))
        conv3 = F.relu(self.conv3(conv2))
        conv4 = F.relu(self.conv4(conv3))
        conv5 = F.relu(self.conv5(conv4))
        conv6 = F.relu(self.conv6(torch.cat([conv4, self._up(self.up6, conv5)], dim=1)))
        conv7 = F.relu(self.conv7(torch.cat([conv3, self._up(self.up7, conv6)], dim=1)))
        conv8 = F.relu(self.conv8(torch.cat([conv2, self._up(self.up8, conv7)], dim=1)))
        conv9 = F.relu(self.conv9(torch.cat([conv1, self._up(self.up9, conv8), inputs], dim=1)))
        out = self.residual(F.relu(self.conv10(conv9)))
        if not self.residual_output:
            out = torch.sigmoid(out)
        return out[:, :, :self.height, :self.width]


class StegaStampDecoder(nn.Module):
    """Seven 3x3 convs (five of stride 2), ReLU, flatten, FC 16*base (512), FC code_length logits."""

    def __init__(self, channels: int = 3, height: int = 32, width: int = 32, code_length: int = 100,
                 base: int = 32):
        super().__init__()
        b = base
        self.decoder = nn.Sequential(
            nn.Conv2d(channels, b, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(b, b, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(b, 2 * b, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(2 * b, 2 * b, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(2 * b, 2 * b, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(2 * b, 4 * b, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(4 * b, 4 * b, 3, 2, 1), nn.ReLU(),
        )
        flat = _halvings(height, 5) * _halvings(width, 5) * 4 * b  # 128 at 32x32, base 32, as published
        self.dense = nn.Sequential(nn.Linear(flat, 16 * b), nn.ReLU(), nn.Linear(16 * b, code_length))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.dense(self.decoder(image).flatten(1))


# ---------------------------------------------------------------- training and embedding

def l2_loss_weight(steps_since_activation: int, await_steps: int, ramp_steps: int, max_weight: float) -> float:
    """StegaStamp's image-loss weight: 0 before activation (-1) and for `await_steps` after it, then a
    linear ramp to `max_weight` over `ramp_steps`."""
    if ramp_steps <= 0:
        return max_weight if steps_since_activation - await_steps > 0 else 0.0
    return min(max(0.0, max_weight * (steps_since_activation - await_steps) / ramp_steps), max_weight)


def random_bits(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (batch, length), generator=generator).float()


def encoded_float(encoder: StegaStampEncoder, code: torch.Tensor, images01: torch.Tensor) -> torch.Tensor:
    """The encoded image in [0, 1]-ish float (residual mode adds the residual to the image)."""
    out = encoder(code, images01)
    return images01 + out if encoder.residual_output else out


def train_stegastamp(encoder: StegaStampEncoder, decoder: StegaStampDecoder, images: torch.Tensor, *, steps: int,
                     batch_size: int = 64, lr: float = 1e-4, l2_weight: float = 10.0, l2_await: int = 1000,
                     l2_ramp: int = 3000, activation_bit_accuracy: float = 0.9, seed: int = 0, device=None,
                     progress: bool = True) -> dict:
    """BackdoorBench's resource/ssba train.py: shuffled epochs over the uint8 images (last partial batch
    kept), random bits per sample, loss = w2 * MSE(encoded, clean) + BCE(decoder(encoded), bits), one Adam
    over both networks. Trains in place; returns a summary (activation step, final bit accuracy)."""
    device = torch.device(device) if device is not None else images.device
    encoder.to(device).train()
    decoder.to(device).train()
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(list(decoder.parameters()) + list(encoder.parameters()), lr=lr)
    code_length = encoder.secret_dense.in_features
    since_activation, activation_step = -1, None
    recent: list[float] = []
    order, cursor = torch.randperm(len(images), generator=gen), 0
    bar = tqdm(range(steps), desc="ssba encoder", disable=not progress, mininterval=2.0, leave=False)
    for step in bar:
        if cursor >= len(images):
            order, cursor = torch.randperm(len(images), generator=gen), 0
        idx = order[cursor:cursor + batch_size]
        cursor += batch_size
        clean = images[idx].to(device).float() / 255.0
        bits = random_bits(len(idx), code_length, gen).to(device)
        weight = l2_loss_weight(since_activation, l2_await, l2_ramp, l2_weight)
        encoded = encoded_float(encoder, bits, clean)
        logits = decoder(encoded)
        loss = weight * F.mse_loss(encoded, clean) + F.binary_cross_entropy_with_logits(logits.view(-1), bits.view(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bit_accuracy = 1.0 - torch.mean(torch.abs(bits - (logits > 0).float())).item()
        if since_activation == -1:
            if bit_accuracy > activation_bit_accuracy:
                since_activation, activation_step = 0, step
        else:
            since_activation += 1
        recent = (recent + [bit_accuracy])[-50:]
        if step % 50 == 0:
            bar.set_postfix(bits=f"{bit_accuracy:.3f}", w2=f"{weight:.2f}")
    encoder.eval()
    decoder.eval()
    return {"activation_step": -1 if activation_step is None else activation_step,
            "train_bit_accuracy": sum(recent) / max(1, len(recent))}


def round_to_uint8(x01: torch.Tensor) -> torch.Tensor:
    """torchvision.utils.save_image's conversion: x * 255 + 0.5, clamp to [0, 255], truncate."""
    return x01.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


@torch.no_grad()
def encode_images(encoder: StegaStampEncoder, images: torch.Tensor, code: torch.Tensor,
                  batch_size: int = 256) -> torch.Tensor:
    """Hide `code` in every uint8 image; uint8 out, on the images' device."""
    device = next(encoder.parameters()).device
    encoder.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device).float() / 255.0
        out.append(round_to_uint8(encoded_float(encoder, code.to(device).expand(len(x), -1), x)).to(images.device))
    return torch.cat(out) if out else images.clone()


@torch.no_grad()
def decode_bits(decoder: StegaStampDecoder, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The decoder's bits (bool, N x code_length) for uint8 images."""
    device = next(decoder.parameters()).device
    decoder.eval()
    out = [decoder(images[s:s + batch_size].to(device).float() / 255.0).gt(0).cpu()
           for s in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.empty(0, decoder.dense[-1].out_features, dtype=torch.bool)


# ---------------------------------------------------------------- the attack

class SSBA(Attack):
    CHECK_IMAGES = 1000  # encoded training images on which the decoder's bit accuracy is recorded
    WORKING_BIT_ACCURACY = 0.9  # below it a warning says the code is not hidden (StegaStamp's own activation bar)

    def __init__(self, spec: DatasetSpec, target: int = 0, poison_ratio: float = 0.1,
                 label_transform: str = "all2one", seed: int = 0, secret: str = "stega!!", code_length: int = 100,
                 width: int = 32, epochs: int = 20, steps: int | None = None, batch_size: int = 64, lr: float = 1e-4,
                 l2_loss_weight: float = 10.0, l2_loss_await: int = 1000, l2_loss_ramp: int = 3000,
                 l2_activation_bit_accuracy: float = 0.9, residual_output: bool = False, progress: bool = True,
                 train_overrides: dict | None = None):
        super().__init__(spec, target, poison_ratio, label_transform, train_overrides)
        self.code = fingerprint_bits(secret, int(code_length))
        for key, value in (("width", width), ("epochs", epochs), ("batch_size", batch_size)):
            if int(value) < 1:
                raise AttackConfigError(f"attack.{key}={value} must be >= 1; BackdoorBench's StegaStamp uses "
                                        "width 32, 20 epochs, batch 64")
        if steps is not None and int(steps) < 1:
            raise AttackConfigError(f"attack.steps={steps} must be >= 1, or null for `epochs` over the training set")
        self.seed, self.secret, self.code_length = int(seed), str(secret), int(code_length)
        self.width, self.epochs, self.steps, self.batch_size = int(width), int(epochs), steps, int(batch_size)
        self.lr, self.l2_loss_weight = float(lr), float(l2_loss_weight)
        self.l2_loss_await, self.l2_loss_ramp = int(l2_loss_await), int(l2_loss_ramp)
        self.l2_activation_bit_accuracy = float(l2_activation_bit_accuracy)
        self.residual_output, self.progress = bool(residual_output), bool(progress)
        self.encoder: StegaStampEncoder | None = None
        self.decoder: StegaStampDecoder | None = None
        self.generation_seconds: float | None = None
        self.code_bit_accuracy: float | None = None

    def _build_networks(self) -> tuple[StegaStampEncoder, StegaStampDecoder]:
        s = self.spec
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return (StegaStampEncoder(s.channels, s.height, s.width, self.code_length, self.width,
                                      self.residual_output),
                    StegaStampDecoder(s.channels, s.height, s.width, self.code_length, self.width))

    def training_steps(self, num_images: int) -> int:
        return int(self.steps) if self.steps is not None else self.epochs * math.ceil(num_images / self.batch_size)

    def material(self, num_images: int) -> dict:
        return {"secret": self.secret, "code_length": self.code_length, "width": self.width,
                "steps": self.training_steps(num_images), "batch_size": self.batch_size, "lr": self.lr,
                "l2_loss_weight": self.l2_loss_weight, "l2_loss_await": self.l2_loss_await,
                "l2_loss_ramp": self.l2_loss_ramp, "l2_activation_bit_accuracy": self.l2_activation_bit_accuracy,
                "residual_output": self.residual_output, "shape": list(self.spec.shape), "seed": self.seed,
                "version": 1}

    def prepare(self, train: ImageSet, resources: AttackResources) -> None:
        """Train the encoder/decoder on the clean training images (cached), then record the decoder's bit
        accuracy on encoded training images (BackdoorBench's --check)."""
        def produce() -> dict[str, torch.Tensor]:
            encoder, decoder = self._build_networks()
            start = time.perf_counter()
            summary = train_stegastamp(
                encoder, decoder, train.images, steps=self.training_steps(len(train)), batch_size=self.batch_size,
                lr=self.lr, l2_weight=self.l2_loss_weight, l2_await=self.l2_loss_await, l2_ramp=self.l2_loss_ramp,
                activation_bit_accuracy=self.l2_activation_bit_accuracy, seed=self.seed, device=resources.device,
                progress=self.progress)
            seconds = time.perf_counter() - start
            sample = train.images[:self.CHECK_IMAGES]
            accuracy = (decode_bits(decoder, encode_images(encoder, sample, self.code)) == self.code.bool()).float()
            state = {f"encoder.{k}": v.detach().cpu() for k, v in encoder.state_dict().items()}
            state.update({f"decoder.{k}": v.detach().cpu() for k, v in decoder.state_dict().items()})
            state["generation_seconds"] = torch.tensor(seconds, dtype=torch.float64)
            state["code_bit_accuracy"] = torch.tensor(accuracy.mean().item(), dtype=torch.float64)
            state["activation_step"] = torch.tensor(summary["activation_step"])
            return state

        stored = resources.cached("ssba_encoder", self.material(len(train)), produce)
        self._load_networks({k[len("encoder."):]: v for k, v in stored.items() if k.startswith("encoder.")},
                            {k[len("decoder."):]: v for k, v in stored.items() if k.startswith("decoder.")},
                            resources.device)
        self.generation_seconds = float(stored["generation_seconds"])
        self.code_bit_accuracy = float(stored["code_bit_accuracy"])
        if self.code_bit_accuracy < self.WORKING_BIT_ACCURACY:
            log.warning("ssba: the decoder reads %.0f %% of the code's bits (50 %% is chance): the encoder has not learnt "
                        "to hide the code, so the poisoned images are its unconstrained output, not SSBA's invisible "
                        "trigger; train it longer (attack.epochs / attack.steps)", 100 * self.code_bit_accuracy)

    def _load_networks(self, encoder_state: dict, decoder_state: dict, device=None) -> None:
        self.encoder, self.decoder = self._build_networks()
        self.encoder.load_state_dict(encoder_state)
        self.decoder.load_state_dict(decoder_state)
        if device is not None:
            self.encoder.to(device)
            self.decoder.to(device)
        self.encoder.eval()
        self.decoder.eval()

    def _require_encoder(self) -> StegaStampEncoder:
        if self.encoder is None:
            raise RuntimeError("ssba: call prepare(train, resources) first (it trains the encoder) or restore a "
                               "stored state")
        return self.encoder

    def apply_trigger(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Each image replaced by its encoded copy (BackdoorBench's replacement), rounded to uint8."""
        return encode_images(self._require_encoder(), images, self.code)

    def residuals(self, images: torch.Tensor) -> torch.Tensor:
        """encoded - clean, int16, the sample-specific trigger."""
        return self.apply_trigger(images).to(torch.int16) - images.to(torch.int16)

    def decoded_bit_accuracy(self, images: torch.Tensor) -> float:
        """Fraction of the code's bits the decoder reads back from `images` (encoded ones: near 1)."""
        if self.decoder is None:
            self._require_encoder()
        return (decode_bits(self.decoder, images) == self.code.bool()).float().mean().item()

    def trigger_report(self) -> dict:
        return {"code_bit_accuracy": self.code_bit_accuracy}

    def state_dict(self) -> dict:
        encoder = self._require_encoder()
        return {"encoder": {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()},
                "decoder": {k: v.detach().cpu().clone() for k, v in self.decoder.state_dict().items()},
                "code": self.code.clone(), "generation_seconds": self.generation_seconds,
                "code_bit_accuracy": self.code_bit_accuracy}

    def load_state_dict(self, state: dict) -> None:
        self._load_networks(state["encoder"], state["decoder"])
        self.code = state["code"].clone()
        self.generation_seconds = state.get("generation_seconds")
        self.code_bit_accuracy = state.get("code_bit_accuracy")
