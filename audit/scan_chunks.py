"""One attack over one rank's shard, chunk by chunk, with finished chunks kept on disk.

The scan engine (engine.py) calls `attack_shard` per attack and `merge_shards` on what
every rank returns. A chunk is `batch_size` positions of the subset; its result is an
.npz in OUT/.robaudit-state/<attack>-<key>/ so an interrupted scan re-run with the same
--out reuses it (`ScanState`). Besides robust/adv_pred and a few fooled examples, an
attack may hand back, through `AttackResult`:
- `extras`: per-sample arrays (e.g. FMN's minimal perturbation norms), stored per chunk
  as `extra__<key>` and merged into full-length arrays in subset order;
- `stats`: fixed-shape arrays that add up over samples (e.g. PGD's per-step loss sums),
  stored as `stat__<key>` and summed over chunks and ranks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from robaudit.audit import distributed
from robaudit.audit import replay as replay_mod
from robaudit.audit.data.image_folders import stream_batches
from robaudit.audit.io import write_npz_atomic
from robaudit.errors import UserError

log = logging.getLogger(__name__)

CHUNK_KEYS = {"robust", "adv_pred", "seconds", "ex_pos", "ex_img"}
EXTRA_PREFIX = "extra__"
STAT_PREFIX = "stat__"
EXAMPLES_PER_CLASS = 4      # fooled examples kept per class and attack (for the report)


def run_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def hash_array(array) -> str:
    """Content hash of a tensor/array (dtype, shape and bytes), without a Python loop."""
    arr = np.ascontiguousarray(array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else array)
    digest = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    digest.update(arr.reshape(-1).view(np.uint8) if arr.size else b"")
    return digest.hexdigest()[:16]


def images_fingerprint(x) -> str:
    """Resume key of the images: a lazy source's own fingerprint (file list, sizes,
    preprocessing) instead of decoding every image to hash its pixels."""
    fingerprint = getattr(x, "fingerprint", None)
    return fingerprint() if callable(fingerprint) else hash_array(x)


def to_uint8_hwc(x: torch.Tensor) -> np.ndarray:
    return (x.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def first_k_per_class(labels: np.ndarray, k: int) -> np.ndarray:
    """Indices of the first k entries of each label, in the given order (vectorised cumcount)."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    rank = np.arange(len(order)) - np.searchsorted(sorted_labels, sorted_labels, side="left")
    return np.sort(order[rank < k]).astype(np.int64)


def fooled_mask(robust, adv_pred, y, clean_pred, score) -> np.ndarray:
    if score == "adv-only":
        return adv_pred != y
    return (clean_pred == y) & ~robust


class ScanState:
    """Finished chunks of a scan, on disk, keyed so that a different setting never reuses them."""

    def __init__(self, root: Path, run_key: dict):
        self.root = root
        self.run_key = run_hash(run_key)

    def chunk_path(self, attack_name: str, attack_params: dict, positions: np.ndarray) -> Path:
        key = run_hash({"run": self.run_key, "attack": attack_params})
        tag = hashlib.sha256(np.ascontiguousarray(positions, dtype=np.int64).tobytes()).hexdigest()[:12]
        return self.root / f"{attack_name}-{key}" / f"{int(positions[0]):09d}-{int(positions[-1]):09d}-{tag}.npz"

    def load(self, path: Path, positions: np.ndarray, num_classes: int) -> Optional[dict]:
        """The finished chunk over `positions`, or None (absent, unreadable or malformed)."""
        if not path.exists():
            return None
        size = len(positions)
        try:
            with np.load(path, allow_pickle=False) as f:
                chunk = {k: f[k] for k in f.files}
            ok = (set(chunk) >= CHUNK_KEYS and chunk["robust"].shape == (size,)
                  and chunk["robust"].dtype == np.bool_
                  and chunk["adv_pred"].shape == (size,) and chunk["seconds"].shape == ()
                  and chunk["ex_pos"].ndim == 1 and chunk["ex_img"].ndim == 4
                  and len(chunk["ex_img"]) == len(chunk["ex_pos"]))
            ok = ok and all(v.shape == (size,) for k, v in chunk.items() if k.startswith(EXTRA_PREFIX))
            ok = ok and bool(((chunk["adv_pred"] >= 0) & (chunk["adv_pred"] < num_classes)).all()
                             and np.isin(chunk["ex_pos"], positions).all())
            ok = ok and (not replay_mod.has_record(chunk) or replay_mod.record_ok(chunk, positions))
        except Exception:  # a damaged chunk is recomputed, never trusted
            ok = False
        if not ok:
            log.warning("ignoring unreadable state chunk %s", path)
            return None
        return chunk


