"""Atomic file writes: a reader (or a resumed run) never sees a half-written file."""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic(path: Path, write: Callable[[Any], None], mode: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:  # owns fd from here on, closes it on any error
            os.fchmod(fh.fileno(), 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be shared
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


# What robaudit names its temporary files: _atomic and check_writable_dir (mkstemp adds 8
# characters), loading.save_export (.NAME.PID.tmp.pt2); and the ONNX export's scratch folder.
_TEMP_NAME = re.compile(r"^\.(?:.+\.[A-Za-z0-9_]{8}\.tmp|robaudit-probe\.[A-Za-z0-9_]{8}"
                        r"|.+\.\d+\.tmp\.pt2)$")
_TEMP_DIR = re.compile(r"^\.onnx-export\.[A-Za-z0-9_]{8}$")


def remove_stale_temp_files(folder) -> int:
    """Delete the temporary files a killed writer left under `folder`; how many were removed.

    Only safe while no other process writes there: outlock calls it once it holds --out.
    """
    removed = 0
    for path in sorted(Path(folder).rglob(".*")):
        try:
            if path.is_symlink():
                continue
            if path.is_file() and _TEMP_NAME.match(path.name):
                path.unlink()
                removed += 1
            elif path.is_dir() and _TEMP_DIR.match(path.name):
                shutil.rmtree(path)
                removed += 1
        except OSError:
            pass
    return removed


def write_text_atomic(path, text: str) -> Path:
    return _atomic(Path(path), lambda fh: fh.write(text), "w")


def write_bytes_atomic(path, data: bytes) -> Path:
    return _atomic(Path(path), lambda fh: fh.write(data), "wb")


def write_npz_atomic(path, **arrays) -> Path:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return write_bytes_atomic(path, buf.getvalue())


def check_writable_dir(path) -> None:
    """Raise OSError early if `path` cannot be created or written; create nothing.

    Walks up to the nearest existing ancestor: it must be a directory we can create a
    file in (probed with a temporary file that is removed at once). Nothing is left
    behind, so a scan that later fails on bad input leaves no empty --out folder.
    """
    path = Path(path)
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "exists and is not a directory" if existing == path else f"{existing} is not a directory"
        raise NotADirectoryError(errno.ENOTDIR, what, str(path))
    fd, tmp = tempfile.mkstemp(prefix=".robaudit-probe.", dir=existing)
    os.close(fd)
    os.unlink(tmp)


def png_base64(img) -> str:
    """An HWC uint8 array (C = 1 or 3) as a base64 PNG (report thumbnails, FERD's synthetic grid)."""
    import base64

    from PIL import Image

    if img.shape[2] == 1:
        img = img[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")
