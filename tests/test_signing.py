"""--sign KEYFILE and robaudit.signing: SSHSIG signatures that OpenSSH itself verifies.

Every test needs OpenSSH's ssh-keygen (robaudit signs through it) and skips without it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from robaudit.errors import GateFailed, UserError
from robaudit.signing import (NAMESPACE, fingerprint, load_signing_key, sign_file, sign_outputs, signature_findings,
                              signature_key, verify_signature)
from report_fixtures import make_results
from test_cli import _scan_args, files, run_cli  # noqa: F401  (files: the tiny model and data, a fixture)

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs OpenSSH's ssh-keygen")


def keygen(path: Path, kind: str = "ed25519", passphrase: str = "", comment: str = "auditor") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", passphrase, "-C", comment, "-f", str(path)],
                   check=True, capture_output=True)
    return path


def allowed_signers(path: Path, principal: str, key: Path) -> Path:
    path.write_text(f"{principal} {key.with_name(key.name + '.pub').read_text()}")
    return path


def openssh_verify(file: Path, sig: Path, allowed: Path, principal: str) -> subprocess.CompletedProcess:
    """What a reviewer runs, without robaudit."""
    with open(file, "rb") as data:
        return subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", principal,
                               "-n", NAMESPACE, "-s", str(sig)], stdin=data, capture_output=True)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    return {"a": keygen(folder / "a"), "b": keygen(folder / "b", comment="other")}




def test_sign_then_verify_with_robaudit_and_openssh(tmp_path, keys):
    file = tmp_path / "results.json"
    file.write_text('{"x": 1}\n')
    sig = sign_file(file, keys["a"])
    assert sig == tmp_path / "results.json.sig"
    allowed = allowed_signers(tmp_path / "allowed", "auditor@example.org", keys["a"])
    pub_line = keys["a"].with_name("a.pub").read_text().split()
    expected_fp = subprocess.run(["ssh-keygen", "-l", "-f", str(keys["a"]) + ".pub"], capture_output=True,
                                 text=True, check=True).stdout.split()[1]
    assert signature_key(sig)[1] == NAMESPACE

    alone = verify_signature(file)
    assert alone.ok and alone.fingerprint == expected_fp and alone.principal is None
    checked = verify_signature(file, allowed_signers=allowed)
    assert checked.ok and checked.principal == "auditor@example.org" and checked.fingerprint == expected_fp
    assert fingerprint(__import__("base64").b64decode(pub_line[1])) == expected_fp
    reviewer = openssh_verify(file, sig, allowed, "auditor@example.org")
    assert reviewer.returncode == 0, reviewer.stderr


def test_one_edited_byte_fails_both_checks(tmp_path, keys):
    file = tmp_path / "report.html"
    file.write_bytes(b"<p>robust 31.0%</p>\n")
    sig = sign_file(file, keys["a"])
    allowed = allowed_signers(tmp_path / "allowed", "auditor", keys["a"])
    file.write_bytes(b"<p>robust 81.0%</p>\n")
    assert not verify_signature(file).ok
    edited = verify_signature(file, allowed_signers=allowed)
    assert not edited.ok and edited.principal == "auditor" and "does not match" in edited.message
    assert openssh_verify(file, sig, allowed, "auditor").returncode != 0


@pytest.mark.parametrize("command", ["scan", "remediate", "report"])
def test_the_three_writing_commands_take_sign(capsys, command):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0 and "--sign KEYFILE" in out


def test_key_not_in_allowed_signers_fails(tmp_path, keys):
    file = tmp_path / "results.json"
    file.write_text("{}\n")
    sig = sign_file(file, keys["b"])                        # signed by b, reviewer trusts a only
    allowed = allowed_signers(tmp_path / "allowed", "auditor", keys["a"])
    check = verify_signature(file, allowed_signers=allowed)
    assert not check.ok and check.principal is None and "not in" in check.message
    assert signature_findings(file, allowed_signers=allowed) == [check.message]
    assert signature_findings(file) == []     # a good signature, by a key nobody vouched for
    assert check.fingerprint == load_signing_key(keys["b"]).fingerprint
    assert openssh_verify(file, sig, allowed, "auditor").returncode != 0


def test_other_namespace_and_garbage_signatures_fail(tmp_path, keys):
    file = tmp_path / "results.json"
    file.write_text("{}\n")
    with open(file, "rb") as data:   # a valid signature of the same bytes, made for git commits
        git_sig = subprocess.run(["ssh-keygen", "-Y", "sign", "-f", str(keys["a"]), "-n", "git"], stdin=data,
                                 capture_output=True, check=True).stdout
    (tmp_path / "results.json.sig").write_bytes(git_sig)
    check = verify_signature(file)
    assert not check.ok and "namespace 'git'" in check.message
    (tmp_path / "results.json.sig").write_text("not a signature\n")
    assert not verify_signature(file).ok
    with pytest.raises(UserError, match="no signature file"):
        verify_signature(file, sig_path=tmp_path / "missing.sig")


def test_bad_keys_are_refused_before_anything_is_written(tmp_path, capsys, keys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(make_results()))
    bad = {"missing": tmp_path / "nope",
           "public": keys["a"].with_name("a.pub"),
           "ecdsa": keygen(tmp_path / "ecdsa", kind="ecdsa"),
           "passphrase": keygen(tmp_path / "locked", passphrase="secret"),
           "not a key": results,
           "directory": tmp_path}
    loose = tmp_path / "loose"
    shutil.copy(keys["a"], loose)
    os.chmod(loose, 0o644)     # ssh-keygen refuses private keys others can read
    if os.getuid() != 0:       # root's keys are never "too open" for ssh-keygen
        bad["permissions"] = loose
    for why, key in bad.items():
        out = tmp_path / f"report-{why.replace(' ', '-')}.html"
        code, _, err = run_cli(capsys, "report", results, "--out", out, "--sign", key)
        assert code == 2, (why, err)
        assert err.count("\n") == 1 and "--sign" in err, (why, err)
        assert not out.exists() and not Path(str(out) + ".sig").exists(), why
    # scan: the key is checked as the option is read, before the model, the data or --out
    out_dir = tmp_path / "scan-out"
    code, _, err = run_cli(capsys, "scan", tmp_path / "no-model.pt2", "--dataset", "demo",
                           "--out", out_dir, "--sign", bad["passphrase"])
    assert code == 2 and "passphrase" in err and not out_dir.exists()


def test_report_sign_signs_the_page_it_wrote(tmp_path, capsys, keys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(make_results()))
    out = tmp_path / "report.html"
    code, _, err = run_cli(capsys, "report", results, "--out", out, "--sign", keys["a"])
    assert code == 0, err
    allowed = allowed_signers(tmp_path / "allowed", "auditor", keys["a"])
    assert openssh_verify(out, Path(str(out) + ".sig"), allowed, "auditor").returncode == 0
    assert not (tmp_path / "results.json.sig").exists()      # report did not write results.json


def test_sign_outputs_signs_only_what_the_run_wrote(tmp_path, keys):
    key = load_signing_key(keys["a"])
    stale = tmp_path / "report.html"
    stale.write_text("from an earlier run")
    (tmp_path / "samples.npz").write_bytes(b"not signed: not an output")
    with sign_outputs(key, tmp_path):
        (tmp_path / "results.json").write_text("{}")
        (tmp_path / "sub").mkdir()
        (tmp_path / "sub" / "evidence.npz").write_bytes(b"ev")
    assert verify_signature(tmp_path / "results.json").ok
    assert verify_signature(tmp_path / "sub" / "evidence.npz").ok
    assert not (tmp_path / "report.html.sig").exists() and not (tmp_path / "samples.npz.sig").exists()
    assert not (tmp_path / "evidence.npz.sig.sig").exists()

    with pytest.raises(GateFailed):      # a failed gate still ships complete files: signed
        with sign_outputs(key, tmp_path):
            (tmp_path / "report.html").write_text("rewritten")
            raise GateFailed("gate failed")
    assert verify_signature(tmp_path / "report.html").ok
    with pytest.raises(RuntimeError):    # an error: nothing signed
        with sign_outputs(key, tmp_path):
            (tmp_path / "results.json").write_text('{"half": true}')
            raise RuntimeError("crash")
    assert not verify_signature(tmp_path / "results.json").ok   # the old signature no longer matches


def test_scan_sign_end_to_end(tmp_path, capsys, keys, files):
    """A real scan with --sign: OpenSSH verifies results.json and report.html, the page re-renders
    to itself, and results.json carries the commit and the checks ledger."""
    from robaudit.audit.integrity import tool_identity
    from robaudit.audit.report.integrity import check_page

    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *_scan_args(files, out, "--attacks", "clean,fgsm,pgd",
                                               "--attack-opt", "pgd.steps=2", "--sign", keys["a"]))
    assert code == 0, err
    assert f"signed with {load_signing_key(keys['a']).fingerprint}" in err and "results.json.sig" in err
    allowed = allowed_signers(tmp_path / "allowed", "auditor", keys["a"])
    for name in ("results.json", "report.html"):
        assert openssh_verify(out / name, out / f"{name}.sig", allowed, "auditor").returncode == 0, name
        assert verify_signature(out / name, allowed_signers=allowed).principal == "auditor"
    assert not (out / "samples.npz.sig").exists()
    assert check_page(out / "report.html") == []
    assert check_page(out / "report.html", results_path=out / "results.json") == []
    results = json.loads((out / "results.json").read_text())
    assert results["tool"] == tool_identity()
    ledger = {entry["id"]: entry for entry in results["checks_ledger"]}
    assert ledger["blackbox_stronger_than_whitebox"]["state"] == "not_run"
