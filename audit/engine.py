"""The scan engine: load -> adapt -> attack -> results.json -> report.

`run_scan` takes an already loaded model and dataset (so `remediate` and torchrun
runs reuse it unchanged), attacks the data chunk by chunk, and keeps every finished
chunk in OUT/.robaudit-state/ so an interrupted scan re-run with the same --out
continues where it stopped. Per-sample randomness is keyed by dataset index, so the
chunking does not change our own attacks' results.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from fractions import Fraction
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

import robaudit
from robaudit.audit import checks as checks_mod
from robaudit.audit.attacks import create_attack, list_attacks
from robaudit.audit.io import check_writable_dir, write_json_atomic, write_npz_atomic
from robaudit.audit.metrics import class_summary, target_flow
from robaudit.errors import GateFailed, UserError

log = logging.getLogger(__name__)

DEFAULT_ATTACKS = ("clean", "fgsm", "pgd", "cw", "aa")
STATE_DIR = ".robaudit-state"
EXAMPLES_PER_CLASS = 4      # fooled examples kept per class and attack (for the report)
REPORT_WORST_CLASSES = 3    # the report shows examples for this many worst classes
REPORT_PAIRS_PER_CLASS = 3

NOTES = [
    "A point counts as robust only if it is clean-correct and no iterate of the attack "
    "fooled it (AutoAttack's convention, worst over iterates). Fooled points stop being "
    "attacked (early stop), which is exact under this rule.",
    "NSD = population standard deviation (ddof 0) of the class accuracies divided by their "
    "mean; the sample SD would be x1.054 larger for 10 classes.",
    "95% intervals are Wilson score intervals on each class's correct count.",
    "Our own attacks seed their random starts per sample (seed + dataset index), so results do "
    "not depend on batching or sharding; AutoAttack (pyautoattack) seeds per run, so its "
    "results can differ slightly with the batch size.",
]


@dataclass
class ScanConfig:
    out_dir: Optional[Path]
    attacks: Sequence[str] = DEFAULT_ATTACKS
    eps: float = 8 / 255
    seed: int = 0
    batch_size: int = 256
    device: str = "auto"
    iterates: str = "any"          # "any": worst over iterates (default); "final": last iterate only
    score: str = "robust"          # "robust": clean-correct and not fooled; "adv-only": acc on x_adv
    attack_overrides: Dict[str, dict] = field(default_factory=dict)
    write_report: bool = True
    redact_paths: bool = False
    command: Optional[str] = None
    fail_under_worst: Optional[float] = None
    fail_over_nsd: Optional[float] = None
    gate_attack: Optional[str] = None   # which block the gates read; default: ensemble


def parse_eps(text) -> float:
    """'8/255', '0.031', '8' (read as k/255 when > 1) -> float in [0, 1]."""
    try:
        value = float(Fraction(str(text).strip()))
    except (ValueError, ZeroDivisionError):
        raise UserError(f"malformed --eps {text!r}: give a fraction like 8/255 or a number like 0.031")
    if value > 1:
        value = value / 255.0
    if not (0 <= value <= 1) or math.isnan(value):
        raise UserError(f"--eps {text!r} is outside [0, 1] (eps is in [0,1] image units, e.g. 8/255)")
    return value


def eps_as_255(eps: float) -> float:
    return round(eps * 255, 4)


def resolve_device(name: str) -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}: use auto, cpu or cuda")


def build_attacks(cfg: ScanConfig):
    names = [a.strip().lower() for a in cfg.attacks if a.strip()]
    if not names:
        raise UserError("no attacks given: pass e.g. --attacks clean,pgd")
    unknown = [a for a in names if a not in list_attacks()]
    if unknown:
        raise UserError(f"unknown attack {unknown[0]!r}; choose from: {', '.join(list_attacks())}")
    unknown = [a for a in cfg.attack_overrides if a not in names]
    if unknown:
        raise UserError(f"option given for attack {unknown[0]!r}, which is not in --attacks")
    if "clean" in names:  # clean first: everything else is read against it
        names.remove("clean")
        names.insert(0, "clean")
    attacks = {}
    for name in dict.fromkeys(names):
        try:
            attacks[name] = create_attack(name, eps=cfg.eps, seed=cfg.seed, iterates=cfg.iterates,
                                          score=cfg.score, **cfg.attack_overrides.get(name, {}))
        except TypeError as err:
            raise UserError(f"bad option for attack {name!r}: {err}")
    return attacks


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _versions() -> dict:
    env = {"python": platform.python_version(), "platform": platform.platform(),
           "robaudit": robaudit.__version__}
    for dist, key in [("torch", "torch"), ("torchvision", "torchvision"),
                      ("onnxruntime-gpu", "onnxruntime"), ("onnxruntime", "onnxruntime"),
                      ("pyautoattack", "pyautoattack"), ("plotly", "plotly"), ("onnx2torch", "onnx2torch")]:
        if key in env:
            continue
        try:
            env[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return env


def _png_b64(img: np.ndarray) -> str:
    """HWC uint8 (C = 1 or 3) -> base64 PNG."""
    from PIL import Image

    if img.shape[2] == 1:
        img = img[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _to_uint8_hwc(x: torch.Tensor) -> np.ndarray:
    return (x.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _first_k_per_class(positions: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """The first k entries of each label, in the given order (vectorised cumcount)."""
    if len(positions) == 0:
        return positions
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    rank = np.arange(len(order)) - np.searchsorted(sorted_labels, sorted_labels, side="left")
    return np.sort(positions[order[rank < k]])


class ScanState:
    """Finished chunks of a scan, on disk, keyed so that a different setting never reuses them."""

    def __init__(self, root: Path, run_key: dict):
        self.root = root
        self.run_key = _hash(run_key)

    def chunk_path(self, attack_name: str, attack_params: dict, start: int, end: int) -> Path:
        key = _hash({"run": self.run_key, "attack": attack_params})
        return self.root / f"{attack_name}-{key}" / f"{start:09d}-{end:09d}.npz"

    def load(self, path: Path) -> Optional[dict]:
        if not path.exists():
            return None
        try:
            with np.load(path) as f:
                return {k: f[k] for k in f.files}
        except Exception:  # a damaged chunk is recomputed, never trusted
            log.warning("ignoring unreadable state chunk %s", path)
            return None


def clean_predictions(module, x: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """argmax predictions for all of x; non-finite logits are a user-facing error."""
    preds = []
    bad = 0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            logits = module(x[start:start + batch_size].to(device)).float()
            bad += int((~torch.isfinite(logits)).any(dim=1).sum())
            preds.append(logits.argmax(dim=1).cpu())
    if bad:
        raise UserError(f"the model produced NaN or infinite logits on {bad} of {len(x)} inputs; "
                        "check the input range (--mean/--std) and the exported graph")
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def run_scan(cfg: ScanConfig, *, model, data, extra: Optional[dict] = None) -> dict:
    """Audit `model` (a LoadedModel) on `data` (an EvalData); write OUT files; return results."""
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    if cfg.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    attacks = build_attacks(cfg)
    num_classes = len(data.classes)
    if len(data.y) == 0:
        raise UserError("the dataset selection is empty; check --limit / --n-per-class")
    module = model.module.to(device).eval()

    # Everything that can fail on the user's input fails here, before a file is written.
    clean_pred = clean_predictions(module, data.x, cfg.batch_size, device)
    probe = slice(0, min(64, len(data.y)))
    flags = checks_mod.model_checks(module, data.x[probe].to(device).contiguous(),
                                    data.y[probe].to(device), model.white_box)
    out_dir = Path(cfg.out_dir) if cfg.out_dir is not None else None
    if out_dir is not None:
        try:
            check_writable_dir(out_dir)
        except OSError as err:
            raise UserError(f"cannot write to --out {out_dir}: {err.strerror or err}")

    run_key = {"model": model.sha256, "index": _hash(data.index.tolist()), "y": _hash(data.y.tolist()),
               "eps": cfg.eps, "seed": cfg.seed, "batch": cfg.batch_size, "device": str(device),
               "iterates": cfg.iterates, "score": cfg.score,
               "adapt": _hash(model.adaptations)}
    state = ScanState(out_dir / STATE_DIR, run_key) if out_dir is not None else None

    n = len(data.y)
    y_np = data.y.numpy()
    per_sample = {"index": data.index.numpy().astype(np.int64), "y": y_np.astype(np.int64),
                  "clean_pred": clean_pred.numpy().astype(np.int64)}
    attack_blocks, flows, seconds, kept_examples, config_attacks = {}, {}, {}, {}, {}
    robust_by_attack = {}
    for name, attack in attacks.items():
        params = attack.params()
        config_attacks[name] = params
        if attack.white_box and not model.white_box:
            flags.append(checks_mod.refused_attack_flag(name, model.refusal or "no gradients"))
            continue
        robust = np.zeros(n, dtype=bool)
        adv_pred = clean_pred.numpy().copy()
        ex_pos, ex_img = [], []
        spent = 0.0
        bar = tqdm(total=n, desc=f"{name:>6}", unit="img", file=sys.stderr, disable=None, leave=False)
        for start in range(0, n, cfg.batch_size):
            end = min(start + cfg.batch_size, n)
            path = state.chunk_path(name, params, start, end) if state else None
            chunk = state.load(path) if state else None
            if chunk is None:
                chunk = _attack_chunk(attack, module, data, clean_pred, start, end, device)
                if state:
                    write_npz_atomic(path, **chunk)
            robust[start:end] = chunk["robust"]
            adv_pred[start:end] = chunk["adv_pred"]
            ex_pos.append(chunk["ex_pos"])
            ex_img.append(chunk["ex_img"])
            spent += float(chunk["seconds"])
            bar.update(end - start)
        bar.close()
        seconds[name] = round(spent, 3)
        robust_by_attack[name] = robust
        per_sample[f"robust_{name}"] = robust
        per_sample[f"adv_pred_{name}"] = adv_pred.astype(np.int64)
        block = class_summary(robust, y_np, data.classes)
        fooled = _fooled(robust, adv_pred, y_np, per_sample["clean_pred"], cfg.score)
        block["n_attacked"] = int(n if cfg.score == "adv-only" else (per_sample["clean_pred"] == y_np).sum())
        block["seconds"] = seconds[name]
        block["description"] = repr(attack)
        attack_blocks[name] = block
        if name != "clean":
            flows[name] = target_flow(y_np, adv_pred, fooled, num_classes)
            kept_examples[name] = (np.concatenate(ex_pos), np.concatenate(ex_img))

    ensemble = None
    attacked = [a for a in robust_by_attack if a != "clean"]
    if attacked:
        robust_all = np.logical_and.reduce([robust_by_attack[a] for a in attacked])
        if cfg.score == "robust":
            robust_all &= per_sample["clean_pred"] == y_np
        ensemble = class_summary(robust_all, y_np, data.classes)
        ensemble["attacks"] = attacked
        ensemble["n_attacked"] = max(attack_blocks[a]["n_attacked"] for a in attacked)
        ensemble["seconds"] = round(sum(seconds[a] for a in attacked), 3)
        ensemble["description"] = "robust against every attack run: " + ", ".join(attacked)

    finished_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results = {
        "schema_version": 1,
        "tool": {"name": "robaudit", "version": robaudit.__version__},
        "command": cfg.command,
        "started_at": started_at,
        "finished_at": finished_at,
        "model": {"path": str(model.path), "format": model.format, "sha256": model.sha256,
                  "num_params": model.num_params, "arch": model.arch, "white_box": model.white_box,
                  "adaptations": model.adaptations},
        "dataset": {"name": data.name, "split": data.split, "n": n, "num_classes": num_classes,
                    "classes": list(data.classes), "source": str(data.source), "subset": data.subset},
        "config": {"eps": cfg.eps, "eps_255": eps_as_255(cfg.eps), "seed": cfg.seed,
                   "device": str(device), "batch_size": cfg.batch_size,
                   "scoring": {"iterates": cfg.iterates, "score": cfg.score},
                   "attacks": config_attacks},
        "attacks": attack_blocks,
        "ensemble": ensemble,
        "target_flow": flows,
        "examples": _select_examples(kept_examples, attack_blocks, ensemble, data, per_sample),
        "checks": flags,
        "timing": {"total_seconds": round(time.perf_counter() - t_start, 3), "per_attack": seconds},
        "environment": {**_versions(), "device": str(device),
                        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                        else platform.processor() or platform.machine()),
                        "world_size": 1},
        "notes": _notes(cfg),
        "training": None,
    }
    if extra:
        results.update(extra)
    results["checks"] = flags + checks_mod.result_checks(results)

    if out_dir is not None:
        write_npz_atomic(out_dir / "samples.npz", **per_sample)
        write_json_atomic(out_dir / "results.json", results)
        if cfg.write_report:
            from robaudit.audit.report import render_report

            render_report(results, out_dir / "report.html", redact_paths=cfg.redact_paths)
    check_gates(results, cfg)
    return results


def _notes(cfg: ScanConfig) -> List[str]:
    notes = list(NOTES)
    if cfg.iterates == "final":
        notes[0] = ("Only the final iterate of each attack is scored (--iterates final), as the "
                    "papers' evaluators do; no early stopping.")
    if cfg.score == "adv-only":
        notes.insert(1, "Accuracy is measured on the adversarial inputs alone (--score adv-only, the "
                        "Fair-ARD evaluation convention): clean-wrong points are attacked too.")
    return notes


def _fooled(robust, adv_pred, y, clean_pred, score) -> np.ndarray:
    if score == "adv-only":
        return adv_pred != y
    return (clean_pred == y) & ~robust


def _attack_chunk(attack, module, data, clean_pred, start, end, device) -> dict:
    x = data.x[start:end].to(device).contiguous()
    y = data.y[start:end].to(device)
    index = data.index[start:end].to(device)
    cp = clean_pred[start:end].to(device)
    t0 = time.perf_counter()
    out = attack(module, x, y, index, cp)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    spent = time.perf_counter() - t0
    robust = out.robust.cpu().numpy().astype(bool)
    adv_pred = out.adv_pred.cpu().numpy().astype(np.int64)
    y_np = data.y[start:end].numpy()
    fooled = _fooled(robust, adv_pred, y_np, clean_pred[start:end].numpy(), attack.score)
    local = _first_k_per_class(np.flatnonzero(fooled), y_np[fooled], EXAMPLES_PER_CLASS)
    return {"robust": robust, "adv_pred": adv_pred, "seconds": np.float64(spent),
            "ex_pos": (local + start).astype(np.int64),
            "ex_img": _to_uint8_hwc(out.x_adv[torch.as_tensor(local, dtype=torch.long, device=out.x_adv.device)])
            if len(local) else np.zeros((0, x.shape[2], x.shape[3], x.shape[1]), np.uint8)}


def _select_examples(kept, attack_blocks, ensemble, data, per_sample) -> List[dict]:
    """A few clean/adversarial pairs for the worst classes (by ensemble robust accuracy)."""
    if not kept:
        return []
    ranking = ensemble or attack_blocks[next(iter(kept))]
    classes = sorted((c for c in ranking["per_class"] if c["n"] > 0), key=lambda c: c["accuracy"])
    examples = []
    for entry in classes[:REPORT_WORST_CLASSES]:
        k = data.classes.index(entry["class"])
        shown = set()
        for name, (positions, images) in kept.items():
            for pos, img in zip(positions.tolist(), images):
                if len(shown) >= REPORT_PAIRS_PER_CLASS:
                    break
                if int(data.y[pos]) != k or pos in shown:
                    continue
                shown.add(pos)
                examples.append({
                    "attack": name, "index": int(data.index[pos]), "class": data.classes[k],
                    "clean_pred": data.classes[int(per_sample["clean_pred"][pos])],
                    "adv_pred": data.classes[int(per_sample[f"adv_pred_{name}"][pos])],
                    "clean_png": _png_b64(_to_uint8_hwc(data.x[pos:pos + 1])[0]),
                    "adv_png": _png_b64(img),
                })
    return examples


def check_gates(results: dict, cfg: ScanConfig) -> None:
    block = results["attacks"].get(cfg.gate_attack) if cfg.gate_attack else (
        results["ensemble"] or results["attacks"].get("clean"))
    if block is None:
        return
    if cfg.fail_under_worst is not None and block["worst"] < cfg.fail_under_worst:
        raise GateFailed(f"gate failed: worst-class accuracy {block['worst']:.4f} "
                         f"({block['worst_class']}) is under --fail-under-worst {cfg.fail_under_worst}")
    if cfg.fail_over_nsd is not None and block["nsd"] is not None and block["nsd"] > cfg.fail_over_nsd:
        raise GateFailed(f"gate failed: NSD {block['nsd']:.4f} is over --fail-over-nsd {cfg.fail_over_nsd}")
