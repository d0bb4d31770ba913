"""Input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020) as BackdoorBench trains it
(docs/methods/attacks.md).

Two encoder-decoder networks of the same architecture: a pattern generator G (C output channels) and a
mask generator M (1 output channel). On normalised tensors, with thr(m) = tanh(20 m - 10) / (2 + 1e-7) + 0.5,

    backdoor input  x_bd    = x  + (Normalize(G(x))  - x)  * thr(M(x))
    cross input     x_cross = x1 + (Normalize(G(x2)) - x1) * thr(M(x2))      (true label kept)

Epoch accounting (BackdoorBench shares one counter): of the train group's `epochs` (100 on CIFAR), the
first `clean_train_epochs` (25) pretrain M alone; they run in `prepare` (cached as the resource
"inputaware_mask"), and the classifier then trains for the remaining 75 epochs in the one training loop
(`training_settings` returns epochs - 25, SGD lr 0.01 with MultiStepLR [100, 200, ...]: constant at 75
epochs). M is frozen afterwards. Inside the loop, per batch of size bs (the last, smaller batch included,
as BackdoorBench's loaders do not drop it): `batch_transform` turns the first int(p * bs) samples into
backdoor samples (label -> target) and the next int(p * bs) into cross samples whose pattern and mask come
from a second, independently shuffled and augmented stream of the training set; `extra_loss` adds the
diversity term  mean( ||x1 - x2|| / (||G(x1) - G(x2)|| + 1e-7) )  (RMS distances, eq. 3 of the paper);
G's Adam optimiser is stepped with the classifier's; `on_epoch_end` steps G's scheduler.

Divergences from the published code (fidelity rows; switch in brackets):
- BackdoorBench's generator registers a Tanh as its last child and applies tanh again in forward, so
  patterns are tanh(tanh(z)) / 2 + 0.5, inside (0.119, 0.881). Default: one tanh (the paper's (0, 1)
  range) [published_double_tanh: true].
- BackdoorBench never zeroes G's gradients: they accumulate over every batch and epoch. Default: zeroed
  each step [published_generator_grad_accumulation: true; exact only without fp16 grad scaling].
- The mask-pretraining loss multiplies the diversity term by lambda_div twice (lambda_div * (mean * lambda_div)).
  Default: once; identical at the default lambda_div = 1 [published_squared_mask_lambda_div: true].
- A batch with no backdoor sample (poison_ratio * bs < 1, BackdoorBench's random per-batch fallback)
  gives a NaN diversity loss there (mean of nothing; gradients unaffected); here it is 0.
Mirrored as published: M is run on x1 twice per pretraining step (the extra run only moves BatchNorm
statistics); bd_test images are denormalised (x / (1/std) + mean) and truncated to uint8, as
BackdoorBench's PNG store does; the 28x28 branch (16 channels, 2 down/up steps) is BackdoorBench's MNIST
network, used here for any size divisible by 4 but not 8 (BackdoorBench never ran 1-channel data).
Not carried over: BackdoorBench's global-RNG draws (here private generators derived from `seed`), its
`C_lr_scheduler: ReduceLROnPlateau` option (stepped on the last batch's loss; `train_overrides` can set
the loop's plateau schedule, stepped on the epoch's mean loss), and its cross_test set.
"""
from __future__ import annotations

import copy
import logging
import time
import zlib
from dataclasses import replace
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from attacks.base import Attack, AttackConfigError, AttackResources, PoisonedSet
from attacks.batch_poisoning import batch_poison_count, channel_stats, denormalize_like_backdoorbench, to_pil_uint8
from bdcore.data import DatasetSpec, ImageSet, normalize, random_crop_flip
from bdcore.train import TrainingHooks, TrainSettings

log = logging.getLogger(__name__)

EPSILON = 1e-7  # BackdoorBench's EPSILON in the output squash, the threshold and the diversity ratio


# ---------------------------------------------------------------- networks (BackdoorBench's module names)

class Conv2dBlock(nn.Module):
    """3x3 conv (stride 1, pad 1) + BatchNorm(eps 1e-5, momentum 0.05) + optional ReLU."""

    def __init__(self, in_channels: int, out_channels: int, relu: bool = True):
        super().__init__()
        self.conv2d = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.batch_norm = nn.BatchNorm2d(out_channels, eps=1e-5, momentum=0.05, affine=True)
        self.relu = nn.ReLU(inplace=True) if relu else None

    def forward(self, x):
        x = self.batch_norm(self.conv2d(x))
        return self.relu(x) if self.relu is not None else x


