"""The model boundary: robaudit's attack space on one side, the model as it arrived on the other.

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

Every step is differentiable, so white-box attacks see the gradient of the model as
deployed. Step 6 makes a softmax model attackable: cross-entropy over softmax(p) would
saturate and mask gradients, while cross-entropy over log p equals the model's own
cross-entropy (log p differs from the logits by a per-row constant). FLOOR is float32's
smallest normal number (1.18e-38): probabilities that underflowed to 0 become
log(FLOOR) = -87.3 instead of -inf, with zero gradient (they carried none anyway).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from robaudit.errors import UserError

LAYOUTS = ("auto", "nchw", "nhwc")
INPUT_RANGES: Dict[str, float] = {"0-1": 1.0, "0-255": 255.0}
OUTPUT_KINDS = ("auto", "logits", "probs", "log-probs")
PROB_FLOOR = float(torch.finfo(torch.float32).tiny)   # 1.1755e-38; log -> -87.34
# Row-sum tolerance for "these outputs are probabilities" (float32 softmax sums to 1
# within ~1e-6; float16 within ~1e-3).
PROB_SUM_TOL = {torch.float32: 1e-3, torch.float64: 1e-3}
PROB_SUM_TOL_LOW_PRECISION = 1e-2


# --- modules -----------------------------------------------------------------------------

def _cat_outputs(outputs: List[Any]) -> Any:
    """Concatenate per-chunk outputs along the batch: tensors, tuples/lists or dicts of them."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, (tuple, list)):
        return type(first)(_cat_outputs([o[i] for o in outputs]) for i in range(len(first)))
    if isinstance(first, Mapping):
        return {k: _cat_outputs([o[k] for o in outputs]) for k in first}
    return first


def _take_rows(output: Any, n: int) -> Any:
    if isinstance(output, torch.Tensor):
        return output[:n] if output.ndim else output
    if isinstance(output, (tuple, list)):
        return type(output)(_take_rows(o, n) for o in output)
    if isinstance(output, Mapping):
        return {k: _take_rows(v, n) for k, v in output.items()}
    return output


class FixedBatchModule(nn.Module):
    """Runs a module that only accepts batch size `batch_size` on any batch, in chunks.

    The last chunk is zero-padded and the padding rows dropped. Differentiable: the
    chunks are concatenated with torch ops. Tuple/list/dict outputs are concatenated
    element by element.
    """

    def __init__(self, module: nn.Module, batch_size: int):
        super().__init__()
        self.module = module
        self.batch_size = int(batch_size)

    def forward(self, x: torch.Tensor) -> Any:
        outputs = []
        for part in torch.split(x, self.batch_size):
            short = self.batch_size - len(part)
            if short:
                part = torch.cat([part, part.new_zeros((short,) + tuple(part.shape[1:]))])
            outputs.append(_take_rows(self.module(part), self.batch_size - short))
        return _cat_outputs(outputs)


class SelectOutput(nn.Module):
    """Picks one output (tuple index or dict key) of a module that returns several."""

    def __init__(self, module: nn.Module, key: Any):
        super().__init__()
        self.module = module
        self.key = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)[self.key]


