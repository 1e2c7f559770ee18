"""Zoo models (audit/models/zoo.py): robustbench:[THREAT/]NAME from the cache, and timm architectures.

Offline and small: RobustBench checkpoints are written here in the zoo's own format
({'state_dict': {'module.' + key: tensor}}, mu/sigma buffers for one case) for the small
registered `smallcnn`, under made-up names in a temporary --zoo-dir. Where robustbench
itself is importable (it is not a test dependency), its zoo gets a made-up small entry and
its downloader is replaced, so nothing touches the network. The timm tests need timm
(the `test` extra installs it) and use its smallest model at 32x32.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np
import pytest
import torch

from robaudit.audit.models import zoo
from robaudit.audit.models.architectures import create_architecture
from robaudit.audit.models.loading import load_model
from robaudit.errors import UserError

from conftest import assert_is_argmax, assert_logits_close
from test_cli import run_cli

MU = torch.tensor([0.4914, 0.4822, 0.4465])
SIGMA = torch.tensor([0.2471, 0.2435, 0.2616])
N = 20


@pytest.fixture(scope="module")
def images():
    return torch.rand(N, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def data_files(tmp_path_factory, images):
    """--data-dir files standing in for CIFAR-10 / CIFAR-100 (the dataset's name is what counts)."""
    root = tmp_path_factory.mktemp("zoo-data")
    np.savez(root / "c10.npz", x_test=images.numpy(), y_test=np.arange(N) % 10)
    np.savez(root / "c100.npz", x_test=images.numpy(), y_test=np.arange(N) % 100)
    np.savez(root / "c10train.npz", x_test=images.numpy(), y_test=np.arange(N) % 10,
             x_train=images.numpy(), y_train=np.arange(N) % 10)
    return root


@pytest.fixture
def no_robustbench(monkeypatch):
    monkeypatch.setattr(zoo, "import_robustbench", lambda: None)


def small_model(classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_architecture("smallcnn", num_classes=classes).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a skipped normalisation shows
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model


def save_zoo_checkpoint(path, model: torch.nn.Module, with_mu_sigma: bool, **extra) -> str:
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    if with_mu_sigma:
        state["module.mu"], state["module.sigma"] = MU.view(1, 3, 1, 1), SIGMA.view(1, 3, 1, 1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"state_dict": state, **extra} if with_mu_sigma or extra else state, path)
    return str(path)


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def expected_logits(model, x, normalised: bool) -> torch.Tensor:
    with torch.no_grad():
        return model((x - MU.view(1, 3, 1, 1)) / SIGMA.view(1, 3, 1, 1) if normalised else x)


def loaded_logits(loaded, x) -> torch.Tensor:
    with torch.no_grad():
        return loaded.module(x)


# --- robustbench:NAME from the cache, robustbench not installed ------------------------------

@pytest.mark.parametrize("dataset, threat, spec, with_mu_sigma", [
    ("cifar10", "Linf", "robustbench:FakeSmall", True),            # checkpoint dict, module., mu/sigma
    ("cifar100", "L2", "robustbench:l2/FakeSmall100", False),       # a raw state_dict, threat prefix
])
def test_cached_checkpoint_is_read_as_weights_and_recorded(
        dataset, threat, spec, with_mu_sigma, tmp_path, data_files, images, no_robustbench, capsys):
    classes = 10 if dataset == "cifar10" else 100
    model = small_model(classes, seed=classes)
    name = spec.split("/")[-1].split(":")[-1]
    cached = save_zoo_checkpoint(tmp_path / "zoo" / dataset / threat / f"{name}.pt", model, with_mu_sigma)
    data = data_files / ("c10.npz" if classes == 10 else "c100.npz")

    out = tmp_path / "out"
    code, _, stderr = run_cli(capsys, "scan", spec, "--dataset", dataset, "--data-dir", data, "--zoo-dir",
                              tmp_path / "zoo", "--attacks", "clean", "--out", out, "--device", "cpu", "--no-report")
    assert code == 0, stderr
    results = json.loads((out / "results.json").read_text())
    record = results["model"]["adaptations"]["zoo"]
    assert results["model"]["path"] == cached and results["model"]["sha256"] == sha256(cached)
    assert results["model"]["arch"] == "smallcnn" and results["model"]["arch_inferred"] is not None
    assert {k: record[k] for k in ("zoo", "model", "threat_model", "dataset", "cache_path", "model_dir_from")} == {
        "zoo": "robustbench", "model": name, "threat_model": threat, "dataset": dataset,
        "cache_path": cached, "model_dir_from": "--zoo-dir"}
    assert "inferred" in record["built_by"] and "not taken from RobustBench's zoo" in record["built_by"]
    normalize = results["model"]["adaptations"]["normalize"]
    notes = " ".join(results["model"]["adaptations"]["notes"])
    if with_mu_sigma:
        assert normalize["source"] == "the file's mu/sigma buffers"
        assert_logits_close(torch.tensor(normalize["mean"]), MU)
    else:
        assert normalize is None and "unknown to robaudit" in notes

    loaded = load_model(spec, dataset=dataset, zoo_dir=str(tmp_path / "zoo"), num_classes=classes)
    expected = expected_logits(model, images, normalised=with_mu_sigma)
    assert_logits_close(loaded_logits(loaded, images), expected, msg=spec)
    clean_pred = np.load(out / "samples.npz")["clean_pred"]
    assert_is_argmax(expected, torch.from_numpy(clean_pred))


def test_missing_checkpoint_without_robustbench_names_the_exact_path(tmp_path, data_files, no_robustbench, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(capsys, "scan", "robustbench:L2/Nowhere2024", "--dataset", "cifar10",
                                   "--data-dir", data_files / "c10.npz", "--zoo-dir", tmp_path / "zoo",
                                   "--attacks", "clean", "--out", out, "--device", "cpu")
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("robaudit: error: "), stderr
    assert str(tmp_path / "zoo" / "cifar10" / "L2" / "Nowhere2024.pt") in lines[0]
    assert "pip install 'robaudit[robustbench]'" in lines[0] and "Traceback" not in stderr
    assert not out.exists() and not (tmp_path / "zoo").exists()


def test_remediate_teacher_takes_zoo_dir_too(tmp_path, data_files, no_robustbench, capsys):
    code, _, stderr = run_cli(capsys, "remediate", "--teacher", "robustbench:Absent", "--zoo-dir", tmp_path / "tz",
                              "--dataset", "cifar10", "--data-dir", data_files / "c10train.npz", "--epochs", "1",
                              "--out", tmp_path / "out", "--device", "cpu")
    assert code == 2 and str(tmp_path / "tz" / "cifar10" / "Linf" / "Absent.pt") in stderr, stderr
    assert not (tmp_path / "out").exists()


def test_zoo_dir_comes_from_the_option_then_the_environment_then_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(zoo.ZOO_DIR_ENV, raising=False)
    assert zoo.resolve_zoo_dir() == (str(tmp_path / "home" / ".cache" / "robaudit" / "robustbench"), "default")
    monkeypatch.setenv(zoo.ZOO_DIR_ENV, str(tmp_path / "env"))
    assert zoo.resolve_zoo_dir() == (str(tmp_path / "env"), "$ROBAUDIT_ZOO_DIR")
    assert zoo.resolve_zoo_dir(str(tmp_path / "opt")) == (str(tmp_path / "opt"), "--zoo-dir")


def test_environment_zoo_dir_is_used_and_recorded(tmp_path, monkeypatch, images, no_robustbench):
    model = small_model(10, seed=3)
    cached = save_zoo_checkpoint(tmp_path / "env" / "cifar10" / "corruptions" / "EnvSmall.pt", model, True)
    monkeypatch.setenv(zoo.ZOO_DIR_ENV, str(tmp_path / "env"))
    loaded = load_model("robustbench:corruptions/EnvSmall", dataset="cifar10", num_classes=10)
    assert loaded.path == cached and loaded.adaptations["zoo"]["model_dir_from"] == "$ROBAUDIT_ZOO_DIR"
    assert_logits_close(loaded_logits(loaded, images), expected_logits(model, images, normalised=True))


@pytest.mark.parametrize("spec, dataset, zoo_dir, expected", [
    ("robustbench:Linfinity/X", "cifar10", None, "unknown RobustBench threat model 'Linfinity'"),
    ("robustbench:L2/../x", "cifar10", None, "malformed RobustBench model name '../x'"),
    ("robustbench:", "cifar10", None, "malformed RobustBench model name ''"),
    ("robustbench:X", "svhn", None, "RobustBench models are for the datasets cifar10, cifar100, imagenet"),
    ("robustbench:X", None, None, "got None"),
    ("model.pt", "cifar10", "zoo", "--zoo-dir is only used with robustbench:NAME models"),
])
def test_malformed_zoo_requests_are_one_line(spec, dataset, zoo_dir, expected, no_robustbench):
    with pytest.raises(UserError) as caught:
        load_model(spec, dataset=dataset, zoo_dir=zoo_dir, num_classes=10)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


# --- robustbench importable: its zoo builds the model (skipped where it is not) -------------

@pytest.fixture
def robustbench_zoo(monkeypatch):
    """robustbench.utils with a made-up small CIFAR-10 Linf entry and a fake downloader that
    writes `zoo_checkpoint[0]` (None: fails as offline); the downloads it was asked for."""
    try:
        utils = zoo.import_robustbench()  # (not importorskip: robaudit serves its `autoattack` import)
    except UserError as err:
        pytest.skip(str(err))
    if utils is None:
        pytest.skip("robustbench is not installed")
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    entries = model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf]
    monkeypatch.setitem(entries, "FakeZooSmall", {"model": lambda: create_architecture("smallcnn", num_classes=10),
                                                  "gdrive_id": "FAKE-ID"})
    state = {"writes": None, "calls": []}

    def download(gdrive_id, target):
        state["calls"].append((gdrive_id, target))
        if state["writes"] is None:
            raise ConnectionError("Failed to resolve host (offline)")
        torch.save(state["writes"], target)

    monkeypatch.setattr(utils, "download_gdrive_new", download)
    return state


def test_robustbench_builds_the_model_and_downloads_into_the_cache(tmp_path, images, robustbench_zoo):
    model = small_model(10, seed=5)
    robustbench_zoo["writes"] = {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}
    cached = tmp_path / "zoo" / "cifar10" / "Linf" / "FakeZooSmall.pt"
    loaded = load_model("robustbench:FakeZooSmall", dataset="cifar10", zoo_dir=str(tmp_path / "zoo"), num_classes=10)
    record = loaded.adaptations["zoo"]
    assert loaded.path == str(cached) and loaded.sha256 == sha256(cached)
    assert record["built_by"].startswith("robustbench.utils.load_model") and record["downloaded"] is True
    assert record["published_at"].endswith("FAKE-ID") and os.listdir(cached.parent) == [cached.name]
    assert_logits_close(loaded_logits(loaded, images), expected_logits(model, images, normalised=False))
    again = load_model("robustbench:FakeZooSmall", dataset="cifar10", zoo_dir=str(tmp_path / "zoo"), num_classes=10)
    assert again.adaptations["zoo"]["downloaded"] is False and len(robustbench_zoo["calls"]) == 1


def test_robustbench_offline_download_says_where_to_put_the_file(tmp_path, robustbench_zoo):
    with pytest.raises(UserError) as caught:
        load_model("robustbench:FakeZooSmall", dataset="cifar10", zoo_dir=str(tmp_path / "zoo"), num_classes=10)
    message = str(caught.value)
    assert str(tmp_path / "zoo" / "cifar10" / "Linf" / "FakeZooSmall.pt") in message and "FAKE-ID" in message
    assert os.listdir(tmp_path / "zoo" / "cifar10" / "Linf") == []  # no partial file left behind


def test_robustbench_reads_its_checkpoint_weights_only(tmp_path, robustbench_zoo):
    model = small_model(10, seed=6)
    cached = tmp_path / "zoo" / "cifar10" / "Linf" / "FakeZooSmall.pt"
    save_zoo_checkpoint(cached, model, False, args=argparse.Namespace(lr=0.1))  # a pickled object
    with pytest.raises(UserError, match="--trust-pickle"):
        load_model("robustbench:FakeZooSmall", dataset="cifar10", zoo_dir=str(tmp_path / "zoo"), num_classes=10)
    loaded = load_model("robustbench:FakeZooSmall", dataset="cifar10", zoo_dir=str(tmp_path / "zoo"),
                        num_classes=10, trust_pickle=True)
    assert loaded.format == "checkpoint" and robustbench_zoo["calls"] == []


# --- timm ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def timm_files(tmp_path_factory):
    """A tiny timm model (4 classes, 32x32) as safetensors, as an HF folder, and variants."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    name = "test_resnet" if timm.is_model("test_resnet") else "resnet10t"
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=4).eval()
    root = tmp_path_factory.mktemp("timm")
    cfg = {"input_size": [3, 32, 32], "mean": [0.5, 0.45, 0.4], "std": [0.2, 0.25, 0.3], "classifier": "fc"}
    for folder, size in (("hf", [3, 32, 32]), ("hf224", [3, 224, 224])):
        (root / folder).mkdir()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / folder / "model.safetensors")
        config = {"architecture": name, "num_classes": 4, "pretrained_cfg": {**cfg, "input_size": size}}
        (root / folder / "config.json").write_text(json.dumps(config))
    partial = {k: v.contiguous() for k, v in list(model.state_dict().items())[:-1]}  # the head's bias missing
    save_file(partial, root / "partial.safetensors")
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    np.savez(root / "data.npz", x_test=images.numpy(), y_test=np.arange(8) % 4)
    return {"root": root, "name": name, "model": model, "cfg": cfg, "images": images}


def timm_load(path, **kwargs):
    return load_model(path, num_classes=4, dataset_classes=["a", "b", "c", "d"], **kwargs)


def test_timm_arch_loads_a_safetensors_file_without_assuming_a_normalisation(timm_files):
    loaded = timm_load(timm_files["root"] / "hf" / "model.safetensors", arch=f"timm:{timm_files['name']}")
    x = timm_files["images"]
    with torch.no_grad():
        assert_logits_close(loaded_logits(loaded, x), timm_files["model"](x))
    assert loaded.arch == f"timm:{timm_files['name']}" and loaded.adaptations["normalize"] is None
    assert loaded.adaptations["zoo"]["zoo"] == "timm" and loaded.adaptations["zoo"]["config"] is None
    assert any("pass the folder" in note for note in loaded.adaptations["notes"])


def test_timm_folder_uses_its_pretrained_cfg_as_the_normalisation(timm_files, tmp_path, capsys):
    root, cfg, x = timm_files["root"], timm_files["cfg"], timm_files["images"]
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = timm_files["model"]((x - mean) / std)
    loaded = timm_load(root / "hf")
    assert_logits_close(loaded_logits(loaded, x), expected)
    normalize = loaded.adaptations["normalize"]
    assert normalize["mean"] == cfg["mean"] and normalize["source"].startswith("the timm pretrained_cfg in")
    assert loaded.path == str(root / "hf" / "model.safetensors") and loaded.format == "safetensors"
    assert loaded.adaptations["zoo"]["pretrained_cfg"]["input_size"] == [3, 32, 32]
    code, _, stderr = run_cli(capsys, "scan", root / "hf", "--dataset", root / "data.npz", "--attacks", "clean",
                              "--out", tmp_path / "out", "--device", "cpu", "--no-report")
    assert code == 0, stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["model"]["arch"] == f"timm:{timm_files['name']}"
    assert_is_argmax(expected, torch.from_numpy(np.load(tmp_path / "out" / "samples.npz")["clean_pred"]))


def test_timm_folder_refuses_a_disagreeing_mean_and_accepts_an_equal_one(timm_files, tmp_path, capsys):
    root = timm_files["root"]
    code, _, stderr = run_cli(capsys, "scan", root / "hf", "--dataset", root / "data.npz", "--mean", "0.1,0.1,0.1",
                              "--std", "0.2,0.25,0.3", "--out", tmp_path / "out", "--device", "cpu")
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "disagree with the normalisation in the timm pretrained_cfg" in stderr and not (tmp_path / "out").exists()
    loaded = timm_load(root / "hf", mean=timm_files["cfg"]["mean"], std=timm_files["cfg"]["std"])
    assert any("normalised once" in note for note in loaded.adaptations["notes"])


@pytest.mark.parametrize("case, expected", [
    ("input_size", "pretrained_cfg input_size [3, 224, 224] differs from the dataset's images [3, 32, 32]"),
    ("partial", "do not match arch 'timm:"),
    ("other_arch", "disagrees with"),
    ("unknown", "unknown timm architecture 'no_such_net'"),
])
def test_timm_mismatches_are_refused_in_one_line(timm_files, case, expected):
    root, name = timm_files["root"], timm_files["name"]
    path, arch = {"input_size": (root / "hf224", None), "partial": (root / "partial.safetensors", f"timm:{name}"),
                  "other_arch": (root / "hf", "timm:resnet18"),
                  "unknown": (root / "partial.safetensors", "timm:no_such_net")}[case]
    with pytest.raises(UserError) as caught:
        timm_load(path, arch=arch)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_timm_missing_says_how_to_install_it(tmp_path, monkeypatch):
    (tmp_path / "w.safetensors").write_bytes(b"unused")
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(UserError, match=r"pip install 'robaudit\[timm\]'"):
        timm_load(tmp_path / "w.safetensors", arch="timm:resnet18")
