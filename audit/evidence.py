"""The evidence file: every counted failure, exactly enough to reproduce it (issue 24, item 2).

`OUT/evidence.npz` is a zip of .npy arrays (numpy's own format, so `np.load(path,
allow_pickle=False)` reads it without robaudit), written after results.json:

- `manifest`: uint8 bytes of a UTF-8 JSON object (`json.loads(f["manifest"].tobytes())`):
  format, version, the digests below, eps, norm, score, n, image_shape, per attack its
  failure counts, and `payload_sha256`;
- per attack A (failures the artifact confirmed, in subset order):
  `A__position` int64 (row in the audited data), `A__index` int64 (dataset index),
  `A__label` int64, `A__pred` int64 (the artifact's prediction on the stored image),
  `A__kind` uint8 (0: 8-bit, stored as `A__delta8`; 1: float32, stored as `A__float32`),
  `A__delta8` int8 [n0, C, H, W]: the adversarial image is (round(x * 255) + delta8) / 255
  in float32, x the clean image in [0, 1] (rows: the kind-0 failures in order),
  `A__float32` float32 [n1, C, H, W]: the adversarial image itself (the kind-1 failures).

Why int8 deltas: the 8-bit image is what an attacker delivers and, for eps = 8/255, the
delta takes 17 values, which deflate squeezes to a fraction of a raw image; the clean
image comes from the reviewer's own copy of the data, pinned by `data_sha256`.

Digests (sha256, hex):
- `model_sha256`: the model file's bytes (results.json model.sha256);
- `data_sha256`: the audited images, then the labels, in audited order: every image as
  float32 NCHW little-endian C-order bytes (`np.ascontiguousarray(x, "<f4").tobytes()`
  for x of shape [N, C, H, W] in [0, 1]), followed by y as int64 little-endian bytes;
- `config_sha256`: `json.dumps(results["config"], sort_keys=True, separators=(",", ":"))`
  encoded as UTF-8;
- `results_sha256`: results.json's file bytes (`sha256sum results.json`);
- `payload_sha256`: every array except `manifest`, in sorted name order, as
  name + "\\n" + dtype.str + "\\n" + json(list(shape)) + "\\n" + C-order bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import numpy as np
import torch

from robaudit.audit import replay as replay_mod
from robaudit.audit.integrity import file_digest, tool_identity
from robaudit.audit.io import write_bytes_atomic
from robaudit.errors import UserError

log = logging.getLogger(__name__)

FILE_NAME = "evidence.npz"
# Common mail servers refuse attachments over 20-25 MB; above this the scan says so (the file
# is still written: it is the audit's proof, and it can travel by other means).
MAIL_LIMIT_BYTES = 20 * 1024 * 1024
FORMAT = "robaudit-evidence"
VERSION = 1
DATA_LAYOUT = ("sha256 of the audited images as float32 NCHW little-endian C-order bytes in audited "
               "order, then the labels as int64 little-endian bytes")
KINDS = {replay_mod.KIND_DELTA8: "delta8", replay_mod.KIND_FLOAT32: "float32"}


def data_digest(x, y, batch_size: int = 1024) -> str:
    """sha256 of the audited images and labels (layout: DATA_LAYOUT), streamed in batches."""
    from robaudit.audit.data.image_folders import stream_batches

    h = hashlib.sha256()
    n = len(y)
    batches = [np.arange(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    for part in stream_batches(x, batches):  # lazy image folders decode in workers
        h.update(np.ascontiguousarray(part.detach().cpu().numpy(), dtype="<f4").tobytes())
    labels = y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return h.hexdigest()


def config_digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def payload_digest(arrays: Dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        if name == "manifest":
            continue
        value = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\n{value.dtype.str}\n{json.dumps(list(value.shape))}\n".encode("utf-8"))
        h.update(value.tobytes())
    return h.hexdigest()


def attack_arrays(name: str, record: Dict[str, np.ndarray], index: np.ndarray, y: np.ndarray) -> Dict[str, np.ndarray]:
    """The `<attack>__*` arrays of one merged replay record (confirmed failures only)."""
    p = replay_mod.PREFIX
    kind = record[p + "kind"]
    keep = kind != replay_mod.KIND_UNCONFIRMED
    pos = record[p + "pos"][keep]
    return {f"{name}__position": pos.astype(np.int64), f"{name}__index": index[pos].astype(np.int64),
            f"{name}__label": y[pos].astype(np.int64), f"{name}__pred": record[p + "pred"][keep].astype(np.int64),
            f"{name}__kind": kind[keep].astype(np.uint8), f"{name}__delta8": record[p + "delta8"],
            f"{name}__float32": record[p + "float32"]}


def build(results: dict, results_sha256: str, replays: Dict[str, dict], data, batch_size: int) -> Dict[str, np.ndarray]:
    """Every array of the evidence file, manifest included."""
    index, y = data.index.numpy(), data.y.numpy()
    arrays: Dict[str, np.ndarray] = {}
    counts = {}
    for name, record in replays.items():
        part = attack_arrays(name, record, index, y)
        arrays.update(part)
        counts[name] = {"failures": int(len(part[f"{name}__position"])),
                        "delta8": int(len(part[f"{name}__delta8"])), "float32": int(len(part[f"{name}__float32"]))}
    config = results["config"]
    manifest = {
        "format": FORMAT, "version": VERSION, "tool": tool_identity(),
        "results_sha256": results_sha256, "model_sha256": results["model"]["sha256"],
        "data_sha256": data_digest(data.x, data.y, batch_size), "data_layout": DATA_LAYOUT,
        "config_sha256": config_digest(config),
        "eps": config["eps"], "norm": config["norm"], "score": config["scoring"]["score"],
        "n": int(len(y)), "image_shape": [int(d) for d in data.x.shape[1:]],
        "classes": list(results["dataset"]["classes"]), "attacks": counts,
        "payload_sha256": payload_digest(arrays),
    }
    arrays["manifest"] = np.frombuffer(json.dumps(manifest, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    return arrays


def to_bytes(arrays: Dict[str, np.ndarray]) -> bytes:
    """A .npz (zip of .npy members), deflate-compressed: np.load reads it as it is."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def write_scan_evidence(out_dir: Path, results: dict, replays: Dict[str, dict], data, batch_size: int) -> Path:
    """OUT/evidence.npz, after OUT/results.json (whose file digest it records)."""
    out_dir = Path(out_dir)
    arrays = build(results, file_digest(out_dir / "results.json"), replays, data, batch_size)
    payload = to_bytes(arrays)
    if len(payload) > MAIL_LIMIT_BYTES:
        log.warning("%s is %.1f MB, more than most mail servers accept (%d MB): share it another way, "
                    "or audit a subset (--n-per-class)", FILE_NAME, len(payload) / 1e6,
                    MAIL_LIMIT_BYTES // (1024 * 1024))
    return write_bytes_atomic(out_dir / FILE_NAME, payload)


# --------------------------------------------------------------------------- reading

@dataclass
class Evidence:
    manifest: dict
    arrays: Dict[str, np.ndarray]

    def attack(self, name: str) -> Dict[str, np.ndarray]:
        return {key.split("__", 1)[1]: value for key, value in self.arrays.items()
                if key.startswith(name + "__")}

    def images(self, name: str, clean: torch.Tensor) -> torch.Tensor:
        """float32 adversarial images of attack `name`, in its order; clean: the clean images
        of its failures (x[position]), NCHW in [0, 1]."""
        part = self.attack(name)
        kind = torch.from_numpy(part["kind"].astype(np.int64))
        out = torch.empty(clean.shape, dtype=torch.float32)
        at8 = kind == replay_mod.KIND_DELTA8
        q = replay_mod.clean_uint8(clean[at8]) + torch.from_numpy(part["delta8"].astype(np.int16))
        out[at8] = replay_mod.as_image(q)
        out[kind == replay_mod.KIND_FLOAT32] = torch.from_numpy(part["float32"])
        return out


def read(path) -> Evidence:
    """Load and self-check an evidence file; any problem is a one-line UserError."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {key: f[key] for key in f.files}
    except FileNotFoundError:
        raise UserError(f"evidence file not found: {path}") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise UserError(f"{path} is not a readable evidence file (truncated or edited?): "
                        f"{type(err).__name__}") from None
    try:
        manifest = json.loads(arrays["manifest"].tobytes().decode("utf-8"))
    except (KeyError, UnicodeDecodeError, json.JSONDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path} has no robaudit evidence manifest; is it an evidence.npz from "
                        "`robaudit scan`?")
    if manifest.get("version") != VERSION:
        raise UserError(f"{path} is evidence version {manifest.get('version')!r}; this robaudit reads {VERSION}")
    if payload_digest(arrays) != manifest.get("payload_sha256"):
        raise UserError(f"{path}: the arrays do not match the manifest's payload_sha256 (the evidence file "
                        "was edited or truncated)")
    return Evidence(manifest, arrays)
