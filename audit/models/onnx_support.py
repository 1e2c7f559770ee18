"""ONNX models: onnxruntime for inference, onnx2torch for gradients, and a fidelity check.

Black-box attacks only need logits, which onnxruntime gives exactly as the model's
owner runs it. White-box attacks need gradients, so the graph is converted to torch
with onnx2torch and the conversion is trusted only if its logits match onnxruntime's
on a batch (and gradients reach the input). Otherwise the model is audited with
black-box attacks only, through `ort_runtime.OnnxRuntimeModule`, and the reason is recorded.

onnx2torch 1.5 stops at opset 17 for several ops that torch's exporters emit today
(Reduce* with `axes` as an input, Reshape with `allowzero=1`, Constant-19, ...), so this
module registers the missing converters at import time (`install_converters`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnx.external_data_helper
import torch
from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription, get_converter
from onnx2torch.utils.common import (OnnxMapping, OnnxToTorchModule, OperationConverterResult,
                                     get_const_value, onnx_mapping_from_node)
from torch import nn

from robaudit.audit.models import adapters
from robaudit.audit.models.adapters import FixedBatchModule
from robaudit.audit.models.ort_runtime import OnnxRuntimeModule  # noqa: F401 (also imported from here)
from robaudit.errors import UserError

# Logit agreement needed to trust the torch conversion, relative to the logit scale
# (max |logit|, at least 1): float32 kernels differ by ~1e-6 relative, a wrong
# conversion by orders of magnitude more.
FIDELITY_RTOL = 1e-4
FIDELITY_BATCH = 4

_ONNX_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
}


# --- extra onnx2torch converters -------------------------------------------------------

def _reduce_prod(x: torch.Tensor, dims: List[int], keepdim: bool) -> torch.Tensor:
    for d in reversed(dims):  # descending, so the remaining dims keep their index
        x = torch.prod(x, d, keepdim=keepdim)
    return x


# ONNX Reduce* op -> f(x, sorted non-negative dims, keepdim)
_REDUCERS: Dict[str, Callable[[torch.Tensor, List[int], bool], torch.Tensor]] = {
    "ReduceL1": lambda x, d, k: torch.sum(torch.abs(x), dim=d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.linalg.vector_norm(x, 2, dim=d, keepdim=k),
    "ReduceLogSum": lambda x, d, k: torch.log(torch.sum(x, dim=d, keepdim=k)),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
    "ReduceMax": lambda x, d, k: torch.amax(x, dim=d, keepdim=k),
    "ReduceMean": lambda x, d, k: torch.mean(x, dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: torch.amin(x, dim=d, keepdim=k),
    "ReduceProd": _reduce_prod,
    "ReduceSum": lambda x, d, k: torch.sum(x, dim=d, keepdim=k),
    "ReduceSumSquare": lambda x, d, k: torch.sum(x * x, dim=d, keepdim=k),
}


class OnnxReduce(nn.Module, OnnxToTorchModule):
    """Any ONNX Reduce* op, axes from the attribute (opset < 18) or the input (opset >= 18).

    Negative axes are normalised against the input rank before reducing (onnx2torch's
    own multi-axis ReduceMax/Min/Prod with keepdims=0 mis-indexes them).
    """

    def __init__(self, operation_type: str, axes: Optional[List[int]], keepdims: int = 1,
                 noop_with_empty_axes: int = 0):
        super().__init__()
        self.operation_type = operation_type
        self.axes = None if axes is None else [int(a) for a in axes]
        self.keepdims = bool(keepdims)
        self.noop_with_empty_axes = bool(noop_with_empty_axes)

    def forward(self, input_tensor: torch.Tensor, axes: Optional[torch.Tensor] = None) -> torch.Tensor:
        dims = self.axes if axes is None else [int(a) for a in axes.reshape(-1).tolist()]
        if not dims:
            if self.noop_with_empty_axes:
                return input_tensor
            dims = list(range(input_tensor.dim()))
        if input_tensor.dim() == 0:
            return input_tensor
        dims = sorted({d % input_tensor.dim() for d in dims})
        return _REDUCERS[self.operation_type](input_tensor, dims, self.keepdims)


class OnnxReshape(nn.Module, OnnxToTorchModule):
    """ONNX Reshape including `allowzero=1` (a 0 in the shape means an empty dimension)."""

    def __init__(self, allowzero: int = 0, constant_shape: Optional[List[int]] = None):
        super().__init__()
        self.allowzero = bool(allowzero)
        # The shape when the graph holds it as a constant: read once here, so a forward does not
        # read it back from the GPU (a host sync per Reshape per call).
        self.constant_shape = constant_shape

    def forward(self, input_tensor: torch.Tensor, shape: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.constant_shape is not None:
            target = list(self.constant_shape)
        else:
            target = [int(s) for s in shape.reshape(-1).tolist()]
        if not self.allowzero:
            target = [input_tensor.shape[i] if s == 0 else s for i, s in enumerate(target)]
        return torch.reshape(input_tensor, target)


class OnnxSplit18(nn.Module, OnnxToTorchModule):
    """ONNX Split-18: explicit `split` sizes, or `num_outputs` chunks of ceil(len / n)."""

    def __init__(self, axis: int, num_outputs: int):
        super().__init__()
        self.axis = axis
        self.num_outputs = num_outputs

    def forward(self, input_tensor: torch.Tensor, split: Optional[torch.Tensor] = None):
        if split is not None:
            return torch.split(input_tensor, [int(s) for s in split.tolist()], dim=self.axis)
        length = input_tensor.shape[self.axis]
        return torch.split(input_tensor, math.ceil(length / self.num_outputs), dim=self.axis)


def _constant_ints(name: str, graph) -> Optional[List[int]]:
    """The value of a constant integer tensor input, or None when it is computed at run time."""
    try:
        value = get_const_value(name, graph)
    except KeyError:
        return None
    return [int(v) for v in torch.as_tensor(value).reshape(-1).tolist()]


def _convert_reduce(node, graph):
    axes = node.attributes.get("axes")
    inputs: Tuple[str, ...] = (node.input_values[0],)
    if axes is None and len(node.input_values) > 1 and node.input_values[1]:
        axes = _constant_ints(node.input_values[1], graph)
        if axes is None:  # axes computed in the graph: the module reads them per call
            inputs = (node.input_values[0], node.input_values[1])
    module = OnnxReduce(node.operation_type, axes, node.attributes.get("keepdims", 1),
                        node.attributes.get("noop_with_empty_axes", 0))
    return OperationConverterResult(torch_module=module,
                                    onnx_mapping=OnnxMapping(inputs=inputs, outputs=node.output_values))


def _convert_reshape(node, graph):
    shape = _constant_ints(node.input_values[1], graph) if len(node.input_values) > 1 else None
    if shape is None:   # computed in the graph: the module reads it per call
        return OperationConverterResult(torch_module=OnnxReshape(node.attributes.get("allowzero", 0)),
                                        onnx_mapping=onnx_mapping_from_node(node))
    return OperationConverterResult(torch_module=OnnxReshape(node.attributes.get("allowzero", 0), shape),
                                    onnx_mapping=OnnxMapping(inputs=(node.input_values[0],),
                                                             outputs=node.output_values))


def _convert_split18(node, graph):
    del graph
    module = OnnxSplit18(node.attributes.get("axis", 0),
                         node.attributes.get("num_outputs", len(node.output_values)))
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


def _delegate_if(base_version: int, unsupported: Callable[[Any], Optional[str]]):
    """A converter that reuses onnx2torch's converter for `base_version` of the same op,
    unless `unsupported(node)` names a newer-opset feature it would silently ignore."""

    def converter(node, graph):
        reason = unsupported(node)
        if reason:
            raise NotImplementedError(f"{node.operation_type}: {reason} is not supported")
        return get_converter(node.operation_type, base_version, node.domain)(node, graph)

    return converter


def _average_pool_dilations(node) -> Optional[str]:
    dilations = node.attributes.get("dilations")
    return "dilations != 1" if dilations and any(d != 1 for d in dilations) else None


def _pad_axes_input(node) -> Optional[str]:
    return "the axes input" if len(node.input_values) > 3 and node.input_values[3] else None


def _nothing_unsupported(node) -> Optional[str]:
    return None


REDUCE_OPS = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
              "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSumSquare")

# Opset versions whose schema differs from the newest one onnx2torch converts only in
# the element types allowed (bfloat16, float8, int4, ...; checked against onnx.defs in
# tests/test_onnx.py), so onnx2torch's converter for the older version is exact for them.
TYPE_ONLY_VERSION_BUMPS: Dict[str, Tuple[int, Tuple[int, ...]]] = {
    "Acos": (7, (22,)), "Asin": (7, (22,)), "Atan": (7, (22,)), "Cos": (7, (22,)),
    "Sin": (7, (22,)), "Tan": (7, (22,)),
    "Constant": (13, (19, 21, 23, 24, 25)),
    "ConstantOfShape": (9, (20, 21, 23, 24, 25)),
    "Conv": (11, (22,)), "ConvTranspose": (11, (22,)),
    "Dropout": (13, (22,)), "Elu": (6, (22,)), "Equal": (13, (19,)), "EyeLike": (9, (22,)),
    "Flatten": (13, (21, 23, 24, 25)),
    "GlobalAveragePool": (1, (22,)), "GreaterOrEqual": (12, (16,)), "LessOrEqual": (12, (16,)),
    "HardSigmoid": (6, (22,)), "HardSwish": (14, (22,)),
    "Identity": (16, (19, 21, 23, 24, 25)),
    "InstanceNormalization": (6, (22,)), "IsInf": (10, (20,)), "IsNaN": (13, (20,)),
    "MaxPool": (12, (22,)), "Round": (11, (22,)), "Selu": (6, (22,)),
    "Shape": (15, (19, 21, 23, 24, 25)),
    "Softplus": (1, (22,)), "Softsign": (1, (22,)),
    "Squeeze": (21, (23, 24, 25)), "Transpose": (13, (21, 23, 24, 25)),
    "Unsqueeze": (13, (21, 23, 24, 25)),
}

_installed = False


def install_converters() -> None:
    """Register robaudit's extra onnx2torch converters (idempotent; runs at import)."""
    global _installed
    if _installed:
        return

    def put(op: str, version: int, converter, replace: bool = False) -> None:
        key = OperationDescription(domain="", operation_type=op, version=version)
        if replace or key not in _CONVERTER_REGISTRY:
            _CONVERTER_REGISTRY[key] = converter

    for op in REDUCE_OPS:
        # Replace the opset<18 ones too: same module, and it fixes negative multi-axis
        # ReduceMax/Min/Prod with keepdims=0.
        for version in (1, 11, 12, 13, 18, 20, 28):
            schema_exists = any(s.since_version == version for s in _schemas(op))
            if schema_exists:
                put(op, version, _convert_reduce, replace=True)
    # Reshape-14's onnx2torch converter refuses allowzero=1, which torch's dynamo exporter
    # always sets; 19+ differ from 14 only in element types.
    for version in (14, 19, 21, 23, 24, 25):
        put("Reshape", version, _convert_reshape, replace=True)
    put("Split", 18, _convert_split18)
    for op, (base, versions) in TYPE_ONLY_VERSION_BUMPS.items():
        for version in versions:
            put(op, version, _delegate_if(base, _nothing_unsupported))
    # Cast-19+ adds `saturate` / `round_mode`, which only act on float8/float4 targets;
    # onnx2torch's Cast refuses those targets, so delegating is exact for the rest.
    for version in (19, 21, 23, 24, 25):
        put("Cast", version, _delegate_if(13, _nothing_unsupported))
    for version in (19, 22):
        put("AveragePool", version, _delegate_if(11, _average_pool_dilations))
    # Pad-18 adds an optional `axes` input, 19 the "wrap" mode (which Pad-13's converter
    # refuses by name), 21+ element types.
    for version in (18, 19, 21, 23, 24, 25):
        put("Pad", version, _delegate_if(13, _pad_axes_input))
    _installed = True


