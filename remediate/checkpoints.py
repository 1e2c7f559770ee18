"""What a remediation run keeps in --out: atomic checkpoints with exact resume, and metrics.csv.

Both training loops (remediate/train.py, remediate/ferd.py) write `checkpoint.pt` once per
epoch through `save_atomic` (a temporary file renamed into place: a reader or a kill never
leaves half a file) and `metrics.csv` right after it; `--resume` reads the checkpoint back
with torch.load(weights_only=True), refuses one made with other settings (the run's
fingerprint) and restores the RNG state so that the continued run is bitwise the run that
was never interrupted (on CPU).
"""

from __future__ import annotations

import csv
import errno
import io
import logging
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from robaudit.audit.io import check_writable_dir, write_bytes_atomic
from robaudit.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_KIND = "robaudit-remediate-checkpoint"
CHECKPOINT_VERSION = 1


def describe_os_error(err: OSError) -> str:
    if err.errno == errno.ENOSPC:
        return "no space left on the device"
    return err.strerror or str(err)


def save_atomic(obj, path: Path) -> None:
    """torch.save `obj` to `path` via a temporary file + rename: readers never see half a file."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        write_bytes_atomic(path, buffer.getvalue())
    except OSError as err:
        raise UserError(f"could not write {path}: {describe_os_error(err)}; "
                        f"the previous {path.name} (if any) is unchanged") from err


def write_text_atomic(path: Path, text: str) -> None:
    try:
        write_bytes_atomic(path, text.encode("utf-8"))
    except OSError as err:
        raise UserError(f"could not write {path}: {describe_os_error(err)}") from err


def _csv_value(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return repr(round(value, 6))
    return str(value)


def metrics_rows(history: List[dict], classes: Sequence[str]) -> Tuple[List[str], List[dict]]:
    """Flatten the per-epoch history: scalars as columns, per-class lists as 'key:class'."""
    header: List[str] = []
    rows: List[dict] = []
    for entry in history:
        flat: Dict[str, object] = {}
        for key, value in entry.items():
            if key == "method":
                continue
            if isinstance(value, list):
                for cls, v in zip(classes, value):
                    flat[f"{key}:{cls}"] = v
            else:
                flat[key] = value
        for key, value in entry.get("method", {}).items():
            if isinstance(value, list):
                for cls, v in zip(classes, value):
                    flat[f"{key}:{cls}"] = v
            else:
                flat[key] = value
        for key in flat:
            if key not in header:
                header.append(key)
        rows.append(flat)
    return header, rows


def write_metrics_csv(path: Path, history: List[dict], classes: Sequence[str]) -> None:
    header, rows = metrics_rows(history, classes)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_csv_value(row.get(key)) for key in header])
    write_text_atomic(path, buffer.getvalue())



def load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read the checkpoint {path}: {err}".splitlines()[0])
    if not isinstance(state, dict) or state.get("kind") != CHECKPOINT_KIND:
        raise UserError(f"{path} is not a robaudit remediation checkpoint")
    return state


# Fingerprint keys added after checkpoints were first written, with the value every older
# checkpoint was made with (they trained under L-inf only).
FINGERPRINT_DEFAULTS = {"norm": "linf"}


def check_resume(state: dict, fingerprint: dict) -> None:
    saved = {**FINGERPRINT_DEFAULTS, **state.get("fingerprint", {})}
    for key, value in fingerprint.items():
        if saved.get(key) != value:
            raise UserError(
                f"cannot resume: the checkpoint was made with {key}={saved.get(key)!r} but this run has "
                f"{key}={value!r}; rerun with the checkpoint's settings or choose another --out"
            )


def prepare_out_dir_for_resume(out_dir: Path, checkpoint_path: Path, resume: bool,
                               fingerprint: dict, *, create: bool = True) -> Optional[dict]:
    """Rank 0 only: create --out, refuse to overwrite a checkpoint, read one to resume (or None).

    create=False (the pre-flight check): only check that --out could be created and read what
    is there; nothing is written.
    """
    try:
        if create:
            out_dir.mkdir(parents=True, exist_ok=True)
        else:
            check_writable_dir(out_dir)
    except OSError as err:
        raise UserError(f"cannot create --out {out_dir}: {describe_os_error(err)}")
    if checkpoint_path.exists() and not resume:
        raise UserError(f"{out_dir} already holds a remediation checkpoint: pass --resume to continue it, "
                        f"or choose another --out")
    if resume and checkpoint_path.exists():
        saved = load_checkpoint(checkpoint_path)
        check_resume(saved, fingerprint)
        return saved
    if resume:
        log.warning("--resume: no checkpoint in %s, starting from epoch 1", out_dir)
    return None



def _set_cuda_rng(cuda_state, device: torch.device) -> None:
    if device.type != "cuda" or cuda_state is None:
        return
    if isinstance(cuda_state, (list, tuple)):   # older checkpoints: every visible device's state
        index = device.index if device.index is not None else torch.cuda.current_device()
        cuda_state = cuda_state[index] if index < len(cuda_state) else cuda_state[0]
    torch.cuda.set_rng_state(cuda_state, device)


def rng_state(device: torch.device) -> dict:
    """The RNG state a checkpoint keeps (torch's CPU generator, and the device's on CUDA)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng_state(state: dict, device: torch.device) -> None:
    """Put back what `rng_state` saved (older checkpoints hold every visible device's CUDA state)."""
    torch.set_rng_state(state["torch"])
    _set_cuda_rng(state.get("cuda"), device)
