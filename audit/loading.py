"""Load a classifier from a file, whatever its format, and check it before attacking it.

`load_model` picks the file's format (forced, or detected from the file's content, not
its name: audit/formats.py lists the formats and the order they are tried in), reads
it without executing untrusted code, puts it in eval mode on the device, and hands it to
the boundary builder (audit/adapters.py `build_boundary`), which adapts its input range,
normalisation, layout, fixed batch, output choice and kind and class order so that it
takes NCHW images in [0, 1] and returns logits in dataset class order, and runs forward
passes on an all-zero batch and on a random probe batch to check the model can be
audited. Every problem a user can cause ends in a one-line UserError. What was adapted,
and why, goes to `adaptations`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

from robaudit.audit import adapters, formats
# Re-exported: these lived here before the format registry (audit/formats.py) and the
# boundary builder (audit/adapters.py) took them over.
from robaudit.audit.adapters import PROBE_TEXT, BoundaryModel, FixedBatchModule, SelectOutput, first_line
from robaudit.audit.architectures import check_architecture
from robaudit.audit.formats import (CHECKPOINT_WEIGHT_KEYS, WEIGHT_FORMATS, WRAPPER_PREFIXES, ExportedModule,
                                    ReadOptions)
from robaudit.errors import UserError

__all__ = ["BoundaryModel", "CHECKPOINT_WEIGHT_KEYS", "ExportedModule", "FORMATS", "FixedBatchModule",
           "LoadedModel", "PROBE_TEXT", "SelectOutput", "WEIGHT_FORMATS", "WRAPPER_PREFIXES", "load_model",
           "save_export", "sha256_file"]

# The built-in formats, in detection order (audit/formats.py; formats registered later
# are in formats.format_names()).
FORMATS = tuple(formats.format_names())


@dataclass
class LoadedModel:
    module: torch.nn.Module        # [0,1] NCHW float32 in -> logits [B, C] out; eval mode; on device
    format: str                    # torchscript|export|state_dict|checkpoint|pickle|onnx|safetensors
    path: str
    sha256: str
    num_params: Optional[int]
    arch: Optional[str]
    white_box: bool                # False: gradients not trustworthy/available -> only black-box attacks
    adaptations: dict              # see docs/results-schema.md model.adaptations
    refusal: Optional[str]         # why white-box attacks are refused (one line), when white_box is False
    num_classes: Optional[int] = None   # C, from the zero-batch forward check
    class_names: Optional[List[str]] = None  # from --class-names: replace the dataset's names


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_export(module: nn.Module, path: str, example_input: torch.Tensor) -> None:
    """Write `module` as a torch.export .pt2 (the format robaudit recommends and writes).

    Exported in eval mode with a dynamic batch dimension where the model allows it
    (otherwise with the example's batch size, which `load_model` then feeds in chunks).
    The file is written next to `path` and renamed into place, so it is never half-written.
    """
    # Each submodule's mode is restored on its own: a wrapper built around an eval-mode
    # model is in training mode, and restoring it recursively would flip the model too.
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    # A slice of a big tensor would save its whole storage as the program's sample input.
    example_input = example_input.detach().clone().contiguous()
    try:
        if example_input.shape[0] < 2:  # a batch of 1 would make torch.export specialise it
            example_input = example_input.expand(2, *example_input.shape[1:]).contiguous()
        try:
            program = torch.export.export(
                module, (example_input,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        except Exception:  # the model fixes its batch size somewhere: export it as it is
            program = torch.export.export(module, (example_input,))
        directory, name = os.path.split(os.path.abspath(path))
        temporary = os.path.join(directory, f".{name}.{os.getpid()}.tmp.pt2")
        torch.export.save(program, temporary)
        os.replace(temporary, path)
    finally:
        for submodule, mode in modes:
            submodule.training = mode


def load_model(path, *, format="auto", arch=None, num_classes=None, trust_pickle=False,
               mean=None, std=None, device="cpu", input_shape=(3, 32, 32), input_layout="auto",
               input_range="0-1", output="auto", output_name=None, class_map=None,
               class_names=None, dataset_classes=None) -> LoadedModel:
    """Load the model at `path` and adapt it to NCHW [0, 1] in, logits in dataset class order out.

    input_shape is the dataset's (C, H, W). input_layout auto|nchw|nhwc, input_range 0-1|0-255,
    output auto|logits|probs|log-probs and output_name adapt the boundary (audit/adapters.py).
    class_map (a JSON file path, a list or a dict: model index -> dataset class index or name)
    reorders the outputs; class_names (a file path or a list) renames the dataset's classes
    (returned as LoadedModel.class_names). dataset_classes are the dataset's class names
    (they also set num_classes when that is not given). Every adaptation is recorded in
    LoadedModel.adaptations (docs/results-schema.md, model.adaptations).
    """
    path = os.fspath(path)
    input_shape = tuple(int(d) for d in input_shape)
    _check_file(path)
    if format != "auto" and format not in formats.format_names():
        raise UserError(f"unknown model format {format!r}; choose auto or one of: "
                        f"{', '.join(formats.format_names())}")
    if arch is not None:
        arch = check_architecture(arch)
    device = _check_device(device)
    # Files the user names are read before the model, so a typo fails fast.
    request = adapters.resolve_request(
        input_shape=input_shape, device=device, mean=mean, std=std, input_layout=input_layout,
        input_range=input_range, output=output, output_name=output_name, num_classes=num_classes,
        class_map=class_map, class_names=class_names, dataset_classes=dataset_classes)

    reader = formats.pick_format(path, format)
    module, info = reader.read(path, ReadOptions(arch=arch, num_classes=request.num_classes,
                                                 trust_pickle=trust_pickle, device=device))
    notes = ([f"--arch {arch} ignored: {path} contains the whole model, not just weights"]
             if arch is not None and info.arch is None else [])
    num_params = info.num_params
    if num_params is None:
        num_params = sum(p.numel() for p in module.parameters())
    module = module if info.on_device else module.to(device)
    module.eval()
    built = adapters.build_boundary(module, info, request, notes)
    return LoadedModel(module=built.module, format=info.format, path=path, sha256=sha256_file(path),
                       num_params=int(num_params), arch=info.arch, white_box=info.white_box,
                       adaptations=built.adaptations, refusal=info.refusal,
                       num_classes=built.num_classes, class_names=request.names)


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise UserError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory; pass the model file")
    if not os.access(path, os.R_OK):
        raise UserError(f"model file {path} is not readable (permissions)")
    if os.path.getsize(path) == 0:
        raise UserError(f"model file {path} is empty")


def _check_device(device: str) -> str:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise UserError(f"invalid device {device!r}: {first_line(err)}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available")
    return str(parsed)
