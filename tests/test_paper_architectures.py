"""preactresnet34, mnist-cnn, the students at 64/96 px, and torchvision classifiers inferred from weights."""

import json

import pytest
import torch
import torchvision

from robaudit.audit.models.architectures import create_architecture
from robaudit.audit.models.loading import load_model
from robaudit.audit.models.torchvision_inference import candidate_names
from robaudit.cli import main
from robaudit.errors import UserError
from tests.paper_layouts import write_tinyimagenet


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_preactresnet34_is_the_cfa_form():
    with torch.device("meta"):
        model = create_architecture("preactresnet34", num_classes=200)
    blocks = [len(getattr(model, f"layer{k}")) for k in range(1, 5)]
    assert blocks == [3, 4, 6, 3] and model.bn is not None
    # 21.3M parameters: PreAct ResNet-34 = ResNet-34's 21.28M with a 200-class head
    assert 21_000_000 < _n_params(model) < 21_500_000


@pytest.mark.parametrize("name", ["resnet18", "preactresnet18", "mobilenetv2", "preactresnet34"])
@pytest.mark.parametrize("side", [64, 96])
def test_students_take_tinyimagenet_and_stl10_sizes(name, side):
    with torch.device("meta"):
        model = create_architecture(name, num_classes=200).eval()
        assert model(torch.empty(2, 3, side, side)).shape == (2, 200)


def test_mnist_cnn_shapes():
    model = create_architecture("mnist-cnn").eval()
    assert model.conv1.in_channels == 1 and model.fc1.in_features == 7 * 7 * 64
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("name", ["preactresnet34", "mnist-cnn"])
def test_new_architectures_inferred_from_weights(tmp_path, name):
    torch.manual_seed(0)
    shape = (1, 28, 28) if name == "mnist-cnn" else (3, 64, 64)
    torch.save(create_architecture(name, num_classes=10).state_dict(), tmp_path / "w.pt")
    loaded = load_model(tmp_path / "w.pt", num_classes=10, input_shape=shape)
    assert loaded.arch == name and loaded.arch_inferred["candidates"] == [name]


def test_torchvision_resnet18_inferred_and_wrong_arch_names_the_flag(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "r18.pt")
    loaded = load_model(tmp_path / "r18.pt", num_classes=10, input_shape=(3, 64, 64))
    assert loaded.arch == "torchvision:resnet18"
    with pytest.raises(UserError) as info:
        load_model(tmp_path / "r18.pt", arch="resnet18", num_classes=10, input_shape=(3, 64, 64))
    message = str(info.value)
    assert "conv1.weight: file [64, 3, 7, 7]" in message and message.endswith("pass --arch torchvision:resnet18")


def test_torchvision_family_prefilter():
    state = torchvision.models.mobilenet_v3_small(num_classes=5).state_dict()
    names = candidate_names(state)
    assert "torchvision:mobilenet_v3_small" in names and not any("resnet" in n for n in names)
    assert candidate_names(create_architecture("resnet18").state_dict()) == []   # CIFAR keys: no family
    from robaudit.audit.models.torchvision_inference import exact_fits

    assert [f.name for f in exact_fits(state, 5)] == ["torchvision:mobilenet_v3_small"]


def test_scan_infers_torchvision_model_on_tinyimagenet_layout(tmp_path, capsys):
    write_tinyimagenet(tmp_path / "data", per_class_train=1, per_class_val=1)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), tmp_path / "r18.pt")
    try:
        main(["scan", str(tmp_path / "r18.pt"), "--dataset", "tinyimagenet", "--data-dir", str(tmp_path / "data"),
              "--device", "cpu", "--attacks", "clean", "--workers", "0", "--no-report", "--out", str(tmp_path / "o")])
    except SystemExit as exit_:
        assert exit_.code == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "o/results.json").read_text())
    assert results["model"]["arch"] == "torchvision:resnet18"
    assert "torchvision:resnet18" in capsys.readouterr().err
