"""The model boundary: robaudit's attack space on one side, the model as it arrived on the other.

`build_boundary(module, info, request)` is the one place the boundary is decided and
built, for every format (audit/models/formats.py): a format's reader returns the model as it
arrived and a `ModelInfo`; the user's flags arrive as a `BoundaryRequest`
(`resolve_request`).

robaudit always attacks images in NCHW layout with values in [0, 1] and an eps in [0, 1]
units, and always attacks logits. Models arrive otherwise: NHWC (TensorFlow/Keras
exports), pixel values in 0..255, a fixed batch size, a final softmax, several outputs,
another class order. `BoundaryModel` adapts each of those at the model boundary, in this
order (the order `adaptations["pipeline"]` lists for each audit):

    x: NCHW, [0, 1]                     robaudit's attack space (eps in [0, 1] units)
    1. x * 255                          --input-range 0-255 (eps in the model's units = eps * 255)
    2. (x - mean) / std                 --mean/--std, in the model's units (so after step 1)
    3. NCHW -> NHWC                     --input-layout nhwc (or auto-detected)
    4. the model                        fed in chunks of its batch size if that is fixed
    5. one output of several            --output-name
    6. log(max(p, FLOOR))               --output probs (or auto-detected probabilities)
    7. columns reordered                --class-map: column k = dataset class k

A model that normalises its own input (RobustBench's DM models) gets no step 2: equal
--mean/--std are applied once, inside the model, with a note; different ones are refused
(`check_own_normalization`), since applying both would normalise twice.

Every step is differentiable, so white-box attacks see the gradient of the model as
deployed. Step 6 makes a softmax model attackable: cross-entropy over softmax(p) would
saturate and mask gradients, while cross-entropy over log p equals the model's own
cross-entropy (log p differs from the logits by a per-row constant). FLOOR is float32's
smallest normal number (1.18e-38): probabilities that underflowed to 0 become
log(FLOOR) = -87.3 instead of -inf, with zero gradient (they carried none anyway).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from robaudit.audit.models.adaptations import describe
from robaudit.audit.models.boundary_types import BoundaryRequest, DeferredModel, ModelInfo  # noqa: F401 (re-exported)
from robaudit.audit.models.boundary_modules import PROB_FLOOR, BoundaryModel, FixedBatchModule, SelectOutput
from robaudit.audit.data.class_maps import column_order, read_class_names, resolve_class_map
from robaudit.errors import UserError

# Re-exported: the boundary's modules and class-map helpers live in their own modules.
__all__ = ["PROB_FLOOR", "BoundaryModel", "FixedBatchModule", "SelectOutput", "column_order",
           "read_class_names", "resolve_class_map"]

LAYOUTS = ("auto", "nchw", "nhwc")
INPUT_RANGES: Dict[str, float] = {"0-1": 1.0, "0-255": 255.0}
OUTPUT_KINDS = ("auto", "logits", "probs", "log-probs")
# Row-sum tolerance for "these outputs are probabilities" (float32 softmax sums to 1
# within ~1e-6; float16 within ~1e-3).
PROB_SUM_TOL = {torch.float32: 1e-3, torch.float64: 1e-3}
PROB_SUM_TOL_LOW_PRECISION = 1e-2
PROBE_TEXT = "a probe batch of 4 uniform-random images"
# Spatial sizes tried when the model rejects the requested input shape, to tell the user
# what it seems to need; probing stops after this many seconds.
PROBE_SIZES = (32, 28, 64, 96, 224, 299)
PROBE_BUDGET_S = 10.0


def first_line(err: BaseException) -> str:
    """The line of an exception's message worth showing (at most 200 characters)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    # TorchScript puts a generic header first and the actual error last.
    return (lines[-1] if "TorchScript interpreter" in lines[0] else lines[0])[:200]


# --- input layout --------------------------------------------------------------------------

def shape_text(shape: Sequence[Any]) -> str:
    return "[" + ", ".join("?" if d in (None, "") else str(d) for d in shape) + "]"


def _known(d: Any) -> Optional[int]:
    return d if isinstance(d, int) and not isinstance(d, bool) and d > 0 else None


def native_shape(input_shape: Sequence[int], layout: str) -> Tuple[int, ...]:
    """The dataset's (C, H, W) in the model's layout."""
    c, h, w = input_shape
    return (h, w, c) if layout == "nhwc" else (c, h, w)


