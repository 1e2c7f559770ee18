"""Models as they really arrive (issue 8): the same weights exported in the forms auditors
receive must give the same audit as the plain PyTorch model.

The forms: .safetensors + --arch, torch.export .pt2 (NCHW, NHWC/0..255, fixed batch 1,
softmax output, permuted classes), and ONNX through both torch exporters (NHWC/0..255,
softmax, fixed batch 1). Fixtures are built here from one small CNN; nothing binary is
committed. Labels are the plain model's own predictions on balanced classes, so the plain
model is 100% clean-accurate and a model fed the wrong range collapses to chance.

Tolerances (docs/testing.md): every form computes the same function with other kernels
(onnx2torch, a folded BatchNorm, an exported graph, chunked batches), so outputs agree to
`assert_logits_close` and the per-sample attack flags to `assert_flags_agree` (sign-gradient
steps can flip a point whose gradient or margin sits within rounding of 0). Clean
predictions are compared exactly: the fixture keeps only points whose top-2 logit margin is
far above any rounding (MIN_MARGIN).
"""

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robaudit.audit.models import adapters
from robaudit.audit.models.architectures import create_architecture
from robaudit.audit.data.datasets import load_dataset
from robaudit.audit.engine import ScanConfig, run_scan
from robaudit.audit.models.loading import LoadedModel, load_model, save_export
from robaudit.errors import UserError

from conftest import assert_flags_agree, assert_logits_close, logit_tolerance

SHAPE = (3, 16, 16)
NUM_CLASSES = 4
PER_CLASS = 8
EPS = 2 / 255
ATTACKS = ["clean", "fgsm", "pgd"]
# Clean top-2 logit margin of every kept point, in logits (which reach ~9 here): 50x the
# logit tolerance (1e-4 x 9), so no form's rounding can change a clean prediction.
MIN_MARGIN = 0.05


