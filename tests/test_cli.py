"""The `robaudit` command line: scan output, gates, resume, list, report, and bad input.

Runs robaudit.cli.main in-process (SystemExit caught, output via capsys); two cases go
through a real subprocess to check the console entry point end to end. Models are tiny:
a nearest-centroid classifier exported once as .pt2, TorchScript traces, state_dicts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from robaudit.audit.models.architectures import ARCHITECTURES, create_architecture
from robaudit.audit.attacks import ATTACKS, PGD
from robaudit.audit.data.datasets import DATASETS
from robaudit.audit.models.loading import save_export
from robaudit.cli import main
from robaudit.remediate import METHODS

from test_engine import CLASSES, HW, Centroid, make_arrays

FAST = ["--attack-opt", "pgd.steps=3"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Data and model files shared by the module (exports are the slow part: done once)."""
    root = tmp_path_factory.mktemp("cli")
    x, y = make_arrays()
    np.savez(root / "tiny.npz", x_test=x, y_test=y, class_names=np.array(CLASSES))
    big = np.clip(np.repeat(np.repeat(x, 4, axis=2), 4, axis=3), 0, 1)  # the same images at 32x32
    np.savez(root / "tiny32.npz", x_test=big, y_test=y, class_names=np.array(CLASSES))
    example = torch.from_numpy(x[:2])
    save_export(Centroid(), str(root / "centroid.pt2"), example)
    pt2 = (root / "centroid.pt2").read_bytes()
    (root / "truncated.pt2").write_bytes(pt2[: len(pt2) // 2])
    (root / "garbage.pt").write_bytes(os.urandom(2048))

    torch.manual_seed(0)
    torch.save(create_architecture("smallcnn", num_classes=len(CLASSES)).state_dict(), root / "small5.pt")
    torch.save(create_architecture("smallcnn", num_classes=10).state_dict(), root / "small10.pt")
    torch.save({"w": torch.zeros(3)}, root / "unknown_weights.pt")  # no registered architecture's
    torch.save(Centroid(), root / "whole_module.pt")  # a pickled nn.Module

    warnings.filterwarnings("ignore", message=".*torch.jit.trace", category=FutureWarning)
    mlp32 = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, len(CLASSES))).eval()
    torch.jit.trace(mlp32, torch.rand(2, 3, 32, 32)).save(str(root / "mlp32.ts"))
    mlp8 = nn.Sequential(nn.Flatten(), nn.Linear(3 * HW * HW, len(CLASSES))).eval()
    torch.jit.trace(mlp8, torch.rand(2, 3, HW, HW)).save(str(root / "mlp8.ts"))
    torch.jit.trace(NaNOnBright().eval(), torch.rand(2, 3, HW, HW)).save(str(root / "nan.ts"))
    return root


class NaNOnBright(nn.Module):
    """Finite on the all-zero check batch, NaN logits on real images."""

    def forward(self, x):
        z = Centroid()(x)
        return torch.where(x.amax((1, 2, 3))[:, None] > 0.5, z * float("nan"), z)


def run_cli(capsys, *args):
    """(exit code, stdout, stderr) of an in-process `robaudit ARGS`."""
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _scan_args(files, out, *extra, model="centroid.pt2", data="tiny.npz"):
    return ["scan", files / model, "--dataset", files / data, "--out", out, "--device", "cpu",
            "--batch-size", "16", *extra]


# ---------------------------------------------------------------------------- scan