def decide_layout(requested: str, declared: Optional[Sequence[Any]],
                  input_shape: Sequence[int]) -> Tuple[str, str]:
    """(layout "nchw"/"nhwc", why) from --input-layout and the model's declared input shape.

    auto: channels last (the dataset's channel count) with the dataset's spatial size, or
    with unknown spatial dims while the second dim is not the channel count -> NHWC;
    channels second -> NCHW; nothing declared or nothing to tell -> NCHW (PyTorch's).
    """
    if requested not in LAYOUTS:
        raise UserError(f"unknown --input-layout {requested!r}; choose one of {', '.join(LAYOUTS)}")
    if requested != "auto":
        return requested, f"--input-layout {requested}"
    c, h, w = (int(d) for d in input_shape)
    if declared is None:
        return "nchw", "the model declares no input shape; NCHW assumed (PyTorch's layout)"
    text = shape_text(declared)
    if len(declared) != 4:
        return "nchw", f"declared input {text} is not 4-D; NCHW assumed"
    d1, d2, d3 = (_known(d) for d in declared[1:])
    if d3 == c and d1 == h and d2 == w and not (d1 == c and d2 == h and d3 == w):
        return "nhwc", f"declared input {text}: channels last, {h}x{w} like the dataset"
    if d1 == c and (d2 in (None, h)) and (d3 in (None, w)):
        return "nchw", f"declared input {text}: channels first"
    if d3 == c and d1 is None and d2 is None:
        return "nhwc", f"declared input {text}: channels last ({c}), spatial size dynamic"
    return "nchw", (f"declared input {text} matches neither NCHW nor NHWC for the dataset's "
                    f"{c}x{h}x{w} images; NCHW assumed (pass --input-layout nhwc if the model "
                    f"takes channels last)")


def range_scale(input_range: str) -> float:
    if input_range not in INPUT_RANGES:
        raise UserError(f"unknown --input-range {input_range!r}; choose one of {', '.join(INPUT_RANGES)}")
    return INPUT_RANGES[input_range]


# --- outputs -------------------------------------------------------------------------------

def describe_outputs(out: Any) -> List[Tuple[Any, Any]]:
    """[(key, value)] for a model's raw output: one tensor -> [(None, tensor)]."""
    if isinstance(out, (tuple, list)):
        return list(enumerate(out))
    if isinstance(out, Mapping):
        return list(out.items())
    return [(None, out)]


def _is_scores(value: Any, batch: int) -> bool:
    return (isinstance(value, torch.Tensor) and value.ndim == 2 and value.shape[0] == batch
            and value.is_floating_point())


