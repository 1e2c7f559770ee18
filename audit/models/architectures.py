"""Model architectures that state_dict / safetensors weights are loaded into.

The CIFAR forms (32x32 input, stride-1 stems, no ImageNet max-pool) follow the code the
robust-training literature publishes its checkpoints with, so their state_dict keys load
strictly (key names, module order and forward as in the original repositories):

* `resnet18`, `mobilenetv2`: kuangliu/pytorch-cifar (used by MART, RSLAD and ABSLD).
* PreAct ResNet-18 comes in four forms that share block key names but not logits:
  `preactresnet18` (shortcut projection from relu(bn1(x)), final `bn` + ReLU: Rice et al.
  robust_overfitting; RobustBench `PreActBlockV2` with bn_before_fc=True),
  `preactresnet18-fast` (projection from the raw x, final `bn`: locuslab/fast_adversarial),
  `preactresnet18-kuangliu` (projection from relu(bn1(x)), no final BN: kuangliu) and
  `preactresnet18-robustbench` (projection from x, no final BN: RobustBench `PreActBlock`,
  e.g. Wong2020Fast, Andriushchenko2020Understanding).
* `wrn-D-W`: WideResNet-D-W as in TRADES / RSLAD (RobustBench `wide_resnet.py`), any
  depth D = 6n+4 and width W; `wrn-28-10`, `wrn-34-10`, `wrn-34-20`, `wrn-70-16` are listed.
* `dm-wrn-D-W`, `dm-preactresnet18`: RobustBench's DMWideResNet / DMPreActResNet (Swish,
  TF 'SAME' padding), see `architectures_dm`. These normalise their own input
  (`module.input_normalization`); all the others take [0, 1] images and do no
  normalisation of their own; `load_model(mean=..., std=...)` adds it.

Any torchvision classification model is also available by its torchvision name
(`resnet50`, `vit_b_16`, ...; `torchvision:resnet18` when a CIFAR name shadows it),
always built with random weights: robaudit never downloads weights. `resolve_architecture`
maps the names users type (`WRN_34_10`, `wrn34`, `mobilenet_v2`, ...) to these.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from robaudit.audit.models.architectures_dm import DMPreActResNet, DMWideResNet
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
    """Pre-activation basic block; `shortcut_from_input` picks the projection's input.

    False: the 1x1 projection sees relu(bn1(x)) (Rice et al., kuangliu, RobustBench
    PreActBlockV2). True: it sees the raw x (fast_adversarial, RobustBench PreActBlock).
    Blocks without a projection add the raw x either way.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1,
                 shortcut_from_input: bool = False):
        super().__init__()
        self.shortcut_from_input = shortcut_from_input
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        if hasattr(self, "shortcut"):
            shortcut = self.shortcut(x if self.shortcut_from_input else out)
        else:
            shortcut = x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """PreAct ResNet; `final_bn` adds the `bn` + ReLU before pooling (key `bn.*`)."""

    def __init__(self, num_blocks: List[int], num_classes: int = 10,
                 shortcut_from_input: bool = False, final_bn: bool = True):
        super().__init__()
        self.in_planes = 64
        self.shortcut_from_input = shortcut_from_input
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        self.bn = nn.BatchNorm2d(512) if final_bn else None
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(PreActBlock(self.in_planes, planes, s, self.shortcut_from_input))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.bn is not None:
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
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4 (n >= 1), got {depth}")
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


# The four PreAct ResNet-18 forms in the wild: identical key names (except the final BN),
# different forwards, so each is its own name: (shortcut from raw x?, final BN?, where from).
PREACT_RESNET18_FORMS = {
    "preactresnet18": (False, True, "projection from relu(bn1(x)), final bn: Rice et al. "
                                    "robust_overfitting; RobustBench PreActBlockV2 + bn_before_fc"),
    "preactresnet18-fast": (True, True, "projection from raw x, final bn: locuslab/fast_adversarial"),
    "preactresnet18-kuangliu": (False, False, "projection from relu(bn1(x)), no final BN: "
                                              "kuangliu/pytorch-cifar"),
    "preactresnet18-robustbench": (True, False, "projection from raw x, no final BN: RobustBench "
                                                "PreActBlock (Wong2020Fast, Andriushchenko2020Understanding)"),
}


def _preact_resnet18_builder(shortcut_from_input: bool, final_bn: bool):
    def build(num_classes: int = 10) -> nn.Module:
        return PreActResNet([2, 2, 2, 2], num_classes, shortcut_from_input=shortcut_from_input,
                            final_bn=final_bn)
    return build


for _name, (_from_input, _final_bn, _where) in PREACT_RESNET18_FORMS.items():
    ARCHITECTURES.register(_name, help=f"PreAct ResNet-18, {_where}")(
        _preact_resnet18_builder(_from_input, _final_bn))


