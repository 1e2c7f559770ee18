"""The demo "patterns" dataset (audit/data/demo.py): deterministic, and separable at the demo's eps.

Issue 15: the first demo's weakest classes carried ~1.3 eps of signal per pixel and were
0% robust before and after remediation, a geometry limit rather than a training gap. These
tests pin the geometry property, computed from the generator (benchmarks/demo_geometry.py
prints the full table, including a near-Bayes classifier's robust accuracy).
"""

import numpy as np
import pytest
import torch

from robaudit.audit.data import demo
from robaudit.audit.data.datasets import load_dataset

EPS = demo.DEMO_EPS
# Every channel of every class moves by at least SIGNAL_FACTOR x 2 eps across its pattern:
# an L-inf perturbation (which can move each pixel by eps, i.e. close a gap of 2 eps between
# two images) cannot erase the class, with 50% to spare.
SIGNAL_FACTOR = 1.5
# The nearest noise-free images of two different classes a, b are at least MARGIN_FACTOR x eps
# apart along the best linear separator (||a-b||_2^2 / (2 ||a-b||_1)): the adversary's eps
# covers at most half of it.
MARGIN_FACTOR = 2.0


@pytest.fixture(scope="module")
def train_arrays():
    return demo.make_demo_arrays("train")


def test_demo_data_is_deterministic(train_arrays):
    x, y, classes = train_arrays
    x2, y2, classes2 = demo.make_demo_arrays("train")
    assert np.array_equal(x, x2) and np.array_equal(y, y2) and classes == classes2
    xt, yt, _ = demo.make_demo_arrays("test")
    xt2, yt2, _ = demo.make_demo_arrays("test")
    assert np.array_equal(xt, xt2) and np.array_equal(yt, yt2)
    assert not np.array_equal(x[:len(xt)], xt)   # the splits are different draws


def test_demo_shapes_dtypes_and_class_counts(train_arrays):
    x, y, classes = train_arrays
    k = len(demo.DEMO_CLASSES)
    assert classes == [name for name, _ in demo.DEMO_CLASSES] and len(classes) == k == 10
    assert len(set(classes)) == k
    assert x.dtype == np.uint8 and x.shape == (len(y), 32, 32, 3)
    assert y.dtype == np.int64
    counts = np.bincount(y, minlength=k)
    assert counts.tolist() == [demo.train_count(c) for c in range(k)]
    assert set(demo.DEMO_RARE_TRAIN) <= set(classes)
    for name, n in demo.DEMO_RARE_TRAIN.items():   # the rare classes are rare
        assert 0 < n < demo.DEMO_TRAIN_PER_CLASS and counts[classes.index(name)] == n
    xt, yt, _ = demo.make_demo_arrays("test")
    assert xt.shape == (k * demo.DEMO_TEST_PER_CLASS, 32, 32, 3)
    assert np.bincount(yt, minlength=k).tolist() == [demo.DEMO_TEST_PER_CLASS] * k   # balanced test split
    assert y[:50].tolist() != sorted(y[:50].tolist())   # interleaved, not sorted by class


def test_every_class_signal_exceeds_two_eps_with_margin():
    rng = np.random.default_rng(0)
    for k, (name, _) in enumerate(demo.DEMO_CLASSES):
        imgs = demo.noise_free_images(k, 32, rng)               # [n, H, W, 3] in [0, 1]
        # half the peak-to-peak swing of each channel of each image, as measured on the pixels
        amplitude = (imgs.max(axis=(1, 2)) - imgs.min(axis=(1, 2))) / 2
        assert amplitude.min() >= SIGNAL_FACTOR * 2 * EPS, (name, amplitude.min() / EPS)
        # the declared signal agrees with the measured one
        assert np.allclose(amplitude.max(axis=0), demo.class_signal(k), atol=0.02), name


def test_nearest_images_of_different_classes_are_apart_at_eps():
    banks = [torch.as_tensor(demo.noise_free_images(k, 24, np.random.default_rng(k))).flatten(1)
             for k in range(len(demo.DEMO_CLASSES))]
    for i in range(len(banks)):
        others = torch.cat([b for j, b in enumerate(banks) if j != i])
        nearest = torch.cdist(banks[i], others).argmin()
        a, b = divmod(int(nearest), len(others))
        d = banks[i][a] - others[b]
        margin = float((d ** 2).sum() / (2 * d.abs().sum()))
        assert margin >= MARGIN_FACTOR * EPS, (demo.DEMO_CLASSES[i][0], margin / EPS)


def test_train_demo_model_smoke():
    torch.manual_seed(0)
    data = load_dataset("demo", split="train")
    keep = torch.arange(0, len(data.y), 10)                       # 1 in 10 images
    model = demo.train_demo_model(data.x[keep], data.y[keep], data.index[keep], len(data.classes),
                                  epochs=1, steps=1, batch_size=64)
    assert not model.training
    with torch.no_grad():
        logits = model(data.x[:8])
    assert logits.shape == (8, 10) and torch.isfinite(logits).all()