def generator_layout(spec: DatasetSpec, width: int | None) -> tuple[int, int]:
    """(initial channels, down/up steps): 32 and 3 (BackdoorBench, sizes divisible by 8); 16 and 2 (its
    MNIST branch) for sizes divisible by 4 only."""
    if spec.height % 8 == 0 and spec.width % 8 == 0:
        return (32 if width is None else int(width)), 3
    if spec.height % 4 == 0 and spec.width % 4 == 0:
        return (16 if width is None else int(width)), 2
    raise AttackConfigError(f"attack=inputaware needs image sides divisible by 4, got {spec.height}x{spec.width}; "
                            "use a data set such as cifar10 (32x32) or fashion_mnist (28x28)")


def squash_output(z: torch.Tensor, double_tanh: bool = False) -> torch.Tensor:
    """tanh(z) / (2 + 1e-7) + 0.5, in (0, 1); BackdoorBench's generator applies tanh twice."""
    if double_tanh:
        z = torch.tanh(z)
    return torch.tanh(z) / (2 + EPSILON) + 0.5


def mask_threshold(m: torch.Tensor) -> torch.Tensor:
    """The soft step at 0.5 that turns M's output into a mask: tanh(20 m - 10) / (2 + 1e-7) + 0.5."""
    return torch.tanh(m * 20 - 10) / (2 + EPSILON) + 0.5


class InputAwareGenerator(nn.Sequential):
    """BackdoorBench's encoder-decoder: `steps` x (conv, conv, maxpool), a middle conv, `steps` x
    (bilinear upsample x2, conv, conv), the last conv without ReLU; output squashed into (0, 1)."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 32, steps: int = 3,
                 double_tanh: bool = False):
        super().__init__()
        self.double_tanh = double_tanh
        current, nxt = in_channels, width
        for step in range(steps):
            self.add_module(f"convblock_down_{2 * step}", Conv2dBlock(current, nxt))
            self.add_module(f"convblock_down_{2 * step + 1}", Conv2dBlock(nxt, nxt))
            self.add_module(f"downsample_{step}", nn.MaxPool2d(2, 2))
            if step < steps - 1:
                current, nxt = nxt, nxt * 2
        self.add_module("convblock_middle", Conv2dBlock(nxt, nxt))
        current, nxt = nxt, nxt // 2
        for step in range(steps):
            self.add_module(f"upsample_{step}", nn.Upsample(scale_factor=2, mode="bilinear"))
            self.add_module(f"convblock_up_{2 * step}", Conv2dBlock(current, current))
            last = step == steps - 1
            self.add_module(f"convblock_up_{2 * step + 1}", Conv2dBlock(current, nxt, relu=not last))
            current, nxt = nxt, nxt // 2
            if step == steps - 2:
                nxt = out_channels

    def forward(self, x):
        return squash_output(super().forward(x), self.double_tanh)


# ---------------------------------------------------------------- the published arithmetic, tensor in, tensor out

def normalize_pattern(pattern: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    """(p - mean) / std per channel: G's (0, 1) output brought to the classifier's input space."""
    mean, std = channel_stats(spec, pattern.device, pattern.dtype)
    return (pattern - mean) / std


def blend_with_pattern(x: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x + (pattern - x) * mask (all normalised; mask broadcast over channels)."""
    return x + (pattern - x) * mask