def clean_predictions(module, x, batch_size: int, device,
                      num_classes: Optional[int] = None, positions: Optional[np.ndarray] = None) -> torch.Tensor:
    """argmax predictions for x[positions] (all of x by default); non-finite logits or a wrong
    class count are user-facing errors."""
    preds = []
    bad = 0
    if positions is None:
        positions = np.arange(len(x), dtype=np.int64)
    batches = [positions[start:start + batch_size] for start in range(0, len(positions), batch_size)]
    with torch.no_grad():
        for images in stream_batches(x, batches):  # lazy folders decode ahead in workers
            logits = module(images.to(device)).float()
            if logits.ndim != 2 or (num_classes is not None and logits.shape[1] != num_classes):
                raise UserError(f"the model returns logits of shape {list(logits.shape)} but the dataset "
                                f"has {num_classes} classes; expected [batch, {num_classes}]")
            bad += int((~torch.isfinite(logits)).any(dim=1).sum())
            preds.append(logits.argmax(dim=1).cpu())
    if bad:
        raise UserError(f"the model produced NaN or infinite logits on {bad} of {len(positions)} inputs; "
                        "check --input-range, --mean/--std and the exported graph")
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def _empty_examples(image_shape) -> np.ndarray:
    return np.zeros((0, image_shape[1], image_shape[2], image_shape[0]), np.uint8)


def _add_chunk(shard: dict, chunk: dict, where: slice, y_np: np.ndarray) -> None:
    """Fold one finished chunk into the shard's arrays (in place)."""
    shard["robust"][where] = chunk["robust"]
    shard["adv_pred"][where] = chunk["adv_pred"]
    for key, value in chunk.items():
        if key.startswith(EXTRA_PREFIX):
            name = key[len(EXTRA_PREFIX):]
            shard["extras"].setdefault(name, np.full(len(shard["robust"]), np.nan))[where] = value
        elif key.startswith(STAT_PREFIX):
            name = key[len(STAT_PREFIX):]
            total = shard["stats"].get(name)
            shard["stats"][name] = value.astype(np.float64) if total is None else total + value
    # keep only the first EXAMPLES_PER_CLASS fooled images per class overall
    ex_pos = np.concatenate([shard["ex_pos"], chunk["ex_pos"].astype(np.int64)])
    ex_img = np.concatenate([shard["ex_img"], chunk["ex_img"]])
    keep = first_k_per_class(y_np[ex_pos], EXAMPLES_PER_CLASS)
    shard["ex_pos"], shard["ex_img"] = ex_pos[keep], ex_img[keep]
    shard["seconds"] += float(chunk["seconds"])
    if replay_mod.has_record(chunk):  # failures replayed on the artifact (audit/replay.py)
        record = {k: v for k, v in chunk.items() if k.startswith(replay_mod.PREFIX)}
        shard["replay"] = record if "replay" not in shard else replay_mod.concat([shard["replay"], record])


def attack_shard(name, attack, params, module, data, clean_pred, positions, batch_size, device,
                 state, num_classes, replayer=None) -> dict:
    """Attack this rank's positions chunk by chunk, reusing finished chunks from `state`."""
    y_np = data.y.numpy()
    shard = {"positions": positions, "robust": np.zeros(len(positions), dtype=bool),
             "adv_pred": np.zeros(len(positions), dtype=np.int64), "extras": {}, "stats": {},
             "ex_pos": np.zeros(0, dtype=np.int64), "ex_img": _empty_examples(data.x.shape[1:]),
             "seconds": 0.0}
    bar = tqdm(total=len(positions), desc=f"{name:>6}", unit="img", file=sys.stderr,
               disable=None if distributed.current().is_main else True, leave=False)
    starts = range(0, len(positions), batch_size)
    paths = [state.chunk_path(name, params, positions[s:s + batch_size]) if state else None for s in starts]
    done = [state.load(path, positions[s:s + batch_size], num_classes) if state else None
            for s, path in zip(starts, paths)]
    # Only the chunks still to compute are decoded, in order, ahead of the attack (workers).
    todo = stream_batches(data.x, [positions[s:s + batch_size] for s, c in zip(starts, done) if c is None])
    try:
        for start, path, chunk in zip(starts, paths, done):
            chunk_positions = positions[start:start + batch_size]
            if chunk is None:
                chunk = attack_chunk(attack, module, data, clean_pred, chunk_positions, device, next(todo),
                                     replayer)
                if state:
                    write_npz_atomic(path, **chunk)
            _add_chunk(shard, chunk, slice(start, start + len(chunk_positions)), y_np)
            bar.update(len(chunk_positions))
    finally:
        todo.close()
        bar.close()
    return shard


