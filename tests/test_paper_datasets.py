"""MNIST, STL-10 and Tiny-ImageNet on tiny generated copies of their on-disk layouts."""

import json

import numpy as np
import pytest
import torch

from robaudit.audit.data.datasets import list_datasets, load_dataset
from robaudit.audit.data.grey import check_model_channels
from robaudit.audit.data.paper_datasets import DATASET_DEFAULTS, dataset_defaults
from robaudit.audit.models.architectures import create_architecture
from robaudit.errors import UserError
from test_cli import run_cli
from tests.paper_layouts import TINY_WNIDS, write_mnist, write_stl10, write_tinyimagenet


def test_registered_and_defaults_recorded():
    assert {"mnist", "stl10", "tinyimagenet"} <= set(list_datasets())
    assert DATASET_DEFAULTS["mnist"]["eps"] == 0.3 and "Madry" in DATASET_DEFAULTS["mnist"]["source"]
    assert dataset_defaults("TinyImageNet")["tau_bounds"] == (0.9, 1.1)
    from robaudit.remediate.distillation import default_tau_bounds

    # ABSLD's own default reads the same bounds for Tiny-ImageNet
    assert default_tau_bounds("tinyimagenet", "preactresnet18") == DATASET_DEFAULTS["tinyimagenet"]["tau_bounds"]


def test_mnist_layout_matches_torchvision_reader(tmp_path):
    written = write_mnist(tmp_path, n_train=20, n_test=10)
    data = load_dataset("mnist", split="test", data_dir=tmp_path, download=False)
    assert data.x.shape == (10, 1, 28, 28) and data.classes == [str(d) for d in range(10)]
    images, labels = written["test"]
    # exact: uint8 / 255 is one correctly rounded division either way
    assert torch.equal(data.x[:, 0], torch.from_numpy(images).float() / 255)
    assert data.y.tolist() == labels.tolist()
    import torchvision

    reference = torchvision.datasets.MNIST(str(tmp_path), train=True, download=False)
    train = load_dataset("mnist", split="train", data_dir=tmp_path, download=False, n_per_class=1)
    assert torch.equal((train.x[:, 0] * 255).round().to(torch.uint8), reference.data[train.index])
    assert train.y.tolist() == reference.targets[train.index].tolist()


