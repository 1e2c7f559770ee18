import hashlib
import pickle
import warnings

import pytest
import torch
from torch import nn

from robaudit.audit.models.architectures import create_architecture
from robaudit.audit.models.loading import (ExportedModule, LoadedModel, load_model, save_export,
                                    sha256_file)
from robaudit.errors import UserError

# Loaded forms run the same weights through other kernels (TorchScript, an exported graph,
# onnx2torch with BatchNorm folded into the convs) or other batch sizes: logits agree to
# the relative tolerance of conftest.assert_logits_close, not bit for bit.
from conftest import assert_logits_close


def _trained_looking_smallcnn() -> nn.Module:
    """SmallCNN with non-default BatchNorm statistics, so eval vs train mode shows."""
    torch.manual_seed(0)
    model = create_architecture("smallcnn", num_classes=10)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            module.num_batches_tracked.fill_(7)
    return model.eval()


class FlattenNet(nn.Module):
    """Needs exactly 3x32x32 input (a flatten into a fixed-size Linear)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * 16 * 16, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class ReturnsInput(nn.Module):
    def forward(self, x):
        return x


class ReturnsTuple(nn.Module):
    """Several outputs, none of them class scores [B, C]."""

    def forward(self, x):
        return x, x * 2


class ReturnsNaN(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :10] * float("nan")


class CreatesMarkerWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        # A stand-in for arbitrary code: unpickling calls open(marker, "w").
        return (open, (self.marker, "w"))


def _script(module: nn.Module, path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(module), str(path))
    return str(path)


@pytest.fixture(scope="module")
def reference():
    model = _trained_looking_smallcnn()
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x)
    return model, x, logits


@pytest.fixture(scope="module")
def model_files(reference, tmp_path_factory):
    """The same weights in every format robaudit reads; built here, never committed."""
    from safetensors.torch import save_file

    model, x, _ = reference
    root = tmp_path_factory.mktemp("formats")
    state = model.state_dict()
    files = {}
    files["state_dict"] = root / "weights.pt"
    torch.save(state, files["state_dict"])
    files["checkpoint"] = root / "checkpoint.pth"
    torch.save({"epoch": 3, "best_acc": 0.5,
                "state_dict": {f"module.{k}": v for k, v in state.items()}}, files["checkpoint"])
    files["safetensors"] = root / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(files["safetensors"]))
    files["torchscript"] = root / "model.ts"
    _script(model, files["torchscript"])
    files["export"] = root / "model.pt2"
    save_export(model, str(files["export"]), x[:2])
    files["pickle"] = root / "model_pickled.pt"
    torch.save(model, files["pickle"])
    files["onnx"] = root / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x[:2],), str(files["onnx"]), dynamo=False, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "b"}, "logits": {0: "b"}})
    return {k: str(v) for k, v in files.items()}


LOAD_OPTIONS = {
    "state_dict": {"arch": "smallcnn"},
    "checkpoint": {"arch": "smallcnn"},
    "safetensors": {"arch": "SmallCNN"},
    "torchscript": {},
    "export": {},
    "pickle": {"trust_pickle": True},
    "onnx": {},
}


@pytest.mark.parametrize("fmt", sorted(LOAD_OPTIONS))
def test_every_format_gives_the_same_logits(fmt, model_files, reference):
    model, x, expected = reference
    loaded = load_model(model_files[fmt], num_classes=10, **LOAD_OPTIONS[fmt])
    assert isinstance(loaded, LoadedModel)
    assert loaded.format == fmt
    assert loaded.white_box and loaded.refusal is None
    assert loaded.sha256 == hashlib.sha256(open(model_files[fmt], "rb").read()).hexdigest()
    assert loaded.num_classes == 10
    assert not loaded.module.training
    with torch.no_grad():
        logits = loaded.module(x)
    assert_logits_close(logits, expected, msg=fmt)
    if fmt != "onnx":  # ONNX counts initializers, and the exporter folds BatchNorm into convs
        assert loaded.num_params == sum(p.numel() for p in model.parameters())
    assert loaded.arch == ("smallcnn" if fmt in ("state_dict", "checkpoint", "safetensors") else None)
    assert set(loaded.adaptations) >= {"normalize", "onnx", "notes"}


def test_forced_format_matches_detection(model_files, reference):
    _, x, expected = reference
    loaded = load_model(model_files["torchscript"], format="torchscript")
    assert_logits_close(loaded.module(x), expected)


def test_checkpoint_notes_key_and_prefix(model_files):
    notes = load_model(model_files["checkpoint"], arch="smallcnn").adaptations["notes"]
    assert any("'state_dict'" in n for n in notes)
    assert any("'module.'" in n for n in notes)


def test_torchscript_is_loaded_with_a_deprecation_note(model_files):
    notes = load_model(model_files["torchscript"]).adaptations["notes"]
    assert any("TorchScript is deprecated" in n and ".pt2" in n for n in notes)


def test_export_module_tolerates_mode_switches_and_any_batch(model_files, reference):
    _, x, expected = reference
    loaded = load_model(model_files["export"])
    loaded.module.train()
    loaded.module.eval()
    assert_logits_close(loaded.module(x[:1]), expected[:1])  # batch 1 vs the reference's 5


def test_export_with_fixed_batch_is_fed_in_chunks(tmp_path, reference):
    model, x, expected = reference
    path = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(model, (x[:1],)), str(path))
    loaded = load_model(str(path))
    assert any("fixed batch size of 1" in n for n in loaded.adaptations["notes"])
    assert_logits_close(loaded.module(x), expected)  # fed in chunks of 1


def test_checkpoint_under_ema_key_and_missing_num_batches_tracked(tmp_path, reference):
    model, x, expected = reference
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"ema": state, "optimizer": {"lr": 0.1}}, tmp_path / "ema.pt")
    loaded = load_model(str(tmp_path / "ema.pt"), arch="smallcnn")
    assert loaded.format == "checkpoint"
    assert_logits_close(loaded.module(x), expected)


def test_mean_std_wraps_model_in_normalize(model_files, reference):
    model, x, _ = reference
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    loaded = load_model(model_files["state_dict"], arch="smallcnn", mean=mean, std=std)
    assert loaded.adaptations["normalize"] == {"mean": mean, "std": std}
    normalized = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        # the wrapper may normalise with other (equivalent) arithmetic: rounding differs
        assert_logits_close(loaded.module(x), model(normalized))


def test_head_size_is_read_from_the_weights(tmp_path):
    torch.save(create_architecture("smallcnn", num_classes=100).state_dict(), tmp_path / "c100.pt")
    assert load_model(str(tmp_path / "c100.pt"), arch="smallcnn").num_classes == 100


def test_sha256_file(tmp_path):
    path = tmp_path / "bytes.bin"
    path.write_bytes(b"robaudit")
    assert sha256_file(str(path)) == hashlib.sha256(b"robaudit").hexdigest()


# --- refusals and bad inputs -------------------------------------------------------------

def _error(*args, **kwargs) -> str:
    with pytest.raises(UserError) as err:
        load_model(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize("dump", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_without_running_it(tmp_path, dump):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if dump == "torch.save":
        torch.save(CreatesMarkerWhenUnpickled(marker), path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(CreatesMarkerWhenUnpickled(marker), handle)
    for fmt in ("auto", "pickle", "state_dict"):
        message = _error(str(path), format=fmt, arch="smallcnn")
        assert "contains pickled Python objects" in message and "did not execute" in message
        assert "--trust-pickle" in message
    assert not marker.exists()


def test_pickled_module_needs_trust(model_files):
    assert "--trust-pickle" in _error(model_files["pickle"])


def test_missing_file_directory_and_empty(tmp_path):
    assert "not found" in _error(str(tmp_path / "nope.pt"))
    assert "directory" in _error(str(tmp_path))
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "empty" in _error(str(tmp_path / "empty.pt"))


@pytest.mark.parametrize("fmt", ["state_dict", "torchscript", "export", "safetensors", "onnx"])
def test_truncated_files_are_reported(fmt, model_files, tmp_path):
    data = open(model_files[fmt], "rb").read()
    path = tmp_path / ("truncated." + model_files[fmt].rsplit(".", 1)[1])
    path.write_bytes(data[: len(data) // 2])
    message = _error(str(path), arch="smallcnn")
    assert any(word in message for word in ("truncated", "corrupt", "could not read", "not a readable"))


def test_garbage_file_is_reported(tmp_path):
    path = tmp_path / "garbage.bin"
    path.write_bytes(b"this is not a model at all\n" * 10)
    assert "cannot tell the format" in _error(str(path))


def test_weights_need_an_arch_unless_their_keys_and_shapes_name_one(model_files, tmp_path):
    # Weights of a registered architecture are inferred (tests/test_arch_inference.py) ...
    assert load_model(model_files["state_dict"]).arch == "smallcnn"
    # ... others need --arch, and the refusal names the closest registered ones.
    torch.save(FlattenNet().state_dict(), tmp_path / "unknown.pt")
    message = _error(str(tmp_path / "unknown.pt"))
    assert "--arch" in message and "match no registered architecture" in message
    assert "closest: " in message and "mismatched keys" in message


def test_unknown_arch(model_files):
    assert "unknown architecture 'resnet-7'" in _error(model_files["state_dict"], arch="resnet-7")


def test_weights_that_do_not_fit_the_arch(model_files):
    message = _error(model_files["state_dict"], arch="resnet18")
    assert "do not match arch 'resnet18'" in message
    assert "missing" in message and "unexpected" in message


def test_class_count_mismatch(model_files):
    message = _error(model_files["safetensors"], arch="smallcnn", num_classes=100)
    assert message == "model outputs 10 classes but dataset has 100"


def test_wrong_input_size_names_the_shape_the_model_needs(tmp_path):
    path = _script(FlattenNet().eval(), tmp_path / "flat.ts")
    load_model(path)  # 3x32x32 is right
    message = _error(path, input_shape=(3, 64, 64))
    assert "[2, 3, 64, 64]" in message and "seems to need input shape [3, 32, 32]" in message


@pytest.mark.parametrize("module, expected", [
    (ReturnsInput(), "expected logits [B, C]"),
    (ReturnsTuple(), "none of the model's 2 outputs is a [B, C] float tensor"),
    (ReturnsNaN(), "NaN/inf logits"),
])
def test_bad_outputs(module, expected, tmp_path):
    assert expected in _error(_script(module, tmp_path / "bad.ts"))


def test_bad_normalization(model_files):
    assert "1 or 3 values" in _error(model_files["state_dict"], arch="smallcnn", mean=[0.5, 0.5], std=[1, 1])
    assert "positive" in _error(model_files["state_dict"], arch="smallcnn", mean=[0.5], std=[0.0])
    assert "both" in _error(model_files["state_dict"], arch="smallcnn", mean=[0.5])


def test_dict_without_weights(tmp_path):
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "ckpt.pt")
    assert "without model weights" in _error(str(tmp_path / "ckpt.pt"), arch="smallcnn")


def test_bad_format_and_device(model_files):
    assert "unknown model format" in _error(model_files["state_dict"], format="keras")
    assert "not a readable ONNX model" in _error(model_files["state_dict"], format="onnx")
    if not torch.cuda.is_available():
        assert "CUDA is not available" in _error(model_files["torchscript"], device="cuda")


def test_save_export_restores_training_mode(tmp_path):
    model = create_architecture("smallcnn").train()
    save_export(model, str(tmp_path / "m.pt2"), torch.rand(1, 3, 32, 32))
    assert model.training
    assert isinstance(load_model(str(tmp_path / "m.pt2")).module, ExportedModule)
