"""`--sign KEYFILE`: OpenSSH signatures (SSHSIG) beside the files robaudit writes.

A reviewer checks them without robaudit, with OpenSSH alone (docs/signing.md):

    ssh-keygen -Y verify -f allowed_signers -I auditor@example.org -n robaudit \\
        -s results.json.sig < results.json

Signing and verifying go through `ssh-keygen -Y sign / check-novalidate / find-principals /
verify` (OpenSSH >= 8.1): the signature is OpenSSH's own, byte for byte the format git's SSH
commit signing uses, and robaudit carries no cryptographic code or new dependency. Only the
parts that need no cryptography are done here: reading the private key's header (is it an
OpenSSH ed25519 key without a passphrase? checked before anything is written, so a bad key
costs nothing) and reading the public key out of a signature, for its fingerprint.

`sign_outputs(key, *paths)` wraps a command's run: it signs what the run wrote (found by
name, `SIGNED_NAMES`, under the given folders; a file that existed before the run and was not
rewritten is left alone), also when the run ends with a failed gate (exit 3, the files are
complete), never after an error.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from robaudit.errors import GateFailed, UserError

# The SSHSIG namespace: a signature made for one purpose (a git commit: "git", a file: "file")
# never verifies as another. Reviewers pass it as `-n robaudit`.
NAMESPACE = "robaudit"
# What gets a signature: the audit's outputs and remediation's exported student.
SIGNED_NAMES = ("results.json", "report.html", "comparison.html", "evidence.*",
                "student.pt2", "student.onnx", "student.torchscript.pt")
SIG_SUFFIX = ".sig"
SSH_KEYGEN_TIMEOUT_S = 60
_KEY_ARMOR = ("-----BEGIN OPENSSH PRIVATE KEY-----", "-----END OPENSSH PRIVATE KEY-----")
_SIG_ARMOR = ("-----BEGIN SSH SIGNATURE-----", "-----END SSH SIGNATURE-----")
_MAKE_KEY = "make one with `ssh-keygen -t ed25519 -N '' -f KEYFILE`"


@dataclass(frozen=True)
class SigningKey:
    path: Path
    fingerprint: str     # "SHA256:..." as ssh-keygen -l prints it


@dataclass(frozen=True)
class SignatureCheck:
    ok: bool
    fingerprint: Optional[str]   # "SHA256:..." of the key that made the signature (None: unreadable)
    principal: Optional[str]     # who allowed_signers says the key is; None without allowed_signers
    message: str                 # one line: what was checked and what was found


# --------------------------------------------------------------------------- SSH wire format


def _read_string(blob: bytes, at: int) -> Tuple[bytes, int]:
    if at + 4 > len(blob):
        raise ValueError("truncated")
    (size,) = struct.unpack(">I", blob[at:at + 4])
    end = at + 4 + size
    if end > len(blob):
        raise ValueError("truncated")
    return blob[at + 4:end], end


def _dearmor(text: str, armor: Tuple[str, str]) -> bytes:
    lines = [line.strip() for line in text.strip().splitlines()]
    if len(lines) < 3 or lines[0] != armor[0] or lines[-1] != armor[1]:
        raise ValueError("no armor")
    return base64.b64decode("".join(lines[1:-1]), validate=True)


def fingerprint(public_key_blob: bytes) -> str:
    """"SHA256:<base64, no padding>" of an SSH public key blob, as `ssh-keygen -l` prints it."""
    digest = base64.b64encode(hashlib.sha256(public_key_blob).digest()).decode("ascii")
    return "SHA256:" + digest.rstrip("=")


def _ssh_keygen() -> str:
    found = shutil.which("ssh-keygen")
    if found is None:
        raise UserError("--sign and signature checks need OpenSSH's ssh-keygen (8.1 or newer) on PATH; "
                        "install openssh-client")
    return found


def _run_keygen(args: List[str], stdin_path: Optional[Path] = None) -> subprocess.CompletedProcess:
    """ssh-keygen with no terminal to prompt on: a key that needs a passphrase fails instead of hanging."""
    env = {k: v for k, v in os.environ.items() if k not in ("SSH_ASKPASS", "DISPLAY", "SSH_AUTH_SOCK")}
    stdin = open(stdin_path, "rb") if stdin_path is not None else subprocess.DEVNULL
    try:
        return subprocess.run([_ssh_keygen(), *args], stdin=stdin, capture_output=True, env=env,
                              timeout=SSH_KEYGEN_TIMEOUT_S, start_new_session=True)
    except subprocess.TimeoutExpired:
        raise UserError(f"ssh-keygen {args[0]} {args[1]} did not finish in {SSH_KEYGEN_TIMEOUT_S} s") from None
    finally:
        if stdin_path is not None:
            stdin.close()


def _last_line(process: subprocess.CompletedProcess) -> str:
    lines = [line for line in process.stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"exit status {process.returncode}"


# --------------------------------------------------------------------------- the signing key


def load_signing_key(keyfile) -> SigningKey:
    """Check KEYFILE is an unencrypted OpenSSH ed25519 private key ssh-keygen can sign with;
    any problem is one UserError line (exit 2). Writes nothing outside a temporary folder."""
    path = Path(keyfile)
    if path.is_dir():
        raise UserError(f"--sign: {path} is a directory; pass the private key file")
    if not path.is_file():
        raise UserError(f"--sign: no key file {path}" + ("" if path.exists() else f"; {_MAKE_KEY}"))
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--sign: cannot read {path}: {getattr(err, 'strerror', None) or err}") from None
    if text.startswith(("ssh-", "ecdsa-", "sk-")):
        raise UserError(f"--sign: {path} is a public key; pass the private key (the file without .pub)")
    try:
        blob = _dearmor(text, _KEY_ARMOR)
        if not blob.startswith(b"openssh-key-v1\0"):
            raise ValueError("magic")
        cipher, at = _read_string(blob, len(b"openssh-key-v1\0"))
        _kdf, at = _read_string(blob, at)
        _kdf_options, at = _read_string(blob, at)
        public, _ = _read_string(blob, at + 4)         # after the key count
        key_type, _ = _read_string(public, 0)
    except (ValueError, struct.error):
        raise UserError(f"--sign: {path} is not an OpenSSH private key; {_MAKE_KEY}") from None
    if key_type != b"ssh-ed25519":
        raise UserError(f"--sign: {path} is a {key_type.decode('ascii', 'replace')} key; robaudit signs "
                        f"with ed25519 keys only; {_MAKE_KEY}")
    if cipher != b"none":
        raise UserError(f"--sign: {path} is protected by a passphrase, which robaudit cannot ask for; sign "
                        f"with a key without one ({_MAKE_KEY})")
    key = SigningKey(path, fingerprint(public))
    with tempfile.TemporaryDirectory(prefix="robaudit-sign-") as scratch:   # what ssh-keygen itself says
        probe = Path(scratch) / "probe"
        probe.write_bytes(b"robaudit signing probe\n")
        _sign_bytes(key, probe)
    return key


def _sign_bytes(key: SigningKey, path: Path) -> bytes:
    """The armored SSHSIG signature of the file at `path` (ssh-keygen signs stdin to stdout)."""
    process = _run_keygen(["-Y", "sign", "-f", str(key.path), "-n", NAMESPACE], stdin_path=path)
    if process.returncode != 0 or not process.stdout.startswith(_SIG_ARMOR[0].encode()):
        detail = _last_line(process)
        if "UNPROTECTED" in process.stderr.decode("utf-8", "replace"):
            detail = f"its permissions are too open for ssh-keygen; run `chmod 600 {key.path}`"
        raise UserError(f"--sign: ssh-keygen cannot sign with {key.path}: {detail}")
    return process.stdout


def sign_file(path, keyfile) -> Path:
    """Write `<path>.sig`, the SSHSIG signature of the file's bytes (namespace NAMESPACE); return it."""
    from robaudit.audit.io import write_bytes_atomic

    key = keyfile if isinstance(keyfile, SigningKey) else load_signing_key(keyfile)
    path = Path(path)
    sig_path = path.with_name(path.name + SIG_SUFFIX)
    write_bytes_atomic(sig_path, _sign_bytes(key, path))
    return sig_path