def _schemas(op: str):
    return [s for s in onnx.defs.get_all_schemas_with_history() if s.name == op and s.domain == ""]


# --- onnxruntime forward-only module ---------------------------------------------------

class _SelectOutput(nn.Module):
    """A converted multi-output graph returns a tuple; robaudit attacks one of its outputs."""

    def __init__(self, module: nn.Module, index: int = 0):
        super().__init__()
        self.module = module
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x)
        return out[self.index] if isinstance(out, (tuple, list)) else out


# --- loading ---------------------------------------------------------------------------

@dataclass
class OnnxLoadResult:
    module: nn.Module                  # converted torch module, or OnnxRuntimeModule; model-layout input
    white_box: bool
    refusal: Optional[str]
    adaptation: Dict[str, Any]         # -> results model.adaptations["onnx"]
    num_params: int
    notes: List[str] = field(default_factory=list)
    declared_input_shape: Optional[List[Any]] = None   # the graph input's dims (str for symbolic)
    layout: str = "nchw"               # the layout `module` takes (see adapters.decide_layout)
    layout_reason: str = ""
    output_name: Optional[str] = None  # the output `module` returns
    output_names: List[str] = field(default_factory=list)
    output_reason: str = ""
    fixed_batch: Optional[int] = None  # the graph's fixed batch size, if any
    batch_chunked: bool = False        # whether `module` is fed chunks of fixed_batch