def rms_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample sqrt(mean over C, H, W of (a - b)^2)."""
    return torch.sqrt(torch.mean((a - b) ** 2, dim=(1, 2, 3)))


def diversity_loss(images1: torch.Tensor, images2: torch.Tensor, out1: torch.Tensor, out2: torch.Tensor,
                   eps: float = EPSILON) -> torch.Tensor:
    """mean( d(x1, x2) / (d(g(x1), g(x2)) + eps) ): small when different inputs get different outputs.
    Zero on an empty batch (the published code's mean of nothing is NaN)."""
    if len(images1) == 0:
        return images1.new_zeros(())
    return torch.mean(rms_distance(images1, images2) / (rms_distance(out1, out2) + eps))


def mask_norm_loss(mask: torch.Tensor, density: float) -> torch.Tensor:
    """mean(ReLU(mask - density)): pushes the mask below the target density."""
    return torch.mean(F.relu(mask - density))


def mask_pretraining_loss(x1: torch.Tensor, x2: torch.Tensor, mask1: torch.Tensor, mask2: torch.Tensor, *,
                          lambda_div: float, lambda_norm: float, density: float,
                          squared_lambda_div: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage A's loss lambda_norm * norm(mask1) + lambda_div * diversity (the published code applies
    lambda_div twice: `squared_lambda_div`). Returns (loss, norm, weighted diversity)."""
    div = diversity_loss(x1, x2, mask1, mask2) * lambda_div
    norm = mask_norm_loss(mask1, density)
    return lambda_norm * norm + (lambda_div * div if squared_lambda_div else div), norm, div


def derived_seed(seed: int, purpose: str) -> int:
    """A stable per-purpose seed, so streams seeded from one `seed` never coincide with the training loop's."""
    return (int(seed) * 1_000_003 + zlib.crc32(purpose.encode())) % (2 ** 63)


class AugmentedStream:
    """An independently shuffled pass over uint8 images with the standard train transform (crop, flip),
    normalised; `take(k)` returns the next k samples, reshuffling at each `new_epoch()` (a second DataLoader)."""

    def __init__(self, images: torch.Tensor, spec: DatasetSpec, seed: int, augment: bool = True):
        self.images, self.spec, self.augment = images, spec, augment
        self.order_gen = torch.Generator().manual_seed(derived_seed(seed, "order"))
        device = images.device
        self.aug_gen = torch.Generator(device=device if device.type == "cuda" else "cpu") \
            .manual_seed(derived_seed(seed, "augment"))
        self.order = torch.arange(len(images))
        self.cursor = 0

    def new_epoch(self) -> None:
        self.order = torch.randperm(len(self.images), generator=self.order_gen).to(self.images.device)
        self.cursor = 0

    def take(self, count: int) -> torch.Tensor:
        idx = self.order[self.cursor:self.cursor + count]
        self.cursor += count
        x = self.images[idx]
        if self.augment:
            x = random_crop_flip(x, self.spec, self.aug_gen)
        return normalize(x, self.spec)


def pretrain_mask(mask_net: nn.Module, images: torch.Tensor, spec: DatasetSpec, *, epochs: int, batch_size: int,
                  lr: float, milestones: Sequence[int], gamma: float, lambda_div: float, lambda_norm: float,
                  density: float, squared_lambda_div: bool = False, seed: int = 0, device=None,
                  progress: bool = True) -> list[dict]:
    """Stage A: M alone, on two independently shuffled, augmented streams of the training images
    (Adam betas (0.5, 0.9), MultiStepLR per epoch). Loss = lambda_norm * norm + lambda_div * diversity.
    Trains `mask_net` in place; returns one row per epoch."""
    device = torch.device(device) if device is not None else images.device
    mask_net.to(device).train()
    images = images.to(device)
    streams = [AugmentedStream(images, spec, derived_seed(seed, f"mask-stream-{k}")) for k in (1, 2)]
    optimizer = torch.optim.Adam(mask_net.parameters(), lr, betas=(0.5, 0.9))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(milestones), gamma)
    steps = -(-len(images) // batch_size)  # the last, smaller batch is kept
    history = []
    bar = tqdm(range(epochs), desc="inputaware mask", disable=not progress, mininterval=2.0, leave=False)
    for epoch in bar:
        start = time.perf_counter()
        for stream in streams:
            stream.new_epoch()
        norm_sum = div_sum = 0.0
        for step in range(steps):
            count = min(batch_size, len(images) - step * batch_size)
            x1, x2 = streams[0].take(count), streams[1].take(count)
            optimizer.zero_grad()
            mask_net(x1)  # as published: a discarded extra pass (it moves only the BatchNorm statistics)
            m1, m2 = mask_threshold(mask_net(x1)), mask_threshold(mask_net(x2))
            loss, norm, div = mask_pretraining_loss(x1, x2, m1, m2, lambda_div=lambda_div, lambda_norm=lambda_norm,
                                                    density=density, squared_lambda_div=squared_lambda_div)
            loss.backward()
            optimizer.step()
            norm_sum += norm.item()
            div_sum += div.item()
        scheduler.step()
        history.append({"epoch": epoch, "norm": norm_sum / steps, "diversity": div_sum / steps,
                        "seconds": time.perf_counter() - start})
        bar.set_postfix(norm=f"{norm_sum / steps:.4f}", div=f"{div_sum / steps:.3f}")
        # the log line carries the same figures, so a run with progress=false still shows the mask's training
        log.info("inputaware mask epoch %d/%d: norm %.4f, diversity %.3f, %.0f s", epoch + 1, epochs,
                 norm_sum / steps, div_sum / steps, history[-1]["seconds"])
    mask_net.eval().requires_grad_(False)
    return history


class _KeepGradientsAdam(torch.optim.Adam):
    """Adam whose zero_grad does nothing: BackdoorBench's G gradients accumulate over the whole training."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass


# ---------------------------------------------------------------- the attack

class InputAware(Attack):
    """Training-controllable: `prepare` pretrains the mask, `training_hooks` poison each batch and train G."""

    def __init__(self, spec: DatasetSpec, target: int = 0, poison_ratio: float = 0.1,
                 label_transform: str = "all2one", seed: int = 0,
                 generator_lr: float = 0.01, classifier_lr: float = 0.01, mask_lr: float = 0.01,
                 generator_milestones: Sequence[int] = (200, 300, 400, 500),
                 classifier_milestones: Sequence[int] = (100, 200, 300, 400),
                 mask_milestones: Sequence[int] = (10, 20),
                 generator_gamma: float = 0.1, classifier_gamma: float = 0.1, mask_gamma: float = 0.1,
                 lambda_div: float = 1.0, lambda_norm: float = 100.0, mask_density: float = 0.032,
                 clean_train_epochs: int = 25, mask_batch_size: int = 128, generator_width: int | None = None,
                 published_double_tanh: bool = False, published_generator_grad_accumulation: bool = False,
                 published_squared_mask_lambda_div: bool = False, progress: bool = True,
                 train_overrides: dict | None = None):
        super().__init__(spec, target, poison_ratio, label_transform, train_overrides)
        if float(poison_ratio) > 0.5:
            raise AttackConfigError(f"attack.poison_ratio={poison_ratio} leaves no room for as many cross samples "
                                    "in a batch; use at most 0.5, e.g. attack.poison_ratio=0.1")
        if int(clean_train_epochs) < 0:
            raise AttackConfigError(f"attack.clean_train_epochs={clean_train_epochs} is negative; "
                                    "BackdoorBench uses 25")
        if not 0.0 < float(mask_density) < 1.0:
            raise AttackConfigError(f"attack.mask_density={mask_density} is outside (0, 1); BackdoorBench uses 0.032")
        if int(mask_batch_size) < 1:
            raise AttackConfigError(f"attack.mask_batch_size={mask_batch_size} must be >= 1; BackdoorBench uses 128")
        self.seed = int(seed)
        self.generator_lr, self.classifier_lr, self.mask_lr = float(generator_lr), float(classifier_lr), float(mask_lr)
        self.generator_milestones = tuple(int(m) for m in generator_milestones)
        self.classifier_milestones = tuple(int(m) for m in classifier_milestones)
        self.mask_milestones = tuple(int(m) for m in mask_milestones)
        self.generator_gamma, self.classifier_gamma = float(generator_gamma), float(classifier_gamma)
        self.mask_gamma = float(mask_gamma)
        self.lambda_div, self.lambda_norm = float(lambda_div), float(lambda_norm)
        self.mask_density = float(mask_density)
        self.clean_train_epochs, self.mask_batch_size = int(clean_train_epochs), int(mask_batch_size)
        self.width, self.steps = generator_layout(spec, generator_width)
        self.published_double_tanh = bool(published_double_tanh)
        self.published_generator_grad_accumulation = bool(published_generator_grad_accumulation)
        self.published_squared_mask_lambda_div = bool(published_squared_mask_lambda_div)
        self.progress = bool(progress)
        self.generator, self.mask_net = self._build_networks()
        self.mask_ready = self.clean_train_epochs == 0
        self.generation_seconds: float | None = None
        self.train_images: torch.Tensor | None = None

    def _build_networks(self) -> tuple[InputAwareGenerator, InputAwareGenerator]:
        """G and M initialised from `seed` without touching the global RNG."""
        kw = dict(width=self.width, steps=self.steps, double_tanh=self.published_double_tanh)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return (InputAwareGenerator(self.spec.channels, self.spec.channels, **kw),
                    InputAwareGenerator(self.spec.channels, 1, **kw))

    # -- trigger ------------------------------------------------------------------------------------
    @torch.no_grad()
    def trigger_normalized(self, x: torch.Tensor) -> torch.Tensor:
        """Backdoor inputs from normalised inputs, with G and M in eval mode."""
        self.generator.eval()
        self.mask_net.eval()
        return blend_with_pattern(x, normalize_pattern(self.generator(x), self.spec),
                                  mask_threshold(self.mask_net(x)))

    def apply_trigger(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                      batch_size: int = 256) -> torch.Tensor:
        """Input-specific triggers on any uint8 images, as BackdoorBench stores bd_test: normalise,
        blend with the image's own pattern and mask, denormalise, truncate to uint8."""
        device = next(self.generator.parameters()).device
        out = []
        for start in range(0, len(images), batch_size):
            x = normalize(images[start:start + batch_size].to(device), self.spec)
            bd = denormalize_like_backdoorbench(self.trigger_normalized(x), self.spec)
            out.append(to_pil_uint8(bd).to(images.device))
        return torch.cat(out) if out else images.clone()

    # -- pipeline stages ----------------------------------------------------------------------------
    def mask_material(self) -> dict:
        return {"clean_train_epochs": self.clean_train_epochs, "mask_lr": self.mask_lr,
                "mask_milestones": list(self.mask_milestones), "mask_gamma": self.mask_gamma,
                "lambda_div": self.lambda_div, "lambda_norm": self.lambda_norm, "mask_density": self.mask_density,
                "mask_batch_size": self.mask_batch_size, "width": self.width, "steps": self.steps,
                "double_tanh": self.published_double_tanh,
                "squared_lambda_div": self.published_squared_mask_lambda_div, "seed": self.seed, "version": 1}

    def prepare(self, train: ImageSet, resources: AttackResources) -> None:
        """Stage A (the first `clean_train_epochs` of the shared epoch counter): pretrain M, cached."""
        self.train_images = train.images
        if self.clean_train_epochs == 0:
            self.mask_ready = True
            return

        def produce() -> dict[str, torch.Tensor]:
            net = copy.deepcopy(self.mask_net)
            start = time.perf_counter()
            history = pretrain_mask(
                net, train.images, self.spec, epochs=self.clean_train_epochs, batch_size=self.mask_batch_size,
                lr=self.mask_lr, milestones=self.mask_milestones, gamma=self.mask_gamma,
                lambda_div=self.lambda_div, lambda_norm=self.lambda_norm, density=self.mask_density,
                squared_lambda_div=self.published_squared_mask_lambda_div, seed=self.seed,
                device=resources.device, progress=self.progress)
            seconds = time.perf_counter() - start
            state = {f"mask.{k}": v.detach().cpu() for k, v in net.state_dict().items()}
            state["seconds"] = torch.tensor(seconds, dtype=torch.float64)
            state["final_norm"] = torch.tensor(history[-1]["norm"], dtype=torch.float64)
            return state

        stored = resources.cached("inputaware_mask", self.mask_material(), produce)
        self.mask_net.load_state_dict({k[len("mask."):]: v for k, v in stored.items() if k.startswith("mask.")})
        self.mask_net.eval().requires_grad_(False)
        self.generation_seconds = float(stored["seconds"])
        self.mask_ready = True

    def poison_train(self, train: ImageSet, seed: int) -> PoisonedSet:
        """Nothing is poisoned ahead of training: the hooks poison each batch."""
        self.train_images = train.images
        return PoisonedSet(train, torch.empty(0, dtype=torch.long))

    def training_settings(self, settings: TrainSettings) -> TrainSettings:
        """The classifier's share of the shared epoch counter, with Input-aware's own optimiser settings
        (the train group's lr and schedule are ignored, as in BackdoorBench); `train_overrides` last."""
        epochs = settings.epochs - self.clean_train_epochs
        if epochs < 1:
            raise AttackConfigError(
                f"attack.clean_train_epochs={self.clean_train_epochs} leaves no classifier epoch of "
                f"train.epochs={settings.epochs} (they count inside it); use e.g. "
                f"attack.clean_train_epochs={max(0, settings.epochs // 4)}")
        schedule = replace(settings, epochs=epochs, lr=self.classifier_lr, momentum=0.9, weight_decay=5e-4,
                           scheduler="multistep", milestones=self.classifier_milestones,
                           gamma=self.classifier_gamma, augment=True, drop_last=False)
        return super().training_settings(schedule)

    def training_hooks(self, model: nn.Module, device: torch.device) -> TrainingHooks:
        if self.train_images is None:
            raise RuntimeError("inputaware: call poison_train(train, seed) before training_hooks (it needs the "
                               "training images for the cross samples)")
        if not self.mask_ready:
            raise RuntimeError("inputaware: call prepare(train, resources) first (it pretrains the mask)")
        device = torch.device(device)
        self.generator.to(device)
        self.mask_net.to(device).eval().requires_grad_(False)
        optimizer_cls = _KeepGradientsAdam if self.published_generator_grad_accumulation else torch.optim.Adam
        optimizer = optimizer_cls(self.generator.parameters(), self.generator_lr, betas=(0.5, 0.9))
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(self.generator_milestones),
                                                         self.generator_gamma)
        stream = AugmentedStream(self.train_images.to(device), self.spec, derived_seed(self.seed, "cross-stream"))
        count_gen = torch.Generator().manual_seed(derived_seed(self.seed, "batch-count"))
        current = {"epoch": None, "diversity": None}

        def batch_transform(x: torch.Tensor, y: torch.Tensor, epoch: int):
            if current["epoch"] != epoch:
                current["epoch"] = epoch
                stream.new_epoch()
            x2 = stream.take(len(x))
            num_bd = batch_poison_count(self.poison_ratio, len(x), count_gen)
            x_new, y_new, current["diversity"] = self.poison_batch(x, y, x2, num_bd)
            return x_new, y_new

        def extra_loss(model, x, y, logits, epoch):
            return current["diversity"]

        def on_epoch_end(epoch: int):
            scheduler.step()

        def resumable_state() -> dict:  # at an epoch boundary: the next batch starts a new stream epoch
            return {"generator": self.generator.state_dict(), "scheduler": scheduler.state_dict(),
                    "stream_order": stream.order_gen.get_state(), "stream_augment": stream.aug_gen.get_state(),
                    "count": count_gen.get_state(),  # the published variant also carries G's gradients over
                    "generator_grads": [None if q.grad is None else q.grad.detach().cpu().clone()
                                        for q in self.generator.parameters()]}

        def load_resumable_state(state: dict) -> None:
            self.generator.load_state_dict(state["generator"])
            scheduler.load_state_dict(state["scheduler"])
            stream.order_gen.set_state(state["stream_order"])
            stream.aug_gen.set_state(state["stream_augment"])
            count_gen.set_state(state["count"])
            for q, grad in zip(self.generator.parameters(), state["generator_grads"]):
                q.grad = None if grad is None else grad.to(q.device)

        return TrainingHooks(batch_transform=batch_transform, extra_loss=extra_loss,
                             extra_optimizers=[optimizer], on_epoch_end=on_epoch_end,
                             resumable_state=resumable_state, load_resumable_state=load_resumable_state)

    def poison_batch(self, x1: torch.Tensor, y1: torch.Tensor, x2: torch.Tensor, num_bd: int):
        """One Stage-B batch (normalised inputs): [backdoor | cross | clean] and its labels, plus the
        weighted diversity loss; G in train mode (BatchNorm statistics of each G call)."""
        self.generator.train()
        num_cross = num_bd
        pattern1 = normalize_pattern(self.generator(x1[:num_bd]), self.spec)
        x_bd = blend_with_pattern(x1[:num_bd], pattern1, mask_threshold(self.mask_net(x1[:num_bd])))
        partner = x2[num_bd:num_bd + num_cross]
        pattern2 = normalize_pattern(self.generator(partner), self.spec)
        x_cross = blend_with_pattern(x1[num_bd:num_bd + num_cross], pattern2, mask_threshold(self.mask_net(partner)))
        inputs = torch.cat((x_bd, x_cross, x1[num_bd + num_cross:]), 0)
        labels = torch.cat((self.backdoor_labels(y1[:num_bd]), y1[num_bd:]), 0)
        div = diversity_loss(x1[:num_bd], x2[num_bd:num_bd + num_bd], pattern1, pattern2) * self.lambda_div
        return inputs, labels, div

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"generator": {k: v.detach().cpu().clone() for k, v in self.generator.state_dict().items()},
                "mask": {k: v.detach().cpu().clone() for k, v in self.mask_net.state_dict().items()},
                "generation_seconds": self.generation_seconds}

    def load_state_dict(self, state: dict) -> None:
        # new modules: `restored` makes a shallow copy, which must not share networks with the original
        self.generator, self.mask_net = self._build_networks()
        self.generator.load_state_dict(state["generator"])
        self.mask_net.load_state_dict(state["mask"])
        self.generator.eval()
        self.mask_net.eval().requires_grad_(False)
        self.generation_seconds = state.get("generation_seconds")
        self.mask_ready = True