def _value_text(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{list(value.shape)} {str(value.dtype).replace('torch.', '')}"
    return type(value).__name__


def choose_output(out: Any, output_name: Optional[str], batch: int,
                  num_classes: Optional[int] = None) -> Tuple[Any, List[str], str]:
    """(key, names of all outputs, why) for a model's raw output.

    key is None for a single tensor (no names). Without --output-name: the only output, or
    the first float [B, C] tensor with C = num_classes (when known), else the first float
    [B, C] tensor.
    """
    items = describe_outputs(out)
    names = [str(k) for k, _ in items]
    listing = ", ".join(f"{k} {_value_text(v)}" for k, v in items)
    if len(items) == 1 and items[0][0] is None:
        if output_name is not None:
            return None, [], f"--output-name {output_name} ignored: the model has one unnamed output"
        return None, [], "the model's only output"
    if len(items) == 1 and output_name is None:
        return items[0][0], names, "the model's only output"
    if output_name is not None:
        for key, _ in items:
            if str(key) == str(output_name):
                return key, names, f"--output-name {output_name}"
        raise UserError(f"--output-name {output_name!r} is not one of the model's outputs: {listing}")
    scores = [(key, value) for key, value in items if _is_scores(value, batch)]
    fitting = [key for key, value in scores if num_classes is None or value.shape[1] == num_classes]
    if fitting or scores:
        key = (fitting or [k for k, _ in scores])[0]
        what = f"[B, {num_classes}]" if fitting and num_classes is not None else "[B, C]"
        return key, names, (f"first {what} float output of {len(items)} ({listing}); "
                            f"pass --output-name to choose another")
    raise UserError(f"none of the model's {len(items)} outputs is a [B, C] float tensor of class "
                    f"scores ({listing}); pass --output-name NAME, or export the logits")


def _stats(out: torch.Tensor) -> str:
    sums = out.sum(dim=1)
    return (f"values {float(out.min()):.3g} to {float(out.max()):.3g}, row sums "
            f"{float(sums.min()):.3g} to {float(sums.max()):.3g}")


def looks_like_probs(out: torch.Tensor) -> bool:
    tol = PROB_SUM_TOL.get(out.dtype, PROB_SUM_TOL_LOW_PRECISION)
    out = out.double()
    return bool(out.shape[1] > 1 and (out >= 0).all() and ((out.sum(dim=1) - 1).abs() <= tol).all())


def looks_like_log_probs(out: torch.Tensor) -> bool:
    tol = PROB_SUM_TOL.get(out.dtype, PROB_SUM_TOL_LOW_PRECISION)
    out = out.double()
    return bool(out.shape[1] > 1 and (out <= tol).all()
                and (torch.logsumexp(out, dim=1).abs() <= tol).all())


def check_output_kind(requested: str) -> str:
    if requested not in OUTPUT_KINDS:
        raise UserError(f"unknown --output {requested!r}; choose one of {', '.join(OUTPUT_KINDS)}")
    return requested


def decide_output_kind(requested: str, out: torch.Tensor, probe_text: str) -> Tuple[str, str, List[str]]:
    """(kind, why, notes) for the chosen output, from --output and its values on a probe batch."""
    check_output_kind(requested)
    out = out.detach()
    if not torch.isfinite(out).all():
        return ("logits" if requested == "auto" else requested), "not checked (non-finite outputs)", []
    probs, log_probs = looks_like_probs(out), looks_like_log_probs(out)
    notes: List[str] = []
    if requested == "auto":
        if probs:
            return "probs", f"non-negative rows summing to 1 on {probe_text}", notes
        if log_probs:
            return "log-probs", f"rows with logsumexp 0 on {probe_text}", notes
        if bool((out >= 0).all()) and bool((out <= 1).all()):
            notes.append(f"outputs lie in [0, 1] but rows do not sum to 1 on {probe_text} "
                         f"(sigmoid scores?); attacked as logits, whose gradients may saturate")
        return "logits", f"not probabilities or log-probabilities on {probe_text} ({_stats(out)})", notes
    if requested == "probs" and not probs:
        raise UserError(f"--output probs, but the model's outputs are not probabilities on {probe_text} "
                        f"({_stats(out)}); pass --output logits"
                        + (" or --output log-probs" if log_probs else "") + ", or --output auto")
    if requested == "log-probs" and not log_probs:
        raise UserError(f"--output log-probs, but the model's outputs are not log-probabilities on "
                        f"{probe_text} ({_stats(out)}); pass --output "
                        + ("probs" if probs else "logits") + ", or --output auto")
    if requested == "logits" and probs:
        notes.append("--output logits, but the outputs look like probabilities (rows sum to 1); "
                     "attacked as given: cross-entropy over softmax(probabilities) masks gradients")
    return requested, f"--output {requested}", notes


# --- what the user asked for -----------------------------------------------------------

def check_mean_std(mean, std, channels: int) -> Tuple[List[float], List[float]]:
    if (mean is None) != (std is None):
        raise UserError("pass both --mean and --std (or neither)")
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    for name, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, channels):
            raise UserError(f"--{name} needs 1 or {channels} values (one per input channel), got {len(values)}")
        if not all(math.isfinite(v) for v in values):
            raise UserError(f"--{name} values must be finite numbers")
    if any(v <= 0 for v in std):
        raise UserError("--std values must be positive")
    if len(mean) != len(std):
        mean = mean * channels if len(mean) == 1 else mean
        std = std * channels if len(std) == 1 else std
    return mean, std


