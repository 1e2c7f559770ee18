"""The remediation loop: schedule/split/augmentation helpers, ABSLD's temperatures on a
dataset with one deliberately hard class, bitwise resume, the NaN stop, bad input, and
one end-to-end run through export and `engine.run_scan`.

Synthetic 3x8x8 colour images, tiny conv nets, 1-3 epochs of PGD-2: seconds on one core.
"""

from __future__ import annotations

import copy
import csv
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from robaudit.audit.data.datasets import EvalData
from robaudit.errors import UserError
from robaudit.remediate.train import (
    RemediateConfig, augment_batch, epoch_permutation, run_remediate, scale_milestones,
    selection_score, split_validation, worst_metric,
)

from conftest import assert_logits_close

C = 4
CLASSES = ["red", "green", "blue", "mixed"]
COLOURS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9]])


def colour_dataset(per_class: int = 40, seed: int = 0, size: int = 8) -> EvalData:
    """Classes 0-2: a solid colour + noise. Class 3 ("mixed"), the deliberately hard class:
    its images are drawn from the other three colours, so nothing separates it from them."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(C).repeat_interleave(per_class)
    colour_of = torch.where(y < 3, y, torch.randint(0, 3, (len(y),), generator=generator))
    x = COLOURS[colour_of][:, :, None, None] + 0.05 * torch.randn(len(y), 3, size, size, generator=generator)
    order = torch.randperm(len(y), generator=generator)
    return EvalData(name="synthetic", split="train", x=x.clamp(0, 1)[order].contiguous(), y=y[order],
                    index=torch.arange(len(y)), classes=list(CLASSES),
                    subset={"limit": None, "n_per_class": per_class, "total_in_split": len(y)},
                    source="tests")


class ColourTeacher(nn.Module):
    """Reads the mean chromaticity (unchanged by the black borders of padded crops):
    confident on classes 0-2, never predicts the hard class."""

    def forward(self, x):
        mean = x.mean(dim=(2, 3))
        chroma = mean / mean.sum(1, keepdim=True).clamp_min(1e-6)    # [B, 3]
        templates = (COLOURS / COLOURS.sum(1, keepdim=True)).to(x.device)   # on the GPU under test_virtual_cuda
        scores = -50 * ((chroma[:, None, :] - templates[None]) ** 2).sum(-1)
        return torch.cat([scores, torch.full_like(scores[:, :1], -3.0)], dim=1)


def tiny_student(seed: int = 0, num_classes: int = C) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


def teacher_model(module=None):
    return SimpleNamespace(module=module or ColourTeacher(), path="colour-teacher")


def config(out_dir, **overrides) -> RemediateConfig:
    base = dict(out_dir=Path(out_dir), method="absld", epochs=2, batch_size=32, steps=2, val_per_class=2,
                val_steps=2, milestones=(2,), export_formats=(), progress=False)
    base.update(overrides)
    return RemediateConfig(**base)


def read_metrics(path: Path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ================================================================= helpers
def test_scale_milestones_keeps_the_paper_fractions():
    assert scale_milestones(300) == (215, 260, 285)
    assert scale_milestones(30) == (22, 26, 28)
    assert scale_milestones(100) == (72, 87, 95)
    assert scale_milestones(3) == (2, 3)          # duplicates removed, never past the last epoch
    assert scale_milestones(1) == (1,)


def test_split_validation_is_seeded_per_class_and_disjoint():
    data = colour_dataset(per_class=10)
    train, val = split_validation(data.y, data.index, 3, seed=5, num_classes=C)
    assert torch.bincount(data.y[val], minlength=C).tolist() == [3, 3, 3, 3]
    assert len(set(train.tolist()) & set(val.tolist())) == 0 and len(train) + len(val) == len(data.y)
    again, _ = split_validation(data.y, data.index, 3, seed=5, num_classes=C)
    assert torch.equal(train, again)
    _, other = split_validation(data.y, data.index, 3, seed=6, num_classes=C)
    assert not torch.equal(val, other)
    with pytest.raises(UserError, match="val-per-class"):
        split_validation(data.y, data.index, 10, seed=5, num_classes=C)


def test_augmentation_is_a_padded_crop_and_flip_keyed_by_dataset_index():
    x = torch.rand(6, 3, 8, 8)
    index = torch.tensor([4, 9, 1, 7, 3, 0])
    out = augment_batch(x, index, seed=1, epoch=3)
    # Each output is some 8x8 window of the zero-padded image, possibly mirrored.
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(len(x)):
        windows = [padded[i, :, r:r + 8, c:c + 8] for r in range(9) for c in range(9)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)
    # Per sample: the same image with the same index gets the same crop in any batch.
    torch.testing.assert_close(augment_batch(x[3:], index[3:], seed=1, epoch=3), out[3:], rtol=0, atol=0)  # copies, no arithmetic
    assert not torch.equal(augment_batch(x, index, seed=1, epoch=4), out)
    assert torch.equal(epoch_permutation(50, 0, 2), epoch_permutation(50, 0, 2))
    assert not torch.equal(epoch_permutation(50, 0, 2), epoch_permutation(50, 0, 3))


def test_selection_score_uses_worst_ten_percent_for_many_classes():
    ten = torch.tensor([0.5, 0.2, 0.9, 0.4, 0.6, 0.5, 0.5, 0.5, 0.5, 0.4])
    assert selection_score(ten) == pytest.approx(0.5 + 0.2)
    hundred = torch.linspace(0.0, 0.99, 100)
    assert worst_metric(hundred) == pytest.approx(float(hundred[:10].mean()))


# ================================================================= ABSLD on a hard class
def test_hard_class_temperature_goes_down_and_easy_ones_go_up(tmp_path):
    summary = run_remediate(config(tmp_path, epochs=2, val_per_class=0, milestones=(), batch_size=16,
                                   method_options={"loss_scale": 1.0}),
                            teacher=teacher_model(), train_data=colour_dataset(per_class=40),
                            student_module=tiny_student())
    temps = summary["training"]["temperatures"]
    assert len(temps["tau_adv"]) == 2
    for tau in (temps["tau_adv"][-1], temps["tau_nat"][-1]):
        assert tau[3] == pytest.approx(0.8)           # the hardest class moves by the full beta twice
        assert min(tau[:3]) > 1.0
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [float(r["tau_adv:mixed"]) for r in rows] == pytest.approx([0.9, 0.8])
    risk_hard = float(rows[-1]["train_risk_adv:mixed"])
    assert risk_hard > max(float(rows[-1][f"train_risk_adv:{c}"]) for c in CLASSES[:3])


# ================================================================= resume and failures
@pytest.mark.parametrize("method", ["absld", "cfa"])
def test_resume_is_bitwise_equal_to_a_straight_run(tmp_path, method):
    data = colour_dataset(per_class=12)
    options = {"averaging_start": 2, "fawa_threshold": 0.0} if method == "cfa" else {}
    straight = tmp_path / "straight"
    run_remediate(config(straight, method=method, epochs=3, method_options=options),
                  teacher=teacher_model(), train_data=data, student_module=tiny_student())
    split = tmp_path / "split"
    run_remediate(config(split, method=method, epochs=2, method_options=options),
                  teacher=teacher_model(), train_data=data, student_module=tiny_student())
    run_remediate(config(split, method=method, epochs=3, resume=True, method_options=options),
                  teacher=teacher_model(), train_data=data, student_module=tiny_student(seed=99))
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(split / "checkpoint.pt", weights_only=True)
    # Bitwise: the resumed run repeats the straight run's kernel calls on the same batches
    # from the same saved state, in this process.
    assert a["epoch"] == b["epoch"] == 3
    for key in a["student"]:
        assert torch.equal(a["student"][key], b["student"][key]), key
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(state_a["momentum_buffer"], state_b["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]
    assert repr(a["method"]) == repr(b["method"])
    assert a["best"] == b["best"]

    def without_seconds(path):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in read_metrics(path)]

    assert without_seconds(straight / "metrics.csv") == without_seconds(split / "metrics.csv")
    best_a = torch.load(straight / "best.pt", weights_only=True)["state_dict"]
    best_b = torch.load(split / "best.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)


class PoisonedAfter(nn.Module):
    """Returns NaN logits once it has run `after` train-mode forward passes."""

    def __init__(self, base: nn.Module, after: int):
        super().__init__()
        self.base, self.after, self.calls = base, after, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
        out = self.base(x)
        return out * float("nan") if self.calls > self.after else out


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    data = colour_dataset(per_class=10)        # 32 training images after validation: 1 batch
    student = PoisonedAfter(tiny_student(), after=2)   # epoch 1: two train-mode passes (x', x)
    with pytest.raises(UserError, match=r"loss became nan at epoch 2.*last good checkpoint \(epoch 1\)"):
        run_remediate(config(tmp_path, method="rslad", epochs=3), teacher=teacher_model(),
                      train_data=data, student_module=student)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())
    assert len(read_metrics(tmp_path / "metrics.csv")) == 1
    assert (tmp_path / "best.pt").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_bad_input_fails_with_one_line(tmp_path):
    data = colour_dataset(per_class=6)
    three_class_teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    with pytest.raises(UserError, match="teacher predicts 3 classes but the dataset has 4"):
        run_remediate(config(tmp_path / "a"), teacher=teacher_model(three_class_teacher), train_data=data,
                      student_module=tiny_student())
    with pytest.raises(UserError, match="student predicts 5 classes"):
        run_remediate(config(tmp_path / "b"), teacher=teacher_model(), train_data=data,
                      student_module=tiny_student(num_classes=5))
    with pytest.raises(UserError, match="unknown method"):
        run_remediate(config(tmp_path / "c", method="magic"), teacher=teacher_model(), train_data=data,
                      student_module=tiny_student())
    with pytest.raises(UserError, match="val-per-class"):
        run_remediate(config(tmp_path / "d", method="cfa", val_per_class=0), teacher=teacher_model(),
                      train_data=data, student_module=tiny_student())
    with pytest.raises(UserError, match="val-steps"):
        run_remediate(config(tmp_path / "d", val_steps=-1), teacher=teacher_model(), train_data=data,
                      student_module=tiny_student())
    assert not (tmp_path / "d").exists()
    run_remediate(config(tmp_path / "e", epochs=1, method="sat"), teacher=teacher_model(), train_data=data,
                  student_module=tiny_student())
    with pytest.raises(UserError, match="pass --resume"):
        run_remediate(config(tmp_path / "e", epochs=1, method="sat"), teacher=teacher_model(), train_data=data,
                      student_module=tiny_student())
    with pytest.raises(UserError, match="cannot resume.*lr"):
        run_remediate(config(tmp_path / "e", epochs=2, method="sat", lr=0.05, resume=True),
                      teacher=teacher_model(), train_data=data, student_module=tiny_student())


def test_out_of_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno
    import os as os_module

    data = colour_dataset(per_class=6)
    run_remediate(config(tmp_path, epochs=1, method="sat"), teacher=teacher_model(), train_data=data,
                  student_module=tiny_student())
    before = (tmp_path / "checkpoint.pt").read_bytes()
    real_fsync = os_module.fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os_module, "fsync", full_disk)
    with pytest.raises(UserError, match="no space left"):
        run_remediate(config(tmp_path, epochs=2, method="sat", resume=True), teacher=teacher_model(),
                      train_data=data, student_module=tiny_student())
    monkeypatch.setattr(os_module, "fsync", real_fsync)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))


# ================================================================= end to end
def test_end_to_end_remediate_exports_and_reaudits_the_student(tmp_path):
    import json

    import onnxruntime

    data = colour_dataset(per_class=10, size=16)
    test_data = copy.deepcopy(colour_dataset(per_class=4, seed=1, size=16))
    test_data.split = "test"
    cfg = config(tmp_path, student="smallcnn", epochs=1, export_formats=("pt2", "torchscript", "onnx"),
                 audit_attacks=("clean", "pgd"), audit_overrides={"pgd": {"steps": 2}}, audit_batch_size=64)
    summary = run_remediate(cfg, teacher=teacher_model(), train_data=data, test_data=test_data)
    assert all(summary["exports"][f]["ok"] for f in ("pt2", "torchscript", "onnx")), summary["exports"]
    results = json.loads((tmp_path / "student" / "results.json").read_text())
    assert results["model"]["path"].endswith("student.pt2")
    training = results["training"]
    assert training["method"] == "absld" and training["teacher"] == "colour-teacher"
    assert training["epochs"] == 1 and training["selected_epoch"] == 1
    assert len(training["temperatures"]["tau_adv"]) == 1 and len(training["temperatures"]["tau_adv"][0]) == C
    assert set(results["attacks"]) == {"clean", "pgd"}
    assert (tmp_path / "student" / "report.html").exists()
    # The three exports compute the same function.
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    from robaudit.audit.models.architectures import create_architecture

    reference = create_architecture("smallcnn", C)
    reference.load_state_dict(best["state_dict"])
    reference.eval()
    x = test_data.x[:5]
    expected = reference(x).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # torch.jit is deprecated, still loadable
        scripted = torch.jit.load(str(tmp_path / "student.torchscript.pt"))
    # Exported graphs run other kernels (TorchScript; onnxruntime on a graph whose exporter
    # may fold BatchNorm into the convs): logits agree to a relative tolerance
    assert_logits_close(scripted(x), expected, msg="torchscript")
    session = onnxruntime.InferenceSession(str(tmp_path / "student.onnx"))
    onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert_logits_close(torch.from_numpy(onnx_out), expected, msg="onnx")


def test_fine_tunes_from_student_init_weights_without_a_teacher(tmp_path):
    from robaudit.audit.models.architectures import create_architecture

    torch.manual_seed(4)
    init = create_architecture("smallcnn", C)
    torch.save({"state_dict": init.state_dict()}, tmp_path / "init.pt")
    cfg = config(tmp_path / "out", method="trades", student="smallcnn", student_init=str(tmp_path / "init.pt"),
                 epochs=1, lr=1e-3)
    summary = run_remediate(cfg, teacher=None, train_data=colour_dataset(per_class=6, size=16))
    assert summary["training"]["teacher"] is None and summary["training"]["temperatures"] is None
    trained = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)["student"]
    start = init.state_dict()["features.0.0.weight"]
    step = (trained["features.0.0.weight"] - start).abs().max()
    # Started from the init weights (a small lr moves them a little), and did train them.
    assert 0 < step < 0.1 * start.abs().max()
    with pytest.raises(UserError, match="distils a teacher"):
        run_remediate(config(tmp_path / "other"), teacher=None, train_data=colour_dataset(per_class=6),
                      student_module=tiny_student())


# ---------------------------------------------------------------------------- schedules and hold-out size
def test_paper_schedule_presets_and_explicit_values_win():
    from robaudit.remediate import METHODS
    from robaudit.remediate.common import resolve_schedule

    cfa = resolve_schedule(METHODS.get("cfa"), "paper")
    assert (cfa["epochs"], cfa["lr"], cfa["weight_decay"], tuple(cfa["milestones"])) == (200, 0.1, 5e-4, (100, 150))
    short = resolve_schedule(METHODS.get("cfa"), "paper", epochs=20, lr=0.05)
    assert tuple(short["milestones"]) == (10, 15) and short["lr"] == 0.05     # same fractions, lr as given
    shared = resolve_schedule(METHODS.get("cfa"), "shared")
    assert (shared["epochs"], shared["weight_decay"], shared["milestones"]) == (300, 2e-4, None)
    trades = resolve_schedule(METHODS.get("trades"), "paper")
    assert (trades["epochs"], tuple(trades["milestones"])) == (80, (74,))
    from robaudit.remediate import Trainer

    with pytest.raises(UserError, match="no paper schedule"):
        resolve_schedule(type("NoPaper", (Trainer,), {"name": "x"}), "paper")
    frl = resolve_schedule(METHODS.get("frl"), "shared")   # fine-tuning: never the shared lr 0.1
    assert (frl["schedule"], frl["lr"], frl["epochs"], tuple(frl["milestones"])) == ("own", 1e-3, 40, ())


@pytest.mark.parametrize("num_classes, per_class, expected", [(10, 5000, 100), (100, 500, 25), (4, 40, 4), (4, 5, 0)])
def test_default_hold_out_scales_with_the_dataset(num_classes, per_class, expected):
    from robaudit.remediate.selection import default_val_per_class

    y = torch.arange(num_classes).repeat_interleave(per_class)
    got, rule = default_val_per_class(y, num_classes)
    assert got == expected and "per class" in rule
    assert got < per_class or got == 0      # every class keeps images to train on
