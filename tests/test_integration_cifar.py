"""End to end on real CIFAR-10 images (../shared/data/cifar10_subset.npz; skipped when absent).

A tiny CNN is trained for a fixed 300 steps (~5 s on one core) on 1000 training images,
exported as torch.export .pt2 and audited through the CLI on 5 test images per class.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robaudit.audit.data.datasets import CIFAR10_CLASSES, load_dataset
from robaudit.audit.models.loading import save_export
from robaudit.audit.results_schema import dense_flow
from robaudit.cli import main

pytestmark = pytest.mark.integration

TRAIN_STEPS = 300


def _tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def _train(path) -> nn.Module:
    train = load_dataset(path, split="train", n_per_class=100)
    assert train.name == "cifar10" and len(train.y) == 1000
    torch.manual_seed(0)
    model = _tiny_cnn()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for step in range(TRAIN_STEPS):
        idx = torch.randint(len(train.y), (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(train.x[idx]), train.y[idx]).backward()
        opt.step()
    return model.eval()


def test_scan_of_a_trained_model_on_the_cifar_subset(cifar_subset_path, tmp_path, capsys):
    model = _train(cifar_subset_path)
    model_path = tmp_path / "tiny.pt2"
    save_export(model, str(model_path), torch.rand(2, 3, 32, 32))
    out = tmp_path / "out"
    try:
        main(["scan", str(model_path), "--dataset", str(cifar_subset_path), "--n-per-class", "5",
              "--attacks", "clean,fgsm,pgd", "--out", str(out), "--device", "cpu", "--batch-size", "32"])
    except SystemExit as exit_:
        pytest.fail(f"scan exited {exit_.code}: {capsys.readouterr().err}")
    stdout = capsys.readouterr().out

    results = json.loads((out / "results.json").read_text())
    ds = results["dataset"]
    assert ds["name"] == "cifar10" and ds["classes"] == CIFAR10_CLASSES
    assert ds["n"] == 50 and ds["subset"]["n_per_class"] == 5 and ds["subset"]["total_in_split"] == 1017
    assert results["model"]["format"] == "export"
    assert all(name in stdout for name in CIFAR10_CLASSES)
    clean = results["attacks"]["clean"]
    assert [c["n"] for c in clean["per_class"]] == [5] * 10
    assert clean["avg"] > 0.15  # trained: well above chance (0.10)
    for name in ("fgsm", "pgd"):
        for k in range(10):
            robust = results["attacks"][name]["per_class"][k]["correct"]
            assert results["ensemble"]["per_class"][k]["correct"] <= robust <= clean["per_class"][k]["correct"]
        flow = np.array(dense_flow(results["target_flow"][name], 10))
        assert flow.shape == (10, 10) and (np.diag(flow) == 0).all()
    assert results["attacks"]["pgd"]["avg"] < clean["avg"]  # an undefended model loses accuracy
    assert (out / "report.html").stat().st_size > 0
    with np.load(out / "samples.npz") as samples:
        # the first 5 test images of each class, in dataset order
        y_all = np.load(cifar_subset_path)["y_test"]
        expected = np.sort(np.concatenate([np.flatnonzero(y_all == k)[:5] for k in range(10)]))
        assert (samples["index"] == expected).all()
        assert (samples["y"] == y_all[expected]).all()