class NHWC255(nn.Module):
    """What a Keras-style export looks like: NHWC input in 0..255, then the same net."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.permute(0, 3, 1, 2) / 255.0)


class Softmax(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.softmax(self.net(x), dim=1)


class Permuted(nn.Module):
    """The net with its output columns in another class order: column i = class ORDER[i]."""

    ORDER = [2, 0, 3, 1]

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)[:, self.ORDER]


class TwoOutputs(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        logits = self.net(x)
        return {"features": x.mean((2, 3)), "probs": torch.softmax(logits, 1), "logits": logits}


def _pool_images(n: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth colour blobs with noise, quantised to 8 bits (what a uint8 dataset holds)."""
    low = torch.rand(n, 3, 4, 4, generator=generator)
    x = F.interpolate(low, size=SHAPE[1:], mode="bilinear", align_corners=False)
    x = (x + 0.05 * torch.randn(x.shape, generator=generator)).clamp(0, 1)
    return (x * 255).round() / 255


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The plain net, a balanced dataset labelled by it (as an .npz) and the EvalData."""
    torch.manual_seed(0)
    net = create_architecture("smallcnn", num_classes=NUM_CLASSES)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    net.eval()
    pool = _pool_images(400, torch.Generator().manual_seed(1))
    with torch.no_grad():
        # An untrained head predicts one class everywhere: centre and scale it so that
        # the predictions spread over the classes with useful margins.
        feats = net.pool(net.features(pool)).flatten(1)
        spread = (net.classifier(feats) - net.classifier(feats).mean(0)).std()
        net.classifier.weight.mul_(3.0 / spread)
        net.classifier.bias.copy_(-(net.classifier.weight @ feats.mean(0)))
        logits = net(pool)
        pred = logits.argmax(1)
        top2 = logits.topk(2, dim=1).values
        clear = top2[:, 0] - top2[:, 1] > MIN_MARGIN
    assert MIN_MARGIN > 20 * logit_tolerance(logits)
    keep = torch.cat([torch.nonzero((pred == k) & clear).flatten()[:PER_CLASS] for k in range(NUM_CLASSES)])
    keep = keep.sort().values
    assert len(keep) == NUM_CLASSES * PER_CLASS
    root = tmp_path_factory.mktemp("interop")
    npz = root / "blobs.npz"
    x_u8 = (pool[keep] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez(npz, x_test=x_u8, y_test=pred[keep].numpy())
    data = load_dataset(str(npz))
    assert torch.equal(data.x, pool[keep])  # uint8 round trip of k/255 values: exact IEEE arithmetic
    return {"net": net, "data": data, "npz": str(npz), "root": root}


def _export_onnx(module, path, example, *, dynamo, dynamic=True, output_names=("out",)):
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
            torch.onnx.export(module, (example,), str(path), dynamo=True, opset_version=18,
                              dynamic_shapes=shapes, input_names=["x"], output_names=list(output_names),
                              verbose=False)
        else:
            axes = ({"x": {0: "b"}, **{name: {0: "b"} for name in output_names}} if dynamic else None)
            torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=["x"],
                              output_names=list(output_names), dynamic_axes=axes)
    return str(path)


def _export_pt2(module, path, example, *, fixed=False):
    if fixed:  # exported as it is: the example's batch size is baked in
        torch.export.save(torch.export.export(module.eval(), (example,)), str(path))
    else:
        save_export(module, str(path), example)
    return str(path)


@pytest.fixture(scope="module")
def files(world):
    """name -> (path, load_model options): the same weights in every form."""
    from safetensors.torch import save_file

    net, root = world["net"], world["root"]
    nchw = world["data"].x[:2].clone()
    nhwc255 = (nchw * 255).permute(0, 2, 3, 1).contiguous()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "w.safetensors"))
    made = {
        "safetensors": (str(root / "w.safetensors"), {"arch": "smallcnn"}),
        "pt2": (_export_pt2(net, root / "plain.pt2", nchw), {}),
        "pt2-nhwc-255": (_export_pt2(NHWC255(net), root / "nhwc.pt2", nhwc255), {"input_range": "0-255"}),
        "pt2-batch1": (_export_pt2(net, root / "b1.pt2", nchw[:1], fixed=True), {}),
        "pt2-softmax": (_export_pt2(Softmax(net), root / "softmax.pt2", nchw), {}),
        "onnx-legacy-nhwc-255": (_export_onnx(NHWC255(net), root / "legacy_nhwc.onnx", nhwc255, dynamo=False),
                                 {"input_range": "0-255"}),
        "onnx-legacy-softmax": (_export_onnx(Softmax(net), root / "legacy_softmax.onnx", nchw, dynamo=False), {}),
        # torch's default exporter, with everything at once: NHWC, 0..255, softmax, batch 1.
        "onnx-dynamo-nhwc-255-softmax-batch1": (
            _export_onnx(Softmax(NHWC255(net)), root / "dynamo_nhwc_softmax_b1.onnx", nhwc255[:1],
                         dynamo=True, dynamic=False), {"input_range": "0-255"}),
        "onnx-legacy-batch1": (_export_onnx(net, root / "legacy_b1.onnx", nchw[:1], dynamo=False,
                                            dynamic=False), {}),
        "pt2-permuted": (_export_pt2(Permuted(net), root / "permuted.pt2", nchw),
                         {"class_map": Permuted.ORDER}),
    }
    # The wrappers are built in training mode (nn.Module's default) around the eval-mode
    # net; save_export restores each submodule's own mode, so the net stays in eval mode.
    assert not any(m.training for m in net.modules())
    return made


def _audit(loaded, data, out_dir):
    cfg = ScanConfig(out_dir=out_dir, attacks=ATTACKS, attack_overrides={"pgd": {"steps": 3}}, eps=EPS,
                     device="cpu", batch_size=12, write_report=False)
    results = run_scan(cfg, model=loaded, data=data)
    with np.load(out_dir / "samples.npz") as samples:
        flags = {name: samples[f"robust_{name}"].copy() for name in ATTACKS}
    return results, flags


@pytest.fixture(scope="module")
def plain(world):
    net = world["net"]
    loaded = LoadedModel(module=net, format="pickle", path="<plain>", sha256="0" * 64,
                         num_params=sum(p.numel() for p in net.parameters()), arch="smallcnn",
                         white_box=True, adaptations={"normalize": None, "onnx": None, "notes": []},
                         refusal=None, num_classes=NUM_CLASSES)
    results, flags = _audit(loaded, world["data"], world["root"] / "out-plain")
    clean = results["attacks"]["clean"]
    assert clean["avg"] == 1.0  # labels are the plain model's predictions
    # The comparison means something only if the attacks fool some points and not others.
    for name in ("fgsm", "pgd"):
        assert 0 < flags[name].sum() < len(flags[name]), (name, flags[name].mean())
    return results, flags


EXPECTED = {  # name -> (layout, range, output kind, fixed batch, chunked)
    "safetensors": ("nchw", "0-1", "logits", None, False),
    "pt2": ("nchw", "0-1", "logits", None, False),
    "pt2-nhwc-255": ("nhwc", "0-255", "logits", None, False),
    "pt2-batch1": ("nchw", "0-1", "logits", 1, True),
    "pt2-softmax": ("nchw", "0-1", "probs", None, False),
    "onnx-legacy-nhwc-255": ("nhwc", "0-255", "logits", None, False),
    "onnx-legacy-softmax": ("nchw", "0-1", "probs", None, False),
    "onnx-dynamo-nhwc-255-softmax-batch1": ("nhwc", "0-255", "probs", 1, True),
    "onnx-legacy-batch1": ("nchw", "0-1", "logits", 1, False),
    "pt2-permuted": ("nchw", "0-1", "logits", None, False),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_form_audits_like_the_plain_model(name, files, world, plain, tmp_path):
    plain_results, plain_flags = plain
    path, options = files[name]
    data = world["data"]
    loaded = load_model(path, dataset_classes=data.classes, input_shape=SHAPE, **options)
    assert loaded.white_box, loaded.refusal
    results, flags = _audit(loaded, data, tmp_path)

    adaptations = results["model"]["adaptations"]
    layout, value_range, kind, fixed, chunked = EXPECTED[name]
    assert adaptations["input_layout"]["layout"] == layout, adaptations["input_layout"]
    assert adaptations["input_range"] == {"range": value_range, "scale": 255.0 if value_range == "0-255" else 1.0}
    assert adaptations["output"]["kind"] == kind and adaptations["output"]["requested"] == "auto"
    if fixed is None:
        assert adaptations["batch_size"] is None
    else:
        assert adaptations["batch_size"]["fixed"] == fixed
        assert adaptations["batch_size"]["chunked"] is chunked
        assert ("forward calls" in adaptations["batch_size"]["note"]) is chunked
    json.dumps(adaptations)  # results.json must hold it

    # Clean: exact (margins > MIN_MARGIN). Attacks: other kernels, so a stated few flips.
    assert results["attacks"]["clean"]["per_class"] == plain_results["attacks"]["clean"]["per_class"]
    assert np.array_equal(flags["clean"], plain_flags["clean"])
    for attack in ATTACKS[1:]:
        assert_flags_agree(flags[attack], plain_flags[attack], what=f"{name} {attack}")
    assert {c["id"] for c in results["checks"]} == {c["id"] for c in plain_results["checks"]}


def test_adapted_gradients_match_the_plain_model(files, world):
    """Log-probabilities differ from logits by a per-row constant: identical CE gradients."""
    net, x, y = world["net"], world["data"].x[:6], world["data"].y[:6]

    def grad(module):
        xa = x.clone().requires_grad_(True)
        F.cross_entropy(module(xa), y).backward()
        return xa.grad

    expected = grad(net)
    for name in ("onnx-dynamo-nhwc-255-softmax-batch1", "onnx-legacy-softmax", "pt2-permuted"):
        path, options = files[name]
        loaded = load_model(path, dataset_classes=world["data"].classes, input_shape=SHAPE, **options)
        # Other kernels, and log(softmax) instead of log_softmax (1 - p cancels): measured
        # ~6e-6 of the gradient's scale; 1e-3 of it still fails a wrong scale or class order.
        torch.testing.assert_close(grad(loaded.module), expected, rtol=0,
                                   atol=1e-3 * float(expected.abs().max()), msg=name)


def test_wrong_range_is_flagged_near_chance(files, world, tmp_path):
    path, _ = files["onnx-legacy-nhwc-255"]
    loaded = load_model(path, dataset_classes=world["data"].classes, input_shape=SHAPE)  # no --input-range
    assert loaded.adaptations["input_range"]["range"] == "0-1"
    results, _ = _audit(loaded, world["data"], tmp_path)
    assert results["attacks"]["clean"]["avg"] <= 1.5 / NUM_CLASSES
    near = [c for c in results["checks"] if c["id"] == "near_chance"]
    assert near and "range" in near[0]["message"]


def test_layout_decisions():
    decide = adapters.decide_layout
    assert decide("auto", [1, 16, 16, 3], SHAPE)[0] == "nhwc"
    assert decide("auto", ["batch", 3, 16, 16], SHAPE)[0] == "nchw"
    assert decide("auto", ["N", "H", "W", 3], SHAPE)[0] == "nhwc"
    layout, reason = decide("auto", ["N", "C", "H", "W"], SHAPE)
    assert layout == "nchw" and "--input-layout nhwc" in reason
    layout, reason = decide("auto", None, SHAPE)
    assert layout == "nchw" and "declares no input shape" in reason
    assert decide("nhwc", ["batch", 3, 16, 16], SHAPE) == ("nhwc", "--input-layout nhwc")
    assert decide("auto", [1, 28, 28, 1], (1, 28, 28))[0] == "nhwc"


def test_forced_layout_overrides_the_declaration(files, world):
    path, options = files["onnx-legacy-nhwc-255"]
    with pytest.raises(UserError, match="--input-layout"):
        load_model(path, input_shape=SHAPE, input_layout="nchw", **options)


def test_output_forcing_and_refusals(files, world):
    classes = world["data"].classes
    softmax_path, _ = files["pt2-softmax"]
    loaded = load_model(softmax_path, dataset_classes=classes, input_shape=SHAPE, output="probs")
    assert loaded.adaptations["output"]["kind"] == "probs"
    assert loaded.adaptations["output"]["attacked_as"].startswith("log(max(p, ")
    # Forced logits on a softmax model: honoured, with a note (checks.py flags it too).
    loaded = load_model(softmax_path, dataset_classes=classes, input_shape=SHAPE, output="logits")
    assert loaded.adaptations["output"]["kind"] == "logits"
    assert any("look like probabilities" in n for n in loaded.adaptations["notes"])
    plain_path, _ = files["pt2"]
    for forced in ("probs", "log-probs"):
        with pytest.raises(UserError) as err:
            load_model(plain_path, dataset_classes=classes, input_shape=SHAPE, output=forced)
        message = str(err.value)
        assert f"--output {forced}, but" in message and "--output logits" in message and "\n" not in message


def test_log_prob_outputs_are_detected(world, tmp_path):
    class LogSoftmax(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return torch.log_softmax(self.net(x), 1)

    path = _export_pt2(LogSoftmax(world["net"]), tmp_path / "logsoftmax.pt2", world["data"].x[:2])
    loaded = load_model(path, dataset_classes=world["data"].classes, input_shape=SHAPE)
    assert loaded.adaptations["output"]["kind"] == "log-probs"


def test_multi_output_models(world, tmp_path):
    classes, x = world["data"].classes, world["data"].x[:5]
    with torch.no_grad():
        expected = world["net"](x)
    pt2 = _export_pt2(TwoOutputs(world["net"]), tmp_path / "two.pt2", x[:2])
    loaded = load_model(pt2, dataset_classes=classes, input_shape=SHAPE)
    output = loaded.adaptations["output"]
    # "features" is [B, 3], not [B, 4]: the first [B, 4] output is "probs" -> attacked as its log.
    assert output["available"] == ["features", "probs", "logits"]
    assert output["name"] == "probs" and output["kind"] == "probs"
    with pytest.raises(UserError, match="model outputs 3 classes"):
        load_model(pt2, dataset_classes=classes, input_shape=SHAPE, output_name="features")
    loaded = load_model(pt2, dataset_classes=classes, input_shape=SHAPE, output_name="logits")
    assert loaded.adaptations["output"]["name"] == "logits" and loaded.adaptations["output"]["kind"] == "logits"
    assert_logits_close(loaded.module(x), expected, msg="pt2 logits output")  # exported graph, batch 5 vs 2
    with pytest.raises(UserError, match="not one of the model's outputs"):
        load_model(pt2, dataset_classes=classes, input_shape=SHAPE, output_name="scores")

    class ProbsAndLogits(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            logits = self.net(x)
            return torch.softmax(logits, 1), logits

    onnx_path = _export_onnx(ProbsAndLogits(world["net"]), tmp_path / "two.onnx", x[:2], dynamo=False,
                             output_names=("probs", "logits"))
    loaded = load_model(onnx_path, dataset_classes=classes, input_shape=SHAPE)
    assert loaded.white_box and loaded.adaptations["output"]["name"] == "probs"
    assert loaded.adaptations["output"]["kind"] == "probs"
    loaded = load_model(onnx_path, dataset_classes=classes, input_shape=SHAPE, output_name="logits")
    assert loaded.white_box and loaded.adaptations["output"]["kind"] == "logits"
    assert_logits_close(loaded.module(x), expected, msg="onnx logits output")  # onnx2torch, BN folded


def test_torchscript_keeps_loading_with_its_deprecation_note(world, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(world["net"]), str(tmp_path / "m.ts"))
    loaded = load_model(str(tmp_path / "m.ts"), dataset_classes=world["data"].classes, input_shape=SHAPE)
    assert any("TorchScript is deprecated" in n for n in loaded.adaptations["notes"])
    with torch.no_grad():
        assert_logits_close(loaded.module(world["data"].x), world["net"](world["data"].x), msg="torchscript")


def test_undeclared_channels_last_model_is_found(world, tmp_path):
    """A TorchScript model declares no input shape: NCHW is tried first, then NHWC."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(NHWC255(world["net"]).eval()), str(tmp_path / "nhwc.ts"))
    loaded = load_model(str(tmp_path / "nhwc.ts"), dataset_classes=world["data"].classes, input_shape=SHAPE,
                        input_range="0-255")
    layout = loaded.adaptations["input_layout"]
    assert layout["layout"] == "nhwc" and "fails on NCHW input" in layout["reason"]
    with torch.no_grad():
        assert_logits_close(loaded.module(world["data"].x), world["net"](world["data"].x), msg="torchscript nhwc")


