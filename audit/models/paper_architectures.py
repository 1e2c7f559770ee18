"""Architectures of the source papers beyond the CIFAR students (registered on import).

* `preactresnet34`: PreAct ResNet-34, ABSLD's Tiny-ImageNet teacher (ABSLD paper App. A.7,
  Table 7: TRADES-trained, clean 52.76 / AA 18.92). Blocks [3, 4, 6, 3] of the same
  PreActBlock as `preactresnet18` (projection shortcut from relu(bn1(x)), final `bn` +
  ReLU): the form of PKU-ML/CFA model.py (`PreActResNet34`, which the Tiny-ImageNet
  baselines CFA/RSLAD share) and of Rice et al.'s robust_overfitting preactresnet.py.
* `mnist-cnn`: the MNIST network of Madry et al. (ICLR 2018; MadryLab mnist_challenge
  model.py): conv 5x5x32 + ReLU + 2x2 max-pool, conv 5x5x64 + ReLU + 2x2 max-pool, fc 1024
  + ReLU, fc 10; one input channel: the standard robust-MNIST network. The class-wise paper
  (Tian et al., arXiv 2105.14240) audits MNIST models, but its MNIST network's layers were
  not read here, so this is "a network like the ones such papers use", not a copy of it.

64 px (Tiny-ImageNet) and 96 px (STL-10) students. Every CIFAR student here ends with
global average pooling (F.adaptive_avg_pool2d(out, 1)), so `resnet18`, `preactresnet18`
and `mobilenetv2` take 64x64 and 96x96 input unchanged (feature maps 8x8 / 12x12 before
the pool) with the same keys. The authors' published code does not fix another form:
ABSLD's repository (zhaoshiji123/ABSLD) holds only the CIFAR-10 ResNet-18 script
(resnet18_absld_cifar10.py: RandomCrop(32, padding=4)) and no Tiny-ImageNet model; CFA's
model.py (PKU-ML/CFA, PreActResNet.forward) pools with F.avg_pool2d(out, 4) before a
512-input Linear, which at 64 px leaves a 2x2 map (2048 features) and fails, so a 64 px
run of it needs global pooling, the form registered here. No separate "-64"/"-96" names
are therefore registered: they would have identical keys and forwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robaudit.audit.models.architectures import ARCHITECTURES, PreActResNet


# Input (C, H, W) of architectures that do not take CIFAR's 3x32x32 (the others take any H, W >= 32).
ARCH_INPUT_SHAPES = {"mnist-cnn": (1, 28, 28)}


class MnistCNN(nn.Module):
    """Madry et al.'s MNIST network (1x28x28 in; any size divisible by 4 runs, flattened 64*(H/4)*(W/4))."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, side: int = 28):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.fc1 = nn.Linear(64 * (side // 4) * (side // 4), 1024)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.max_pool2d(F.relu(self.conv1(x)), 2)
        out = F.max_pool2d(F.relu(self.conv2(out)), 2)
        return self.fc2(F.relu(self.fc1(out.flatten(1))))


@ARCHITECTURES.register("preactresnet34", help="PreAct ResNet-34 (blocks 3,4,6,3; final bn): ABSLD's "
                                               "Tiny-ImageNet teacher (Table 7), CFA model.py form")
def preactresnet34(num_classes: int = 10) -> nn.Module:
    return PreActResNet([3, 4, 6, 3], num_classes, shortcut_from_input=False, final_bn=True)


@ARCHITECTURES.register("mnist-cnn", help="MNIST CNN of Madry et al. 2018 (1x28x28 grey in; 2 conv + 2 fc)")
def mnist_cnn(num_classes: int = 10) -> nn.Module:
    return MnistCNN(num_classes)
