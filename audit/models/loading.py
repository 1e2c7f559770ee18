"""Load a classifier from a file, whatever its format, and check it before attacking it.

`load_model` picks the file's format (forced, or detected from the file's content, not
its name: audit/models/formats.py lists the formats and the order they are tried in), reads
it without executing untrusted code, puts it in eval mode on the device, and hands it to
the boundary builder (audit/models/adapters.py `build_boundary`), which adapts its input range,
normalisation, layout, fixed batch, output choice and kind and class order so that it
takes NCHW images in [0, 1] and returns logits in dataset class order, and runs forward
passes on an all-zero batch and on a random probe batch to check the model can be
audited. Every problem a user can cause ends in a one-line UserError. What was adapted,
and why, goes to `adaptations`.
"""

from __future__ import annotations

import hashlib
import os
import math
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import torch
from torch import nn

from robaudit.audit.models import adapters
from robaudit.audit.models import formats
from robaudit.audit.models import zoo
from robaudit.audit.devices import resolve_device
from robaudit.audit.modes import eval_mode
# Re-exported: these lived here before the format registry (audit/models/formats.py) and the
# boundary builder (audit/models/adapters.py) took them over.
from robaudit.audit.models.adapters import PROBE_TEXT, BoundaryModel, FixedBatchModule, SelectOutput, first_line
from robaudit.audit.models.arch_inference import FILE_NORMALIZATION_SOURCE
from robaudit.audit.models.architectures import resolve_architecture
from robaudit.audit.models.formats import (CHECKPOINT_WEIGHT_KEYS, WEIGHT_FORMATS, WRAPPER_PREFIXES, ExportedModule,
                                    ReadOptions)
from robaudit.audit.data.grey import check_model_channels
from robaudit.errors import UserError

__all__ = ["BoundaryModel", "CHECKPOINT_WEIGHT_KEYS", "ExportedModule", "FORMATS", "FixedBatchModule",
           "LoadedModel", "PROBE_TEXT", "SelectOutput", "WEIGHT_FORMATS", "WRAPPER_PREFIXES", "load_model",
           "save_export", "sha256_file"]

# The built-in formats, in detection order (audit/models/formats.py; formats registered later
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
    # How arch was chosen when no --arch was given (audit/models/arch_inference.py): {"how",
    # "candidates", "probe"?}; -> results.json model.arch_inferred. None: given or not needed.
    arch_inferred: Optional[dict] = None


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
    # A slice of a big tensor would save its whole storage as the program's sample input.
    example_input = example_input.detach().clone().contiguous()
    with eval_mode(module):
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


def load_model(path, *, format="auto", arch=None, num_classes=None, trust_pickle=False,
               mean=None, std=None, device="cpu", input_shape=(3, 32, 32), input_layout="auto",
               input_range="0-1", output="auto", output_name=None, class_map=None,
               class_names=None, dataset_classes=None, probe_data=None, dataset=None,
               zoo_dir=None) -> LoadedModel:
    """Load the model at `path` and adapt it to NCHW [0, 1] in, logits in dataset class order out.

    input_shape is the dataset's (C, H, W). input_layout auto|nchw|nhwc, input_range 0-1|0-255,
    output auto|logits|probs|log-probs and output_name adapt the boundary (audit/models/adapters.py).
    class_map (a JSON file path, a list or a dict: model index -> dataset class index or name)
    reorders the outputs; class_names (a file path or a list) renames the dataset's classes
    (returned as LoadedModel.class_names). dataset_classes are the dataset's class names
    (they also set num_classes when that is not given). Every adaptation is recorded in
    LoadedModel.adaptations (docs/results-schema.md, model.adaptations).

    A weights-only file without `arch` is loaded into the registered architecture its keys
    and shapes fit (audit/models/arch_inference.py; LoadedModel.arch_inferred says how). probe_data
    = (x, y), a small batch of the audited data (NCHW in [0, 1], labels), lets it tell apart
    forms with the same keys but different forwards by clean accuracy; without it they are
    refused.

    `path` may also name a zoo model (audit/models/zoo.py): `robustbench:[THREAT/]NAME` (for the
    dataset named `dataset`; cached under `zoo_dir`), or a timm Hugging Face folder; `arch`
    may be `timm:NAME`. What the zoo did is recorded in adaptations["zoo"].
    """
    path = os.fspath(path)
    input_shape = tuple(int(d) for d in input_shape)
    source = zoo.model_source(path, arch=arch, format=format, dataset=dataset, zoo_dir=zoo_dir)
    if source is None:
        _check_file(path)
    if format != "auto" and format not in formats.format_names():
        raise UserError(f"unknown model format {format!r}; choose auto or one of: "
                        f"{', '.join(formats.format_names())}")
    arch_note = None
    if source is not None and source.arch is not None:
        arch = source.arch  # timm:NAME, checked (from --arch or the folder's config.json)
    elif arch is not None:
        arch, arch_note = resolve_architecture(arch)
    device = str(resolve_device(device))
    # Files the user names are read before the model, so a typo fails fast.
    request = adapters.resolve_request(
        input_shape=input_shape, device=device, mean=mean, std=std, input_layout=input_layout,
        input_range=input_range, output=output, output_name=output_name, num_classes=num_classes,
        class_map=class_map, class_names=class_names, dataset_classes=dataset_classes)

    if source is not None:
        path = source.prepare(request)  # checks the flags against the zoo, then fetches
        _check_file(path)
    reader = source.reader if source is not None else None
    reader = reader or formats.pick_format(path, format)
    scorer = None if probe_data is None else _probe_scorer(probe_data, request, path)
    module, info = reader.read(path, ReadOptions(arch=arch, num_classes=request.num_classes,
                                                 trust_pickle=trust_pickle, device=device,
                                                 score_candidate=scorer))
    if source is not None:
        source.finish(info)
    notes = ([f"--arch {arch} ignored: {path} contains the whole model, not just weights"]
             if arch is not None and info.arch is None else [])
    if arch_note is not None and info.arch is not None:
        notes.append(arch_note)  # e.g. mobilenet_v2 -> mobilenetv2 (the CIFAR form)
    request = with_file_normalization(request, info, path)
    num_params = info.num_params
    if num_params is None:
        num_params = sum(p.numel() for p in module.parameters())
    module = module if info.on_device else module.to(device)
    module.eval()
    if input_layout != "nhwc":   # grey data and RGB models meet here (audit/data/grey.py)
        check_model_channels(module, input_shape[0], path)
    built = adapters.build_boundary(module, info, request, notes)
    if source is not None:
        built.adaptations["zoo"] = source.record
    return LoadedModel(module=built.module, format=info.format, path=path, sha256=sha256_file(path),
                       num_params=int(num_params), arch=info.arch, white_box=info.white_box,
                       adaptations=built.adaptations, refusal=info.refusal,
                       num_classes=built.num_classes, class_names=request.names,
                       arch_inferred=info.arch_inferred)


