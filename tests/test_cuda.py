"""Real-CUDA twins of tests/test_virtual_cuda.py: the same scans and training runs on a real
GPU, skipped without one (benchmarks/gpu_check.sh runs them first on a GPU machine).

Tolerances: the GPU runs other kernels than the CPU (cuDNN convolutions, other reduction
orders), so values differ in the last bits (fp32: ~1e-6 relative per layer); the audit runs
exact fp32 (TF32 off, audit/precision.py), so per-sample flags agree but for
conftest.allowed_flips, as for any two backends. Training compounds those differences over
its steps: a one-epoch student is compared loosely (1e-3), a wrong device path (NaN, another
batch, data not moved) differs by O(1).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

REAL = contextlib.nullcontext


@pytest.fixture(autouse=True)
def _gpu_or_virtual(request):
    """A real GPU; else, with --virtual-cuda / ROBAUDIT_VIRTUAL_CUDA=1, the simulated one (which
    checks these twins' own code on the CPU); else skipped."""
    from conftest import virtual_cuda_requested
    if torch.cuda.is_available():
        yield
    elif virtual_cuda_requested(request.config):
        from virtual_cuda import VirtualCuda
        with VirtualCuda():
            yield
    else:
        pytest.skip("needs a CUDA GPU (or --virtual-cuda to run these twins on the simulated one)")


def test_real_scan_matches_cpu(tmp_path):
    from test_virtual_cuda import SCAN_DEFAULT, _scan_both
    cpu, cuda = _scan_both(tmp_path, SCAN_DEFAULT, env=REAL)
    assert cuda["config"]["precision"] == {"dtype": "fp32", "tf32": False, "rule": "exact fp32 (TF32 off)"}
    assert cuda["environment"]["device_name"]


@pytest.mark.parametrize("extra", [("cw",), ("tpgd",), ("square",), ("aa",)])
def test_real_scan_every_attack(tmp_path, extra):
    from test_virtual_cuda import _scan_both
    _scan_both(tmp_path, ["clean", *extra], env=REAL)


def test_real_absld_epoch_close_to_cpu(tmp_path):
    from test_virtual_cuda import _remediate
    _remediate(tmp_path / "cpu", "cpu")
    _remediate(tmp_path / "cuda", "cuda")
    a = torch.load(tmp_path / "cpu" / "checkpoint.pt", weights_only=True)["student"]
    b = torch.load(tmp_path / "cuda" / "checkpoint.pt", map_location="cpu", weights_only=True)["student"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-3, msg=key)


def test_real_every_method_one_epoch(tmp_path):
    from test_virtual_cuda import _methods, _remediate
    for method in _methods():
        _remediate(tmp_path / method, "cuda", method=method)
        assert (tmp_path / method / "checkpoint.pt").exists(), method


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_real_training_precisions_run(tmp_path, precision):
    from test_virtual_cuda import _remediate
    summary = _remediate(tmp_path, "cuda", precision=precision)
    assert summary["epochs"] == 1


def test_real_resume_drift_is_small(tmp_path):
    from test_virtual_cuda import _remediate
    _remediate(tmp_path / "straight", "cuda", epochs=2)
    _remediate(tmp_path / "split", "cuda", epochs=1)
    _remediate(tmp_path / "split", "cuda", epochs=2, resume=True)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", map_location="cpu", weights_only=True)["student"]
    b = torch.load(tmp_path / "split" / "checkpoint.pt", map_location="cpu", weights_only=True)["student"]
    for key in a:   # cuDNN may pick other (non-deterministic) kernels after a restart
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-3, msg=key)


def test_real_ferd(tmp_path):
    from test_ferd import BNTeacher, config, teacher_model, tiny_student
    from robaudit.remediate.ferd import run_ferd
    run_ferd(config(tmp_path, device="cuda"), teacher=teacher_model(BNTeacher().to("cuda")),
             student_module=tiny_student())
    assert (tmp_path / "checkpoint.pt").exists()


@pytest.fixture(scope="module")
def onnx_net(tmp_path_factory):
    """(net, exported file); module scope: made before the per-test device fixture."""
    from test_onnx import PoolingNet, _export
    net = PoolingNet().eval()
    return net, _export(net, tmp_path_factory.mktemp("onnx") / "m.onnx", dynamo=False)


def test_real_onnx_conversion_and_provider(onnx_net):
    from robaudit.audit.models.loading import load_model
    net, path = onnx_net
    x = torch.rand(3, 3, 32, 32)
    loaded = load_model(str(path), device="cuda")
    out = loaded.module(x.to("cuda")).cpu()
    torch.testing.assert_close(out, net(x), rtol=1e-4, atol=1e-4)


def test_real_torchrun_refuses_a_forced_gpu(monkeypatch):
    from robaudit.audit.devices import resolve_device
    from robaudit.errors import UserError
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(UserError, match="same GPU"):
        resolve_device("cuda:1")
