"""One run per --out folder: an exclusive advisory lock held for the whole run.

Two `robaudit scan` (or `remediate`, `demo`) processes pointed at the same --out would
otherwise both finish "successfully", the second silently overwriting the first's
results. The lock is flock(2) on `OUT/.robaudit.lock`: the kernel drops it when the
holder exits for any reason (SIGKILL included), so a lock left by a killed process
never blocks the next run; the file itself only names the holder for the refusal line.

Taken after every check on the user's input (it creates --out), released at the end
of the run; a folder the lock created and the run left empty is removed again, so a
refused run leaves nothing behind. Temporary files a killed run's atomic writes left
behind are deleted once the lock is held. Nested holds inside one process (remediate's
teacher/ and student/ audits under its --out) are no-ops. Under torchrun rank 0 holds
the lock for every rank and a refusal ends every rank with the same line.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Set

from robaudit.audit import distributed
from robaudit.audit.io import remove_stale_temp_files
from robaudit.errors import UserError

LOCK_NAME = ".robaudit.lock"
_HELD: Set[Path] = set()  # resolved folders this process holds


def _held_by_us(path: Path) -> bool:
    return any(path == held or held in path.parents for held in _HELD)


def _holder_text(lock_path: Path) -> str:
    try:
        info = json.loads(lock_path.read_text())
        return (f"process {info['pid']} on {info['host']} since {info['since']}: "
                f"{info['command']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its details could not be read)"


def _acquire(path: Path) -> int:
    """Open and flock OUT/.robaudit.lock; the fd, or a one-line UserError naming the holder."""
    lock_path = path / LOCK_NAME
    for _ in range(10):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"--out {path} is in use by another robaudit run ({_holder_text(lock_path)}); "
                            f"wait for it to finish or choose another --out") from None
        # The previous holder unlinks the file on release: if it did so between our open
        # and our flock, we hold a lock on a file nobody else can see; take a fresh one.
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise UserError(f"--out {path}: could not take its lock file {lock_path} (it keeps being replaced)")


def _write_holder(fd: int) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(["robaudit", *sys.argv[1:]])[:300]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)


def _release(path: Path, fd: int, created: bool) -> None:
    # Unlink while still holding the lock (see _acquire's inode check), then close.
    with contextlib.suppress(OSError):
        os.unlink(path / LOCK_NAME)
    os.close(fd)
    if created:
        with contextlib.suppress(OSError):  # only succeeds if the run wrote nothing
            path.rmdir()


def _lock_on_this_rank(path: Path):
    """(fd, created) on rank 0 after taking the lock; raises UserError if it is held."""
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create --out {path}: {err.strerror or err}")
    try:
        fd = _acquire(path)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
    _write_holder(fd)
    # Nobody else writes here now: what a killed run left half-written can go.
    remove_stale_temp_files(path)
    return fd, created


@contextlib.contextmanager
def hold_out_dir(out_dir: Optional[os.PathLike]) -> Iterator[None]:
    """Hold --out exclusively for the `with` body (no-op for None or a folder already held here)."""
    if out_dir is None:
        yield
        return
    path = Path(out_dir).resolve()
    if _held_by_us(path):
        yield
        return
    ctx = distributed.current()
    fd, created, error = None, False, None
    if ctx.is_main:
        try:
            fd, created = _lock_on_this_rank(path)
        except UserError as err:
            error = err
    distributed.agree_or_raise(error)
    _HELD.add(path)
    try:
        yield
    finally:
        _HELD.discard(path)
        if fd is not None:
            _release(path, fd, created)
