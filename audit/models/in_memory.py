"""Models the library is handed in memory: an nn.Module or a torch.export ExportedProgram.

They get the same boundary as a file does (audit/models/adapters.py: --mean/--std,
input range and layout, probabilities detected and attacked as their log, the zero-batch
and probe checks), recorded in `adaptations` the same way. A module's sha256 is the
digest of its state_dict (names, dtypes, shapes and bytes, in order), so a resumed scan
reuses chunks only for the same weights. The module is used as given (not copied): it is
put in eval mode for the audit, and its train/eval mode restored by the caller.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import torch
from torch import nn

from robaudit.audit.devices import resolve_device
from robaudit.audit.models import adapters
from robaudit.audit.models.loading import LoadedModel, load_model


def module_sha256(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def wrap_module(module: nn.Module, *, dataset_classes, input_shape, device="cpu", mean=None, std=None,
                input_layout="auto", input_range="0-1", output="auto", output_name=None,
                class_map=None) -> LoadedModel:
    """A LoadedModel around `module` (what load_model returns for a file)."""
    device = str(resolve_device(device))
    request = adapters.resolve_request(
        input_shape=input_shape, device=device, mean=mean, std=std, input_layout=input_layout,
        input_range=input_range, output=output, output_name=output_name, num_classes=len(dataset_classes),
        class_map=class_map, dataset_classes=list(dataset_classes))
    info = adapters.ModelInfo(format="module", arch=None, num_params=sum(p.numel() for p in module.parameters()))
    built = adapters.build_boundary(module.to(device).eval(), info, request)
    return LoadedModel(module=built.module, format="module", path=f"<in-memory {type(module).__name__}>",
                       sha256=module_sha256(module), num_params=int(info.num_params), arch=None,
                       white_box=True, adaptations=built.adaptations, refusal=None,
                       num_classes=built.num_classes, class_names=None)


def wrap_exported(program, *, dataset_classes, input_shape, device="cpu", **boundary) -> LoadedModel:
    """A LoadedModel around an ExportedProgram: saved to a private .pt2 and read as `scan` reads one."""
    handle, path = tempfile.mkstemp(suffix=".pt2", prefix="robaudit-program.")
    os.close(handle)
    try:
        torch.export.save(program, path)
        loaded = load_model(path, num_classes=len(dataset_classes), dataset_classes=list(dataset_classes),
                            input_shape=input_shape, device=device, **boundary)
    finally:
        os.unlink(path)
    loaded.path = "<in-memory ExportedProgram>"
    return loaded
