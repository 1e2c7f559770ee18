"""Speed options of the training loop that do not change what is computed.

- `convs_to_channels_last`: the teacher's convolution weights in channels_last, like its
  input (Runtime.memory_format); with NCHW weights and NHWC input every conv converts one of
  them first. Works on any module (exported programs and converted ONNX graphs included),
  since only the weights' memory layout changes, never their values.
- `compiled_for_training`: torch.compile of the student for the training steps (--compile).
  The small students (MobileNetV2's inner PGD-10 is ~4700 kernel launches per batch) are
  launch-bound on a GPU; fusing their elementwise ops cuts the launches. The module object
  the checkpoints, validation and export use stays the uncompiled one (same parameters).
"""

from __future__ import annotations

import torch
from torch import nn


def convs_to_channels_last(module: nn.Module) -> nn.Module:
    """In place: every 4-D conv weight of `module` in channels_last memory format."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.Conv2d) and sub.weight.dim() == 4:
                sub.weight.data = sub.weight.data.contiguous(memory_format=torch.channels_last)
    return module


def compiled_for_training(module: nn.Module, backend: str = "inductor") -> nn.Module:
    """torch.compile(module) (dynamic=False: the training batch shape is fixed but for the
    last batch of an epoch, which compiles once more)."""
    return torch.compile(module, dynamic=False, backend=backend)