def _external_data_files(model: onnx.ModelProto) -> List[str]:
    files = []
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in init.external_data if e.key == "location"), None)
            if location and location not in files:
                files.append(location)
    return files


def read_model_proto(path: str, load_external_data: bool = False) -> onnx.ModelProto:
    """Parse the ModelProto; with load_external_data, also read the weights that exporters
    (torch's dynamo exporter by default) store in a separate `<name>.onnx.data` file."""
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as err:  # protobuf DecodeError and friends
        raise UserError(f"{path} is not a readable ONNX model ({type(err).__name__}: "
                        f"{_first_line(err)})") from None
    if not model.graph.node:
        raise UserError(f"{path} is not a readable ONNX model (empty or truncated graph)")
    external_files = _external_data_files(model) if load_external_data else []
    if external_files:
        directory = os.path.dirname(os.path.abspath(path))
        missing = [f for f in external_files if not os.path.isfile(os.path.join(directory, f))]
        if missing:
            raise UserError(f"ONNX model {path} keeps its weights in {', '.join(missing)}, which is "
                            f"missing; keep it next to the .onnx file")
        try:
            onnx.external_data_helper.load_external_data_for_model(model, directory)
        except Exception as err:
            raise UserError(f"cannot read the external weights of {path} "
                            f"({', '.join(external_files)}): {_first_line(err)[:120]}") from None
    return model