class BoundaryModel(nn.Module):
    """NCHW [0, 1] images in, logits in dataset class order out (see the module docstring)."""

    def __init__(self, model: nn.Module, *, scale: float = 1.0, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, layout: str = "nchw", output_kind: str = "logits",
                 column_order: Optional[Sequence[int]] = None):
        super().__init__()
        self.model = model
        self.scale = float(scale)
        as_buffer = (lambda v: None if v is None else
                     torch.tensor(list(v), dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("mean", as_buffer(mean))
        self.register_buffer("std", as_buffer(std))
        self.register_buffer("column_order", None)
        self.layout = layout
        self.output_kind = output_kind
        self.set_column_order(column_order)

    def set_column_order(self, column_order: Optional[Sequence[int]]) -> None:
        """Output column k becomes the model's column column_order[k] (None: as given)."""
        self.column_order = (None if column_order is None
                             else torch.tensor(list(column_order), dtype=torch.long))

    def is_identity(self) -> bool:
        return (self.scale == 1.0 and self.mean is None and self.layout == "nchw"
                and self.output_kind != "probs" and self.column_order is None)

    def adapt_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            x = x * self.scale
        if self.mean is not None:
            x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        if self.layout == "nhwc":
            x = x.permute(0, 2, 3, 1).contiguous()  # as a channels-last model receives its input
        return x

    def adapt_output(self, out: torch.Tensor) -> torch.Tensor:
        if self.output_kind == "probs":
            out = torch.log(out.float().clamp_min(PROB_FLOOR))
        if self.column_order is not None:
            out = out.index_select(1, self.column_order.to(out.device))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapt_output(self.model(self.adapt_input(x)))


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


# --- class names and class maps ----------------------------------------------------------

def _read_text(path: str, flag: str) -> str:
    try:
        with open(os.fspath(path), encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        raise UserError(f"{flag} file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {flag} {path}: {getattr(err, 'strerror', None) or err}") from None


def read_class_names(path: str, dataset_classes: Sequence[str]) -> List[str]:
    """Names from FILE (one per line, or a JSON list), in dataset label order."""
    text = _read_text(path, "--class-names")
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"--class-names {path} is not valid JSON ({err.msg}, line {err.lineno}); "
                            f"give a JSON list of names or one name per line") from None
        if not isinstance(names, list) or not all(isinstance(n, (str, int)) for n in names):
            raise UserError(f"--class-names {path} must be a JSON list of names (strings)")
        names = [str(n).strip() for n in names]
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    count = len(dataset_classes)
    if len(names) != count:
        raise UserError(f"--class-names {path} lists {len(names)} names but the dataset has {count} "
                        f"classes; give one name per class, in dataset label order (0..{count - 1})")
    if any(not n for n in names):
        raise UserError(f"--class-names {path} contains an empty name")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"--class-names {path} names {duplicates[0]!r} more than once; names must differ")
    if sorted(names) == sorted(dataset_classes) and list(names) != list(dataset_classes):
        raise UserError(f"--class-names {path} lists the dataset's own class names in another order; "
                        f"--class-names renames the dataset's classes in label order. If the model "
                        f"orders its outputs differently, pass --class-map FILE (model index -> "
                        f"dataset class) instead")
    return names


def _class_index(value: Any, names: Sequence[str], alt_names: Sequence[str], where: str) -> int:
    count = len(names)
    if isinstance(value, bool):
        value = None
    if isinstance(value, int):
        if 0 <= value < count:
            return value
        raise UserError(f"--class-map {where} maps to class index {value}, outside 0..{count - 1}")
    if isinstance(value, str):
        for table in (names, alt_names):
            if value in table:
                return list(table).index(value)
        if value.strip().lstrip("-").isdigit():
            return _class_index(int(value), names, alt_names, where)
    shown = ", ".join(list(names)[:5]) + (", ..." if count > 5 else "")
    raise UserError(f"--class-map {where} maps to {value!r}, which is neither a dataset class index "
                    f"0..{count - 1} nor a class name ({shown})")


def resolve_class_map(spec: Any, dataset_classes: Sequence[str],
                      alt_names: Sequence[str] = (), source: str = "--class-map") -> List[int]:
    """model index -> dataset class index, checked to be a permutation of the dataset's classes.

    spec: a path to a JSON file, or its content: a list (position = model index) or a dict
    {"model index": dataset class}, with dataset classes as indices or names.
    """
    count = len(dataset_classes)
    if isinstance(spec, (str, os.PathLike)):
        source = os.fspath(spec)
        text = _read_text(source, "--class-map")
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"--class-map {source} is not valid JSON ({err.msg}, line {err.lineno}); "
                            f"give a JSON list of {count} dataset classes in model output order, "
                            f"or a JSON object {{\"model index\": dataset class}}") from None
    what = (f"pass a JSON list of the {count} dataset classes (indices or names) in model output "
            f"order, or an object mapping each model index 0..{count - 1} to a different dataset class")
    if isinstance(spec, Mapping):
        entries = []
        for key, value in spec.items():
            try:
                index = int(key)
            except (TypeError, ValueError):
                raise UserError(f"--class-map {source}: key {key!r} is not a model output index; {what}") from None
            entries.append((index, value))
    elif isinstance(spec, (list, tuple)):
        entries = list(enumerate(spec))
    else:
        raise UserError(f"--class-map {source} holds a {type(spec).__name__}; {what}")
    indices = sorted(i for i, _ in entries)
    if indices != list(range(count)):
        missing = sorted(set(range(count)) - set(indices))
        extra = sorted(set(indices) - set(range(count)))
        detail = (f"model indices {missing[:5]} are missing" if missing
                  else f"model indices {extra[:5]} are outside 0..{count - 1}" if extra
                  else "a model index appears twice")
        raise UserError(f"--class-map {source} is not a permutation of the dataset's {count} classes: "
                        f"{detail}; {what}")
    mapping = [0] * count
    targets: Dict[int, int] = {}
    for model_index, value in entries:
        k = _class_index(value, dataset_classes, alt_names, f"model index {model_index}")
        if k in targets:
            raise UserError(f"--class-map {source} is not a permutation: model indices {targets[k]} and "
                            f"{model_index} both map to dataset class {dataset_classes[k]!r}; {what}")
        targets[k] = model_index
        mapping[model_index] = k
    return mapping


def column_order(model_to_dataset: Sequence[int]) -> List[int]:
    """Indices that reorder model output columns so that column k is dataset class k."""
    order = [0] * len(model_to_dataset)
    for model_index, k in enumerate(model_to_dataset):
        order[k] = model_index
    return order
