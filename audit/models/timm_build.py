"""timm architectures named `timm:NAME`: the name check and building one around a weights file.

`formats.model_from_weights` calls `timm_from_weights` for `--arch timm:NAME`; `zoo` uses the
same helpers for timm Hugging Face folders. This module imports neither of them, so the
formats -> zoo dependency runs one way (zoo imports formats).
"""

from __future__ import annotations

import difflib
from typing import Any, List, Mapping, Optional, Tuple

import torch
from torch import nn

from robaudit.audit.models.adapters import ModelInfo, first_line
from robaudit.audit.models.arch_inference import compare_keys, mismatch_error
from robaudit.errors import UserError

TIMM_PREFIX = "timm:"
TIMM_INSTALL = "pip install 'robaudit[timm]'"


def is_timm_arch(arch: Any) -> bool:
    return isinstance(arch, str) and arch.strip().lower().startswith(TIMM_PREFIX)


def import_timm():
    try:
        import timm
    except ImportError as err:
        raise UserError(f"timm architectures need timm, which is not importable ({first_line(err)}): "
                        f"{TIMM_INSTALL}") from None
    return timm


def check_timm_arch(arch: str) -> str:
    """`timm:NAME` with NAME a timm model (checked; nothing is downloaded)."""
    name = arch.strip()[len(TIMM_PREFIX):].strip()
    timm = import_timm()
    if not name or not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise UserError(f"unknown timm architecture {name!r} (timm {timm.__version__})"
                        + (f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"))
    return TIMM_PREFIX + name


def _head_classes(module: nn.Module, state: Mapping[str, torch.Tensor]) -> Optional[int]:
    """Rows of the weights' classifier (timm's get_classifier()), if they have one."""
    get = getattr(module, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        return None
    name = next((n for n, m in module.named_modules() if m is head), None)
    weight = state.get(f"{name}.weight") if name else None
    return int(weight.shape[0]) if weight is not None and weight.ndim >= 2 else None


def timm_from_weights(state: Mapping[str, torch.Tensor], kind: str, path: str, options,
                      notes: List[str]) -> Tuple[nn.Module, ModelInfo]:
    """The weights in timm.create_model(NAME, pretrained=False), which they must fit exactly;
    the head gets the class count the weights have (a wrong --dataset is a class mismatch)."""
    arch = check_timm_arch(options.arch)
    name, timm = arch[len(TIMM_PREFIX):], import_timm()
    classes = options.num_classes or 1000

    def create(num_classes: int) -> nn.Module:
        try:
            return timm.create_model(name, pretrained=False, num_classes=num_classes)
        except Exception as err:
            raise UserError(f"timm could not build {name}: {first_line(err)}") from None

    module = create(classes)
    head = _head_classes(module, state)
    if head is not None and head != classes:
        classes, module = head, create(head)
    fit = compare_keys(arch, module.state_dict(), state, classes)
    if not fit.exact:
        raise mismatch_error(fit, path)
    module.load_state_dict(state, strict=False)  # exact but for a missing num_batches_tracked
    notes.append(f"built with timm.create_model({name!r}, pretrained=False, num_classes={classes}) "
                 f"(timm {timm.__version__}); the file's weights fit it exactly")
    return module, ModelInfo(format=kind, arch=arch, notes=notes)
