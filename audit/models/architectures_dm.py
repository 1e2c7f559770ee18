"""DeepMind-style WideResNet and PreAct ResNet, as RobustBench publishes them.

Written after RobustBench's `robustbench/model_zoo/architectures/dm_wide_resnet.py`
(`DMWideResNet`, `DMPreActResNet`, itself from deepmind-research's
adversarial_robustness/pytorch/model_zoo.py). The state_dict keys are the same
(`init_conv`, `layer.G.block.I.batchnorm_0`, `conv_0`, ..., `batchnorm`, `logits`;
`conv_2d`, `layer_0` ... `layer_3` for the PreAct form) so RobustBench checkpoints of
Gowal2020Uncovering_*, Rebuffi2021Fixing_*, Rade2021Helper_*, Gowal2021Improving_*,
Pang2022Robustness_*, Wang2023Better_* and Xu2023Exploring_* load strictly.

Unlike every other robaudit architecture these models normalise their own input: the
forward subtracts a per-channel mean and divides by a std (CIFAR-10 constants, or
CIFAR-100 ones for 100-class heads, as RobustBench builds them). The constants are
`module.input_normalization`, so a loader can report them and must not add its own.
`mean` / `std` are non-persistent buffers (RobustBench keeps them out of the state_dict
in some versions and registers them as buffers in others); `adapt_to_state_dict` makes
them persistent when a checkpoint carries them, so both kinds load strictly.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def cifar_constants(num_classes: int) -> Tuple[str, Tuple[float, ...], Tuple[float, ...]]:
    """RobustBench's choice: CIFAR-100 constants for 100-class DM models, else CIFAR-10."""
    if num_classes == 100:
        return "cifar100", CIFAR100_MEAN, CIFAR100_STD
    return "cifar10", CIFAR10_MEAN, CIFAR10_STD


class Swish(nn.Module):
    """x * sigmoid(x), as RobustBench's `Swish` (same values as nn.SiLU, used by Wang2023)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


def _same_pad(x: torch.Tensor, stride: int) -> torch.Tensor:
    """TensorFlow 'SAME' padding for a 3x3 kernel: symmetric at stride 1, bottom/right at 2."""
    if stride == 1:
        return F.pad(x, (1, 1, 1, 1))
    if stride == 2:
        return F.pad(x, (0, 1, 0, 1))
    raise ValueError(f"unsupported stride {stride}")


class _NormalizingModel(nn.Module):
    """Holds the mean/std buffers and the constants' provenance for the loader."""

    def _init_normalization(self, num_classes: int, mean: Optional[Sequence[float]],
                            std: Optional[Sequence[float]], padding: int) -> None:
        """The CIFAR constants RobustBench builds the model with, unless mean/std are given."""
        name, default_mean, default_std = cifar_constants(num_classes)
        if mean is not None:
            name = "given"
        self._set_normalization(name, mean or default_mean, std or default_std)
        self.padding = padding

    def _set_normalization(self, name: str, mean: Sequence[float], std: Sequence[float]) -> None:
        channels = len(mean)
        self.register_buffer("mean", torch.tensor(mean).view(channels, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(channels, 1, 1), persistent=False)
        self._constants = (name, tuple(mean), tuple(std))

    @property
    def input_normalization(self) -> Dict[str, object]:
        """{"mean", "std", "constants"}: what forward does to its [0, 1] input first."""
        name, mean, std = self._constants
        if self.mean.device.type != "meta":
            loaded = (tuple(round(v, 6) for v in self.mean.flatten().tolist()),
                      tuple(round(v, 6) for v in self.std.flatten().tolist()))
            if loaded != (mean, std):  # a checkpoint's own mean/std buffers
                name, (mean, std) = "checkpoint", loaded
        return {"mean": mean, "std": std, "constants": name}

    def adapt_to_state_dict(self, keys) -> None:
        """Expect `mean` / `std` in the state_dict when the checkpoint has them."""
        keys = set(keys)
        for name in ("mean", "std"):
            if name in keys:
                self.register_buffer(name, getattr(self, name), persistent=True)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding > 0:
            x = F.pad(x, (self.padding,) * 4)
        return (x - self.mean) / self.std


# --- DMWideResNet ----------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, activation=Swish):
        super().__init__()
        self.batchnorm_0 = nn.BatchNorm2d(in_planes)
        self.relu_0 = activation()
        self.conv_0 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes)
        self.relu_1 = activation()
        self.conv_1 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.has_shortcut = in_planes != out_planes
        self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False) \
            if self.has_shortcut else None
        self._stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu_0(self.batchnorm_0(x))
        # With a projection the shortcut sees the pre-activated input, else the raw one.
        residual = self.shortcut(pre) if self.has_shortcut else x
        out = self.conv_0(_same_pad(pre, self._stride))
        out = self.conv_1(self.relu_1(self.batchnorm_1(out)))
        return residual + out


