"""Property-based tests of the model readers (issue 27): torch.save checkpoint dicts (nested,
wrong types, missing keys), safetensors headers, ONNX graphs with odd inputs and outputs.
`load_model` gives a model that maps a [N, 3, 32, 32] batch to [N, C] scores, or one UserError
line; cases hypothesis found are kept as @example.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from fuzz_support import budget, no_stray_warnings, outcome

C, SHAPE = 2, (3, 32, 32)


def reference_state_dict():
    from robaudit.audit.models.architectures import create_architecture

    torch.manual_seed(0)
    return create_architecture("smallcnn", num_classes=C).state_dict()


REFERENCE = reference_state_dict()
KEYS = list(REFERENCE)


def check_loaded(loaded) -> None:
    x = torch.rand((2, *SHAPE), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scores = loaded.module(x)
    assert tuple(scores.shape) == (2, C)


def load(path, **kwargs):
    from robaudit.audit.models.loading import load_model

    return load_model(str(path), num_classes=C, input_shape=SHAPE, device="cpu", **kwargs)


# ---------------------------------------------------------------------------- checkpoint dicts

TENSOR_DTYPES = [torch.float32, torch.float16, torch.float64, torch.int64, torch.uint8, torch.bool,
                 torch.complex64, torch.bfloat16]
LEAVES = st.one_of(
    st.builds(lambda shape, dtype: torch.zeros(shape, dtype=dtype),
              st.lists(st.integers(0, 4), max_size=4), st.sampled_from(TENSOR_DTYPES)),
    st.integers(), st.floats(), st.text(max_size=5), st.none(), st.booleans(),
    st.lists(st.integers(), max_size=3), st.just(np.zeros(2)))


def nested(depth: int = 2):
    keys = st.one_of(st.sampled_from(KEYS + ["state_dict", "model", "net", "ema", "epoch", "module.conv1.weight",
                                             "_orig_mod.fc.weight", "optimizer"]), st.text(max_size=6),
                     st.integers(-1, 3))
    return st.recursive(LEAVES, lambda children: st.dictionaries(keys, children, max_size=5), max_leaves=8)


@st.composite
def mutated_state_dict(draw):
    """The reference weights, changed a little: a key dropped or renamed, a shape or dtype off, wrapped."""
    state = dict(REFERENCE)
    key = draw(st.sampled_from(KEYS))
    change = draw(st.sampled_from(["drop", "rename", "reshape", "dtype", "nan", "scalar", "none", "prefix", "keep"]))
    if change == "drop":
        del state[key]
    elif change == "rename":
        state[key + "x"] = state.pop(key)
    elif change == "reshape":
        state[key] = torch.zeros(draw(st.lists(st.integers(0, 5), max_size=4)))
    elif change == "dtype":
        state[key] = state[key].to(draw(st.sampled_from(TENSOR_DTYPES)))
    elif change == "nan":
        state[key] = torch.full_like(state[key], float("nan")) if state[key].is_floating_point() else state[key]
    elif change == "scalar":
        state[key] = draw(st.one_of(st.integers(), st.floats(), st.text(max_size=3)))
    elif change == "none":
        state[key] = None
    elif change == "prefix":
        state = {f"module.{k}": v for k, v in state.items()}
    wrapper = draw(st.sampled_from([None, "state_dict", "model", "net", "ema"]))
    if wrapper is not None:
        state = {wrapper: state, "epoch": draw(st.integers(0, 300)),
                 "extra": draw(st.sampled_from([None, {"nested": {"deep": 1}}, [1, 2]]))}
    return state


@budget(40)
@given(content=st.one_of(mutated_state_dict(), nested(), st.lists(st.integers(), max_size=3), st.none()),
       arch=st.sampled_from([None, "smallcnn"]))
@example(content={"state_dict": {"conv1.weight": "not a tensor"}}, arch="smallcnn").via("a string weight")
@example(content={0: torch.zeros(2)}, arch=None).via("an integer key")
@example(content={k: v.to(torch.complex64) if v.is_floating_point() else v for k, v in REFERENCE.items()},
         arch="smallcnn").via("complex weights: the imaginary part was dropped with a warning")
def test_checkpoint_dicts(tmp_path_factory, content, arch):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    try:
        torch.save(content, path)
    except Exception:   # torch.save cannot write it (e.g. an unpicklable leaf): nothing to read
        return
    with no_stray_warnings():
        kind, loaded = outcome(load, path, arch=arch)
        if kind == "ok":
            check_loaded(loaded)


# ---------------------------------------------------------------------------- safetensors headers

ST_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "C64", "X", "", 7, None]


@st.composite
def safetensors_bytes(draw):
    from safetensors.torch import save

    real = save({k: v.contiguous() for k, v in REFERENCE.items()})
    length = struct.unpack("<Q", real[:8])[0]
    header, data = json.loads(real[8:8 + length]), real[8 + length:]
    choice = draw(st.sampled_from(["entry", "offsets", "length", "metadata", "junk_json", "drop", "keep"]))
    key = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    if choice == "entry":
        header[key] = draw(st.one_of(
            st.fixed_dictionaries({"dtype": st.sampled_from(ST_DTYPES),
                                   "shape": st.lists(st.integers(-2, 10**12), max_size=4),
                                   "data_offsets": st.lists(st.integers(-1, 10**12), max_size=3)}),
            st.none(), st.integers(), st.text(max_size=4)))
    elif choice == "offsets":
        begin, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = [begin, end + draw(st.integers(-8, 8))]
    elif choice == "metadata":
        header["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=3), st.text(max_size=3)),
                                                st.integers(), st.lists(st.integers(), max_size=2)))
    elif choice == "drop":
        del header[key]
    body = json.dumps(header).encode()
    if choice == "junk_json":
        body = b"{" + draw(st.binary(max_size=30))
    declared = len(body)
    if choice == "length":
        declared = draw(st.sampled_from([0, 1, declared - 1, declared + 1, 2**63, 2**64 - 1]))
    return struct.pack("<Q", declared) + body + data[: draw(st.sampled_from([len(data), len(data) // 2]))]


@budget(40)
@given(payload=safetensors_bytes(), arch=st.sampled_from([None, "smallcnn"]),
       forced=st.sampled_from(["auto", "safetensors"]))
def test_safetensors_headers(tmp_path_factory, payload, arch, forced):
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    path.write_bytes(payload)
    with no_stray_warnings():
        kind, loaded = outcome(load, path, arch=arch, format=forced)
        if kind == "ok":
            check_loaded(loaded)


# ---------------------------------------------------------------------------------- ONNX graphs


@st.composite
def onnx_graphs(draw):
    """Bytes of an ONNX model: inputs and outputs of odd count, rank, size and type."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    elem = {"float": TensorProto.FLOAT, "double": TensorProto.DOUBLE, "uint8": TensorProto.UINT8,
            "int64": TensorProto.INT64, "float16": TensorProto.FLOAT16}
    np_of = {"float": np.float32, "double": np.float64, "uint8": np.uint8, "int64": np.int64,
             "float16": np.float16}
    dims = st.lists(st.one_of(st.sampled_from([1, 2, 3, 32, 0]), st.just("N"), st.none()), max_size=5)
    n_inputs = draw(st.integers(0, 2))
    inputs = [helper.make_tensor_value_info(f"x{k}", elem[draw(st.sampled_from(sorted(elem)))],
                                            draw(st.one_of(st.just(["N", 3, 32, 32]), dims)))
              for k in range(n_inputs)]
    nodes, outputs = [], []
    for k in range(draw(st.integers(0, 2)) + (0 if n_inputs else 1)):
        kind = draw(st.sampled_from(["constant", "identity", "mean_logits"] if n_inputs else ["constant"]))
        name = f"y{k}"
        if kind == "constant":
            dtype = draw(st.sampled_from(sorted(elem)))
            shape = draw(st.lists(st.integers(0, 4), max_size=3))
            value = np.zeros(shape, dtype=np_of[dtype])
            nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value)))
            outputs.append(helper.make_tensor_value_info(name, elem[dtype], list(shape)))
        elif kind == "identity":
            nodes.append(helper.make_node("Identity", ["x0"], [name]))
            outputs.append(helper.make_tensor_value_info(name, inputs[0].type.tensor_type.elem_type, None))
        else:   # a real classifier head on x0: mean over H, W then a [C] projection (needs float NCHW)
            nodes.append(helper.make_node("ReduceMean", ["x0"], [f"m{k}"], axes=[2, 3], keepdims=0))
            weight = numpy_helper.from_array(np.ones((3, C), np.float32), name=f"w{k}")
            nodes.append(helper.make_node("Constant", [], [f"w{k}"], value=weight))
            nodes.append(helper.make_node("MatMul", [f"m{k}", f"w{k}"], [name]))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", C]))
    graph = helper.make_graph(nodes, "fuzz", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


@budget(30)
@given(payload=onnx_graphs(), output=st.sampled_from(["auto", "logits"]))
@example(payload=None, output="auto").via("a float classifier: the 'ok' branch")
def test_onnx_graphs(tmp_path_factory, payload, output):
    pytest.importorskip("onnxruntime")
    if payload is None:
        payload = _float_classifier()
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    path.write_bytes(payload)
    with no_stray_warnings():
        kind, loaded = outcome(load, path, output=output)
        if kind == "ok":
            check_loaded(loaded)


def _float_classifier() -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", C])
    weight = numpy_helper.from_array(np.ones((3, C), np.float32), name="w")
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("Constant", [], ["w"], value=weight), helper.make_node("MatMul", ["m", "w"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "head", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()
