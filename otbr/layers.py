"""Which convolutions OTBR considers, and how its fusion chain walks them (docs/methods/otbr.md).

Layer set ("neurons" = output filters of these convs)
    Every ``nn.Conv2d`` with ``groups == 1`` whose module name contains neither ``shortcut`` nor
    ``downsample`` and that does not sit inside a squeeze-excitation module (class name in
    :data:`SQUEEZE_EXCITATION_CLASSES`: torchvision ``SqueezeExcitation``, timm ``SqueezeExcite`` /
    ``SEModule`` / ``EffectiveSEModule``), in ``named_modules()`` order. Layers are named by their
    weight parameter (``'layer1.0.conv1.weight'``), the official code's keys. On BackdoorBench's
    PreAct-ResNet18 this is exactly the official ``'shortcut' not in name`` set: 17 layers, 3904
    filters at width 64; on torchvision ``vgg19_bn`` 16 layers, 5504 filters.

Fusion chain
    Starts at the first layer (network order) with at least one pruned filter and contains every later
    layer of the set, pruned or not. The official code treats the chain as a plain feed-forward
    sequence: layer i's incoming edges are aligned with layer i-1's transport map. A layer continues the
    alignment only if its ``in_channels`` equals the previous chain layer's ``out_channels``; otherwise
    (and for the first chain layer) its incoming map is the identity. Such a layer is still transported
    and fused on its outgoing side, so the rule never produces a shape error. Everything outside the set
    (BN, shortcut/downsample convs, depthwise and squeeze-excitation convs, linear layers, conv biases)
    keeps the backdoored model's values. On PreAct-ResNet18 every chain layer continues the alignment,
    which is the official behaviour.
"""
from __future__ import annotations

import torch.nn as nn

#: Class names of squeeze-excitation blocks whose internal 1x1 convs are never pruned or fused.
SQUEEZE_EXCITATION_CLASSES = ("SqueezeExcitation", "SqueezeExcite", "SEModule", "EffectiveSEModule")
#: Substrings of module names that mark residual-branch convs (BackdoorBench / torchvision naming).
EXCLUDED_NAME_PARTS = ("shortcut", "downsample")


def prunable_conv_layers(model: nn.Module) -> list[str]:
    """Weight-parameter names of the convs whose filters OTBR scores, prunes and fuses (network order)."""
    squeeze_excitation_prefixes = [name + "." for name, module in model.named_modules()
                                   if type(module).__name__ in SQUEEZE_EXCITATION_CLASSES]
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d) or module.groups != 1:
            continue
        if any(part in name for part in EXCLUDED_NAME_PARTS):
            continue
        if any(name.startswith(prefix) for prefix in squeeze_excitation_prefixes):
            continue
        layers.append(f"{name}.weight")
    return layers


def conv_of(model: nn.Module, layer: str) -> nn.Conv2d:
    """The ``nn.Conv2d`` that owns weight parameter ``layer`` (``'a.b.weight'`` -> module ``a.b``)."""
    module_name = layer.rsplit(".", 1)[0] if layer.endswith(".weight") else layer
    return model.get_submodule(module_name)


def fusion_chain(model: nn.Module, first_layer: str | None) -> list[tuple[str, bool]]:
    """Algorithm 1's layer sequence from ``first_layer`` on, as ``(layer, continues_alignment)`` pairs.

    ``continues_alignment`` is False for the first chain layer and for any layer whose ``in_channels``
    differ from the previous chain layer's ``out_channels`` (identity incoming map, module docstring).
    """
    layers = prunable_conv_layers(model)
    if first_layer is None:
        return []
    if first_layer not in layers:
        raise KeyError(f"{first_layer!r} is not a prunable conv layer of this model; "
                       f"choose one of {layers}")
    chain, previous_out = [], None
    for layer in layers[layers.index(first_layer):]:
        conv = conv_of(model, layer)
        chain.append((layer, previous_out is not None and conv.in_channels == previous_out))
        previous_out = conv.out_channels
    return chain