def with_file_normalization(request: adapters.BoundaryRequest, info: adapters.ModelInfo,
                            path: str) -> adapters.BoundaryRequest:
    """The request with the normalisation the file carries (mu/sigma buffers, or a timm
    pretrained_cfg: its "source"), checked against --mean/--std: equal ones are applied
    once, different ones are refused."""
    file_norm = info.input_normalization
    if file_norm is None:
        return request
    source = file_norm.get("source") or FILE_NORMALIZATION_SOURCE
    where = f"{path}'s mu/sigma buffers" if source == FILE_NORMALIZATION_SOURCE else source
    mean, std = list(file_norm["mean"]), list(file_norm["std"])
    channels = request.input_shape[0]
    if len(mean) not in (1, channels):
        raise UserError(f"{where} hold {len(mean)} values but the dataset's images have {channels} channels")
    if not all(math.isfinite(v) for v in mean + std) or any(v <= 0 for v in std):
        raise UserError(f"{where} are not a usable normalisation (the std must be positive and finite)")
    mean, std = (v * channels if len(v) == 1 else v for v in (mean, std))
    if request.mean is not None:
        if not (_close(request.mean, mean) and _close(request.std, std)):
            raise UserError(f"--mean/--std ({request.mean}, {request.std}) disagree with the normalisation in "
                            f"{where} (mean {_rounded(mean)}, std {_rounded(std)}); "
                            f"drop --mean/--std to use the file's")
        info.notes.append(f"--mean/--std equal {source}; normalised once")
    return replace(request, mean=mean, std=std, mean_source=source)


def _close(given: List[float], stored: List[float]) -> bool:
    # Constants are typed to about 4 decimals (0.4914) and stored in float32.
    return len(given) == len(stored) and all(math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-4)
                                             for a, b in zip(given, stored))


def _rounded(values: List[float]) -> List[float]:
    return [round(v, 4) for v in values]


def _probe_scorer(probe_data, request: adapters.BoundaryRequest, path: str):
    """Scores a candidate architecture (module with the file's weights, its ModelInfo):
    which probe images it classifies correctly through the boundary it would be audited
    with (the file's normalisation, --mean/--std, --input-range, --class-map, ...)."""
    x, y = _check_probe(probe_data, request.input_shape)

    def score(module: nn.Module, info: adapters.ModelInfo) -> torch.Tensor:
        candidate_request = with_file_normalization(request, replace(info, notes=[]), path)
        built = adapters.build_boundary(module.to(request.device).eval(), info, candidate_request)
        predictions = []
        with torch.no_grad():
            for start in range(0, len(x), 64):
                batch = x[start:start + 64].to(request.device)
                predictions.append(built.module(batch).argmax(dim=1).cpu())
        return torch.cat(predictions) == y

    return score


def _check_probe(probe_data, input_shape: Tuple[int, ...]) -> Tuple[torch.Tensor, torch.Tensor]:
    try:
        x, y = probe_data
    except (TypeError, ValueError):
        raise ValueError("probe_data must be a pair (x, y)") from None
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y).long().reshape(-1)
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(input_shape) or len(x) != len(y) or len(y) == 0:
        raise ValueError(f"probe_data must be images [N, {', '.join(map(str, input_shape))}] with N labels, "
                         f"got {list(x.shape)} and {list(y.shape)}")
    return x, y


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise UserError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory; pass the model file")
    if not os.access(path, os.R_OK):
        raise UserError(f"model file {path} is not readable (permissions)")
    if os.path.getsize(path) == 0:
        raise UserError(f"model file {path} is empty")