@ARCHITECTURES.register("mobilenetv2", help="MobileNetV2, CIFAR form (stride-1 stem)")
def mobilenetv2(num_classes: int = 10) -> nn.Module:
    return MobileNetV2(num_classes)


@ARCHITECTURES.register("smallcnn", help="4-conv BatchNorm CNN, ~61k params (demo and tests)")
def smallcnn(num_classes: int = 10) -> nn.Module:
    return SmallCNN(num_classes)


@ARCHITECTURES.register(
    "dm-preactresnet18", help="RobustBench DMPreActResNet-18 (Swish, normalises its input): "
    "Rebuffi2021Fixing_R18, Rade2021Helper_R18, Gowal2021Improving_R18")
def dm_preactresnet18(num_classes: int = 10) -> nn.Module:
    return DMPreActResNet(num_classes, depth=18)


# --- WideResNet family: wrn-D-W and dm-wrn-D-W -----------------------------------------

WRN_LISTED = [(28, 10), (34, 10), (34, 20), (70, 16)]
DM_WRN_LISTED = [(28, 10), (34, 10), (34, 20), (70, 16), (106, 16)]  # as in RobustBench's zoo
DEFAULT_WRN_WIDTH = 10
# dm? wrn|wideresnet|wide-resnet, depth, optional width; on names already lower-cased
# with '_' and ' ' turned into '-'.
_WRN_PATTERN = re.compile(r"^(dm-?)?(?:wrn|wide-?resnet)-?(\d+)(?:[-x](\d+))?$")


def wide_resnet_name(depth: int, width: int, dm: bool = False) -> str:
    return f"{'dm-' if dm else ''}wrn-{depth}-{width}"


def build_wide_resnet(depth: int, width: int, num_classes: int = 10,
                      dm: bool = False) -> nn.Module:
    """WideResNet-depth-width: TRADES/RSLAD code, or RobustBench's DMWideResNet if `dm`.

    For loaders that read depth and width off a state_dict's shapes; raises ValueError
    unless depth = 6n+4 (n >= 1) and width >= 1.
    """
    if width < 1:
        raise ValueError(f"WideResNet width must be >= 1, got {width}")
    if dm:
        return DMWideResNet(num_classes, depth=depth, width=width)
    return WideResNet(depth, width, num_classes)


def _valid_wrn(depth: int, width: int) -> bool:
    return depth >= 10 and (depth - 4) % 6 == 0 and width >= 1


def _parse_wide_resnet(key: str) -> Optional[Tuple[bool, int, int, bool]]:
    """(dm, depth, width, width_was_given) for a WRN-family spelling, else None."""
    match = _WRN_PATTERN.match(key)
    if match is None:
        return None
    width = match.group(3)
    return (bool(match.group(1)), int(match.group(2)),
            int(width) if width else DEFAULT_WRN_WIDTH, width is not None)


def _register_wide_resnet(depth: int, width: int, dm: bool) -> None:
    if dm:
        help_text = (f"RobustBench DMWideResNet-{depth}-{width} (Swish, normalises its input "
                     f"with CIFAR-10/100 constants)")
    else:
        help_text = f"WideResNet-{depth}-{width} (TRADES/RSLAD code, RobustBench wide_resnet.py)"

    def factory(num_classes: int = 10) -> nn.Module:
        return build_wide_resnet(depth, width, num_classes, dm=dm)

    ARCHITECTURES.register(wide_resnet_name(depth, width, dm), help=help_text)(factory)


for _depth, _width in WRN_LISTED:
    _register_wide_resnet(_depth, _width, dm=False)
for _depth, _width in DM_WRN_LISTED:
    _register_wide_resnet(_depth, _width, dm=True)


def infer_wide_resnet(state) -> Optional[str]:
    """The `wrn-D-W` / `dm-wrn-D-W` name a state_dict's keys and shapes fit, else None."""
    if "init_conv.weight" in state:
        blocks = {k.split(".")[3] for k in state if k.startswith("layer.0.block.")}
        first = state.get("layer.0.block.0.conv_0.weight")
        dm = True
    else:
        blocks = {k.split(".")[2] for k in state if k.startswith("block1.layer.")}
        first = state.get("block1.layer.0.conv1.weight")
        dm = False
    if not blocks or first is None or first.shape[0] % 16:
        return None
    depth, width = 6 * len(blocks) + 4, int(first.shape[0]) // 16
    return wide_resnet_name(depth, width, dm) if _valid_wrn(depth, width) else None


# --- names -----------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _torchvision_names() -> Tuple[str, ...]:
    import torchvision

    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def torchvision_architectures() -> List[str]:
    """torchvision's image-classification model names (detection, video, ... excluded)."""
    return list(_torchvision_names())


