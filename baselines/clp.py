"""CLP — Channel Lipschitzness-based Pruning (Zheng et al., ECCV 2022), data-free.

Follows BackdoorBench's ``defense/clp.py`` (``CLP_prune``), docs/methods/clp.md:

1. Pair every ``BatchNorm2d`` with a ``Conv2d`` (see :func:`conv_bn_pairs`).
2. For each channel k of the pair, the upper bound of its channel Lipschitz constant is
   ``UCLC_k = sigma_max(W_conv[k].reshape(in, kh*kw) * |gamma_k / sqrt(running_var_k)|)``
   (no BN eps; SVD on CPU, as the original's ``torch.svd(w.cpu())``).
3. Per BN layer, flag channels with ``UCLC_k > mean(UCLC) + u * std(UCLC)`` (torch's unbiased std,
   strict ``>``) and set **both** the BN weight and bias of those channels to 0.

No data is used and nothing is selected: the result is the pruning at the given ``u`` (3 for
CIFAR-10/100 and GTSRB, 5 for Tiny-ImageNet in BackdoorBench's configs).

Pairing (docs/fidelity.md):

* ``"published"`` (default; the papers' CLP numbers come from it): walk ``named_modules()`` in
  registration order and pair each BN with the most recently registered conv. On BackdoorBench's
  PreAct-ResNet18 (modules registered bn1, conv1, bn2, conv2, shortcut; docs/methods/clp.md) this pairs
  ``layer{2,3,4}.1.bn1`` with the previous block's 1x1 ``shortcut.0`` conv instead of its ``conv2``.
* ``"fixed"``: pair each BN with the conv whose output actually feeds it, found by tracing the
  forward pass with ``torch.fx`` (rule in :func:`fed_by_conv_pairs`). For PreAct blocks ``bn1`` gets
  the previous block's ``conv2`` (the stem ``conv1`` for ``layer1.0.bn1``) and ``bn2`` the same
  block's ``conv1``; on conv->BN architectures (VGG, torchvision ResNet, ...) it equals "published".

A BN that cannot be paired (no conv before it, fed by something that is not a conv, conv output
channels != BN features, BN without affine weights or running variance) is left untouched and
listed under ``skipped`` in the diagnostics instead of raising.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time

import torch
import torch.fx
import torch.nn as nn

from baselines.base import defense

PAIRINGS = ("published", "fixed")


# --------------------------------------------------------------------------------------------------
# Pairing
# --------------------------------------------------------------------------------------------------

def registration_order_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], list[dict]]:
    """Published pairing: each BatchNorm2d with the most recent Conv2d in ``named_modules()`` order.

    Returns ``(pairs, skipped)`` with ``pairs`` a list of ``(bn_name, conv_name)`` in BN registration
    order and ``skipped`` the BNs registered before any conv (the original would raise a NameError).
    """
    pairs, skipped = [], []
    conv_name = None
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            if conv_name is None:
                skipped.append({"bn": name, "conv": None, "reason": "no Conv2d registered before it"})
            else:
                pairs.append((name, conv_name))
        elif isinstance(module, nn.Conv2d):
            conv_name = name
    return pairs, skipped


# Functions that do not mix channels: walking back through them keeps the channel identity.
# For a binary op (residual add, SE scaling) the walk follows the FIRST tensor operand; in
# BackdoorBench's PreActBlock that is the residual branch `out` of `out + shortcut`.
_CONCATENATING = {torch.cat, torch.concat, torch.stack, "cat", "concat", "stack"}


def _first_node_arg(node):
    for arg in node.args:
        if isinstance(arg, torch.fx.Node):
            return arg
    return None


def _feeding_conv(node, modules: dict[str, nn.Module]) -> tuple[str | None, str]:
    """Walk back from the node feeding a BN to the Conv2d producing it; ``(conv_name, reason)``."""
    while True:
        if node is None:
            return None, "fed by no tensor"
        if node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, nn.Conv2d):
                return node.target, ""
            if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
                return None, f"fed by {node.target} ({type(module).__name__}), not a Conv2d"
            node = _first_node_arg(node)  # parameter-free module (ReLU, pooling, dropout, ...)
        elif node.op in ("call_function", "call_method"):
            if node.target in _CONCATENATING:
                return None, f"fed by a concatenation ({node.target})"
            node = _first_node_arg(node)
        elif node.op == "placeholder":
            return None, "fed by the model input"
        else:
            return None, f"fed by a {node.op} node ({node.target})"


def fed_by_conv_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], list[dict]]:
    """Fixed pairing: each BatchNorm2d with the Conv2d whose output feeds it in the forward pass.

    The forward pass is traced with ``torch.fx.symbolic_trace``. From a BN's input the walk goes back
    through parameter-free modules (ReLU, pooling, dropout, identity) and functions (relu, add,
    stochastic depth, ...) along their first tensor operand until it reaches a Conv2d. For a residual
    ``out + shortcut`` that first operand is the residual branch, so on PreAct-ResNet18 ``bn1`` of a
    block pairs with the previous block's ``conv2``. A walk that reaches a module with parameters or
    buffers (another BN, a Linear), a concatenation or the model input leaves the BN unpaired; so do
    BNs the forward pass never calls. Returned in BN registration order, like the published pairing.
    """
    try:
        graph_module = torch.fx.symbolic_trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure gets the same advice
        raise ValueError(f"CLP pairing='fixed' needs a torch.fx-traceable model; tracing "
                         f"{type(model).__name__} failed ({type(err).__name__}: {err}). "
                         f"Use pairing='published' for this model.") from err
    modules = dict(graph_module.named_modules())
    fed_by: dict[str, tuple[str | None, str]] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], nn.BatchNorm2d):
            conv, reason = _feeding_conv(_first_node_arg(node), modules)
            if node.target in fed_by and fed_by[node.target][0] != conv:
                fed_by[node.target] = (None, "called several times with different feeding convs")
            else:
                fed_by.setdefault(node.target, (conv, reason))
    pairs, skipped = [], []
    for name, module in model.named_modules():
        if not isinstance(module, nn.BatchNorm2d):
            continue
        conv, reason = fed_by.get(name, (None, "not called in the traced forward pass"))
        if conv is None:
            skipped.append({"bn": name, "conv": None, "reason": reason})
        else:
            pairs.append((name, conv))
    return pairs, skipped


def conv_bn_pairs(model: nn.Module, pairing: str = "published") -> tuple[list[tuple[str, str]], list[dict]]:
    """``(bn_name, conv_name)`` pairs CLP scores, plus the BNs it must skip (each with a reason).

    ``pairing="published"``: registration order (BackdoorBench, docs/methods/clp.md);
    ``pairing="fixed"``: the conv that feeds each BN (docs/methods/clp.md). Pairs whose conv and BN cannot
    be combined (channel mismatch, BN without affine weight or running variance) move to ``skipped``.
    """
    if pairing == "published":
        raw_pairs, skipped = registration_order_pairs(model)
    elif pairing == "fixed":
        raw_pairs, skipped = fed_by_conv_pairs(model)
    else:
        raise ValueError(f"unknown CLP pairing {pairing!r}; choose one of {', '.join(PAIRINGS)}")
    pairs = []
    for bn_name, conv_name in raw_pairs:
        bn, conv = model.get_submodule(bn_name), model.get_submodule(conv_name)
        reason = ""
        if conv.out_channels != bn.num_features:
            reason = f"conv has {conv.out_channels} output channels, BN has {bn.num_features} features"
        elif bn.weight is None or bn.bias is None:
            reason = "BN has no affine weight/bias"
        elif bn.running_var is None:
            reason = "BN tracks no running variance"
        if reason:
            skipped.append({"bn": bn_name, "conv": conv_name, "reason": reason})
        else:
            pairs.append((bn_name, conv_name))
    return pairs, skipped


# --------------------------------------------------------------------------------------------------
# Scoring and pruning
# --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _single_threaded():
    """Run torch CPU ops on one thread, restoring the previous count afterwards.

    The bounds are thousands of tiny SVDs (e.g. 512 x 9): intra-op/BLAS threading only adds
    synchronisation, and on a busy 2-core machine it made the computation 5-50x slower and erratic
    (PreAct-ResNet18 width 64: 0.5-1.8 s with 2 threads, 0.09 s with 1). Values are unchanged
    (tests/test_clp.py compares them bit for bit with the original's per-channel ``torch.svd``).
    Used once around the whole scoring loop: switching the thread count per layer costs more.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def channel_lipschitz_upper_bounds(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """UCLC of every channel of a conv->BN pair, a float32 CPU tensor of shape (out_channels,).

    ``UCLC_k = sigma_max(W_conv[k].reshape(in, kh*kw) * |gamma_k / sqrt(running_var_k)|)``, no BN
    eps (docs/methods/clp.md; paper Eq. for the upper bound of the channel Lipschitz constant). The
    original loops ``torch.svd(w.cpu())`` over channels and collects the results with
    ``torch.Tensor`` (float32); here one batched ``torch.linalg.svd`` on CPU does the same LAPACK
    call per channel and gives bit-identical values (tests/test_clp.py checks this).
    ``torch.linalg.svdvals`` would differ by ~1e-6 relative, enough to flip a borderline channel.
    """
    weight = conv.weight.detach().cpu()
    scale = (bn.weight.detach().cpu() / bn.running_var.detach().cpu().sqrt()).abs()
    per_channel = weight.reshape(weight.shape[0], weight.shape[1], -1) * scale[:, None, None]
    singular_values = torch.linalg.svd(per_channel, full_matrices=False).S
    return singular_values.amax(dim=-1).float()


def lipschitz_threshold(uclc: torch.Tensor, u: float) -> torch.Tensor:
    """``mean(UCLC) + u * std(UCLC)`` with torch's unbiased std, in UCLC's dtype (docs/methods/clp.md).

    NaN for fewer than two channels (where the unbiased std is undefined; torch would warn).
    """
    if uclc.numel() < 2:
        return torch.full((), float("nan"), dtype=uclc.dtype)
    return uclc.mean() + u * uclc.std()


def lipschitz_outlier_channels(uclc: torch.Tensor, u: float) -> torch.Tensor:
    """Indices of channels with ``UCLC > mean + u * std`` (unbiased std, strict ``>``; docs/methods/clp.md).

    With a single channel the unbiased std is NaN and nothing is flagged, as in the original.
    """
    return torch.where(uclc > lipschitz_threshold(uclc, u))[0]


@torch.no_grad()
def zero_bn_channels(bn: nn.BatchNorm2d, channels: torch.Tensor) -> None:
    """Prune channels in place: BN weight **and** bias set to 0 (docs/methods/clp.md)."""
    channels = channels.to(bn.weight.device)
    bn.weight[channels] = 0
    bn.bias[channels] = 0


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


# --------------------------------------------------------------------------------------------------
# Defense entry point
# --------------------------------------------------------------------------------------------------

@defense(data_free=True)
def defend(model: nn.Module, data=None, *, seed: int = 0, device=None, u: float = 3.0,
           pairing: str = "published") -> tuple[nn.Module, dict]:
    """CLP, data-free: prune Lipschitz-outlier channels of a deep copy of ``model``.

    ``data``, ``seed`` and ``device`` are accepted for the shared defense interface (baselines/base.py)
    and ignored: CLP uses no data, is deterministic, and computes the bounds on CPU like the
    original. The input model is not modified; the returned copy stays on the model's device and
    is in eval mode.

    Diagnostics (JSON-able): ``u``, ``pairing``, ``pairs`` (BN -> conv it was scored with),
    ``pruned_per_layer`` (BN -> number of pruned channels), ``layers`` (per BN: conv, channels,
    pruned channel indices, threshold and UCLC summary), ``skipped`` (BNs left untouched, with
    reason), ``total_pruned``, ``total_channels`` (channels of the scored BNs), ``pruned_fraction``
    and ``clp_seconds`` (wall time of pairing + UCLC computation + pruning, the step the paper's
    Table 4 times at 8.04 s on a GPU for CIFAR-10 PreAct-ResNet18).
    """
    u = float(u)
    pruned_model = copy.deepcopy(model)
    start = time.perf_counter()
    pairs, skipped = conv_bn_pairs(pruned_model, pairing)
    scored = []
    with _single_threaded():
        for bn_name, conv_name in pairs:
            bn = pruned_model.get_submodule(bn_name)
            uclc = channel_lipschitz_upper_bounds(pruned_model.get_submodule(conv_name), bn)
            channels = lipschitz_outlier_channels(uclc, u)
            zero_bn_channels(bn, channels)
            scored.append((bn_name, conv_name, uclc, channels))
    clp_seconds = time.perf_counter() - start
    pruned_model.eval()

    layers = []
    for bn_name, conv_name, uclc, channels in scored:
        layers.append({
            "bn": bn_name,
            "conv": conv_name,
            "channels": int(uclc.numel()),
            "pruned": int(channels.numel()),
            "pruned_channels": [int(c) for c in channels.tolist()],
            "threshold": _finite_or_none(lipschitz_threshold(uclc, u).item()),
            "uclc_mean": _finite_or_none(uclc.mean().item()),
            "uclc_std": _finite_or_none(uclc.std().item()) if uclc.numel() > 1 else None,
            "uclc_max": _finite_or_none(uclc.max().item()),
        })

    total_pruned = sum(layer["pruned"] for layer in layers)
    total_channels = sum(layer["channels"] for layer in layers)
    diagnostics = {
        "defense": "clp",
        "u": u,
        "pairing": pairing,
        "pairs": {layer["bn"]: layer["conv"] for layer in layers},
        "pruned_per_layer": {layer["bn"]: layer["pruned"] for layer in layers},
        "layers": layers,
        "skipped": skipped,
        "total_pruned": total_pruned,
        "total_channels": total_channels,
        "pruned_fraction": total_pruned / total_channels if total_channels else 0.0,
        "clp_seconds": clp_seconds,
    }
    return pruned_model, diagnostics
