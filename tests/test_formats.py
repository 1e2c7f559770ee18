"""The model-format registry (audit/models/formats.py): every registered format detects its own
files, a file no format recognises is refused in one line, and a format registered
outside robaudit is what load_model then uses."""

import pickle
import warnings
import zipfile

import pytest
import torch
from torch import nn

from robaudit.audit.models import formats
from robaudit.audit.models.adapters import ModelInfo
from robaudit.audit.models.architectures import create_architecture
from robaudit.audit.models.loading import load_model, save_export
from robaudit.errors import UserError
from robaudit.registry import Registry

# A torch.save file says what it holds only once unpickled: these three all claim it,
# and the content decides (formats.read_torch_save).
TORCH_SAVE = {"state_dict", "checkpoint", "pickle"}


def _onnx(model, x, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "b"}, "logits": {0: "b"}})


def _torchscript(model, x, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated; robaudit still reads it
        torch.jit.save(torch.jit.script(model), path)


def _safetensors(model, x, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


# One way to write each registered format, and what load_model needs to read it back.
WRITERS = {
    "torchscript": _torchscript,
    "export": lambda model, x, path: save_export(model, path, x),
    "state_dict": lambda model, x, path: torch.save(model.state_dict(), path),
    "checkpoint": lambda model, x, path: torch.save({"epoch": 1, "model": model.state_dict()}, path),
    "pickle": lambda model, x, path: torch.save(model, path),
    "safetensors": _safetensors,
    "onnx": _onnx,
}
OPTIONS = {"state_dict": {"arch": "smallcnn"}, "checkpoint": {"arch": "smallcnn"},
           "safetensors": {"arch": "smallcnn"}, "pickle": {"trust_pickle": True}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    torch.manual_seed(0)
    model = create_architecture("smallcnn", num_classes=10).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    root = tmp_path_factory.mktemp("format-files")
    paths = {}
    for name, write in WRITERS.items():
        paths[name] = str(root / f"model.{name}")
        write(model, x, paths[name])
    paths["plain-pickle"] = str(root / "weights.pkl")
    with open(paths["plain-pickle"], "wb") as handle:
        pickle.dump(model.state_dict(), handle)
    return paths


def test_every_registered_format_has_a_file_here():
    assert sorted(WRITERS) == formats.MODEL_FORMATS.names()


def test_formats_are_tried_in_the_documented_order():
    assert formats.format_names() == ["torchscript", "export", "state_dict", "checkpoint", "pickle",
                                      "onnx", "safetensors"]


@pytest.mark.parametrize("name", formats.MODEL_FORMATS.names())
def test_format_detects_its_own_files(name, files):
    path = files[name]
    head = formats.read_head(path)
    assert formats.MODEL_FORMATS.create(name).detect(path, head)
    claimed = {fmt.name for fmt in formats.formats_in_order() if fmt.detect(path, head)}
    assert claimed == (TORCH_SAVE if name in TORCH_SAVE else {name})
    assert load_model(path, num_classes=10, **OPTIONS.get(name, {})).format == name


def test_a_plain_pickle_is_only_claimed_by_pickle(files):
    path = files["plain-pickle"]
    head = formats.read_head(path)
    assert {fmt.name for fmt in formats.formats_in_order() if fmt.detect(path, head)} == {"pickle"}
    assert load_model(path, arch="smallcnn", trust_pickle=True).format == "state_dict"


def _refusal(path) -> str:
    with pytest.raises(UserError) as err:
        load_model(str(path))
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_an_unknown_file_is_refused_in_one_line(tmp_path, files):
    garbage = tmp_path / "model.bin"
    garbage.write_bytes(b"\x00\x01 neither torch nor onnx nor safetensors\n" * 8)
    message = _refusal(garbage)
    assert "cannot tell the format" in message
    assert all(name in message for name in formats.format_names())

    other_zip = tmp_path / "other.zip"
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("top/readme.txt", "not a model")
    assert "zip archive but not a torch.save" in _refusal(other_zip)

    cut = tmp_path / "cut.pt2"
    cut.write_bytes(open(files["export"], "rb").read()[:2000])
    assert "truncated or corrupt" in _refusal(cut)


TOY_MAGIC = b"ROBAUDIT-TOY\n"


@pytest.fixture
def scratch_registry(monkeypatch):
    """A copy of MODEL_FORMATS that a test may register into; the real one is restored after."""
    scratch = Registry("model format")
    for name in formats.MODEL_FORMATS.names():
        scratch.register(name)(formats.MODEL_FORMATS.get(name))
    monkeypatch.setattr(formats, "MODEL_FORMATS", scratch)
    return scratch


def test_a_registered_format_is_used_by_load_model(scratch_registry, files, tmp_path, monkeypatch):
    @formats.register_format
    class ToyFormat(formats.ModelFormat):
        """toy: a magic line, then the seed of a linear classifier"""
        name, order = "toy", 5

        def detect(self, path, head):
            return head.startswith(TOY_MAGIC)

        def read(self, path, options):
            seed = int(open(path, "rb").read()[len(TOY_MAGIC):])
            torch.manual_seed(seed)
            module = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
            return module, ModelInfo(format=self.name, notes=["built by the toy format"])

    path = tmp_path / "model.toy"
    path.write_bytes(TOY_MAGIC + b"7")
    assert formats.format_names()[0] == "toy"
    loaded = load_model(str(path), num_classes=10)
    assert loaded.format == "toy" and loaded.num_classes == 10 and loaded.white_box
    assert "built by the toy format" in loaded.adaptations["notes"]
    assert loaded.adaptations["input_layout"]["layout"] == "nchw"  # the boundary is built as for any format
    assert load_model(str(path), format="toy").format == "toy"
    assert load_model(files["export"]).format == "export"
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"no format knows this\n" * 4)
    assert "toy" in _refusal(garbage)  # listed among the formats to pass with --format

    monkeypatch.undo()
    assert "toy" not in formats.MODEL_FORMATS and "toy" not in formats.format_names()
    assert "cannot tell the format" in _refusal(path)

