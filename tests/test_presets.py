"""Named configurations: values with sources, overrides recorded, and a 1-epoch smoke run of
every preset on a tiny generated dataset of its layout (sizes, models and attacks overridden
so each run takes seconds; the overrides are themselves recorded and checked)."""

import json

import numpy as np
import pytest
import torch

from robaudit.audit.models.architectures import create_architecture
from robaudit.errors import UserError
from test_cli import run_cli
from robaudit.remediate.presets import PRESET_OPTIONS, PRESETS, apply_preset, get_preset, list_presets
from tests.paper_layouts import write_tinyimagenet




def test_every_value_has_a_source_and_a_known_option():
    for preset in PRESETS.values():
        assert preset.row and preset.dataset in ("cifar10", "cifar100", "tinyimagenet")
        for key, (value, source) in preset.values.items():
            assert key in PRESET_OPTIONS, (preset.name, key)
            assert isinstance(source, str) and len(source) > 10, (preset.name, key)
    absld = get_preset("absld-tinyimagenet-preactresnet18").values
    assert (absld["tau_min"][0], absld["tau_max"][0], absld["epochs"][0]) == (0.9, 1.1, 100)
    assert get_preset("absld-cifar100-resnet18").values["tau_max"][0] == 3.0
    with pytest.raises(UserError, match="robaudit list --presets"):
        get_preset("absld-mnist")


def test_given_flags_override_and_are_recorded():
    params = {"epochs": 1, "lr": 0.1, "student": None, "method": None}
    resolved, record = apply_preset("absld-cifar10-resnet18", params, given={"epochs", "lr"})
    assert resolved["epochs"] == 1 and resolved["student"] == "resnet18" and resolved["method"] == "absld"
    # lr 0.1 = the preset's: no override; the milestones of 300 epochs are scaled to the given epochs
    assert record["overrides"] == {"epochs": {"preset": 300, "given": 1},
                                   "milestones": {"preset": "215,260,285", "given": "scaled to --epochs (robaudit's rule)"}}
    assert resolved["milestones"] is None
    kept, record = apply_preset("absld-cifar10-resnet18", {**params, "milestones": "5"}, given={"epochs", "milestones"})
    assert kept["milestones"] == "5" and record["overrides"]["milestones"] == {"preset": "215,260,285", "given": "5"}
    assert record["values"]["epochs"]["source"].startswith("ABSLD paper Sec. 5.1")


def test_list_presets_shows_every_preset_with_its_source(capsys):
    code, out, _ = run_cli(capsys, "list", "--presets")
    assert code == 0
    for name in list_presets():
        assert f"{name}: {PRESETS[name].row}" in out


def _cifar_npz(path, classes, per_class=2, seed=0):
    rng = np.random.default_rng(seed)
    n = classes * per_class
    labels = np.arange(n) % classes
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    np.savez(path, x_train=images, y_train=labels, x_test=images, y_test=labels)
    return path


def _data_args(preset, tmp_path):
    if preset.dataset == "tinyimagenet":
        write_tinyimagenet(tmp_path / "data", per_class_train=2, per_class_val=1, side=64)
        return ["--dataset", "tinyimagenet", "--data-dir", tmp_path / "data", "--workers", "0"], 4
    classes = 10 if preset.dataset == "cifar10" else 100
    return ["--dataset", preset.dataset, "--data-dir", _cifar_npz(tmp_path / "tiny.npz", classes)], classes


SMOKE = ["--epochs", "1", "--steps", "1", "--batch-size", "8", "--student", "smallcnn", "--arch", "smallcnn",
         "--val-steps", "1", "--audit-attacks", "clean", "--device", "cpu", "--export-formats", "pt2"]
FERD_SMALL = ["g_steps=1", "synthesis_batch_size=8", "kd_steps=1", "ib_steps=1", "teacher_steps=1", "warmup=0",
              "bank_size=16"]


@pytest.mark.parametrize("name", list_presets())
def test_preset_smoke_run(tmp_path, capsys, name):
    preset = PRESETS[name]
    data_args, classes = _data_args(preset, tmp_path)
    torch.manual_seed(0)
    torch.save(create_architecture("smallcnn", num_classes=classes).state_dict(), tmp_path / "teacher.pt")
    method = preset.values["method"][0]
    extra = ["--val-per-class", "1" if method == "cfa" else "0"]
    if method == "ferd":
        extra += [f"--method-opt={kv}" for kv in FERD_SMALL]
    code, out, err = run_cli(capsys, "remediate", "--preset", name, "--teacher", tmp_path / "teacher.pt",
                          *data_args, *SMOKE, *extra, "--out", tmp_path / "out")
    assert code == 0, err
    results = json.loads((tmp_path / "out/student/results.json").read_text())
    record = results["training"]["options"]["preset"]
    assert record["name"] == name and results["training"]["method"] == method
    if "epochs" in preset.values:
        assert record["overrides"]["epochs"] == {"preset": preset.values["epochs"][0], "given": 1}
    else:   # the method's own schedule set the epochs; --epochs 1 overrides that, not the preset
        assert "epochs" not in record["overrides"]
    assert record["overrides"]["student"]["given"] == "smallcnn"
    assert results["training"]["epochs"] == 1
    if "tau_min" in preset.values:   # the preset's temperature bounds reached the method
        bounds = results["training"]["options"]["method"]["tau_bounds"]
        assert bounds == [preset.values["tau_min"][0], preset.values["tau_max"][0]]


def test_export_formats_flag_is_checked():
    from robaudit.remediate.export import parse_export_formats

    assert parse_export_formats("pt2, ONNX") == ("pt2", "onnx")
    for bad in ("onnx", "pt2,zip", ""):
        with pytest.raises(UserError, match="--export-formats"):
            parse_export_formats(bad)
