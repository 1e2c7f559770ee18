"""Replay every counted failure on the shipped artifact (issue 24, item 1).

An attack runs on the module robaudit attacks: for an ONNX file that is its onnx2torch
conversion, checked on one probe batch only. Adversarial examples sit next to decision
boundaries, where a 1e-5 logit difference flips the answer, so a failure counts only
once the artifact's own runtime confirms it:

- ONNX: an onnxruntime InferenceSession on the original file, behind the same boundary
  adaptations (input range, normalisation, layout, output kind, class order);
- .pt2 / TorchScript / weights: the loaded program itself, fed at another batch
  composition than the attack's (reversed order, batches of batch_size // 2 + 1).

The engine also takes the clean predictions from this runtime (which points are
clean-correct, and so attacked), so every count in results.json is the artifact's.

What is replayed is what the evidence file stores (audit/evidence.py): first the image
rounded to the 8-bit grid (`quantize`: the image an attacker would actually deliver);
where that does not fool the artifact, the attack's float32 image. A failure is
confirmed when either fools the artifact; unconfirmed failures count as robust.
For a minimal-norm attack (extras["min_norm"], FMN) both are replayed: the norm stays
the float one when it is confirmed, becomes the 8-bit image's norm when only that one
fools (an overshoot of at most about half a quantum per pixel, documented in
docs/results-schema.md), and +inf when neither does. Norms above the audited eps have
no example inside the ball (FMN returns x there), so they are not replayed.

One forward pass per failure (two for FMN and for failures the 8-bit image misses),
batched; no loop over samples.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from robaudit.audit.attacks.ascent import per_sample_norm
from robaudit.audit.attacks.base import BALL_TOLERANCE, l1_ball_tolerance, l2_ball_tolerance

PREFIX = "replay__"
# stored kinds of a failure (evidence `<attack>__kind`; unconfirmed ones are not stored)
KIND_DELTA8, KIND_FLOAT32, KIND_UNCONFIRMED = 0, 1, 2
MIN_NORM_KEY = "min_norm"


# --------------------------------------------------------------------------- the eps-ball

def ball_tolerance(norm: str, dim: int, eps: float) -> float:
    """Slack of the eps-ball test: float32 rounding only (as the attacks' own guard)."""
    if norm == "linf":
        return BALL_TOLERANCE
    return l2_ball_tolerance(dim, eps) if norm == "l2" else l1_ball_tolerance(dim, eps)


def in_ball(x: torch.Tensor, x_adv: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """bool [B]: x_adv within eps of x (in `norm`, float64) and inside [0, 1]."""
    delta = (x_adv.double() - x.double())
    tol = ball_tolerance(norm, delta[0].numel() if len(delta) else 1, eps)
    size = per_sample_norm(norm, delta).reshape(-1)
    box = ((x_adv >= 0) & (x_adv <= 1)).flatten(1).all(dim=1)
    return (size <= eps + tol) & box


def clean_uint8(x: torch.Tensor) -> torch.Tensor:
    """The clean image on the 8-bit grid, as int16: round(clamp(x, 0, 1) * 255)."""
    return torch.round(x.float().clamp(0, 1) * 255).to(torch.int16)


def quantize(x: torch.Tensor, x_adv: torch.Tensor, eps: float, norm: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q int16 [B, C, H, W] in 0..255, in_ball bool [B]): x_adv on the 8-bit grid.

    q = round(x_adv * 255). L-inf: where q / 255 left the ball, step one quantum toward the
    clean image (for a clean image on the grid and eps = k/255 this never happens). L2 /
    L1: a sample whose rounded image left the ball is rounded toward the clean image
    instead (floor above it, ceil below it). in_ball says whether q / 255 lies in the ball.
    """
    target = x_adv.float().clamp(0, 1) * 255
    q = torch.round(target)
    clean = x.float() * 255
    if norm == "linf":
        outside = (q - clean).abs() > (eps + BALL_TOLERANCE) * 255
        q = torch.where(outside, q - torch.sign(q - clean), q)
    else:
        toward = torch.where(target >= clean, torch.floor(target), torch.ceil(target))
        left = ~in_ball(x, q / 255, eps, norm)
        q = torch.where(left.view(-1, 1, 1, 1), toward, q)
    q = q.clamp(0, 255)
    return q.to(torch.int16), in_ball(x, as_image(q), eps, norm)


def as_image(q: torch.Tensor) -> torch.Tensor:
    """float32 image of 8-bit values: q / 255 (exactly numpy's float32(q) / float32(255))."""
    return q.to(torch.float32) / 255.0


# --------------------------------------------------------------------------- the runtime

class ArtifactForward(nn.Module):
    """onnxruntime on the original file behind the scan's boundary (input side, output side)."""

    def __init__(self, boundary: Optional[nn.Module], runtime: nn.Module):
        super().__init__()
        self.boundary = boundary
        self.runtime = runtime

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.boundary is None:
            return self.runtime(x)
        return self.boundary.adapt_output(self.runtime(self.boundary.adapt_input(x)))


def artifact_module(model, device) -> Tuple[nn.Module, str]:
    """(module: NCHW [0, 1] -> logits in dataset class order, runtime description)."""
    if model.format != "onnx":
        return model.module, f"{model.format} program (batch recomposed)"
    import onnxruntime as ort

    from robaudit.audit.models.boundary_modules import BoundaryModel
    from robaudit.audit.models.ort_runtime import OnnxRuntimeModule

    output = (model.adaptations.get("output") or {}).get("name")
    runtime = OnnxRuntimeModule(str(model.path), device=str(device), output_name=output, share_cpu=True)
    boundary = model.module if isinstance(model.module, BoundaryModel) else None
    providers = runtime.session.get_providers()
    return ArtifactForward(boundary, runtime).eval(), f"onnxruntime {ort.__version__} ({providers[0]})"


def predict(module: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """argmax of module(x), in reversed order and batches of batch_size // 2 + 1 (another
    batch composition than the attack's); returned in x's order."""
    if len(x) == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    step = max(1, batch_size // 2 + 1)
    reversed_x = x.flip(0)
    with torch.no_grad():
        preds = [module(reversed_x[s:s + step].contiguous()).float().argmax(dim=1)
                 for s in range(0, len(x), step)]
    return torch.cat(preds).to(x.device).flip(0)


# --------------------------------------------------------------------------- one chunk

class Replayer:
    """Replays one chunk's failures on the artifact; what `attack_chunk` stores per chunk."""

    def __init__(self, module: nn.Module, runtime: str, eps: float, norm: str, batch_size: int):
        self.module, self.runtime = module, runtime
        self.eps, self.norm, self.batch_size = float(eps), norm, int(batch_size)

    def chunk_record(self, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, failed: np.ndarray,
                     positions: np.ndarray, extras: Dict[str, torch.Tensor]) -> Dict[str, np.ndarray]:
        """replay__* arrays of the failures in `failed` (bool [B]); updates extras["min_norm"]."""
        at = torch.as_tensor(np.flatnonzero(failed), dtype=torch.long, device=x.device)
        if len(at) == 0:
            return {**empty_record(x.shape[1:]), "_confirmed": torch.zeros(0, dtype=torch.bool)}
        xs, xa, ys = x[at], x_adv[at].to(x.dtype), y[at]
        q, q_ok = quantize(xs, xa, self.eps, self.norm)
        img8 = as_image(q)
        pred8 = predict(self.module, img8, self.batch_size)
        fools8 = q_ok & (pred8 != ys)
        minimal = MIN_NORM_KEY in extras
        again = torch.ones_like(fools8) if minimal else ~fools8
        predf = pred8.clone()
        predf[again] = predict(self.module, xa[again], self.batch_size)
        foolsf = again & (predf != ys)
        confirmed = fools8 | foolsf
        delta = q - clean_uint8(xs)
        fits = (delta.flatten(1).abs().amax(dim=1) <= 127) if len(delta) else fools8
        kind = torch.full_like(ys, KIND_UNCONFIRMED)
        kind[foolsf] = KIND_FLOAT32
        kind[fools8] = torch.where(fits[fools8], KIND_DELTA8, KIND_FLOAT32)
        pred = torch.where(fools8, pred8, predf)
        floats = torch.where(fools8.view(-1, 1, 1, 1), img8, xa.float())[kind == KIND_FLOAT32]
        if minimal:
            norms = extras[MIN_NORM_KEY]   # may live on the host (the attack's extras): index it there
            at_norms = at.to(norms.device)
            old = norms[at_norms].to(foolsf.device)
            size8 = per_sample_norm(self.norm, img8.double() - xs.double()).reshape(-1)
            kept = torch.where(foolsf, old, torch.where(fools8, size8.to(old), torch.full_like(old, np.inf)))
            norms[at_norms] = kept.to(norms.device)
        return {PREFIX + "pos": positions[at.cpu().numpy()].astype(np.int64),
                PREFIX + "kind": kind.cpu().numpy().astype(np.uint8),
                PREFIX + "realizable": fools8.cpu().numpy(),
                PREFIX + "pred": pred.cpu().numpy().astype(np.int64),
                PREFIX + "delta8": delta[kind == KIND_DELTA8].cpu().numpy().astype(np.int8),
                PREFIX + "float32": floats.cpu().numpy().astype(np.float32),
                "_confirmed": confirmed}


def apply_to_chunk(record: dict, robust: np.ndarray, adv_pred: np.ndarray, y: np.ndarray,
                   failed: np.ndarray) -> None:
    """Unconfirmed failures count as robust (their prediction: the label); confirmed ones
    take the artifact's prediction. In place."""
    confirmed = record.pop("_confirmed").cpu().numpy()
    at = np.flatnonzero(failed)
    robust[at[~confirmed]] = True
    adv_pred[at[~confirmed]] = y[at[~confirmed]]
    adv_pred[at[confirmed]] = record[PREFIX + "pred"][confirmed]


# --------------------------------------------------------------------------- shards

def empty_record(image_shape: Sequence[int]) -> Dict[str, np.ndarray]:
    shape = tuple(int(d) for d in image_shape)
    return {PREFIX + "pos": np.zeros(0, np.int64), PREFIX + "kind": np.zeros(0, np.uint8),
            PREFIX + "realizable": np.zeros(0, bool), PREFIX + "pred": np.zeros(0, np.int64),
            PREFIX + "delta8": np.zeros((0, *shape), np.int8), PREFIX + "float32": np.zeros((0, *shape), np.float32)}


def has_record(chunk: dict) -> bool:
    return PREFIX + "pos" in chunk


def record_ok(chunk: dict, positions: np.ndarray) -> bool:
    """Whether a stored chunk's replay arrays fit together (a damaged chunk is recomputed)."""
    keys = [PREFIX + k for k in ("pos", "kind", "realizable", "pred", "delta8", "float32")]
    if not all(k in chunk for k in keys):
        return False
    pos, kind = chunk[PREFIX + "pos"], chunk[PREFIX + "kind"]
    f = len(pos)
    return bool(kind.shape == (f,) and chunk[PREFIX + "realizable"].shape == (f,)
                and chunk[PREFIX + "pred"].shape == (f,) and np.isin(pos, positions).all()
                and len(chunk[PREFIX + "delta8"]) == int((kind == KIND_DELTA8).sum())
                and len(chunk[PREFIX + "float32"]) == int((kind == KIND_FLOAT32).sum()))


def concat(records) -> Dict[str, np.ndarray]:
    """Records one after another (chunk order or rank order)."""
    records = list(records)
    return {key: np.concatenate([r[key] for r in records]) for key in records[0]}


def sorted_by_position(record: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The record in subset order, whatever the sharding (images stay with their kind)."""
    pos, kind = record[PREFIX + "pos"], record[PREFIX + "kind"]
    out = {key: value[np.argsort(pos, kind="stable")] for key, value in record.items()
           if key not in (PREFIX + "delta8", PREFIX + "float32")}
    for key, which in ((PREFIX + "delta8", KIND_DELTA8), (PREFIX + "float32", KIND_FLOAT32)):
        out[key] = record[key][np.argsort(pos[kind == which], kind="stable")]
    return out


def class_counts(record: Dict[str, np.ndarray], y: np.ndarray, num_classes: int, runtime: str) -> dict:
    """results.json attacks.<name>.replay from a merged record."""
    labels = y[record[PREFIX + "pos"]]
    kind = record[PREFIX + "kind"]
    confirmed = kind != KIND_UNCONFIRMED

    def count(mask):
        return [int(v) for v in np.bincount(labels[mask], minlength=num_classes).tolist()]

    return {"runtime": runtime, "confirmed": count(confirmed), "unconfirmed": count(~confirmed),
            "realizable": count(confirmed & record[PREFIX + "realizable"])}


def unconfirmed_flags(replays: Dict[str, dict]) -> list:
    """The `replay_unconfirmed` check: one flag when any counted failure was not confirmed."""
    from robaudit.audit.checks import _flag

    missed = {name: sum(r["unconfirmed"]) for name, r in replays.items() if r and sum(r["unconfirmed"])}
    if not missed:
        return []
    runtime = next(r["runtime"] for r in replays.values() if r)
    listed = ", ".join(f"{name}: {n}" for name, n in missed.items())
    return [_flag("replay_unconfirmed", "warning",
                  f"{sum(missed.values())} failures found by the attacks did not fool the shipped model when "
                  f"replayed on {runtime} ({listed}); they count as robust",
                  "the attacked module differs from the artifact near the decision boundary (e.g. an "
                  "ONNX conversion's rounding); only failures the artifact confirms are counted, so "
                  "these points may still be breakable with a stronger or artifact-specific attack")]


def scan_replayer(cfg, model, device) -> Optional[Replayer]:
    """The scan's Replayer (None with cfg.replay off)."""
    if not getattr(cfg, "replay", True):
        return None
    module, runtime = artifact_module(model, device)
    return Replayer(module, runtime, cfg.eps, cfg.norm, cfg.batch_size)