def test_round_trips_keep_the_logits(files, world):
    """.safetensors with --arch gives back the plain model's logits exactly (the same module
    class and weights, the same batch, in this process); .pt2 runs an exported graph: close."""
    x = world["data"].x
    with torch.no_grad():
        expected = world["net"](x)
        for name in ("safetensors", "pt2"):
            path, options = files[name]
            loaded = load_model(path, dataset_classes=world["data"].classes, input_shape=SHAPE, **options)
            assert loaded.format == {"safetensors": "safetensors", "pt2": "export"}[name]
            if name == "safetensors":
                assert torch.equal(loaded.module(x), expected), name
            else:
                assert_logits_close(loaded.module(x), expected, msg=name)
            assert loaded.adaptations["pipeline"][-1] == "the model"


# --- class names and class maps ----------------------------------------------------------

def test_class_map_forms(files, world, tmp_path):
    classes = world["data"].classes  # "0".."3" (an .npz without class names)
    path, _ = files["pt2-permuted"]
    x = world["data"].x[:5]
    with torch.no_grad():
        expected = world["net"](x)
    as_names = tmp_path / "map_names.json"
    as_names.write_text(json.dumps({str(i): str(k) for i, k in enumerate(Permuted.ORDER)}))
    as_list = tmp_path / "map_list.json"
    as_list.write_text(json.dumps(Permuted.ORDER))
    for spec in (str(as_names), str(as_list), Permuted.ORDER):
        loaded = load_model(path, dataset_classes=classes, input_shape=SHAPE, class_map=spec)
        with torch.no_grad():
            assert_logits_close(loaded.module(x), expected, msg=str(spec))  # exported graph
        entry = loaded.adaptations["class_map"]
        assert entry["model_to_dataset"] == Permuted.ORDER and entry["identity"] is False


