"""Shared test fixtures. Tests run on CPU with tiny synthetic data unless marked integration.

Float comparisons (docs/testing.md): values computed by different backends or graphs
(onnx2torch, onnxruntime, torch.export, TorchScript, BatchNorm folded by an exporter) or by
the same code on different batch compositions or thread counts differ in the last bits, by
amounts that depend on the CPU's kernels; they are compared with `assert_logits_close`.
Per-sample flags behind sign-gradient attacks may flip where those last bits decide a sign
or an argmax: such comparisons allow `allowed_flips(n)` samples (`assert_flags_agree`).
Everything else compared exactly is exact by construction (same code, same inputs, same
batches, same process), said where it is not obvious.
"""

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CIFAR_SUBSET = Path(os.environ.get("ROBAUDIT_CIFAR_SUBSET", REPO.parent / "shared" / "data" / "cifar10_subset.npz"))
# Intra-op threads inside each test (torch.set_num_threads overrides OMP_NUM_THREADS).
TEST_THREADS = int(os.environ.get("ROBAUDIT_TEST_THREADS", "1"))

# Relative tolerance for outputs of one set of weights computed two ways, as a fraction of
# the output's largest magnitude (at least 1). fp32 rounds at 6e-8 relative; a conv or
# linear layer sums a few hundred to a few thousand products, and summed in another order
# (other kernels, BatchNorm folded into the weights, another blocking) the result moves by
# ~1e-6..1e-5 of the largest terms: an x86 CPU measured 1e-4 on logits of magnitude 9
# (1.1e-5 relative). 1e-4 leaves 10x headroom; a real bug (wrong normalisation, layout,
# range, class order, BatchNorm in train mode) changes logits by O(1), 1e3..1e4 times more.
LOGIT_REL_TOL = 1e-4
# Per-sample flags (robust, adversarial prediction) compared across backends, batch
# compositions or iterate rules: sign(grad) and argmax amplify last-bit differences when a
# gradient component or a logit margin is within rounding of 0, which happens to at most a
# few points in hundreds. Allowed: max(1, 2% of the samples). A real bug (another random
# start, wrong eps, wrong model input) changes far more points than that.
FLIP_FRACTION = 0.02


@pytest.fixture
def cifar_subset_path():
    if not CIFAR_SUBSET.exists():
        pytest.skip(f"real CIFAR-10 subset not found at {CIFAR_SUBSET}")
    return CIFAR_SUBSET


@pytest.fixture(autouse=True)
def _test_threads_torch():
    # Two cores shared by the suite: one intra-op thread keeps timings stable.
    # ROBAUDIT_TEST_THREADS=2 runs the suite with two (docs/testing.md).
    previous = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(previous)


def logit_tolerance(expected: torch.Tensor, rel: float = LOGIT_REL_TOL) -> float:
    """Absolute tolerance for outputs like `expected`: rel x max(1, max |expected|)."""
    return rel * max(1.0, float(expected.detach().abs().max())) if expected.numel() else rel


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, *, rel: float = LOGIT_REL_TOL,
                        msg: str = "") -> None:
    """Outputs of the same weights computed by two backends, graphs or batch compositions."""
    actual, expected = torch.as_tensor(actual).detach(), torch.as_tensor(expected).detach()
    atol = logit_tolerance(expected, rel)
    assert actual.shape == expected.shape, (msg, actual.shape, expected.shape)
    diff = float((actual.float() - expected.float()).abs().max()) if actual.numel() else 0.0
    assert diff <= atol, f"{msg}: max |diff| {diff:.3g} > {atol:.3g} ({rel:g} x max(1, max |expected|))"


def assert_is_argmax(logits: torch.Tensor, pred: torch.Tensor, *, rel: float = LOGIT_REL_TOL) -> None:
    """pred[i] is the argmax of logits[i] up to rounding: the predicted class's logit is
    within the logit tolerance of the row's maximum (the logits come from another batch
    composition than `pred`, so an exact tie-break cannot be demanded)."""
    logits = logits.detach()
    pred = torch.as_tensor(pred).to(torch.long).reshape(-1)
    gap = logits.max(dim=1).values - logits.gather(1, pred[:, None]).squeeze(1)
    tol = logit_tolerance(logits, rel)
    bad = torch.nonzero(gap > tol).flatten().tolist()
    assert not bad, f"prediction is not the argmax (gap > {tol:.3g}) at {bad}: gaps {gap[bad].tolist()}"


def allowed_flips(n: int) -> int:
    return max(1, math.floor(FLIP_FRACTION * n))


def assert_flags_agree(actual, expected, *, what: str = "", atol: float = 0.0, max_flips=None) -> None:
    """Per-sample arrays (flags, predictions, or per-sample images with `atol`) equal but for
    at most `allowed_flips(n)` samples (see FLIP_FRACTION)."""
    a = np.asarray(actual.detach().cpu() if isinstance(actual, torch.Tensor) else actual)
    b = np.asarray(expected.detach().cpu() if isinstance(expected, torch.Tensor) else expected)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    if not a.size:
        return
    rows_a, rows_b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    if atol:
        mismatch = np.abs(rows_a.astype(np.float64) - rows_b.astype(np.float64)) > atol
    else:
        mismatch = rows_a != rows_b
    differ = np.flatnonzero(mismatch.any(axis=1))
    limit = allowed_flips(len(a)) if max_flips is None else max_flips
    assert len(differ) <= limit, (f"{what}: {len(differ)} of {len(a)} samples differ (at most {limit} allowed "
                                  f"for last-bit differences): positions {differ[:20].tolist()}")


def randomise_batchnorm(model, seed=0, *, affine=False):
    """Non-default BatchNorm statistics (eval mode), so eval-mode forwards (and mistakes) show;
    affine=True also draws the BatchNorm weights and biases (per layer: mean, var, weight, bias)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if affine:
                m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


# ---------------------------------------------------------------------------- virtual CUDA
# tests/virtual_cuda.py simulates cuda:0 on the CPU (device rules, host-sync counts).
# `pytest --virtual-cuda` or ROBAUDIT_VIRTUAL_CUDA=1 runs every device-relevant test in
# tests/test_virtual_cuda.py (marked `virtual_cuda_full`); by default a representative subset runs.
def pytest_addoption(parser):
    parser.addoption("--virtual-cuda", action="store_true", default=False,
                     help="run every device-relevant test on a simulated cuda:0 (tests/virtual_cuda.py)")


def virtual_cuda_requested(config) -> bool:
    from virtual_cuda import enabled_by_env
    return bool(config.getoption("--virtual-cuda", default=False)) or enabled_by_env()


def pytest_collection_modifyitems(config, items):
    if virtual_cuda_requested(config):
        return
    skip = pytest.mark.skip(reason="full virtual-CUDA matrix: run with --virtual-cuda or ROBAUDIT_VIRTUAL_CUDA=1")
    for item in items:
        if "virtual_cuda_full" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def virtual_cuda():
    """A simulated cuda:0 for the test's duration (tests/virtual_cuda.py); yields the counter."""
    from virtual_cuda import VirtualCuda
    with VirtualCuda() as vc:
        yield vc