def _compact(name: str) -> str:
    return re.sub(r"[-_\s]", "", name.lower())


def _shadow_note(typed: str, canonical: str) -> Optional[str]:
    """Say so when the name typed is (a spelling of) a torchvision model's too."""
    compact = _compact(typed)
    for tv in _torchvision_names():
        if _compact(tv) == compact:
            said = (f"{canonical} is the CIFAR form (32x32)" if typed.lower() == canonical
                    else f"{typed} -> {canonical} (CIFAR form, 32x32)")
            return f"{said}; torchvision's ImageNet model is {TORCHVISION_PREFIX}{tv}"
    return None


def _resolve_wide_resnet(typed: str, key: str) -> Optional[Tuple[str, Optional[str]]]:
    parsed = _parse_wide_resnet(key)
    if parsed is None:
        return None
    dm, depth, width, width_given = parsed
    if not _valid_wrn(depth, width):
        return None
    canonical = wide_resnet_name(depth, width, dm)
    note = None if width_given else (
        f"{typed} -> {canonical} (width {DEFAULT_WRN_WIDTH} assumed, as in TRADES/RSLAD)")
    return canonical, note


def resolve_architecture(name: str) -> Tuple[str, Optional[str]]:
    """(canonical name, note or None) for a name as users type it; UserError if unknown.

    Case-insensitive; '_' and spaces count as '-'. In order: a registered name; an explicit
    `torchvision:<name>`; the WideResNet family `[dm-]wrn-D-W` spelled `wrn34-10`, `WRN_34_10`,
    `WideResNet-34-10`, `wideresnet34-10`, `DMWideResNet-70-16`, ... (any D = 6n+4, W >= 1;
    `wrnD` alone means width 10, as in TRADES/RSLAD); a registered name up to '-' (so
    `mobilenet_v2`, `MobileNetV2` -> `mobilenetv2`, `PreActResNet-18` -> `preactresnet18`);
    then a torchvision classification name (`resnet50` -> `torchvision:resnet50`).
    The note says when a width was assumed, or when the name typed is also torchvision's
    (`mobilenet_v2 -> mobilenetv2 (CIFAR form, 32x32); torchvision's ImageNet model is
    torchvision:mobilenet_v2`).
    """
    typed = name.strip()
    key = typed.lower()
    if key in ARCHITECTURES:
        return key, _shadow_note(typed, key)
    if key.startswith(TORCHVISION_PREFIX):
        bare = key[len(TORCHVISION_PREFIX):].strip()
        if bare in _torchvision_names():
            return TORCHVISION_PREFIX + bare, None
        raise UserError(f"unknown torchvision architecture {name!r}; see torchvision.models."
                        f"list_models() for the classification names")
    dashed = re.sub(r"[_\s]+", "-", key)
    if dashed in ARCHITECTURES:
        return dashed, _shadow_note(typed, dashed)
    wrn = _resolve_wide_resnet(typed, dashed)
    if wrn is not None:
        return wrn
    if _parse_wide_resnet(dashed) is None:
        by_compact = {_compact(n): n for n in ARCHITECTURES.names()}
        if _compact(key) in by_compact:
            canonical = by_compact[_compact(key)]
            return canonical, _shadow_note(typed, canonical)
    for candidate in (key, dashed.replace("-", "_")):
        if candidate in _torchvision_names():
            return TORCHVISION_PREFIX + candidate, None
    raise UserError(
        f"unknown architecture {name!r}; choose one of: {', '.join(ARCHITECTURES.names())}, "
        f"wrn-D-W or dm-wrn-D-W for another WideResNet (D = 6n+4), or a torchvision "
        f"classification model name such as resnet50 or vit_b_16"
    )


def check_architecture(name: str) -> str:
    """The canonical name (registered, `[dm-]wrn-D-W` or `torchvision:<name>`), or a UserError."""
    return resolve_architecture(name)[0]


def create_architecture(name: str, num_classes: int = 10) -> nn.Module:
    """A randomly initialised architecture by (case-insensitive) name; never downloads."""
    key = check_architecture(name)
    if key.startswith(TORCHVISION_PREFIX):
        import torchvision

        return torchvision.models.get_model(key[len(TORCHVISION_PREFIX):], weights=None,
                                            num_classes=num_classes)
    if key in ARCHITECTURES:
        return ARCHITECTURES.create(key, num_classes=num_classes)
    dm, depth, width, _ = _parse_wide_resnet(key)
    return build_wide_resnet(depth, width, num_classes, dm=dm)


# The source papers' other architectures (preactresnet34, mnist-cnn) register themselves on import.
from robaudit.audit.models import paper_architectures  # noqa: E402,F401