@pytest.mark.parametrize("spec, expected", [
    ([0, 0, 1, 2], "both map to dataset class"),
    ([0, 1, 2], "model indices [3] are missing"),
    ([0, 1, 2, 3, 4], "outside 0..3"),
    ({"0": 0, "1": 1, "2": 2, "3": "zebra"}, "neither a dataset class index"),
    ({"0": 0, "1": 1, "2": 2, "x": 3}, "is not a model output index"),
])
def test_class_map_that_is_not_a_permutation(spec, expected, files, world, tmp_path):
    path, _ = files["pt2-permuted"]
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps(spec))
    with pytest.raises(UserError) as err:
        load_model(path, dataset_classes=world["data"].classes, input_shape=SHAPE, class_map=str(map_file))
    message = str(err.value)
    assert expected in message and "\n" not in message
    assert "pass a JSON list" in message or "neither a dataset class index 0..3 nor a class name" in message


def test_class_names(files, world, tmp_path):
    path, _ = files["pt2"]
    classes = world["data"].classes
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n\nbird\nfish\n")
    loaded = load_model(path, dataset_classes=classes, input_shape=SHAPE, class_names=str(names))
    assert loaded.class_names == ["cat", "dog", "bird", "fish"]
    assert loaded.adaptations["class_names"]["dataset_names"] == classes
    as_json = tmp_path / "names.json"
    as_json.write_text(json.dumps(["cat", "dog", "bird", "fish"]))
    assert load_model(path, dataset_classes=classes, input_shape=SHAPE,
                      class_names=str(as_json)).class_names == ["cat", "dog", "bird", "fish"]
    # A class map may name the classes by their new names.
    permuted, _ = files["pt2-permuted"]
    order_names = tmp_path / "map.json"
    order_names.write_text(json.dumps(["bird", "cat", "fish", "dog"]))
    loaded = load_model(permuted, dataset_classes=classes, input_shape=SHAPE, class_names=str(names),
                        class_map=str(order_names))
    assert loaded.adaptations["class_map"]["model_to_dataset"] == Permuted.ORDER

    bad = tmp_path / "bad.txt"
    for text, expected in (("a\nb\nc\n", "lists 3 names but the dataset has 4"),
                           ("a\nb\nb\nc\n", "more than once"),
                           ("1\n0\n2\n3\n", "pass --class-map")):
        bad.write_text(text)
        with pytest.raises(UserError, match=expected):
            load_model(path, dataset_classes=classes, input_shape=SHAPE, class_names=str(bad))