def resolve_request(*, input_shape=(3, 32, 32), device="cpu", mean=None, std=None, input_layout="auto",
                    input_range="0-1", output="auto", output_name=None, num_classes=None,
                    class_map=None, class_names=None, dataset_classes=None) -> BoundaryRequest:
    """Check load_model's boundary arguments and read the files they name (so a typo
    fails before the model is read)."""
    input_shape = tuple(int(d) for d in input_shape)
    if mean is not None or std is not None:
        mean, std = check_mean_std(mean, std, input_shape[0])
    scale = range_scale(input_range)
    decide_layout(input_layout, None, input_shape)  # validates the choice early
    check_output_kind(output)
    if dataset_classes is not None:
        dataset_classes = [str(c) for c in dataset_classes]
        if num_classes is None:
            num_classes = len(dataset_classes)
        elif num_classes != len(dataset_classes):
            raise UserError(f"num_classes {num_classes} does not match the dataset's {len(dataset_classes)} classes")
    request = BoundaryRequest(input_shape=input_shape, device=device, input_layout=input_layout,
                              input_range=input_range, scale=scale, mean=mean, std=std, output=output,
                              output_name=output_name, num_classes=num_classes,
                              dataset_classes=dataset_classes)
    _resolve_classes(request, class_names, class_map)
    return request


def _resolve_classes(request: BoundaryRequest, class_names, class_map) -> None:
    dataset_classes = request.dataset_classes
    if class_names is not None:
        if dataset_classes is None:
            raise UserError("--class-names needs the dataset's classes to check the count against")
        if isinstance(class_names, (str, os.PathLike)):
            request.names_source = os.fspath(class_names)
            request.names = read_class_names(request.names_source, dataset_classes)
        else:
            request.names = [str(n) for n in class_names]
            if len(request.names) != len(dataset_classes):
                raise UserError(f"{len(request.names)} class names given but the dataset has "
                                f"{len(dataset_classes)} classes")
    if class_map is not None:
        if request.num_classes is None:
            raise UserError("--class-map needs the dataset's classes to map the model's outputs to")
        target_names = request.names or dataset_classes or [str(k) for k in range(request.num_classes)]
        request.map_source = os.fspath(class_map) if isinstance(class_map, (str, os.PathLike)) else None
        request.mapping = resolve_class_map(class_map, target_names, alt_names=dataset_classes or ())


# --- the builder -----------------------------------------------------------------------

@dataclass
class Boundary:
    module: nn.Module              # NCHW [0, 1] in -> logits in dataset class order out; eval mode
    native: nn.Module              # what the boundary feeds: the model's layout and units, one output
    num_classes: int
    layout: str
    layout_reason: str
    output_name: Optional[str]
    output_names: List[str]
    output_reason: str
    adaptations: Dict[str, Any]    # -> LoadedModel.adaptations (docs/results-schema.md)


def build_boundary(module: nn.Module, info: ModelInfo, request: BoundaryRequest,
                   notes: Sequence[str] = ()) -> Boundary:
    """Adapt `module` (in eval mode, on the device) to NCHW [0, 1] in, logits in dataset
    class order out, checking it on an all-zero batch and on a probe batch; every problem
    ends in a one-line UserError. `notes` (the caller's) are recorded after the format's."""
    request, own_notes = check_own_normalization(module, info, request)
    boundary, layout_reason, chosen = start_boundary(module, info, request)
    all_notes = list(info.notes) + list(notes) + own_notes
    out, layout_reason = _first_forward(boundary, info, request, layout_reason)
    if chosen is None:
        key, names, reason = choose_output(out, request.output_name, 2, request.num_classes)
        if key is not None:
            boundary.model = SelectOutput(boundary.model, key)
            out = out[key]
        chosen = (None if key is None else str(key), names, reason)
    classes = _check_scores(out, 2, request.num_classes, request.mapping is not None)
    native = boundary.model
    output_kind, kind_reason = _output_side(boundary, request, classes, all_notes)

    adaptations: Dict[str, Any] = {"normalize": None, "onnx": info.onnx, "notes": all_notes}
    adaptations.update(describe(request, info, boundary.layout, layout_reason, chosen,
                                output_kind, kind_reason))
    if request.mean is not None:
        adaptations["normalize"] = {"mean": request.mean, "std": request.std}
        if request.mean_source != "--mean/--std":
            adaptations["normalize"]["source"] = request.mean_source
        if request.scale != 1.0 and max(request.mean) <= 1.0 and max(request.std) <= 1.0:
            all_notes.append(f"--mean/--std are applied after scaling inputs to {request.input_range} "
                             f"(the model's units); values <= 1 look like [0, 1]-unit statistics")
    final = boundary.model if boundary.is_identity() else boundary
    final.eval()
    return Boundary(module=final, native=native, num_classes=classes, layout=boundary.layout,
                    layout_reason=layout_reason, output_name=chosen[0], output_names=chosen[1],
                    output_reason=chosen[2], adaptations=adaptations)


