"""FERD's Fairness-Aware Examples for torch.export (.pt2) teachers: hookable layers.

FERD's information bottleneck needs the output of an intermediate teacher layer, read and
replaced by a forward hook (remediate/ferd_ib.py). A .pt2 teacher runs as one flat graph
(`ExportedProgram.module()`), whose layers fire no hooks. `torch.export.unflatten` rebuilds
the program's module hierarchy from the nn_module_stack the export recorded: each original
submodule becomes an InterpreterModule that runs its share of the same graph, so forward
hooks fire on it and a hook's return value replaces its output, as on the eager module.

`hookable_teacher` swaps the flat graph for the unflattened one inside robaudit's wrapper
(audit/models/formats.py ExportedModule), keeping it only when it gives the same logits on
a probe batch (to float32 rounding); otherwise the teacher is left as it was and the note
says why (FAE then stays off with its existing warning). TorchScript teachers stay hook-free:
scripted modules run their own compiled code and do not call Python hooks; convert such a
teacher to .pt2 (torch.export) or pass its PyTorch weights (state_dict with --arch).
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch
from torch import nn

log = logging.getLogger(__name__)


def _exported_wrappers(module: nn.Module):
    from robaudit.audit.models.formats import ExportedModule

    return [m for m in module.modules() if isinstance(m, ExportedModule) and getattr(m, "program", None) is not None]


def hookable_teacher(teacher: nn.Module, example: torch.Tensor) -> Tuple[nn.Module, Optional[str]]:
    """(teacher, note): the teacher with every .pt2 graph unflattened into hookable layers, when
    that leaves its logits unchanged on `example`; else the teacher unchanged and why."""
    wrappers = _exported_wrappers(teacher)
    if not wrappers:
        return teacher, None
    with torch.no_grad():
        before = teacher(example).float()
    flat = [w.module for w in wrappers]
    try:
        for wrapper in wrappers:
            unflat = torch.export.unflatten(wrapper.program)
            wrapper.module = unflat.to(example.device) if hasattr(unflat, "to") else unflat
        with torch.no_grad():
            after = teacher(example).float()
    except Exception as err:   # an export the unflattener cannot rebuild: keep the flat graph
        for wrapper, module in zip(wrappers, flat):
            wrapper.module = module
        return teacher, f"the .pt2 teacher could not be unflattened into hookable layers ({type(err).__name__}: {err})"
    # float32 logits of the same graph split into submodules: equal up to the rounding of
    # possibly different kernel choices; 1e-4 relative to the logits' scale allows that only.
    scale = before.abs().max().clamp_min(1.0)
    if not torch.allclose(after, before, rtol=0, atol=1e-4 * float(scale)):
        for wrapper, module in zip(wrappers, flat):
            wrapper.module = module
        return teacher, "the .pt2 teacher's unflattened layers gave other logits than its graph; FAE stays off"
    return teacher, ("the .pt2 teacher's graph was unflattened (torch.export.unflatten) so its layers can be "
                     "hooked for the Fairness-Aware Examples")
