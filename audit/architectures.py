"""Model architectures that state_dict / safetensors weights are loaded into.

The CIFAR forms (32x32 input, stride-1 stems, no ImageNet max-pool) follow the code the
robust-training literature publishes its checkpoints with, so their state_dict keys load
strictly: ResNet-18 and MobileNetV2 as in kuangliu/pytorch-cifar (used by MART, RSLAD and
ABSLD), PreAct ResNet-18 as in Rice et al. / fast_adversarial (final BN + ReLU, key `bn`)
and WideResNet as in TRADES / RSLAD. All take [0, 1] images and do no normalisation of
their own; `load_model(mean=..., std=...)` adds it.

Any torchvision classification model is also available by its torchvision name
(`resnet50`, `vit_b_16`, ...; `torchvision:resnet18` when a CIFAR name shadows it),
always built with random weights: robaudit never downloads weights.
"""

from __future__ import annotations

import math
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from robaudit.errors import UserError
from robaudit.registry import Registry

ARCHITECTURES = Registry("architecture")

TORCHVISION_PREFIX = "torchvision:"


# --- ResNet-18 (CIFAR) ---------------------------------------------------------------


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, num_blocks: List[int], num_classes: int = 10):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        # Adaptive pooling (= avg_pool2d(4) at 32x32) so other input sizes still run.
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


# --- PreAct ResNet-18 (CIFAR) ----------------------------------------------------------


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, num_blocks: List[int], num_classes: int = 10):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


# --- MobileNetV2 (CIFAR) ---------------------------------------------------------------


class InvertedResidual(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int):
        super().__init__()
        self.stride = stride
        planes = expansion * in_planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2(nn.Module):
    # (expansion, out_planes, num_blocks, stride); the second stage has stride 1 instead
    # of ImageNet's 2, and the stem is stride 1, so 32x32 inputs end at 4x4.
    CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
           (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        layers, in_planes = [], 32
        for expansion, out_planes, num_blocks, stride in self.CFG:
            for s in [stride] + [1] * (num_blocks - 1):
                layers.append(InvertedResidual(in_planes, out_planes, expansion, s))
                in_planes = out_planes
        self.layers = nn.Sequential(*layers)
        self.conv2 = nn.Conv2d(320, 1280, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.linear = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


# --- WideResNet (TRADES / RSLAD) -------------------------------------------------------


class WideBasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(
            in_planes, out_planes, 1, stride=stride, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As in TRADES: when the width changes, the shortcut sees the pre-activated input.
        if self.equal_in_out:
            out = self.relu1(self.bn1(x))
        else:
            x = self.relu1(self.bn1(x))
            out = x
        out = self.relu2(self.bn2(self.conv1(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return (x if self.equal_in_out else self.convShortcut(x)) + out


class NetworkBlock(nn.Module):
    def __init__(self, num_layers: int, in_planes: int, out_planes: int, stride: int,
                 drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(*[
            WideBasicBlock(in_planes if i == 0 else out_planes, out_planes,
                           stride if i == 0 else 1, drop_rate)
            for i in range(num_layers)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int = 34, widen_factor: int = 10, num_classes: int = 10,
                 drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        # TRADES/RSLAD define this block but never call it; it is kept so their checkpoints
        # load strictly. `adapt_to_state_dict` drops it for checkpoints without it.
        self.sub_block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(channels[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def adapt_to_state_dict(self, keys) -> None:
        """Drop the unused `sub_block1` when the weights come from code without it."""
        if getattr(self, "sub_block1", None) is not None and not any(
                k.startswith("sub_block1.") for k in keys):
            self.sub_block1 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out)))
        out = self.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


# --- SmallCNN (demo / tests) -----------------------------------------------------------


class SmallCNN(nn.Module):
    """~61k parameters: trains to a useful accuracy in about a minute on 2 CPU cores."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()

        def stage(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(stage(in_channels, 16, 1), stage(16, 32, 2),
                                      stage(32, 64, 2), stage(64, 64, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


# --- registry --------------------------------------------------------------------------


@ARCHITECTURES.register("resnet18", help="ResNet-18, CIFAR form (kuangliu/pytorch-cifar keys)")
def resnet18(num_classes: int = 10) -> nn.Module:
    return ResNet([2, 2, 2, 2], num_classes)


@ARCHITECTURES.register("preactresnet18", help="PreAct ResNet-18, CIFAR form")
def preactresnet18(num_classes: int = 10) -> nn.Module:
    return PreActResNet([2, 2, 2, 2], num_classes)


@ARCHITECTURES.register("mobilenetv2", help="MobileNetV2, CIFAR form (stride-1 stem)")
def mobilenetv2(num_classes: int = 10) -> nn.Module:
    return MobileNetV2(num_classes)


@ARCHITECTURES.register("wrn-34-10", help="WideResNet-34-10 (TRADES/RSLAD code)")
def wrn_34_10(num_classes: int = 10) -> nn.Module:
    return WideResNet(34, 10, num_classes)


@ARCHITECTURES.register("wrn-28-10", help="WideResNet-28-10 (TRADES/RSLAD code)")
def wrn_28_10(num_classes: int = 10) -> nn.Module:
    return WideResNet(28, 10, num_classes)


@ARCHITECTURES.register("smallcnn", help="4-conv BatchNorm CNN, ~61k params (demo and tests)")
def smallcnn(num_classes: int = 10) -> nn.Module:
    return SmallCNN(num_classes)


def torchvision_architectures() -> List[str]:
    """torchvision's image-classification model names (detection, video, ... excluded)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def list_architectures() -> List[str]:
    """Registered CIFAR architectures first, then every torchvision classification name."""
    registered = ARCHITECTURES.names()
    shadowed = set(registered)
    return registered + [
        n if n not in shadowed else TORCHVISION_PREFIX + n for n in torchvision_architectures()
    ]


def check_architecture(name: str) -> str:
    """The canonical name (registered name, or `torchvision:<name>`), or a UserError."""
    key = name.strip().lower()
    if key in ARCHITECTURES:
        return key
    bare = key[len(TORCHVISION_PREFIX):] if key.startswith(TORCHVISION_PREFIX) else key
    if bare in torchvision_architectures():
        return TORCHVISION_PREFIX + bare
    raise UserError(
        f"unknown architecture {name!r}; choose one of: {', '.join(ARCHITECTURES.names())}, "
        f"or a torchvision classification model name such as resnet50 or vit_b_16"
    )


def create_architecture(name: str, num_classes: int = 10) -> nn.Module:
    """A randomly initialised architecture by (case-insensitive) name; never downloads."""
    key = check_architecture(name)
    if key.startswith(TORCHVISION_PREFIX):
        import torchvision

        return torchvision.models.get_model(key[len(TORCHVISION_PREFIX):], weights=None,
                                            num_classes=num_classes)
    return ARCHITECTURES.create(key, num_classes=num_classes)