def test_mnist_bad_file_is_one_line(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "MNIST/raw/t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + b"\x00" * 8)
    with pytest.raises(UserError, match="not an MNIST images file"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_stl10_layout_matches_torchvision_reader(tmp_path, monkeypatch):
    written = write_stl10(tmp_path, n_train=4, n_test=6)
    data = load_dataset("stl10", split="test", data_dir=tmp_path, download=False)
    images, labels = written["test"]
    assert data.x.shape == (6, 3, 96, 96) and data.classes[2] == "car"
    assert torch.equal(data.x, torch.from_numpy(images).float() / 255)   # rows, not columns
    assert data.y.tolist() == labels.tolist()
    import torchvision

    # torchvision's STL10 checks the release md5s; its reading of the layout is what is compared
    monkeypatch.setattr(torchvision.datasets.STL10, "_check_integrity", lambda self: True)
    reference = torchvision.datasets.STL10(str(tmp_path), split="train", download=False)
    train = load_dataset("stl10", split="train", data_dir=tmp_path, download=False)
    assert np.array_equal((train.x * 255).round().to(torch.uint8).numpy(), reference.data)
    assert train.y.tolist() == reference.labels.tolist()


def test_tinyimagenet_layout(tmp_path):
    write_tinyimagenet(tmp_path, per_class_train=3, per_class_val=2)
    train = load_dataset("tinyimagenet", split="train", data_dir=tmp_path, download=False, workers=0)
    wnids = sorted(TINY_WNIDS)
    assert train.x.shape == (12, 3, 64, 64) and len(train.classes) == 4
    assert train.classes[wnids.index("n01443537")] == "goldfish (n01443537)"   # a repeated name gets its wnid
    assert train.classes[wnids.index("n02124075")] == "Egyptian cat"
    assert train.y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    test = load_dataset("tinyimagenet", data_dir=tmp_path / "tiny-imagenet-200", download=False, workers=0)
    # val_annotations: val_0..1 -> TINY_WNIDS[0], val_2..3 -> TINY_WNIDS[1], ...
    expected = [wnids.index(TINY_WNIDS[k // 2]) for k in range(8)]
    assert test.y.tolist() == expected and test.subset["split_read"] == "val (labelled)"
    as_path = load_dataset(tmp_path / "tiny-imagenet-200", data_dir=None, workers=0)   # --dataset DIR
    assert as_path.name == "tinyimagenet" and as_path.y.tolist() == expected
    x = test.x[:]   # grey JPEGs decode to 3 equal channels
    assert x.shape == (8, 3, 64, 64) and torch.equal(x[:, 0], x[:, 1])


@pytest.mark.parametrize("name, what", [("mnist", "MNIST/raw/t10k-images-idx3-ubyte"),
                                        ("stl10", "stl10_binary/test_X.bin"),
                                        ("tinyimagenet", "tiny-imagenet-200.zip")])
def test_missing_files_say_where_to_put_them(tmp_path, monkeypatch, name, what):
    with pytest.raises(UserError, match="download is off") as info:
        load_dataset(name, data_dir=tmp_path, download=False)
    assert what in str(info.value) and "\n" not in str(info.value)
    import torchvision.datasets.utils as tv_utils

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(tv_utils, "download_url", offline)
    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(UserError, match="could not download") as info:
        load_dataset(name, data_dir=tmp_path, download=True)
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


def test_grey_data_and_rgb_models(tmp_path):
    write_mnist(tmp_path)
    data = load_dataset("mnist", data_dir=tmp_path, download=False)
    check_model_channels(create_architecture("mnist-cnn"), 1, "m")   # 1-channel model: fine
    with pytest.raises(UserError, match="--grey-to-rgb"):
        check_model_channels(create_architecture("resnet18"), 1, "r18.pt")
    rgb = load_dataset("mnist", data_dir=tmp_path, download=False, grey_to_rgb=True)
    assert rgb.x.shape == (10, 3, 28, 28) and rgb.subset["grey_to_rgb"] is True
    assert torch.equal(rgb.x[:, 2], data.x[:, 0])
    with pytest.raises(UserError, match="already have 3 channels"):
        write_stl10(tmp_path)
        load_dataset("stl10", data_dir=tmp_path, download=False, grey_to_rgb=True)




def test_scan_mnist_layout_with_mnist_cnn_and_refuses_rgb_model(tmp_path, capsys):
    write_mnist(tmp_path / "data")
    torch.manual_seed(0)
    torch.save(create_architecture("mnist-cnn").state_dict(), tmp_path / "cnn.pt")
    torch.save(create_architecture("smallcnn").state_dict(), tmp_path / "rgb.pt")
    common = ["--dataset", "mnist", "--data-dir", tmp_path / "data", "--device", "cpu",
              "--attacks", "clean,fgsm", "--eps", "0.3", "--no-report"]
    code, out, err = run_cli(capsys, "scan", tmp_path / "cnn.pt", *common, "--out", tmp_path / "o1")
    assert code == 0, err
    results = json.loads((tmp_path / "o1/results.json").read_text())
    assert results["model"]["arch"] == "mnist-cnn"   # inferred from the 1-channel weights
    assert "usual L-inf budget" not in err   # --eps 0.3 was given
    code, _, err = run_cli(capsys, "scan", tmp_path / "cnn.pt", *[a for a in common if a not in ("--eps", "0.3")],
                        "--limit", "2", "--out", tmp_path / "o0")
    assert code == 0 and "mnist's usual L-inf budget is 0.3 (eps 0.3, 40 steps of 0.01: Madry" in err
    code, out, err = run_cli(capsys, "scan", tmp_path / "rgb.pt", "--arch", "smallcnn", *common,
                          "--out", tmp_path / "o2")
    assert code == 2 and "--grey-to-rgb" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o2/results.json").exists()
    code, out, err = run_cli(capsys, "scan", tmp_path / "rgb.pt", "--arch", "smallcnn", *common,
                          "--grey-to-rgb", "--out", tmp_path / "o3")
    assert code == 0, err


def test_scan_tinyimagenet_layout_with_preactresnet18(tmp_path, capsys):
    write_tinyimagenet(tmp_path / "data", per_class_train=1, per_class_val=2)
    torch.manual_seed(0)
    torch.save(create_architecture("preactresnet18", num_classes=4).state_dict(), tmp_path / "p18.pt")
    code, out, err = run_cli(capsys, "scan", tmp_path / "p18.pt", "--arch", "preactresnet18",
                          "--dataset", "tinyimagenet", "--data-dir", tmp_path / "data", "--device", "cpu",
                          "--attacks", "clean,fgsm", "--workers", "0", "--no-report", "--out", tmp_path / "o")
    assert code == 0, err
    results = json.loads((tmp_path / "o/results.json").read_text())
    assert results["dataset"]["name"] == "tinyimagenet" and results["dataset"]["num_classes"] == 4


def test_remediate_on_grey_mnist_with_1_channel_models_and_no_flip(tmp_path, capsys):
    write_mnist(tmp_path / "data", n_train=20, n_test=10)
    torch.manual_seed(0)
    torch.save(create_architecture("mnist-cnn").state_dict(), tmp_path / "t.pt")
    code, _, err = run_cli(capsys, "remediate", "--teacher", tmp_path / "t.pt", "--dataset", "mnist", "--data-dir",
                        tmp_path / "data", "--student", "mnist-cnn", "--epochs", "1", "--steps", "1", "--eps", "0.3",
                        "--val-per-class", "0", "--audit-attacks", "clean", "--export-formats", "pt2",
                        "--device", "cpu", "--out", tmp_path / "o")
    assert code == 0, err
    options = json.loads((tmp_path / "o/student/results.json").read_text())["training"]["options"]
    assert options["augment"] is False and "no crop/flip augmentation on mnist" in err
