"""Remediation on streamed (lazily decoded) training data: the same batches, hence the same
student, as the in-memory path; bitwise resume; decode workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robaudit.audit.data.datasets import load_dataset
from robaudit.remediate.train import run_remediate

from test_remediate_train import COLOURS, config, teacher_model, tiny_student


def write_colour_folder(root, per_class=10, size=8, seed=0):
    """train/<class>/*.png (lossless, so decoding gives back the exact pixels)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k, name in enumerate(["blue", "green", "mixed", "red"]):   # sorted: labels 0..3
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for j in range(per_class):
            colour = COLOURS[rng.integers(0, 3)] if name == "mixed" else COLOURS[[2, 1, 0, 0][k]]
            pixels = np.clip(colour.numpy()[None, None] + 0.05 * rng.standard_normal((size, size, 3)), 0, 1)
            Image.fromarray((pixels * 255).round().astype(np.uint8)).save(folder / f"{j:03d}.png")
    (root / "test").mkdir()
    for name in ["blue", "green", "mixed", "red"]:
        (root / "test" / name).symlink_to(root / "train" / name)
    return root


def _checkpoint(path):
    return torch.load(path / "checkpoint.pt", weights_only=True)


def _assert_same_student(a, b):
    assert a["epoch"] == b["epoch"]
    for key in a["student"]:
        assert torch.equal(a["student"][key], b["student"][key]), key
    assert repr(a["method"]) == repr(b["method"])


def test_streamed_training_equals_in_memory_training(tmp_path):
    folder = write_colour_folder(tmp_path / "data")
    lazy = load_dataset(folder, split="train", workers=0)
    assert type(lazy.x).__name__ == "LazyImages"
    in_memory = load_dataset(folder, split="train", workers=0)
    in_memory.x = in_memory.x[:]          # the same images, decoded up front
    run_remediate(config(tmp_path / "memory", epochs=2), teacher=teacher_model(), train_data=in_memory,
                  student_module=tiny_student())
    run_remediate(config(tmp_path / "streamed", epochs=2), teacher=teacher_model(), train_data=lazy,
                  student_module=tiny_student())
    # Bitwise: the same batches in the same order through the same kernels, in this process.
    _assert_same_student(_checkpoint(tmp_path / "memory"), _checkpoint(tmp_path / "streamed"))


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_resume_is_bitwise_equal_to_a_straight_run(tmp_path, workers):
    folder = write_colour_folder(tmp_path / "data", per_class=6)
    data = load_dataset(folder, split="train", workers=workers)
    run_remediate(config(tmp_path / "straight", epochs=3), teacher=teacher_model(), train_data=data,
                  student_module=tiny_student())
    run_remediate(config(tmp_path / "split", epochs=2), teacher=teacher_model(), train_data=data,
                  student_module=tiny_student())
    run_remediate(config(tmp_path / "split", epochs=3, resume=True), teacher=teacher_model(), train_data=data,
                  student_module=tiny_student(seed=99))
    _assert_same_student(_checkpoint(tmp_path / "straight"), _checkpoint(tmp_path / "split"))