def read_onnx(path: str, device: str = "cpu") -> Tuple[nn.Module, adapters.ModelInfo]:
    """The graph in onnxruntime (on the CPU, model-layout input) and what it declares.

    The model is finished by the boundary builder (adapters.build_boundary), which calls
    `OnnxConversion` once it has decided the input layout and the output.
    """
    install_converters()
    model = read_model_proto(path)
    external_files = _external_data_files(model)
    model = read_model_proto(path, load_external_data=True) if external_files else model
    initializer_names = {init.name for init in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializer_names]
    if len(graph_inputs) != 1:
        raise UserError(f"ONNX model {path} has {len(graph_inputs)} inputs; robaudit needs exactly "
                        f"one image input [B, C, H, W]")
    elem_type = graph_inputs[0].type.tensor_type.elem_type
    if elem_type not in _ONNX_FLOAT_TYPES:
        raise UserError(f"ONNX model input has element type {onnx.TensorProto.DataType.Name(elem_type)}; "
                        f"robaudit feeds float images in [0, 1]")
    notes: List[str] = []
    if external_files:
        notes.append(f"weights stored in {', '.join(external_files)} next to the .onnx file "
                     f"(not covered by the model's sha256)")
    try:
        runtime = OnnxRuntimeModule(path, device="cpu")
    except Exception as err:
        raise UserError(f"onnxruntime cannot load {path}: {_first_line(err)}") from None
    declared = [d if isinstance(d, int) else (d or "?") for d in runtime.declared_input_shape]
    info = adapters.ModelInfo(
        format="onnx", declared_input_shape=declared, fixed_batch=runtime.fixed_batch,
        batch_chunked=bool(runtime.fixed_batch), white_box=False, on_device=True, notes=notes,
        num_params=int(sum(int(np.prod(init.dims)) for init in model.graph.initializer)))
    info.deferred = OnnxConversion(path, model, runtime, device)
    return runtime, info


