import warnings

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto
from torch import nn

from robaudit.audit.models import onnx_support
from robaudit.audit.models.loading import load_model
from robaudit.audit.models.onnx_support import (REDUCE_OPS, TYPE_ONLY_VERSION_BUMPS, OnnxRuntimeModule,
                                         install_converters, load_onnx)
from robaudit.errors import UserError

from conftest import LOGIT_REL_TOL, assert_logits_close


class PoolingNet(nn.Module):
    """Mean-pooling, amax, AdaptiveAvgPool, reshape/flatten and an unfoldable BatchNorm:
    the ops whose current ONNX forms onnx2torch 1.5 cannot convert on its own."""

    def __init__(self, num_classes: int = 6):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)  # after the ReLU, so exporters cannot fold it into the conv
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x):
        h = self.bn(torch.relu(self.conv(x)))
        mean = h.mean((2, 3))
        peak = h.amax((-2, -1))
        pooled = self.pool(h).flatten(1)
        features = torch.cat([mean, peak, pooled], 1).reshape(x.shape[0], -1)
        return self.fc(features)


@pytest.fixture(scope="module")
def pooling_net():
    torch.manual_seed(0)
    model = PoolingNet()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.1, 0.1)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _export(model, path, *, dynamo, batch=2, dynamic=True):
    x = torch.rand(batch, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
            # external_data: weights in <name>.onnx.data, as this exporter writes by default.
            torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=18,
                              dynamic_shapes=shapes, input_names=["x"], output_names=["logits"],
                              external_data=True, verbose=False)
        else:
            axes = {"x": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
            torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"],
                              output_names=["logits"], dynamic_axes=axes)
    return str(path)


