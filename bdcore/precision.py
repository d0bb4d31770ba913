"""The one precision policy for every forward/backward pass the suite trains or evaluates with.

``precision`` is ``auto | fp32 | bf16 | fp16``; :func:`resolve_precision` turns it into a concrete
``fp32 | bf16 | fp16`` for a device:

* CUDA: ``auto`` = bf16 where the GPU has native bf16 (compute capability >= 8.0, or ROCm), else fp16
  with a gradient scaler.
* CPU: ``auto`` = bf16 where oneDNN has a *native* bf16 path: x86 with AVX512-BF16 or AMX-BF16, or
  ARM with the BF16 extension, read from ``torch.cpu.get_capabilities()`` (cpuinfo's CPUID flags) and
  ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``. AVX512 without those flags only emulates bf16
  and stays fp32. ``fp16`` on a CPU is refused: in torch 2.14 its convolution backward took ~60x fp32's
  time (58 s vs 0.9 s for one batch of 32 through a width-16 PreAct-ResNet18, Xeon with AVX512-FP16).
* Anything else (MPS, XPU, ...): ``auto`` = fp32; explicit bf16 / fp16 are passed to torch as asked.
  MPS autocast covers fewer ops and nobody has measured it here, so fp32 stays the safe default.

Mixed precision is autocast only: weights, gradients and optimizer state stay fp32 (never ``.half()``).
``fp32`` on a CPU is the exact reference: NCHW layout, no autocast, the same arithmetic as before the
policy existed. Method-internal computations (OTBR's stages, CLP) do not use this module: they run in
fp32 whatever the policy says.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CONCRETE = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _bad_name(name) -> ValueError:
    return ValueError(f"precision={name}; use auto, fp32, bf16 or fp16")


def cpu_features() -> dict:
    """cpuinfo's view of this CPU (instruction-set flags, architecture), as torch reports it."""
    return dict(torch.cpu.get_capabilities())


def mkldnn_bf16_supported() -> bool:
    """oneDNN is built in and can run bf16 at all (on x86 this includes AVX512 emulation)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_has_native_bf16(features: dict | None = None) -> bool:
    """True where oneDNN's bf16 kernels run on bf16 hardware instructions rather than emulation."""
    features = cpu_features() if features is None else features
    if not mkldnn_bf16_supported():
        return False
    arch = str(features.get("architecture", ""))
    if arch in ("x86_64", "x86", "amd64", "AMD64"):
        return bool(features.get("avx512_bf16") or features.get("amx_bf16"))
    if arch in ("arm64", "aarch64"):
        return bool(features.get("bf16") or features.get("sve_bf16"))
    return False


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Ampere (sm_80) and newer, or any ROCm GPU; older GPUs only emulate bf16."""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_properties(device).major >= 8


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto | fp32 | bf16 | fp16`` -> the concrete ``fp32 | bf16 | fp16`` this device will run."""
    if name not in PRECISIONS:
        raise _bad_name(name)
    device = torch.device(device)
    if name == "fp16" and device.type == "cpu":
        raise ValueError("precision=fp16 is not supported on CPU (its fp16 convolution backward is ~60x "
                         "slower than fp32); use precision=bf16 or precision=fp32")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if cuda_has_native_bf16(device) else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def _concrete(precision: str) -> str:
    if precision not in CONCRETE:
        if precision == "auto":
            raise ValueError("precision=auto must be resolved first: resolve_precision('auto', device)")
        raise _bad_name(precision)
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context for a concrete precision; fp32 explicitly disables autocast (also inside an
    outer autocast region), so an fp32 pass is fp32 whatever surrounds it."""
    device = torch.device(device)
    if _concrete(precision) == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def uses_channels_last(device: torch.device, precision: str) -> bool:
    """Whether models and batches use channels_last (NHWC) memory.

    CUDA: always (tensor cores want NHWC). CPU: for bf16, where experiments/bench.py measured it faster;
    not for fp32 although it is faster there too, because an NHWC convolution sums in another order and
    fp32 on a CPU must reproduce the reference (NCHW) weights bit for bit.
    """
    device = torch.device(device)
    precision = _concrete(precision)
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        return precision == "bf16"
    return False


def memory_format(device: torch.device, precision: str) -> torch.memory_format:
    return torch.channels_last if uses_channels_last(device, precision) else torch.contiguous_format


@contextmanager
def temporary_memory_format(model: nn.Module, layout: torch.memory_format):
    """Run `model` with its 4-D weights in `layout` and put the very same original tensors back afterwards,
    so a caller's model leaves unchanged (values, strides, identity). For inference only: updates made to
    the weights inside the block are discarded."""
    # .to(memory_format=...) as Module.to does: unlike .contiguous() it also restrides size-1 dimensions
    # (a 1-channel first conv), which oneDNN otherwise runs in the slower NCHW path (~20 % of inference)
    converted = [(t, t.data.to(memory_format=layout)) for t in (*model.parameters(), *model.buffers())
                 if t.dim() == 4]
    converted = [(t, new) for t, new in converted if new.stride() != t.stride()]
    originals = [t.data for t, _ in converted]
    try:
        for t, new in converted:
            t.data = new
        yield model
    finally:
        for (t, _), original in zip(converted, originals):
            t.data = original


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling against gradient underflow; bf16 has fp32's exponent range and fp32 none."""
    if _concrete(precision) != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def capabilities(device: torch.device) -> dict:
    """What the policy looked at, for the provenance in metrics.json (JSON-able)."""
    device = torch.device(device)
    features = cpu_features()
    flags = ("avx2", "avx512_f", "avx512_bw", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16",
             "bf16", "sve_bf16")
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "cpu_architecture": features.get("architecture"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the ATen kernels dispatched to
        "cpu_flags": {flag: bool(features[flag]) for flag in flags if flag in features},
        "mkldnn_bf16": mkldnn_bf16_supported(),
        "cpu_native_bf16": cpu_has_native_bf16(features),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["cuda"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                        "native_bf16": cuda_has_native_bf16(device)}
    return info