class OnnxConversion(adapters.DeferredModel):
    """Finishes an ONNX model for the boundary builder: onnxruntime's outputs on a probe in
    the model's layout, then the onnx2torch conversion of the chosen output, trusted for
    white-box attacks only if it matches them (otherwise onnxruntime, black-box only)."""

    def __init__(self, path: str, model: onnx.ModelProto, runtime: OnnxRuntimeModule, device: str):
        self.path, self.model, self.runtime, self.device = path, model, runtime, device
        self.probe: Optional[torch.Tensor] = None

    def outputs(self, native_shape, scale, layout, layout_reason):
        fixed = self.runtime.fixed_batch
        # The probe's batch differs from a fixed batch size, so a conversion that only works
        # at that size is caught by the fidelity check (and then fed in chunks).
        batch = FIDELITY_BATCH if fixed != FIDELITY_BATCH else FIDELITY_BATCH + 1
        generator = torch.Generator().manual_seed(0)
        self.probe = torch.rand((batch, *native_shape), generator=generator) * float(scale)
        try:
            with torch.no_grad():
                return self.runtime.run_all(self.probe), batch
        except Exception as err:
            declared = self.runtime.declared_input_shape
            raise UserError(
                f"ONNX model failed on input shape {adapters.shape_text([batch, *native_shape])} "
                f"({layout.upper()}, {layout_reason}): its input is declared as "
                f"{adapters.shape_text(declared)}; --input-layout nchw|nhwc sets the layout "
                f"({_first_line(err)[:160]})") from None

    def finish(self, key, names, outputs, info):
        self.runtime.output_name = key
        reference = outputs[key]
        if not isinstance(reference, torch.Tensor) or not reference.is_floating_point() or reference.ndim != 2:
            shown = (f"{list(reference.shape)} {reference.dtype}" if isinstance(reference, torch.Tensor)
                     else type(reference).__name__)
            raise UserError(f"ONNX output {key!r} is {shown}, not float class scores [B, C]; "
                            f"pass --output-name (outputs: {', '.join(names)})")
        converted, reason = _convert(self.model, names.index(key) if len(names) > 1 else None)
        converted, reason, info.onnx, chunked = self._check(converted, reason, reference)
        fixed = self.runtime.fixed_batch
        info.batch_chunked = chunked if reason is None else bool(fixed)
        if fixed:
            info.notes.append(f"ONNX input has a fixed batch size of {fixed}; robaudit feeds "
                              + ("it in chunks of that size" if info.batch_chunked else
                                 "onnxruntime chunks of that size, but the torch conversion computes "
                                 "the same logits on any batch size, so it gets whole batches"))
        if reason is not None:
            info.white_box = False
            info.refusal = (f"white-box attacks refused for this ONNX model: {reason}; "
                            f"only black-box attacks run")
            if torch.device(self.device).type != "cpu":
                runtime = OnnxRuntimeModule(self.path, device=self.device, output_name=key)
                info.onnx["provider"] = runtime.provider   # the one that really runs
                if runtime.provider_note:
                    info.notes.append(runtime.provider_note)
                return runtime
            info.onnx["provider"] = self.runtime.provider
            return self.runtime
        info.white_box = True
        return converted.to(self.device).eval()

    def _check(self, converted: Optional[nn.Module], reason: Optional[str], reference: torch.Tensor):
        """(module, reason it is not trusted or None, adaptations["onnx"], whether it is fed chunks)."""
        adaptation: Dict[str, Any] = {"converter": "onnx2torch", "fidelity_max_abs_diff": None,
                                      "ok": False, "reason": None}
        fixed = self.runtime.fixed_batch
        chunked = bool(fixed)
        if converted is not None:
            max_diff, reason = _check_fidelity(converted, self.probe, reference)
            if fixed and reason is None:
                chunked = False  # the conversion gives onnxruntime's logits at another batch size too
            elif fixed:
                converted = FixedBatchModule(converted, fixed)
                max_diff, reason = _check_fidelity(converted, self.probe, reference)
            adaptation["fidelity_max_abs_diff"] = max_diff
        adaptation["ok"] = reason is None
        adaptation["reason"] = reason
        return converted, reason, adaptation, chunked


