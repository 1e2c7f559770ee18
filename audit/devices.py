"""One resolver for the --device every command takes (scan, remediate, demo, load_model).

"auto" picks CUDA when it is there; "cuda" without an index means this process's GPU,
which under torchrun is the one of its local rank. A device that cannot be used ends
with one line, before anything is loaded or written.
"""

from __future__ import annotations

import torch

from robaudit.audit import distributed
from robaudit.errors import UserError


def resolve_device(name) -> torch.device:
    """auto | cpu | cuda | cuda:N (or a torch.device) -> a usable torch.device."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown --device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but CUDA is not available; use --device cpu")
    under_torchrun, local_rank = distributed.launched_ranks()
    if device.type == "cuda" and under_torchrun:
        if device.index is not None and device.index != local_rank:   # its own GPU is fine (re-resolved)
            raise UserError(f"--device {name} would put every torchrun rank on the same GPU (NCCL refuses "
                            f"duplicate GPUs); use --device cuda: each rank takes the GPU of its LOCAL_RANK")
        device = torch.device("cuda", local_rank)  # torchrun: one GPU per local rank
    return device