# --- the command line --------------------------------------------------------------------

def _cli(argv):
    from robaudit.cli import main

    try:
        main(argv)
    except SystemExit as exit_:
        return exit_.code
    return 0


def test_cli_scan_with_boundary_flags(files, world, plain, tmp_path, capsys):
    path, _ = files["onnx-legacy-nhwc-255"]
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\nbird\nfish\n")
    out = tmp_path / "out"
    code = _cli(["scan", path, "--dataset", world["npz"], "--input-range", "0-255", "--input-layout", "nhwc",
                 "--class-names", str(names), "--attacks", "clean,fgsm", "--eps", "2/255",
                 "--batch-size", "12", "--device", "cpu", "--out", str(out), "--no-report"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    adaptations = results["model"]["adaptations"]
    assert adaptations["input_layout"]["layout"] == "nhwc" and adaptations["input_layout"]["requested"] == "nhwc"
    assert adaptations["input_range"]["scale"] == 255.0
    assert results["dataset"]["classes"] == ["cat", "dog", "bird", "fish"]
    plain_clean = plain[0]["attacks"]["clean"]["per_class"]
    assert [c["correct"] for c in results["attacks"]["clean"]["per_class"]] == [c["correct"] for c in plain_clean]
    with np.load(out / "samples.npz") as samples:
        assert_flags_agree(samples["robust_fgsm"], plain[1]["fgsm"], what="fgsm")  # onnx2torch: a few flips


def test_cli_bad_class_map_is_one_line_and_writes_nothing(files, world, tmp_path, capsys):
    path, _ = files["pt2-permuted"]
    bad = tmp_path / "map.json"
    bad.write_text("[0, 0, 1, 2]")
    out = tmp_path / "out"
    code = _cli(["scan", path, "--dataset", world["npz"], "--class-map", str(bad), "--attacks", "clean",
                 "--device", "cpu", "--out", str(out), "--no-report"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--class-map" in err and "permutation" in err
    assert not out.exists()