def load_onnx(path: str, *, device: str = "cpu", input_shape: Sequence[int] = (3, 32, 32),
              input_layout: str = "auto", input_scale: float = 1.0,
              output_name: Optional[str] = None, num_classes: Optional[int] = None) -> OnnxLoadResult:
    """Load an ONNX classifier; convert it for white-box attacks if the conversion is faithful.

    input_shape is the dataset's (C, H, W); the graph's declared input decides the layout
    when input_layout is auto. The returned module takes input in that layout (and in the
    model's value range: the fidelity probe is uniform in [0, input_scale]) and returns
    `output_name` (default: the first float [B, num_classes] output). The decisions are
    made by the input side of the boundary builder (adapters.start_boundary), as in load_model.
    """
    module, info = read_onnx(path, device=device)
    scale = float(input_scale)
    request = adapters.BoundaryRequest(input_shape=tuple(int(d) for d in input_shape), device=device,
                                       input_layout=input_layout, input_range=f"0-{scale:g}", scale=scale,
                                       output_name=output_name, num_classes=num_classes)
    boundary, layout_reason, (out_name, out_names, out_reason) = adapters.start_boundary(module, info, request)
    return OnnxLoadResult(module=boundary.model, white_box=info.white_box, refusal=info.refusal,
                          adaptation=info.onnx, num_params=info.num_params, notes=info.notes,
                          declared_input_shape=info.declared_input_shape, layout=boundary.layout,
                          layout_reason=layout_reason, output_name=out_name, output_names=out_names,
                          output_reason=out_reason, fixed_batch=info.fixed_batch,
                          batch_chunked=info.batch_chunked)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _convert(model: onnx.ModelProto, output_index: Optional[int]) -> Tuple[Optional[nn.Module], Optional[str]]:
    """The onnx2torch conversion (returning output `output_index` of a multi-output graph)."""
    import onnx2torch

    try:
        converted = onnx2torch.convert(model)
    except NotImplementedError as err:
        missing = re.search(r"operation_type='([^']+)', version=(\d+)", str(err))
        detail = (f"no converter for {missing.group(1)} (opset {missing.group(2)})" if missing
                  else _first_line(err))
        return None, f"onnx2torch cannot convert the graph: {detail}"
    except Exception as err:  # onnx2torch raises assorted errors on graphs it cannot handle
        return None, f"onnx2torch failed to convert the graph ({type(err).__name__}: {_first_line(err)})"
    converted = converted.eval()
    if output_index is not None:
        converted = _SelectOutput(converted, output_index)
    return converted, None


def _check_fidelity(converted: nn.Module, probe: torch.Tensor,
                    reference: torch.Tensor) -> Tuple[Optional[float], Optional[str]]:
    """(max |logit diff| vs onnxruntime, reason the conversion is not trusted or None)."""
    x = probe.clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            logits = converted(x)
            if not isinstance(logits, torch.Tensor):
                return None, f"the converted model returns {type(logits).__name__}, not a tensor"
            # Class-weighted: a softmax output sums to 1, so a plain sum's gradient is zero (exactly,
            # under ATEN_CPU_CAPABILITY=default) and a differentiable model would be refused.
            weights = torch.linspace(1.0, 2.0, logits.shape[-1], device=logits.device) if logits.dim() else 1.0
            (logits.float() * weights).sum().backward()
    except Exception as err:
        return None, f"the converted model fails to run ({type(err).__name__}: {_first_line(err)[:160]})"
    if logits.shape != reference.shape:
        return None, (f"the converted model's output shape {list(logits.shape)} differs from "
                      f"onnxruntime's {list(reference.shape)}")
    max_diff = float((logits.detach().float() - reference).abs().max())
    if not math.isfinite(max_diff):  # results.json has no NaN/inf
        return None, "the converted model's logits are not finite where onnxruntime's are"
    scale = max(1.0, float(reference.abs().max()))
    if max_diff > FIDELITY_RTOL * scale:
        return max_diff, (f"the converted model's logits differ from onnxruntime's by {max_diff:.2e} "
                          f"(tolerance {FIDELITY_RTOL:.0e} x logit scale {scale:.3g})")
    if x.grad is None or not torch.isfinite(x.grad).all():
        return max_diff, "gradients of the converted model do not reach its input"
    if not x.grad.abs().sum() > 0:
        return max_diff, "gradients of the converted model with respect to its input are all zero"
    return max_diff, None


install_converters()