def merge_shards(shards, clean_pred, y_np, image_shape) -> dict:
    """Per-rank shard results -> full per-sample arrays in subset order (same on every rank).

    Returns robust, adv_pred, extras (name -> [n]), stats (name -> summed array), ex_pos,
    ex_img, seconds (the slowest rank's compute time: what the user waited for)."""
    n = len(y_np)
    robust = np.zeros(n, dtype=bool)
    adv_pred = clean_pred.copy()
    extras: Dict[str, np.ndarray] = {}
    stats: Dict[str, np.ndarray] = {}
    ex_pos = np.concatenate([s["ex_pos"] for s in shards])
    ex_img = np.concatenate([s["ex_img"] for s in shards]) if len(ex_pos) else _empty_examples(image_shape)
    for shard in shards:
        robust[shard["positions"]] = shard["robust"]
        adv_pred[shard["positions"]] = shard["adv_pred"]
        for key, values in shard["extras"].items():
            extras.setdefault(key, np.full(n, np.nan))[shard["positions"]] = values
        for key, total in shard["stats"].items():
            stats[key] = total if key not in stats else stats[key] + total
    order = np.argsort(ex_pos, kind="stable")  # dataset order, whatever the sharding
    ex_pos, ex_img = ex_pos[order], ex_img[order]
    keep = first_k_per_class(y_np[ex_pos], EXAMPLES_PER_CLASS)
    return {"robust": robust, "adv_pred": adv_pred, "extras": extras, "stats": stats,
            "ex_pos": ex_pos[keep], "ex_img": ex_img[keep],
            "seconds": max(s["seconds"] for s in shards),
            "replay": (replay_mod.sorted_by_position(replay_mod.concat(
                [s.get("replay") or replay_mod.empty_record(image_shape) for s in shards]))
                       if any("replay" in s for s in shards) else None)}


def attack_chunk(attack, module, data, clean_pred, positions, device, images=None, replayer=None) -> dict:
    """Attack data.x[positions] (`images`, when the caller already fetched them); with a
    `replayer` (audit/replay.py), only the failures the artifact confirms count."""
    take = torch.from_numpy(positions)
    x = (data.x[take] if images is None else images).to(device).contiguous()
    y = data.y[take].to(device)
    index = data.index[take].to(device)
    cp = clean_pred[take].to(device)
    t0 = time.perf_counter()
    out = attack(module, x, y, index, cp)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    spent = time.perf_counter() - t0
    robust = out.robust.cpu().numpy().astype(bool)
    adv_pred = out.adv_pred.cpu().numpy().astype(np.int64)
    y_np = data.y[take].numpy()
    fooled = fooled_mask(robust, adv_pred, y_np, clean_pred[take].numpy(), attack.score)
    record = None
    if replayer is not None:
        record = replayer.chunk_record(x, out.x_adv, y, fooled, positions, out.extras)
        replay_mod.apply_to_chunk(record, robust, adv_pred, y_np, fooled)
        fooled = fooled_mask(robust, adv_pred, y_np, clean_pred[take].numpy(), attack.score)
    fooled_at = np.flatnonzero(fooled)
    local = fooled_at[first_k_per_class(y_np[fooled_at], EXAMPLES_PER_CLASS)]
    chunk = {"robust": robust, "adv_pred": adv_pred, "seconds": np.float64(spent),
             "ex_pos": positions[local].astype(np.int64),
             "ex_img": to_uint8_hwc(out.x_adv[torch.as_tensor(local, dtype=torch.long, device=out.x_adv.device)])
             if len(local) else np.zeros((0, x.shape[2], x.shape[3], x.shape[1]), np.uint8)}
    for key, values in out.extras.items():
        chunk[EXTRA_PREFIX + key] = values.detach().cpu().double().numpy().reshape(len(positions))
    for key, values in out.stats.items():
        chunk[STAT_PREFIX + key] = values.detach().cpu().double().numpy()
    chunk.update(record or {})
    return chunk
