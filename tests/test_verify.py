"""`robaudit verify` (robaudit/verify.py) and the numpy + onnxruntime recipe of docs/verify.md.

Two audits are mailed: a Keras-style ONNX export (NHWC input in 0..255) and a .pt2
program, each scanned, then results.json, report.html and evidence.npz copied to another
folder and verified there. One edited byte in any of the three, or another model, must
make verify fail and name what differs.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from robaudit.audit.models.loading import save_export

from conftest import CIFAR_SUBSET  # ROBAUDIT_CIFAR_SUBSET, else ../shared/data/cifar10_subset.npz
from test_cli import run_cli
from test_engine import CLASSES, Centroid, make_arrays

DOCS = Path(__file__).resolve().parents[1] / "docs" / "verify.md"
SCAN = ["--attacks", "clean,fgsm,pgd", "--attack-opt", "pgd.steps=3", "--batch-size", "16", "--device", "cpu"]


class KerasStyle(nn.Module):
    """The centroid model behind a Keras-like boundary: NHWC input in 0..255."""

    def __init__(self):
        super().__init__()
        self.inner = Centroid()

    def forward(self, x):
        return self.inner(x.permute(0, 3, 1, 2) / 255.0)


@pytest.fixture(scope="module")
def mailed(tmp_path_factory):
    """{kind: (folder with the three mailed files, model path)}, plus the data file."""
    root = tmp_path_factory.mktemp("verify")
    x, y = make_arrays()
    np.savez(root / "tiny.npz", x_test=np.round(x * 255).astype(np.uint8).transpose(0, 2, 3, 1), y_test=y,
             class_names=np.array(CLASSES))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(KerasStyle().eval(), (torch.rand(2, 8, 8, 3) * 255,), str(root / "keras.onnx"),
                          dynamo=False, input_names=["input_1"], output_names=["dense"],
                          dynamic_axes={"input_1": {0: "n"}, "dense": {0: "n"}})
    save_export(Centroid().eval(), str(root / "centroid.pt2"), torch.rand(2, 3, 8, 8))
    out = {}
    for kind, model, extra in (("onnx", root / "keras.onnx", ["--input-range", "0-255"]),
                               ("pt2", root / "centroid.pt2", [])):
        scan_dir, mail = root / f"scan-{kind}", root / f"mail-{kind}"
        code, _, err = run_cli_noinput(model, root / "tiny.npz", scan_dir, extra)
        assert code == 0, err
        mail.mkdir()
        for name in ("results.json", "report.html", "evidence.npz"):
            shutil.copy(scan_dir / name, mail / name)
        out[kind] = (mail, model)
    out["data"] = root / "tiny.npz"
    return out


def run_cli_noinput(model, data, out, extra):
    from robaudit.cli import main

    code = 0
    try:
        main(["scan", str(model), "--dataset", str(data), "--out", str(out), *SCAN, *extra])
    except SystemExit as exit_:
        code = exit_.code
    return code, "", ""


def verify(capsys, mailed, kind, target="results.json", evidence=None, model=None, extra=()):
    mail, model_path = mailed[kind]
    return run_cli(capsys, "verify", mail / target, "--evidence", evidence or mail / "evidence.npz",
                   "--model", model or model_path, "--dataset", mailed["data"], "--device", "cpu", *extra)


@pytest.mark.parametrize("kind", ["onnx", "pt2"])
@pytest.mark.parametrize("target", ["results.json", "report.html"])
def test_mailed_audit_verifies(capsys, mailed, kind, target):
    code, out, err = verify(capsys, mailed, kind, target)
    assert code == 0, err
    lines = out.strip().splitlines()
    page = ["page"] if target == "report.html" else []   # the page re-renders to its own bytes
    assert [line.split(":")[0] for line in lines] == page + ["results", "model", "config", "attacks", "clean",
                                                             "ensemble", "fgsm", "pgd"]
    assert all(": verified" in line for line in lines), out
    if kind == "onnx":
        assert "onnxruntime" in lines[-1]


def _edit_number(path: Path, dest: Path) -> None:
    text = path.read_text()
    edited = re.sub(r'"correct": ?(\d+)', lambda m: f'"correct": {int(m.group(1)) + 1}', text, count=1)
    assert edited != text
    dest.write_text(edited)


def test_edited_results_json_differs(capsys, mailed, tmp_path):
    mail, _ = mailed["onnx"]
    _edit_number(mail / "results.json", tmp_path / "results.json")
    shutil.copy(mail / "evidence.npz", tmp_path / "evidence.npz")
    code, out, err = run_cli(capsys, "verify", tmp_path / "results.json", "--evidence", tmp_path / "evidence.npz",
                             "--model", mailed["onnx"][1], "--dataset", mailed["data"], "--device", "cpu")
    assert code == 3
    assert out.startswith("results: results.json differs from the results the evidence was made with")
    assert "DIFFERS: class c" in out and "verification failed" in err
    assert "clean: DIFFERS" in out and "ensemble: DIFFERS" in out   # the clean count was edited


def test_edited_page_differs(capsys, mailed, tmp_path):
    mail, _ = mailed["pt2"]
    _edit_number(mail / "report.html", tmp_path / "report.html")
    code, out, err = run_cli(capsys, "verify", tmp_path / "report.html", "--evidence", mail / "evidence.npz",
                             "--model", mailed["pt2"][1], "--dataset", mailed["data"], "--device", "cpu")
    assert code == 3 and "results: the page's embedded results differs" in out


def test_edited_evidence_byte_is_refused(capsys, mailed, tmp_path):
    mail, _ = mailed["onnx"]
    raw = bytearray((mail / "evidence.npz").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (tmp_path / "evidence.npz").write_bytes(bytes(raw))
    code, out, err = verify(capsys, mailed, "onnx", evidence=tmp_path / "evidence.npz")
    assert code == 2 and out == ""
    assert "evidence" in err and len(err.strip().splitlines()) == 1


def test_evidence_array_edited_consistently_is_refused(capsys, mailed, tmp_path):
    """A valid zip whose arrays were changed (the manifest kept): caught by payload_sha256."""
    mail, _ = mailed["onnx"]
    with np.load(mail / "evidence.npz") as f:
        arrays = {k: f[k] for k in f.files}
    arrays["pgd__delta8"] = arrays["pgd__delta8"].copy()
    arrays["pgd__delta8"].flat[0] += 1
    np.savez_compressed(tmp_path / "evidence.npz", **arrays)
    code, out, err = verify(capsys, mailed, "onnx", evidence=tmp_path / "evidence.npz")
    assert code == 2 and "payload_sha256" in err


def test_truncated_evidence_is_refused(capsys, mailed, tmp_path):
    mail, _ = mailed["pt2"]
    raw = (mail / "evidence.npz").read_bytes()
    (tmp_path / "evidence.npz").write_bytes(raw[: len(raw) // 2])
    code, _, err = verify(capsys, mailed, "pt2", evidence=tmp_path / "evidence.npz")
    assert code == 2 and "truncated or edited" in err


def test_another_model_is_refused(capsys, mailed, tmp_path):
    other = Centroid()
    with torch.no_grad():
        other.mu.add_(0.01)
    save_export(other.eval(), str(tmp_path / "other.pt2"), torch.rand(2, 3, 8, 8))
    code, out, err = verify(capsys, mailed, "pt2", model=tmp_path / "other.pt2")
    assert code == 2 and out == "" and err.startswith("robaudit: error: model: sha256")


def test_other_data_is_refused(capsys, mailed):
    code, out, err = verify(capsys, mailed, "pt2", extra=["--limit", "20"])
    assert code == 2 and "data: sha256" in err


def _recipe() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    assert len(blocks) == 1
    return blocks[0]


def _run_recipe(tmp_path, results, evidence, model, data):
    script = tmp_path / "recipe.py"
    script.write_text(_recipe())
    return subprocess.run([sys.executable, str(script), str(results), str(evidence), str(model), str(data)],
                          capture_output=True, text=True, timeout=120)


def test_docs_recipe_verifies_the_onnx_audit_without_robaudit(tmp_path, mailed):
    mail, model = mailed["onnx"]
    assert "robaudit" not in re.sub(r"#.*", "", _recipe())   # the recipe imports nothing of ours
    done = _run_recipe(tmp_path, mail / "results.json", mail / "evidence.npz", model, mailed["data"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [line for line in done.stdout.splitlines() if ": verified (" in line]
    assert {line.split(":")[0] for line in done.stdout.splitlines()} == {"fgsm", "pgd"}
    _edit_number(mail / "results.json", tmp_path / "edited.json")
    failed = _run_recipe(tmp_path, tmp_path / "edited.json", mail / "evidence.npz", model, mailed["data"])
    assert failed.returncode != 0 and "results.json differs" in failed.stderr


def test_incomplete_options_are_refused(capsys, mailed):
    mail, model = mailed["pt2"]
    code, out, err = run_cli(capsys, "verify", mail / "results.json", "--evidence", mail / "evidence.npz",
                             "--dataset", mailed["data"])
    assert code == 2 and "--evidence needs --model and --dataset" in err and out == ""
    code, out, err = run_cli(capsys, "verify", mail / "results.json")
    assert code == 2 and "nothing to verify" in err


def test_page_and_signature_checks_without_evidence(capsys, mailed, tmp_path):
    """FILE_CHECKS need only the file: the page re-renders to its bytes; a visible number edited
    in the page fails; a bare results.json is refused as nothing to verify."""
    mail, _ = mailed["pt2"]
    code, out, _ = run_cli(capsys, "verify", mail / "report.html")
    assert code == 0 and out.startswith("page: verified (re-rendered") and len(out.splitlines()) == 1
    page = (mail / "report.html").read_text()
    visible = re.sub(r"(<td[^>]*>)(\d+)\.(\d)%", lambda m: f"{m.group(1)}{m.group(2)}.{(int(m.group(3)) + 1) % 10}%",
                     page, count=1)
    assert visible != page
    (tmp_path / "report.html").write_text(visible)
    code, out, _ = run_cli(capsys, "verify", tmp_path / "report.html")
    assert code == 3 and "page: DIFFERS" in out
    code, out, err = run_cli(capsys, "verify", mail / "results.json")
    assert code == 2 and "nothing to verify" in err and out == ""


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs OpenSSH's ssh-keygen")
def test_signed_results_verify_names_the_key_and_fail_when_edited(capsys, mailed, tmp_path):
    import subprocess

    from robaudit.signing import sign_file

    mail, _ = mailed["pt2"]
    keys = {}
    for who in ("auditor", "stranger"):
        keys[who] = tmp_path / who
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", who, "-f", str(keys[who])], check=True)
    signed = tmp_path / "signed"
    signed.mkdir()
    shutil.copy(mail / "results.json", signed / "results.json")
    sign_file(signed / "results.json", keys["auditor"])
    fingerprint = subprocess.run(["ssh-keygen", "-l", "-f", f"{keys['auditor']}.pub"], capture_output=True,
                                 text=True, check=True).stdout.split()[1]
    allowed = {}
    for who in keys:
        allowed[who] = tmp_path / f"allowed_{who}"
        allowed[who].write_text(f"{who} " + " ".join(Path(f"{keys[who]}.pub").read_text().split()[:2]) + "\n")
    code, out, _ = run_cli(capsys, "verify", signed / "results.json")
    assert code == 0 and f"results.json by {fingerprint}" in out and "key not vetted" in out
    code, out, _ = run_cli(capsys, "verify", signed / "results.json", "--allowed-signers", allowed["auditor"])
    assert code == 0 and "for auditor" in out
    code, out, _ = run_cli(capsys, "verify", signed / "results.json", "--allowed-signers", allowed["stranger"])
    assert code == 3 and "signatures: DIFFER" in out
    _edit_number(signed / "results.json", signed / "results.json")
    code, out, _ = run_cli(capsys, "verify", signed / "results.json")
    assert code == 3 and "signatures: DIFFER" in out


@pytest.mark.parametrize("kw", [{"score": "adv-only"}, {"norm": "l2", "eps": 0.1}])
def test_verify_api_other_scorings_and_norms(tmp_path, kw):
    """verify() on in-memory model and data (as the API would call it), adv-only scoring
    (robust count = n - failures) and the L2 ball."""
    from robaudit import verify as verify_mod
    from test_engine import make_data, make_model, scan

    results = scan(tmp_path, attacks=["clean", "fgsm", "pgd"], **kw)
    assert sum(sum(results["attacks"][a]["replay"]["confirmed"]) for a in ("fgsm", "pgd")) > 0
    echoed = []
    lines = verify_mod.verify(tmp_path / "results.json", tmp_path / "evidence.npz",
                              load_data=lambda recorded: make_data(), load_model=lambda data, recorded: make_model(),
                              device="cpu", echo=echoed.append)
    assert all(line.ok for line in lines) and len(echoed) == 8
    data = make_data()

    class Oracle(torch.nn.Module):
        """Never fooled: the label of the nearest clean image (adversarial images lie within
        eps, L2 <= 0.43 here, of their own clean image; clean images are ~1 apart)."""

        def forward(self, x):
            nearest = torch.cdist(x.flatten(1), data.x.flatten(1)).argmin(1)
            return torch.nn.functional.one_hot(data.y[nearest], 5).float()

    with pytest.raises(verify_mod.VerifyFailed):
        verify_mod.verify(tmp_path / "results.json", tmp_path / "evidence.npz",
                          load_data=lambda recorded: make_data(),
                          load_model=lambda data, recorded: make_model(Oracle()), device="cpu", echo=echoed.append)
    assert any("no longer fool" in line for line in echoed)
    assert any(line.startswith("clean: DIFFERS: class c") for line in echoed)  # the oracle is never wrong



@pytest.mark.integration
@pytest.mark.skipif(not CIFAR_SUBSET.is_file(), reason="the CIFAR-10 subset is absent")
def test_real_cifar_keras_style_onnx_audit_verifies(tmp_path, capsys):
    """Real CIFAR-10 images (uint8, so every failure should survive 8-bit rounding), a
    Keras-style ONNX network (NHWC, 0..255), robaudit verify and the docs recipe on the
    shared file itself (its first 48 test images are the audited subset)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 10))

    class Keras(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x.permute(0, 3, 1, 2) / 255.0)

    model = tmp_path / "keras.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Keras().eval(), (torch.rand(2, 32, 32, 3) * 255,), str(model), dynamo=False,
                          input_names=["input_1"], output_names=["dense"],
                          dynamic_axes={"input_1": {0: "n"}, "dense": {0: "n"}})
    code, _, err = run_cli(capsys, "scan", model, "--dataset", CIFAR_SUBSET, "--limit", "48", "--input-range", "0-255",
                           "--score", "adv-only", "--out", tmp_path / "out", *SCAN)
    assert code == 0, err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    rep = results["attacks"]["pgd"]["replay"]
    assert sum(rep["confirmed"]) > 0 and rep["realizable"] == rep["confirmed"]
    code, out, err = run_cli(capsys, "verify", tmp_path / "out" / "results.json", "--evidence",
                             tmp_path / "out" / "evidence.npz", "--model", model, "--dataset", CIFAR_SUBSET)
    assert code == 0, err
    assert out.count(": verified") == 8
    done = _run_recipe(tmp_path, tmp_path / "out" / "results.json", tmp_path / "out" / "evidence.npz", model,
                       CIFAR_SUBSET)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(": verified (") == 2
