"""Grey-scale data end to end: a 1-channel model takes 1-channel images as they are; a
model whose first layer takes 3 channels is refused grey images unless the user asks for
the channel to be repeated (--grey-to-rgb), so no model silently sees a different input
than the one it was trained on.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from robaudit.errors import UserError

GREY_TO_RGB_FLAG = "--grey-to-rgb"


def repeat_grey_channel(data):
    """EvalData with its single channel repeated three times (recorded in subset["grey_to_rgb"]).

    Only in-memory (tensor) images have one channel: image folders always decode to RGB.
    """
    channels = int(data.x.shape[1])
    if channels == 3:
        raise UserError(f"{GREY_TO_RGB_FLAG}: {data.name}'s images already have 3 channels; drop the flag")
    if channels != 1 or not isinstance(data.x, torch.Tensor):
        raise UserError(f"{GREY_TO_RGB_FLAG} repeats a grey (1-channel) image's channel, but {data.name}'s "
                        f"images have {channels} channels")
    # expand() is a view: the three channels share the grey values' memory.
    x = data.x.expand(-1, 3, -1, -1)
    return dataclasses.replace(data, x=x, subset={**data.subset, "grey_to_rgb": True})


def first_layer_channels(module: nn.Module) -> Optional[int]:
    """Input channels of the module's first convolution (by registration order), or None."""
    try:
        for layer in module.modules():
            if isinstance(layer, nn.Conv2d):
                return int(layer.in_channels)
    except Exception:   # exported / scripted modules may not walk like this
        return None
    return None


def check_model_channels(module: nn.Module, data_channels: int, where: str) -> None:
    """One line when the model's first convolution takes another channel count than the data has."""
    expected = first_layer_channels(module)
    if expected is None or expected == data_channels:
        return
    if expected == 3 and data_channels == 1:
        raise UserError(f"{where} takes 3-channel (RGB) images but the dataset's are grey (1 channel); pass "
                        f"{GREY_TO_RGB_FLAG} to repeat the grey channel, or use a 1-channel model")
    raise UserError(f"{where} takes {expected}-channel images but the dataset's have {data_channels} channels")