def _per_channel(values: Sequence[float], channels: int) -> List[float]:
    values = [float(v) for v in values]
    return values * channels if len(values) == 1 else values


def _same_constants(given: Sequence[float], own: Sequence[float]) -> bool:
    # Normalisation constants are typed with about 4 decimals (0.4914) and stored in float32.
    return len(given) == len(own) and all(math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-4)
                                          for a, b in zip(given, own))


def _constants_text(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{float(v):.4g}" for v in values) + "]"


def check_own_normalization(module: nn.Module, info: ModelInfo, request: BoundaryRequest
                            ) -> Tuple[BoundaryRequest, List[str]]:
    """(request, notes) for a model that normalises its own input (RobustBench's DM models:
    `module.input_normalization`, audit/models/architectures_dm.py).

    Normalising at the boundary as well would normalise twice, and the model would still run
    with plausible-looking, wrong logits. So --mean/--std (or the file's mu/sigma) that differ
    from the model's own constants are refused; equal ones are dropped from the boundary
    (applied once, inside the model) with a note. Models that do not normalise themselves
    come back unchanged.
    """
    own = getattr(module, "input_normalization", None)
    if request.mean is None or not isinstance(own, Mapping):
        return request, []
    own_mean, own_std = [float(v) for v in own["mean"]], [float(v) for v in own["std"]]
    channels = len(own_mean)
    given_mean, given_std = _per_channel(request.mean, channels), _per_channel(request.std, channels)
    what = f"mean {_constants_text(own_mean)}, std {_constants_text(own_std)}"
    who = f"the weights ({info.arch}) normalise their input themselves" if info.arch \
        else "the model normalises its input itself"
    if not (_same_constants(given_mean, own_mean) and _same_constants(given_std, own_std)):
        fix = "drop --mean/--std" if request.mean_source == "--mean/--std" else "remove one of them"
        raise UserError(f"{who} ({what}); {request.mean_source} (mean {_constants_text(given_mean)}, std "
                        f"{_constants_text(given_std)}) would normalise it a second time: {fix}")
    note = (f"{request.mean_source} equal the model's own input normalisation ({what}); applied once, "
            f"inside the model (not again at the boundary)")
    return replace(request, mean=None, std=None, mean_source="--mean/--std"), [note]


def start_boundary(module: nn.Module, info: ModelInfo, request: BoundaryRequest
                   ) -> Tuple[BoundaryModel, str, Optional[Tuple[Optional[str], List[str], str]]]:
    """The input side: (boundary, why its layout, output choice or None).

    Decides the layout from --input-layout and the declared input shape, and finishes a
    deferred model, whose output is chosen here (on the reader's probe); build_boundary
    goes on from there, and onnx_support.load_onnx stops here.
    """
    layout, layout_reason = decide_layout(request.input_layout, info.declared_input_shape,
                                          request.input_shape)
    boundary = BoundaryModel(module, scale=request.scale, mean=request.mean, std=request.std, layout=layout)
    if info.deferred is None:
        return boundary, layout_reason, None
    native = native_shape(request.input_shape, layout)
    outputs, batch = info.deferred.outputs(native, request.scale, layout, layout_reason)
    key, names, reason = choose_output(outputs, request.output_name, batch, request.num_classes)
    boundary.model = info.deferred.finish(key, names, outputs, info)
    return boundary, layout_reason, ((None if key is None else str(key)), names, reason)


def _first_forward(boundary: BoundaryModel, info: ModelInfo, request: BoundaryRequest,
                   layout_reason: str) -> Tuple[Any, str]:
    """The raw output on an all-zero batch; a torch model that declares no input shape and
    fails on NCHW input is tried on NHWC input."""
    declared, shape = info.declared_input_shape, request.input_shape
    try:
        return _zero_forward(boundary, shape, request.device, declared, layout_reason), layout_reason
    except UserError as nchw_error:
        if not (request.input_layout == "auto" and declared is None and info.deferred is None
                and native_shape(shape, "nhwc") != tuple(shape)):
            raise
        boundary.layout = "nhwc"
        try:
            out = _zero_forward(boundary, shape, request.device, declared, layout_reason)
        except UserError:
            raise nchw_error from None
        return out, "the model declares no input shape, fails on NCHW input and runs on NHWC input"