class _BlockGroup(nn.Module):
    def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int,
                 activation=Swish):
        super().__init__()
        self.block = nn.Sequential(*[
            _Block(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1,
                   activation)
            for i in range(num_blocks)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DMWideResNet(_NormalizingModel):
    def __init__(self, num_classes: int = 10, depth: int = 28, width: int = 10,
                 activation=Swish, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, padding: int = 0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4 (n >= 1), got {depth}")
        self._init_normalization(num_classes, mean, std, padding)
        channels = [16, 16 * width, 32 * width, 64 * width]
        n = (depth - 4) // 6
        self.init_conv = nn.Conv2d(3, channels[0], 3, stride=1, padding=1, bias=False)
        self.layer = nn.Sequential(
            _BlockGroup(n, channels[0], channels[1], 1, activation),
            _BlockGroup(n, channels[1], channels[2], 2, activation),
            _BlockGroup(n, channels[2], channels[3], 2, activation))
        self.batchnorm = nn.BatchNorm2d(channels[3])
        self.relu = activation()
        self.logits = nn.Linear(channels[3], num_classes)
        self.num_channels = channels[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(self.init_conv(self._normalize(x)))
        out = self.relu(self.batchnorm(out))
        # The original's fixed 8x8 pooling; flatten(1) (not view(-1, C)) makes a non-32x32
        # input fail loudly at `logits` instead of folding spatial cells into the batch.
        out = F.avg_pool2d(out, 8).flatten(1)
        return self.logits(out)


# --- DMPreActResNet --------------------------------------------------------------------


class _PreActBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, activation=Swish):
        super().__init__()
        self._stride = stride
        self.batchnorm_0 = nn.BatchNorm2d(in_planes)
        self.relu_0 = activation()
        self.conv_2d_1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=0,
                                   bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes)
        self.relu_1 = activation()
        self.conv_2d_2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.has_shortcut = stride != 1 or in_planes != out_planes
        if self.has_shortcut:
            # A 3x3 projection (not 1x1) on the raw, padded input, as in the original.
            self.shortcut = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=0,
                                      bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu_0(self.batchnorm_0(x))
        residual = self.shortcut(_same_pad(x, self._stride)) if self.has_shortcut else x
        out = self.conv_2d_1(_same_pad(out, self._stride))
        out = self.conv_2d_2(self.relu_1(self.batchnorm_1(out)))
        return out + residual


class DMPreActResNet(_NormalizingModel):
    BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}

    def __init__(self, num_classes: int = 10, depth: int = 18, activation=Swish,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 padding: int = 0):
        super().__init__()
        if depth not in self.BLOCKS:
            raise ValueError(f"DMPreActResNet depth must be 18 or 34, got {depth}")
        self._init_normalization(num_classes, mean, std, padding)
        self.conv_2d = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        blocks = self.BLOCKS[depth]
        planes = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
        for index, ((cin, cout, stride), count) in enumerate(zip(planes, blocks)):
            setattr(self, f"layer_{index}", nn.Sequential(*[
                _PreActBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, activation)
                for i in range(count)
            ]))
        self.batchnorm = nn.BatchNorm2d(512)
        self.relu = activation()
        self.logits = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_2d(self._normalize(x))
        out = self.layer_3(self.layer_2(self.layer_1(self.layer_0(out))))
        out = self.relu(self.batchnorm(out))
        out = F.avg_pool2d(out, 4).flatten(1)
        return self.logits(out)