def test_scan_writes_results_and_prints_the_table(files, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(capsys, *_scan_args(files, out, "--attacks", "clean,fgsm,pgd", *FAST))
    assert code == 0, stderr
    assert {p.name for p in out.iterdir()} >= {"results.json", "samples.npz", "report.html"}
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"]["classes"] == CLASSES
    assert results["model"]["format"] == "export"
    assert list(results["attacks"]) == ["clean", "fgsm", "pgd"]
    assert results["config"]["attacks"]["pgd"]["steps"] == 3
    assert results["command"].startswith("robaudit")
    lines = stdout.splitlines()
    header = lines[0].split()
    assert header[:2] == ["class", "n"] and header[2:] == ["clean", "fgsm", "pgd", "ensemble"]
    for k, name in enumerate(CLASSES):
        row = next(line for line in lines if line.split()[:1] == [name])
        cells = row.split()
        assert int(cells[1]) == results["attacks"]["clean"]["per_class"][k]["n"]
        expected = [100 * results["attacks"][a]["per_class"][k]["accuracy"] for a in ("clean", "fgsm", "pgd")]
        assert [float(c) for c in cells[2:5]] == pytest.approx(expected, abs=0.051)  # printed to 0.1
    assert any(line.startswith("worst class") for line in lines)
    assert "results.json" in lines[-1]
    assert "Traceback" not in stderr


def test_report_command_rerenders(files, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, stderr = run_cli(capsys, *_scan_args(files, out, "--attacks", "clean,fgsm", "--no-report"))
    assert code == 0, stderr
    assert not (out / "report.html").exists()
    code, stdout, stderr = run_cli(capsys, "report", out / "results.json")
    assert code == 0, stderr
    html = (out / "report.html").read_text()
    assert html.lstrip().lower().startswith("<!doctype html") and all(c in html for c in CLASSES)
    assert "report.html" in stdout
    code, _, stderr = run_cli(capsys, "report", out / "results.json", out / "results.json",
                              "--out", tmp_path / "cmp.html")
    assert code == 0, stderr
    assert (tmp_path / "cmp.html").stat().st_size > 0


def test_report_of_a_missing_file_is_one_line(tmp_path, capsys):
    code, _, stderr = run_cli(capsys, "report", tmp_path / "nope.json")
    assert code != 0
    _assert_one_error_line(stderr)


def test_table_with_a_class_absent_from_the_subset(files, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(capsys, *_scan_args(files, out, "--attacks", "clean,fgsm", "--limit", "3",
                                                       "--no-report"))
    assert code == 0, stderr
    assert all(name in stdout for name in CLASSES)


def test_scan_of_a_state_dict_with_arch(files, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(capsys, *_scan_args(files, out, "--arch", "smallcnn", "--attacks", "clean,fgsm",
                                                       "--no-report", "--seed", "1", model="small5.pt"))
    assert code == 0, stderr
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["format"] == "state_dict" and results["model"]["arch"] == "smallcnn"
    assert results["config"]["seed"] == 1
    assert all(name in stdout for name in CLASSES)


def test_version_and_help_exit_0(capsys):
    code, stdout, _ = run_cli(capsys, "--version")
    assert code == 0 and "robaudit" in stdout
    code, stdout, _ = run_cli(capsys, "scan", "--help")
    assert code == 0 and "--fail-under-worst" in stdout


def test_overflowing_attack_option_is_one_line(files, tmp_path, capsys):
    code, _, stderr = run_cli(capsys, *_scan_args(files, tmp_path / "o", "--attacks", "pgd",
                                                  "--attack-opt", "pgd.step_size=1e400"))
    assert code == 2
    _assert_one_error_line(stderr)


def test_nan_attack_option_is_one_line(files, tmp_path, capsys):
    code, _, stderr = run_cli(capsys, *_scan_args(files, tmp_path / "o", "--attacks", "pgd",
                                                  "--attack-opt", "pgd.step_size=NaN"))
    assert code == 2
    _assert_one_error_line(stderr)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- gates


@pytest.mark.parametrize("gate", [["--fail-under-worst", "0.99"], ["--fail-over-nsd", "0"]])
def test_gates_exit_3_with_results_written(files, tmp_path, capsys, gate):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(capsys, *_scan_args(files, out, "--attacks", "clean,fgsm", "--no-report", *gate))
    assert code == 3
    line = _assert_one_error_line(stderr, allow_checks=True)
    assert "gate failed" in line
    results = json.loads((out / "results.json").read_text())
    assert (out / "samples.npz").exists()
    assert results["ensemble"]["worst"] < 0.99
    assert all(name in stdout for name in CLASSES)  # the table is still printed


def test_gates_that_hold_exit_0(files, tmp_path, capsys):
    code, _, stderr = run_cli(capsys, *_scan_args(files, tmp_path / "o", "--attacks", "clean,fgsm", "--no-report",
                                                  "--fail-under-worst", "0", "--fail-over-nsd", "5"))
    assert code == 0, stderr


# ---------------------------------------------------------------------------- resume


def test_interrupt_exits_130_and_the_rerun_resumes(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    args = _scan_args(files, out, "--attacks", "clean,pgd", "--batch-size", "8", "--no-report", *FAST)
    calls = {"n": 0}
    original = PGD.__call__

    def flaky(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(PGD, "__call__", flaky)
        code, _, stderr = run_cli(capsys, *args)
    assert code == 130
    assert "resume" in stderr and "Traceback" not in stderr
    assert not (out / "results.json").exists() and not (out / "samples.npz").exists()

    calls["n"] = 0

    def counting(self, *a, **kw):
        calls["n"] += 1
        return original(self, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(PGD, "__call__", counting)
        code, _, stderr = run_cli(capsys, *args)
    assert code == 0, stderr
    assert calls["n"] == 5 - 2  # 40 samples in chunks of 8; 2 had finished
    assert (out / "results.json").exists()


# ---------------------------------------------------------------------------- list


def test_list_shows_every_registered_name(capsys):
    code, stdout, _ = run_cli(capsys, "list")
    assert code == 0
    sections, current = {}, None
    for line in stdout.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            current = line[:-1]
            sections[current] = set()
        elif line.startswith("  ") and current:
            sections[current].add(line.split()[0])
    for title, registry in (("attacks", ATTACKS), ("architectures", ARCHITECTURES),
                            ("datasets", DATASETS), ("methods", METHODS)):
        assert sections[title] == set(registry.names()), title
        assert registry.names()


# ---------------------------------------------------------------------------- bad input


def _assert_one_error_line(stderr: str, allow_checks: bool = False) -> str:
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    if allow_checks:  # reliability checks go to stderr before a gate fails
        lines = [line for line in lines if not line.startswith("check [")]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("robaudit: error:"), lines[0]
    return lines[0]


BAD_INPUT = {
    "missing model": (["--attacks", "clean"], {"model": "does-not-exist.pt2"}, "not found"),
    "corrupt model": (["--attacks", "clean"], {"model": "garbage.pt"}, "garbage.pt"),
    "truncated pt2": (["--attacks", "clean"], {"model": "truncated.pt2"}, "truncated"),
    "unknown arch": (["--arch", "no-such-net"], {"model": "small5.pt"}, "no-such-net"),
    "weights without arch": ([], {"model": "unknown_weights.pt"}, "--arch"),
    "class count (weights)": (["--arch", "smallcnn"], {"model": "small10.pt"}, "10 classes"),
    "class count (num-classes)": (["--num-classes", "10"], {}, "--num-classes"),
    "input too small for model": ([], {"model": "mlp32.ts"}, "shape"),
    "input too big for model": ([], {"model": "mlp8.ts", "data": "tiny32.npz"}, "shape"),
    "nan logits": (["--attacks", "clean"], {"model": "nan.ts"}, "NaN"),
    "unknown dataset": ([], {"data": "no-such-dataset"}, "unknown dataset"),
    "unknown attack": (["--attacks", "clean,nope"], {}, "unknown attack"),
    "eps abc": (["--eps", "abc"], {}, "eps"),
    "eps 8/0": (["--eps", "8/0"], {}, "eps"),
    "eps -1": (["--eps", "-1"], {}, "eps"),
    "eps huge": (["--eps", "1e400"], {}, "eps"),
    "pickle without trust": ([], {"model": "whole_module.pt"}, "--trust-pickle"),
    "unknown format": (["--format", "tflite"], {}, "format"),
    "bad attack option": (["--attack-opt", "pgd.stepz=3", "--attacks", "pgd"], {}, "stepz"),
    "malformed attack option": (["--attack-opt", "pgd-steps"], {}, "--attack-opt"),
    "option for absent attack": (["--attack-opt", "cw.steps=3", "--attacks", "pgd"], {}, "cw"),
    "limit 0": (["--limit", "0"], {}, "--limit"),
    "gate in percent": (["--fail-under-worst", "30"], {}, "fail-under-worst"),
    "bad mean": (["--mean", "a,b,c", "--std", "1,1,1"], {}, "--mean"),
    "threads 0": (["--threads", "0"], {}, "--threads"),
    "unknown option": (["--no-such-flag"], {}, "--no-such-flag"),
    "bad choice": (["--iterates", "some"], {}, "--iterates"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_writes_nothing(files, tmp_path, capsys, case):
    extra, where, needle = BAD_INPUT[case]
    out = tmp_path / "out"
    model = where.get("model", "centroid.pt2")
    data = where.get("data", "tiny.npz")
    data_arg = data if data == "no-such-dataset" else files / data
    args = ["scan", files / model, "--dataset", data_arg, "--out", out, "--device", "cpu", *extra]
    code, stdout, stderr = run_cli(capsys, *args)
    assert code == 2, (code, stderr)
    line = _assert_one_error_line(stderr)
    assert needle in line
    assert not out.exists(), f"{case}: created {sorted(p.name for p in out.rglob('*'))}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("make_out", ["under-a-file", "is-a-file"])
def test_unwritable_out(files, tmp_path, capsys, make_out):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    out = blocker / "out" if make_out == "under-a-file" else blocker
    code, _, stderr = run_cli(capsys, *_scan_args(files, out, "--attacks", "clean"))
    assert code == 2
    assert "cannot write" in _assert_one_error_line(stderr)
    assert [p.name for p in tmp_path.iterdir()] == ["blocker"]
    assert blocker.read_text() == "not a directory"


def test_no_cuda_is_one_line(files, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, _, stderr = run_cli(capsys, *_scan_args(files, tmp_path / "o", "--device", "cuda"))
    assert code == 2
    assert "cuda" in _assert_one_error_line(stderr).lower()
    assert not (tmp_path / "o").exists()


def _subprocess(*args, cwd):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("ROBAUDIT_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "robaudit", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)


def test_subprocess_bad_model_and_gate(files, tmp_path):
    missing = _subprocess(*_scan_args(files, tmp_path / "a", model="nope.pt2"), cwd=tmp_path)
    assert missing.returncode == 2
    _assert_one_error_line(missing.stderr)
    assert not (tmp_path / "a").exists()

    gated = _subprocess(*_scan_args(files, tmp_path / "b", "--attacks", "clean,fgsm", "--no-report",
                                    "--fail-under-worst", "0.99"), cwd=tmp_path)
    assert gated.returncode == 3, gated.stderr
    assert "gate failed" in _assert_one_error_line(gated.stderr, allow_checks=True)
    assert (tmp_path / "b" / "results.json").exists()
    assert all(name in gated.stdout for name in CLASSES)


def test_threads_sets_torch_threads_and_leaves_results_unchanged(files, tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        code, _, stderr = run_cli(capsys, *_scan_args(files, tmp_path / "two", "--attacks", "clean,pgd",
                                                       "--no-report", *FAST))
        assert code == 0, stderr
        code, _, stderr = run_cli(capsys, *_scan_args(files, tmp_path / "one", "--attacks", "clean,pgd",
                                                       "--no-report", "--threads", "1", *FAST))
        assert code == 0, stderr
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    two = np.load(tmp_path / "two" / "samples.npz")
    one = np.load(tmp_path / "one" / "samples.npz")
    assert sorted(two.files) == sorted(one.files)
    # Exact: every tensor of this scan (a 16 x 3 x 8 x 8 batch through the centroid model)
    # is below torch's intra-op grain size (32768 elements), so each op runs on one thread
    # whatever --threads says. A model big enough to split work across threads would need
    # conftest.assert_flags_agree here.
    for name in two.files:
        np.testing.assert_array_equal(two[name], one[name], err_msg=name)


def test_remediate_bad_training_options_fail_before_the_teacher_audit(files, tmp_path, capsys):
    """--epochs 0 / --val-steps 0 must not leave a teacher/ audit behind (checked before any write)."""
    x, y = make_arrays()
    np.savez(tmp_path / "split.npz", x_train=x, y_train=y, x_test=x, y_test=y, class_names=np.array(CLASSES))
    for extra, needle in ((["--epochs", "0"], "--epochs"), (["--val-steps", "-1"], "--val-steps")):
        out = tmp_path / "o"
        code, _, stderr = run_cli(capsys, "remediate", "--teacher", files / "centroid.pt2", "--dataset",
                                  tmp_path / "split.npz", "--student", "smallcnn", "--device", "cpu",
                                  "--out", out, *extra)
        assert code == 2, stderr
        assert needle in _assert_one_error_line(stderr)
        assert not out.exists()


def test_data_free_remediate_refuses_abs_ld_only_options_and_missing_teacher(tmp_path, capsys):
    from robaudit.cli import main

    for args, needle in (
        (["--data-free", "--dataset", "demo"], "--teacher"),
        (["--data-free", "--teacher", "t.pt2", "--dataset", "demo", "--reweight", "fair-ard"], "--method-opt"),
        (["--data-free", "--teacher", "t.pt2", "--dataset", "demo", "--milestones", "3,4"], "cosine"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["remediate", *args, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2
        assert err.startswith("robaudit: error:") and needle in err and "Traceback" not in err
        assert not (tmp_path / "o").exists()