def _output_side(boundary: BoundaryModel, request: BoundaryRequest, classes: int,
                 notes: List[str]) -> Tuple[str, str]:
    """Output kind (from a probe batch) and class order; (kind, why)."""
    probe = torch.rand((4, *request.input_shape), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            scores = boundary(probe.to(request.device))
    except Exception as err:
        raise UserError(f"model forward failed on {PROBE_TEXT}: {type(err).__name__}: "
                        f"{first_line(err)[:160]}") from None
    output_kind, kind_reason, kind_notes = decide_output_kind(request.output, scores, PROBE_TEXT)
    notes.extend(kind_notes)
    boundary.output_kind = output_kind
    if request.mapping is not None:
        if len(request.mapping) != classes:
            raise UserError(f"--class-map maps {len(request.mapping)} model outputs but the model has {classes}")
        boundary.set_column_order(column_order(request.mapping))
    return output_kind, kind_reason


# --- checks ----------------------------------------------------------------------------

def _first_conv_channels(module: nn.Module) -> Optional[int]:
    try:
        for param in module.parameters():
            if param.ndim == 4:
                return int(param.shape[1])
    except Exception:
        pass
    return None


def _guess_input_shape(module: nn.Module, tried: Tuple[int, ...], device: str) -> Optional[Tuple[int, ...]]:
    channels = _first_conv_channels(module) or tried[0]
    deadline = time.monotonic() + PROBE_BUDGET_S
    for size in PROBE_SIZES:
        shape = (channels, size, size)
        if shape == tuple(tried):
            continue
        if time.monotonic() > deadline:
            break
        try:
            with torch.no_grad():
                out = module(torch.zeros((2, *shape), device=device))
            if isinstance(out, torch.Tensor) and out.ndim == 2:
                return shape
        except Exception:
            continue
    return None


def _zero_forward(boundary: BoundaryModel, input_shape: Tuple[int, ...], device: str,
                  declared: Optional[List[Any]], layout_reason: str) -> Any:
    """The model's raw output on an all-zero batch, or a UserError saying why it failed."""
    batch = 2
    fed = (batch, *native_shape(input_shape, boundary.layout))
    try:
        with torch.no_grad():
            return boundary.model(boundary.adapt_input(torch.zeros((batch, *input_shape), device=device)))
    except Exception as err:
        detail = f"({type(err).__name__}: {first_line(err)[:160]})"
        if declared:
            hint = f"; its input is declared as {shape_text(declared)} ({layout_reason})"
        else:
            guess = (_guess_input_shape(boundary.model, input_shape, device)
                     if boundary.layout == "nchw" else None)
            hint = (f"; it seems to need input shape {list(guess)}" if guess
                    else "; check the input shape it expects")
        if boundary.layout == "nhwc" or declared:
            hint += "; --input-layout nchw|nhwc sets the layout"
        raise UserError(f"model forward failed on a zero batch of shape {shape_text(fed)} "
                        f"({boundary.layout.upper()}){hint} {detail}") from None


def _check_scores(out: Any, batch: int, num_classes: Optional[int], class_map_given: bool) -> int:
    """C for a chosen output, or a UserError: robaudit needs a float [B, C] tensor."""
    if not isinstance(out, torch.Tensor):
        raise UserError(f"model returns {type(out).__name__}; robaudit needs a logits tensor [B, C]")
    if out.ndim != 2 or out.shape[0] != batch:
        raise UserError(f"model output has shape {list(out.shape)} for a batch of {batch}; "
                        f"expected logits [B, C]")
    if not out.is_floating_point():
        raise UserError(f"model output has dtype {str(out.dtype).replace('torch.', '')} (class labels?); "
                        f"robaudit needs float class scores [B, C] (logits or probabilities): "
                        f"pass --output-name to pick another output, or export the logits")
    classes = int(out.shape[1])
    if num_classes is not None and classes != num_classes:
        raise UserError(f"model outputs {classes} classes but dataset has {num_classes}"
                        + ("; --class-map must map every model output to a dataset class"
                           if class_map_given else ""))
    if not torch.isfinite(out).all():
        raise UserError("model produced NaN/inf logits on an all-zero input batch")
    return classes
