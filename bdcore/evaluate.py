"""The one evaluation routine: ACC on clean test, ASR and RA on bd_test (docs/methods/attacks.md).

All metrics are percentages (0-100). Models are evaluated as they are, in eval mode, no BN recalibration.
`precision` follows bdcore.precision (fp32 by default; bf16 / fp16 autocast, the policy's layout).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from bdcore.data import DatasetSpec, ImageSet, normalize
from bdcore.precision import autocast, memory_format, resolve_precision, temporary_memory_format


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, spec: DatasetSpec, *, device=None,
            batch_size: int = 512, precision: str = "fp32") -> torch.Tensor:
    """Arg-max predictions (CPU int64) of `model` on uint8 images. The model is not modified: its
    weights keep their dtype, values and memory layout (a channels_last policy runs them NHWC inside)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    precision = resolve_precision(precision, device)
    layout = memory_format(device, precision)
    was_training = model.training
    model.eval()
    preds = []
    # one autocast region for all batches, so the weights' low-precision copies are made once
    with temporary_memory_format(model, layout), autocast(device, precision):
        for start in range(0, len(images), batch_size):
            x = normalize(images[start:start + batch_size].to(device, non_blocking=True), spec)
            if layout is torch.channels_last:
                x = x.contiguous(memory_format=layout)
            preds.append(model(x).argmax(1).cpu())
    model.train(was_training)
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, data: ImageSet, spec: DatasetSpec, **kw) -> float:
    """Top-1 accuracy (%) of `model` on `data` against its labels."""
    if len(data) == 0:
        return float("nan")
    return 100.0 * (predict(model, data.images, spec, **kw) == data.labels.cpu()).float().mean().item()


def backdoor_metrics(model: nn.Module, clean_test: ImageSet, bd_images: torch.Tensor,
                     bd_target_labels: torch.Tensor, bd_true_labels: torch.Tensor, spec: DatasetSpec,
                     **kw) -> dict[str, float]:
    """ACC on the clean test set; ASR (vs the target label) and RA (vs the true label) on bd_test,
    which holds only non-target-class images (the attack's bd_test guarantees it)."""
    acc = accuracy(model, clean_test, spec, **kw)
    bd_pred = predict(model, bd_images, spec, **kw)
    asr = 100.0 * (bd_pred == bd_target_labels.cpu()).float().mean().item()
    ra = 100.0 * (bd_pred == bd_true_labels.cpu()).float().mean().item()
    return {"acc": acc, "asr": asr, "ra": ra}
