"""One way to run a block with a model in eval mode and put it back exactly as it was.

Attacks, validation, remediation's inner maximisation, exports and FERD's generator
phase all need "this model in eval mode for a while". The mode is saved and restored
per submodule, not with one `module.train(previous)`: a model may mix modes (a frozen
BatchNorm inside a training network, a wrapper built around an eval-mode model), and a
recursive restore would flip those. `freeze_parameters=True` also stops parameter
gradients for the block, for third-party attacks that call .backward() (FAB does),
which would otherwise fill the model's .grad buffers.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def eval_mode(model, *, freeze_parameters: bool = False) -> Iterator[object]:
    """Run a block with every submodule of `model` in eval mode; restore each one's mode after.

    Anything that is not an nn.Module (a plain function, an ONNX session wrapper) is
    passed through unchanged.
    """
    if not isinstance(model, torch.nn.Module):
        yield model
        return
    modes = [(module, module.training) for module in model.modules()]
    frozen = [p for p in model.parameters() if p.requires_grad] if freeze_parameters else []
    model.eval()
    for param in frozen:
        param.requires_grad_(False)
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
        for param in frozen:
            param.requires_grad_(True)