@pytest.fixture(scope="module")
def exported(pooling_net, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    return {
        "torchscript-exporter": _export(pooling_net, root / "legacy.onnx", dynamo=False),
        "dynamo-exporter": _export(pooling_net, root / "dynamo.onnx", dynamo=True),
    }


@pytest.mark.parametrize("exporter", ["torchscript-exporter", "dynamo-exporter"])
def test_exported_graph_converts_faithfully_with_gradients(exporter, exported, pooling_net):
    path = exported[exporter]
    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert {"ReduceMean", "ReduceMax", "BatchNormalization"} <= ops  # the forms this test is about
    result = load_onnx(path)
    assert result.white_box and result.refusal is None
    assert result.adaptation["ok"] and result.adaptation["reason"] is None
    assert result.adaptation["converter"] == "onnx2torch"
    # This net's logits are O(1) (max(1, |logit|) = 1): the absolute bound is the relative one.
    assert result.adaptation["fidelity_max_abs_diff"] < LOGIT_REL_TOL
    assert not isinstance(result.module, OnnxRuntimeModule)

    x = torch.rand(3, 3, 32, 32, requires_grad=True)  # batch differs from the export's
    logits = result.module(x)
    with torch.no_grad():
        expected = pooling_net(x)
    reference = torch.from_numpy(
        ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.detach().numpy()})[0])
    assert_logits_close(logits, expected, msg="onnx2torch vs torch")
    assert_logits_close(logits, reference, msg="onnx2torch vs onnxruntime")
    logits[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert result.module(x[:1]).shape == (1, 6)


def test_load_model_detects_onnx(exported, pooling_net):
    loaded = load_model(exported["dynamo-exporter"], num_classes=6)
    assert loaded.format == "onnx" and loaded.white_box
    assert loaded.adaptations["onnx"]["ok"]
    initializers = onnx.load(exported["dynamo-exporter"]).graph.initializer
    assert loaded.num_params == sum(int(np.prod(i.dims)) for i in initializers)


def test_fixed_batch_graph_is_fed_in_chunks(pooling_net, tmp_path):
    path = _export(pooling_net, tmp_path / "batch1.onnx", dynamo=False, batch=1, dynamic=False)
    result = load_onnx(path)
    assert result.white_box, result.refusal
    assert any("fixed batch size of 1" in n for n in result.notes)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected = pooling_net(x)
        assert_logits_close(result.module(x), expected, msg="onnx2torch in chunks")
    runtime = OnnxRuntimeModule(path)
    assert runtime.fixed_batch == 1
    assert_logits_close(runtime(x), expected, msg="onnxruntime in chunks")


def _shrink_classifier(path, num_classes=5):
    """A valid classifier graph using Shrink, which onnxruntime runs and onnx2torch cannot convert."""
    weight = np.random.default_rng(0).standard_normal((3, num_classes)).astype(np.float32)
    nodes = [
        oh.make_node("Shrink", ["x"], ["shrunk"], lambd=0.1),
        oh.make_node("ReduceMean", ["shrunk"], ["pooled"], axes=[2, 3], keepdims=0),
        oh.make_node("MatMul", ["pooled", "w"], ["logits"]),
    ]
    graph = oh.make_graph(
        nodes, "shrink", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [oh.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes])],
        initializer=[onnx.numpy_helper.from_array(weight, "w")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


def test_unconvertible_graph_falls_back_to_onnxruntime(tmp_path):
    path = _shrink_classifier(tmp_path / "shrink.onnx")
    loaded = load_model(path, num_classes=5)
    assert not loaded.white_box
    assert "no converter for Shrink (opset 9)" in loaded.refusal
    assert "black-box" in loaded.refusal and "\n" not in loaded.refusal
    assert loaded.adaptations["onnx"] == {"converter": "onnx2torch", "fidelity_max_abs_diff": None,
                                          "ok": False, "reason": loaded.adaptations["onnx"]["reason"],
                                          "provider": "CPUExecutionProvider"}   # the one that ran
    assert isinstance(loaded.module, OnnxRuntimeModule)
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    logits = loaded.module(x)
    assert logits.shape == (4, 5) and torch.isfinite(logits).all()
    with pytest.raises(RuntimeError, match="without gradients"):
        logits.sum().backward()


def test_unfaithful_conversion_is_refused(exported, monkeypatch):
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription

    def relu_as_identity(node, graph):
        from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node
        return OperationConverterResult(torch_module=nn.Identity(), onnx_mapping=onnx_mapping_from_node(node))

    monkeypatch.setitem(_CONVERTER_REGISTRY, OperationDescription("", "Relu", 14), relu_as_identity)
    result = load_onnx(exported["dynamo-exporter"])
    assert not result.white_box
    assert result.adaptation["ok"] is False
    assert result.adaptation["fidelity_max_abs_diff"] > 1e-3
    assert "differ from onnxruntime" in result.adaptation["reason"]
    assert result.module(torch.rand(2, 3, 32, 32)).shape == (2, 6)


def test_converter_exception_is_refused(exported, monkeypatch):
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription

    def broken(node, graph):
        raise ValueError("converter exploded")

    monkeypatch.setitem(_CONVERTER_REGISTRY, OperationDescription("", "Conv", 11), broken)
    result = load_onnx(exported["torchscript-exporter"])
    assert not result.white_box and "converter exploded" in result.refusal


def test_onnx_input_shape_mismatch_is_a_user_error(exported):
    with pytest.raises(UserError, match="declared as"):
        load_onnx(exported["dynamo-exporter"], input_shape=(1, 28, 28))


# --- the registered converters, op by op, against onnxruntime -----------------------------

def _run_both(model: onnx.ModelProto, inputs: dict):
    import onnx2torch

    expected = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, inputs)
    converted = onnx2torch.convert(model)
    got = converted(*[torch.from_numpy(v) for v in inputs.values()])
    got = got if isinstance(got, (tuple, list)) else [got]
    return expected, [g.detach().numpy() for g in got]


