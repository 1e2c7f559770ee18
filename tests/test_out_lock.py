"""One run per --out: a second run is refused with one line, a killed holder never blocks,
and every check on a remediation's options and data runs before its first file is written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from robaudit.audit.models.architectures import create_architecture
from robaudit.audit.models.loading import save_export
from robaudit.audit.outlock import LOCK_NAME, hold_out_dir
from robaudit.errors import UserError

from test_cli import _assert_one_error_line, run_cli
from test_engine import CLASSES, Centroid, make_arrays

HOLDER = """
import sys, time
from robaudit.audit.outlock import hold_out_dir
with hold_out_dir(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lock")
    x, y = make_arrays()
    np.savez(root / "tiny.npz", x_test=x, y_test=y, x_train=x, y_train=y, class_names=np.array(CLASSES))
    save_export(Centroid(), str(root / "centroid.pt2"), torch.from_numpy(x[:2]))
    return root


def _scan(files, out, *extra):
    return ["scan", files / "centroid.pt2", "--dataset", files / "tiny.npz", "--out", out, "--device", "cpu",
            "--attacks", "clean,fgsm", "--no-report", *extra]


def _start_holder(folder):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _listing(folder):
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_a_held_out_is_refused_with_one_line_naming_it_and_the_holder(files, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, stderr = run_cli(capsys, *_scan(files, out))
    assert code == 0, stderr
    before = _listing(out)
    holder = _start_holder(out)
    try:
        code, stdout, stderr = run_cli(capsys, *_scan(files, out, "--attacks", "clean,pgd"))
        line = _assert_one_error_line(stderr)
        assert code == 2
        assert str(out.resolve()) in line and f"process {holder.pid}" in line and "in use" in line
        # The refused run wrote nothing: the folder is exactly as the holder left it.
        assert [p for p in _listing(out) if p[0] != LOCK_NAME] == before
        assert "pgd" not in json.loads((out / "results.json").read_text())["attacks"]
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_process_does_not_block(files, tmp_path, capsys):
    out = tmp_path / "out"
    holder = _start_holder(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (out / LOCK_NAME).exists()  # SIGKILL: no clean-up ran, the file stays behind
    code, _, stderr = run_cli(capsys, *_scan(files, out))
    assert code == 0, stderr
    assert (out / "results.json").exists() and not (out / LOCK_NAME).exists()


def test_a_second_scan_while_the_first_runs_is_refused_and_cannot_overwrite(files, tmp_path):
    """Two real `robaudit scan` processes into one --out: the second, started while the first
    holds the folder, exits 2 with one line; the first is still running, unharmed."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")

    def start(*extra):
        args = [str(a) for a in _scan(files, out, "--attacks", "clean,pgd", *extra)]
        return subprocess.Popen([sys.executable, "-m", "robaudit", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)

    # --iterates final: no early stop, so the first run attacks for far longer than the test waits.
    first = start("--iterates", "final", "--attack-opt", "pgd.steps=10000000")
    try:
        deadline = time.monotonic() + 120
        while not (out / LOCK_NAME).exists():
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first scan never took its lock"
            time.sleep(0.05)
        second = start()
        _, stderr = second.communicate(timeout=120)
        assert second.returncode == 2, stderr
        line = _assert_one_error_line(stderr)
        assert "in use by another robaudit run" in line and f"process {first.pid}" in line
        assert first.poll() is None  # the holder was not disturbed
        assert not (out / "results.json").exists()  # the refused run wrote nothing
    finally:
        first.kill()
        first.communicate()


def test_nested_holds_in_one_process_and_an_empty_created_folder_is_removed(tmp_path):
    out = tmp_path / "new" / "out"
    with hold_out_dir(out):
        assert (out / LOCK_NAME).exists()
        with hold_out_dir(out / "teacher"):  # remediate's teacher audit: already covered
            assert not (out / "teacher").exists()
        with hold_out_dir(out):
            pass
        assert (out / LOCK_NAME).exists()
    assert not out.exists()  # created by the lock, left empty by the run
    keep = tmp_path / "keep"
    with hold_out_dir(keep):
        (keep / "results.json").write_text("{}")
    assert sorted(p.name for p in keep.iterdir()) == ["results.json"]


def test_a_second_hold_in_another_process_raises_user_error(tmp_path):
    holder = _start_holder(tmp_path / "o")
    try:
        with pytest.raises(UserError, match="in use"):
            with hold_out_dir(tmp_path / "o"):
                pass
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------------- remediate pre-flight
def _remediate(files, out, *extra):
    return ["remediate", "--teacher", files / "centroid.pt2", "--dataset", files / "tiny.npz",
            "--student", "smallcnn", "--device", "cpu", "--epochs", "1", "--batch-size", "16", "--steps", "1",
            "--val-steps", "1", "--audit-attacks", "clean", "--out", out, *extra]


def test_remediate_refuses_a_too_large_holdout_before_writing_anything(files, tmp_path, capsys):
    out = tmp_path / "out"
    per_class = int(np.bincount(np.load(files / "tiny.npz")["y_train"]).min())
    code, _, stderr = run_cli(capsys, *_remediate(files, out, "--val-per-class", per_class))
    assert code == 2
    assert "--val-per-class" in _assert_one_error_line(stderr)
    assert not out.exists()


def test_remediate_refuses_an_existing_checkpoint_before_the_teacher_audit(files, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, stderr = run_cli(capsys, *_remediate(files, out, "--val-per-class", "2"))
    assert code == 0, stderr
    before = _listing(out)
    code, _, stderr = run_cli(capsys, *_remediate(files, out, "--val-per-class", "2"))
    assert code == 2
    assert "--resume" in _assert_one_error_line(stderr)
    assert _listing(out) == before  # teacher/ not re-audited, nothing rewritten


def test_remediate_refuses_a_student_of_the_wrong_class_count_before_writing(files, tmp_path, capsys):
    student = tmp_path / "student10.pt2"
    save_export(create_architecture("smallcnn", num_classes=10).eval(), str(student), torch.rand(2, 3, 32, 32))
    x, y = make_arrays()
    big = np.clip(np.repeat(np.repeat(x, 4, axis=2), 4, axis=3), 0, 1)
    np.savez(tmp_path / "d32.npz", x_train=big, y_train=y, x_test=big, y_test=y, class_names=np.array(CLASSES))
    teacher = tmp_path / "teacher.pt2"
    save_export(create_architecture("smallcnn", num_classes=len(CLASSES)).eval(), str(teacher), torch.rand(2, 3, 32, 32))
    out = tmp_path / "out"
    code, _, stderr = run_cli(capsys, "remediate", "--teacher", teacher, "--dataset", tmp_path / "d32.npz",
                              "--student-init", student, "--device", "cpu", "--epochs", "1",
                              "--val-per-class", "0", "--audit-attacks", "clean", "--out", out)
    assert code == 2
    assert "classes" in _assert_one_error_line(stderr)
    assert not out.exists()


def test_temporary_files_of_a_killed_writer_are_removed_once_the_lock_is_held(tmp_path):
    from robaudit.audit.io import write_text_atomic

    out = tmp_path / "out"
    (out / ".robaudit-state").mkdir(parents=True)
    stale = [out / ".results.json.a1B2c3_d.tmp", out / ".robaudit-state" / ".chunk-0.npz.zzzzzzzz.tmp",
             out / ".robaudit-probe.k3j4h5g6", out / ".student.pt2.4242.tmp.pt2"]
    kept = [out / "results.json", out / ".hidden.tmp", out / "notes.tmp", out / ".x.toolongname.tmp"]
    for path in stale + kept:
        path.write_text("x")
    scratch = out / ".onnx-export.ab12CD_9"
    (scratch / "sub").mkdir(parents=True)
    (scratch / "sub" / "model.onnx").write_text("x")
    with hold_out_dir(out):
        write_text_atomic(out / "fresh.json", "{}")
    assert not any(p.exists() for p in stale) and not scratch.exists()
    assert all(p.exists() for p in kept) and (out / "fresh.json").read_text() == "{}"
