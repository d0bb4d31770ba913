"""Model zoo: BackdoorBench's PreAct-ResNet18 (exact module names) and torchvision / timm models.

Models take *normalised* input; normalisation lives in the data pipeline, never in the model
(BackdoorBench convention, so BackdoorBench state_dicts load unchanged).
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F


class PreActBlock(nn.Module):
    """BackdoorBench's PreActBlock: bn1 -> relu -> (shortcut) -> conv1 -> bn2 -> relu -> conv2 (+ shortcut).

    Registration order bn1, conv1, bn2, conv2, shortcut matters: OTBR walks conv weights in this order
    and CLP pairs every BatchNorm with the most recently registered conv (baselines/clp.py, otbr/layers.py).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """BackdoorBench PreAct-ResNet18: no BN after the stem, no final BN before pooling, bias-free convs.

    `width` is the base channel count (64 in the paper); stages use width x (1, 2, 4, 8).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64):
        super().__init__()
        if int(width) < 1:
            raise ValueError(f"model.width={width} must be >= 1; e.g. model.width=16")
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        planes = [width, 2 * width, 4 * width, 8 * width]
        in_planes = width
        for stage, (p, stride) in enumerate(zip(planes, (1, 2, 2, 2)), start=1):
            blocks = [PreActBlock(in_planes, p, stride), PreActBlock(p, p, 1)]
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
            in_planes = p
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(8 * width, num_classes)

    def forward(self, x):
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.avgpool(out).flatten(1))


def _replace_first_conv(model: nn.Module, in_channels: int) -> nn.Module:
    """Give a torchvision model a first conv with `in_channels` inputs (same geometry, fresh weights)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            new = nn.Conv2d(in_channels, module.out_channels, module.kernel_size, module.stride,
                            module.padding, module.dilation, module.groups, module.bias is not None)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
            return model
    raise ValueError("model has no Conv2d to adapt")


TORCHVISION_MODELS = ("vgg19_bn", "resnet18", "efficientnet_b3", "mobilenet_v3_large")


def _no_width(name: str, width) -> None:
    if width is not None:
        raise ValueError(f"model.width={width} applies to model=preactresnet18 only; model={name} has no width "
                         "(the quickstart / fmnist presets set it: add ~model.width)")


def torchvision_model(name: str, num_classes: int, in_channels: int = 3, width: int | None = None) -> nn.Module:
    """A torchvision classifier, randomly initialised, built exactly as BackdoorBench builds it (ImageNet
    definitions, no 32x32 adaptation); other input channel counts get a fresh first conv."""
    import torchvision.models as tvm

    _no_width(name, width)
    if name not in TORCHVISION_MODELS:
        raise ValueError(f"model.name={name!r} is not one of {', '.join(TORCHVISION_MODELS)}; for any other "
                         "architecture use model=timm model.name=<timm name>")
    model = getattr(tvm, name)(weights=None, num_classes=num_classes)
    return model if in_channels == 3 else _replace_first_conv(model, in_channels)


def timm_model(name: str, num_classes: int, in_channels: int = 3, width: int | None = None, **kwargs) -> nn.Module:
    """Any timm architecture, randomly initialised; pretrained weights are never downloaded."""
    import timm

    _no_width(name, width)
    if not timm.is_model(name):
        raise ValueError(f"model.name={name!r} is not a timm architecture; e.g. model.name=resnet18 "
                         "(timm.list_models() lists them)")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)
