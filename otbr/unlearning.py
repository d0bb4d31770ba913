"""Stage 1a — random unlearning (paper Eq. 1; docs/methods/otbr.md).

Gradient *ascent* on the cross-entropy of uniform-noise images with random labels, for ``steps``
mini-batches: ``max_theta sum_{I steps} sum_{B samples} CE(f(x; theta), y)``. The official code uses
``x ~ U[0,1)^{3x32x32}`` fed raw (no dataset normalisation), labels drawn *after* the forward pass from
``{0, ..., C-2}`` (``torch.randint(0, C-1)``; the paper says up to the largest label, hence
``labels="paper"``), SGD(lr 1e-4, momentum 0.9, no weight decay) over all parameters, BN in train mode.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from bdcore.io import device_of

LABEL_RANGES = ("official", "paper")
BN_MODES = ("train", "eval")


def label_upper_bound(num_classes: int, labels: str = "official", num_labels: int | None = None) -> int:
    """Exclusive upper bound ``high`` of the random labels ``randint(0, high)`` (docs/methods/otbr.md).

    ``num_labels`` wins when given (Fig. 5(d) sweeps it); else ``C - 1`` (official: class C-1 is never
    drawn) or ``C`` (paper text: every class).
    """
    if num_labels is not None:
        high = int(num_labels)
    elif labels == "official":
        high = num_classes - 1
    elif labels == "paper":
        high = num_classes
    else:
        raise ValueError(f"unlearn.labels must be one of {LABEL_RANGES}, got {labels!r}")
    if high < 1:
        raise ValueError(f"random labels need at least one class, got upper bound {high} "
                         f"for {num_classes} classes; set unlearn.num_labels >= 1")
    return high


def _check_noise_channels(model: nn.Module, noise_shape) -> None:
    """A clear error instead of a conv shape error when the noise has the wrong channel count."""
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None and first_conv.in_channels != noise_shape[0]:
        raise ValueError(f"unlearning noise has {noise_shape[0]} channels but the model's first conv "
                         f"expects {first_conv.in_channels}; set unlearn.noise_shape="
                         f"[{first_conv.in_channels}, H, W]")


def random_unlearning(model: nn.Module, *, steps: int = 20, batch_size: int = 256, lr: float = 1e-4,
                      momentum: float = 0.9, weight_decay: float = 0.0, noise_shape=(3, 32, 32),
                      labels: str = "official", num_labels: int | None = None, bn_mode: str = "train",
                      seed: int = 0, device=None,
                      noise_batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
                      progress: bool = False) -> nn.Module:
    """Eq. 1: return an unlearned deep copy of ``model`` (on ``device``, in eval mode).

    Noise and labels come from one CPU generator seeded by ``seed`` (device-independent), drawn per
    step in the official order: ``x = rand([B, *noise_shape])``, forward, then
    ``y = randint(0, high, [B])`` with ``high`` from :func:`label_upper_bound` on the logits' width.
    ``noise_batches`` (fixed ``(x, y)`` pairs) replaces generation: one step per batch, and
    ``steps``/``batch_size``/``noise_shape`` are then unused (a ``y`` of None is drawn as above).
    Dropout / stochastic depth draw from the global RNG; it is forked and seeded so that the same
    seed gives the same model without disturbing the caller's RNG state. ``progress`` shows a bar of the steps.
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"unlearn.bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    device = torch.device(device) if device is not None else device_of(model)
    unlearned = copy.deepcopy(model).to(device)
    optimizer = torch.optim.SGD(unlearned.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    unlearned.train(bn_mode == "train")
    if noise_batches is None:
        noise_shape = tuple(int(s) for s in noise_shape)
        _check_noise_channels(unlearned, noise_shape)
    generator = torch.Generator("cpu").manual_seed(int(seed))

    def one_step(x: torch.Tensor, y: torch.Tensor | None) -> None:
        optimizer.zero_grad()
        logits = unlearned(x.to(device))
        if y is None:  # labels drawn after the forward pass, as the official code does
            high = label_upper_bound(logits.shape[-1], labels, num_labels)
            y = torch.randint(0, high, [x.shape[0]], generator=generator)
        loss = F.cross_entropy(logits, y.to(device))
        (-loss).backward()  # gradient ascent on CE
        optimizer.step()

    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(int(seed))
        if noise_batches is not None:
            for x, y in tqdm(noise_batches, desc="otbr unlearning", disable=not progress, leave=False):
                one_step(x, y)
        else:
            for _ in tqdm(range(int(steps)), desc="otbr unlearning", disable=not progress, leave=False):
                one_step(torch.rand([int(batch_size), *noise_shape], generator=generator), None)
    return unlearned.eval()