# --------------------------------------------------------------------------- signing a run's outputs


def _candidates(roots) -> List[Path]:
    found = set()
    for root in roots:
        root = Path(root)
        if root.is_file() or not root.exists():
            found.add(root)
            continue
        for path in root.rglob("*"):
            if (path.is_file() and not path.name.endswith(SIG_SUFFIX)
                    and any(fnmatch.fnmatchcase(path.name, pattern) for pattern in SIGNED_NAMES)):
                found.add(path)
    return sorted(found)


def _identity(path: Path):
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size)


@contextlib.contextmanager
def sign_outputs(key: Optional[SigningKey], *roots) -> Iterator[None]:
    """Sign, once the block has run, every output (SIGNED_NAMES under a folder of `roots`, or a
    file named in `roots`) that the block wrote or rewrote; `key` None signs nothing."""
    if key is None:
        yield
        return
    from robaudit.audit import distributed

    before = {path: _identity(path) for path in _candidates(roots)}
    try:
        yield
    except GateFailed:        # the gate is checked after every file was written
        _sign_changed(key, roots, before, distributed.current().is_main)
        raise
    _sign_changed(key, roots, before, distributed.current().is_main)


def _sign_changed(key: SigningKey, roots, before: dict, is_main: bool) -> None:
    if not is_main:   # torchrun: rank 0 wrote the files and signs them
        return
    signed = []
    for path in _candidates(roots):
        identity = _identity(path)
        if identity is not None and identity != before.get(path):
            signed.append(sign_file(path, key))
    if signed:   # progress goes to stderr, like every other robaudit message that is not a result
        print(f"robaudit: signed with {key.fingerprint}: {', '.join(str(p) for p in signed)}", file=sys.stderr)