def _single_op_model(node, inputs, outputs, opset, initializers=()):
    graph = oh.make_graph([node], "op", inputs, outputs, initializer=list(initializers))
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("op", REDUCE_OPS)
def test_opset18_reduce_with_axes_input(op, keepdims):
    node = oh.make_node(op, ["x", "axes"], ["y"], keepdims=keepdims)
    model = _single_op_model(
        node, [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)], 18,
        [onnx.numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), "axes")])
    x = np.random.default_rng(1).uniform(0.5, 1.5, (2, 3, 4, 5)).astype(np.float32)
    (expected,), (got,) = _run_both(model, {"x": x})
    assert got.shape == expected.shape
    # Two libraries reduce 2 x 5 values of 0.5..1.5 in their own order: relative error below
    # 10 x 6e-8 (log/exp forms included), 1e-5 is 15x that; a wrong axis or keepdims is O(1).
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_reduce_max_negative_axes_without_keepdims_opset13():
    # onnx2torch's own converter reduces the wrong dimension here; ours replaces it.
    node = oh.make_node("ReduceMax", ["x"], ["y"], axes=[-2, -1], keepdims=0)
    model = _single_op_model(node, [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5])],
                             [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)], 13)
    (expected,), (got,) = _run_both(model, {"x": np.random.rand(2, 3, 4, 5).astype(np.float32)})
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got, expected, rtol=0, atol=0)  # a max is exact in any order


def test_reduce_empty_axes_noop():
    node = oh.make_node("ReduceMean", ["x"], ["y"], keepdims=1, noop_with_empty_axes=1)
    model = _single_op_model(node, [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                             [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)], 18)
    x = np.random.rand(2, 3).astype(np.float32)
    (expected,), (got,) = _run_both(model, {"x": x})
    np.testing.assert_allclose(got, expected, rtol=0, atol=0)  # no reduction: the input itself


@pytest.mark.parametrize("allowzero, shape", [(1, [6, -1]), (0, [0, -1])])
def test_reshape_allowzero(allowzero, shape):
    node = oh.make_node("Reshape", ["x", "shape"], ["y"], allowzero=allowzero)
    model = _single_op_model(
        node, [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)], 19,
        [onnx.numpy_helper.from_array(np.array(shape, dtype=np.int64), "shape")])
    (expected,), (got,) = _run_both(model, {"x": np.random.rand(2, 3, 4).astype(np.float32)})
    np.testing.assert_array_equal(got, expected)  # a reshape moves values, exact


def test_split18_num_outputs_uneven():
    node = oh.make_node("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3)
    model = _single_op_model(node, [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 7])],
                             [oh.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "abc"], 18)
    expected, got = _run_both(model, {"x": np.random.rand(2, 7).astype(np.float32)})
    assert [g.shape for g in got] == [e.shape for e in expected] == [(2, 3), (2, 3), (2, 1)]


def test_type_only_aliases_match_the_onnx_schemas():
    """Every aliased opset version has the same attributes, inputs and outputs as the
    version whose onnx2torch converter it reuses: only the allowed element types differ."""

    def signature(schema):
        return (sorted((a.name, a.type, a.required) for a in schema.attributes.values()),
                [(i.name, i.option) for i in schema.inputs],
                [(o.name, o.option) for o in schema.outputs])

    for op, (base, versions) in TYPE_ONLY_VERSION_BUMPS.items():
        base_schema = onnx.defs.get_schema(op, max_inclusive_version=base, domain="")
        for version in versions:
            schema = onnx.defs.get_schema(op, max_inclusive_version=version, domain="")
            assert schema.since_version == version, (op, version)
            assert signature(schema) == signature(base_schema), (op, version)


def test_install_converters_is_idempotent():
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY

    before = dict(_CONVERTER_REGISTRY)
    onnx_support._installed = False  # force the registration code to run again
    install_converters()
    install_converters()
    assert _CONVERTER_REGISTRY == before


def test_dynamo_export_keeps_weights_in_external_data(exported, tmp_path):
    import shutil

    result = load_onnx(exported["dynamo-exporter"])
    assert any(".onnx.data" in n for n in result.notes)
    lonely = tmp_path / "lonely.onnx"
    shutil.copy(exported["dynamo-exporter"], lonely)  # without its .data file
    with pytest.raises(UserError, match="missing"):
        load_onnx(str(lonely))
