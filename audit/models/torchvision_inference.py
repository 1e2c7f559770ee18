"""torchvision's ImageNet classifiers, recognised from a weights file's keys and shapes.

Building all ~80 torchvision classifiers on the meta device takes ~15 s on a busy CPU, so a
file is first placed in a family by keys only that family has (`FAMILIES`: ResNet's
`layer1.0.conv1.weight` + `fc.weight`, ViT's `conv_proj.weight`, ...), and only that
family's models are built (meta device: shapes only) and compared key by key and shape by
shape (arch_inference.compare_keys). A family none of whose signature keys the file has
costs nothing. RegNet's builders compute widths with tensors and cannot run on the meta
device, so RegNets are not inferred (pass --arch torchvision:regnet_... for them).
"""

from __future__ import annotations

import warnings
from typing import List, Mapping, Sequence, Tuple

import torch

TORCHVISION_PREFIX = "torchvision:"

# (keys every file of the family has, name prefixes of the family's torchvision models).
FAMILIES: Sequence[Tuple[Tuple[str, ...], Tuple[str, ...]]] = (
    (("layer1.0.conv1.weight", "fc.weight", "conv1.weight"), ("resnet", "resnext", "wide_resnet")),
    (("features.conv0.weight", "classifier.weight"), ("densenet",)),
    (("conv_proj.weight", "heads.head.weight"), ("vit_",)),
    (("features.0.0.weight", "classifier.1.weight"), ("mobilenet_v2", "efficientnet", "mnasnet")),
    (("features.0.0.weight", "classifier.3.weight"), ("mobilenet_v3",)),
    (("features.0.0.weight", "classifier.2.weight"), ("convnext",)),
    (("features.0.0.weight", "head.weight"), ("swin",)),
    (("features.0.weight", "classifier.6.weight"), ("vgg", "alexnet")),
    (("features.0.weight", "classifier.1.weight"), ("squeezenet",)),
    (("layers.0.weight", "classifier.1.weight"), ("mnasnet",)),
    (("conv1.0.weight", "fc.weight"), ("shufflenet",)),
    (("Conv2d_1a_3x3.conv.weight", "fc.weight"), ("inception",)),
    (("conv1.conv.weight", "fc.weight"), ("googlenet",)),
    (("stem.0.0.weight", "classifier.5.weight"), ("maxvit",)),
)
NOT_ON_META = ("regnet_",)


def _names() -> Tuple[str, ...]:
    from robaudit.audit.models.architectures import torchvision_architectures

    return tuple(torchvision_architectures())


def candidate_names(state: Mapping[str, torch.Tensor]) -> List[str]:
    """`torchvision:NAME` of every model in the families the file's keys point to (may be empty)."""
    prefixes = tuple(p for keys, family in FAMILIES if all(k in state for k in keys) for p in family)
    if not prefixes:
        return []
    return [TORCHVISION_PREFIX + n for n in _names() if n.startswith(prefixes) and not n.startswith(NOT_ON_META)]


def exact_fits(state: Mapping[str, torch.Tensor], num_classes: int) -> list:
    """The torchvision candidates the weights fit exactly (arch_inference.Fit each)."""
    from robaudit.audit.models.arch_inference import fit_architecture

    fits = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # googlenet / inception warn about their default init
        for name in candidate_names(state):
            try:
                fit = fit_architecture(name, state, num_classes)
            except Exception:   # a builder that cannot run on the meta device is not a match
                continue
            if fit.exact:
                fits.append(fit)
    return fits