# --------------------------------------------------------------------------- verifying


def signature_key(sig_path) -> Tuple[bytes, str]:
    """(public key blob, namespace) read out of an armored SSHSIG file; ValueError if it is not one."""
    blob = _dearmor(Path(sig_path).read_text(encoding="ascii"), _SIG_ARMOR)
    if not blob.startswith(b"SSHSIG"):
        raise ValueError("magic")
    public, at = _read_string(blob, 6 + 4)             # after the version
    namespace, _ = _read_string(blob, at)
    return public, namespace.decode("utf-8", "replace")


def verify_signature(path, sig_path=None, allowed_signers=None) -> SignatureCheck:
    """Check `<path>.sig` (or `sig_path`) against the file's bytes: the signature and, with an
    `allowed_signers` file (ssh-keygen's format), that its key belongs to a listed principal.
    A bad or foreign signature is ok=False; a missing file or ssh-keygen is a UserError."""
    path = Path(path)
    sig_path = Path(sig_path) if sig_path is not None else path.with_name(path.name + SIG_SUFFIX)
    for needed, what in ((path, "file"), (sig_path, "signature file")) + (
            ((Path(allowed_signers), "allowed signers file"),) if allowed_signers is not None else ()):
        if not needed.is_file():
            raise UserError(f"no {what} {needed}")
    try:
        public, namespace = signature_key(sig_path)
    except (OSError, UnicodeDecodeError, ValueError, struct.error):
        return SignatureCheck(False, None, None, f"{sig_path.name} is not an SSH signature (SSHSIG)")
    key = fingerprint(public)
    if namespace != NAMESPACE:
        return SignatureCheck(False, key, None, f"{sig_path.name} was made for namespace {namespace!r}, "
                                                f"not {NAMESPACE!r}")
    if allowed_signers is None:
        process = _run_keygen(["-Y", "check-novalidate", "-n", NAMESPACE, "-s", str(sig_path)], stdin_path=path)
        if process.returncode != 0:
            return SignatureCheck(False, key, None, f"{path.name}: signature by {key} does not match the "
                                                    "file (edited after signing?)")
        return SignatureCheck(True, key, None, f"{path.name}: good signature by {key} (no allowed signers "
                                               "file given: who owns the key is not checked)")
    allowed = str(allowed_signers)
    found = _run_keygen(["-Y", "find-principals", "-s", str(sig_path), "-f", allowed])
    principals = found.stdout.decode("utf-8", "replace").split() if found.returncode == 0 else []
    if not principals:
        return SignatureCheck(False, key, None, f"{path.name}: signed by {key}, which is not in {allowed}")
    principal = principals[0]
    process = _run_keygen(["-Y", "verify", "-f", allowed, "-I", principal, "-n", NAMESPACE,
                           "-s", str(sig_path)], stdin_path=path)
    if process.returncode != 0:
        return SignatureCheck(False, key, principal, f"{path.name}: signature by {principal} ({key}) does "
                                                     "not match the file (edited after signing?)")
    return SignatureCheck(True, key, principal, f"{path.name}: good signature by {principal} ({key})")


def signature_findings(path, sig_path=None, allowed_signers=None) -> List[str]:
    """verify_signature as findings for `robaudit verify`: [] when the signature is good (and, with
    `allowed_signers`, by a listed key), else its one-line message."""
    check = verify_signature(path, sig_path=sig_path, allowed_signers=allowed_signers)
    return [] if check.ok else [check.message]
