"""The scan engine: load -> adapt -> attack -> results.json (the report is the caller's:
audit/scan_outputs.py `scan_and_report`).

`run_scan` takes an already loaded model and dataset (so `remediate` and torchrun
runs reuse it unchanged), attacks the data chunk by chunk, and keeps every finished
chunk in OUT/.robaudit-state/ so an interrupted scan re-run with the same --out
continues where it stopped. Per-sample randomness is keyed by dataset index, so the
chunking does not change our own attacks' results.
"""

from __future__ import annotations

import logging
import math
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fractions import Fraction
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

import robaudit
from robaudit.audit import checks as checks_mod
from robaudit.audit.checks_ledger import build_ledger
from robaudit.audit import distributed
from robaudit.audit import evidence as evidence_mod
from robaudit.audit import replay as replay_mod
from robaudit.audit import results_schema
from robaudit.audit.attacks import create_attack, list_attacks
from robaudit.audit.curves import scan_curves
from robaudit.audit.io import check_writable_dir, png_base64, write_npz_atomic, write_text_atomic
from robaudit.audit.devices import resolve_device
from robaudit.audit.gates import gate_outcomes
from robaudit.audit.precision import audit_precision_record, tf32_policy
from robaudit.audit.metrics import class_summary, target_flow
from robaudit.audit.outlock import hold_out_dir
from robaudit.audit.scan_chunks import (ScanState, attack_shard, clean_predictions,
                                        fooled_mask, hash_array, images_fingerprint, merge_shards,
                                        run_hash, to_uint8_hwc)
from robaudit.errors import GateFailed, UserError

log = logging.getLogger(__name__)

DEFAULT_ATTACKS = ("clean", "fgsm", "pgd", "cw", "aa")
STATE_DIR = ".robaudit-state"
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
    norm: str = "linf"             # threat model of every attack: "linf" | "l2" (eps in its units)
    seed: int = 0
    batch_size: int = 256
    device: str = "auto"
    iterates: str = "any"          # "any": worst over iterates (default); "final": last iterate only
    score: str = "robust"          # "robust": clean-correct and not fooled; "adv-only": acc on x_adv
    attack_overrides: Dict[str, dict] = field(default_factory=dict)
    write_report: bool = True      # read by scan_outputs.scan_and_report; run_scan renders nothing
    redact_paths: bool = False
    command: Optional[str] = None
    fail_under_worst: Optional[float] = None
    fail_over_nsd: Optional[float] = None
    gate_attack: Optional[str] = None   # which block the gates read; default: ensemble
    replay: bool = True            # count only failures the artifact confirms (audit/replay.py)
    write_evidence: bool = True    # OUT/evidence.npz (audit/evidence.py); needs replay
    allow_tf32: bool = False       # CUDA: let matmuls/convolutions use TF32 (audit/precision.py)


def parse_eps(text, norm: str = "linf") -> float:
    """'8/255', '0.031', '8' (read as k/255 when > 1) -> float in [0, 1].

    norm="l2" / "l1": the number is an L2 / L1 radius in [0, 1] pixel units, taken as given
    (radii above 1, e.g. ImageNet's L2 3.0 or CIFAR-10's L1 12, are common), so no k/255
    reading and no upper bound."""
    try:
        value = float(Fraction(str(text).strip()))
    except (ValueError, ZeroDivisionError, OverflowError):
        raise UserError(f"malformed --eps {text!r}: give a fraction like 8/255 or a number like 0.031")
    if norm in ("l2", "l1"):
        if not (math.isfinite(value) and value >= 0):
            example = "0.5" if norm == "l2" else "12"
            raise UserError(f"--eps {text!r} must be an {norm.upper()} radius >= 0 (in [0,1] image units, "
                            f"e.g. {example})")
        return value
    if value > 1:
        value = value / 255.0
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise UserError(f"--eps {text!r} is outside [0, 1] (eps is in [0,1] image units, e.g. 8/255)")
    return value


def eps_as_255(eps: float) -> float:
    return round(eps * 255, 4)


def build_attacks(cfg: ScanConfig):
    requested = cfg.attacks.split(",") if isinstance(cfg.attacks, str) else cfg.attacks
    names = [a.strip().lower() for a in requested if a.strip()]
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
                                          score=cfg.score, norm=cfg.norm,
                                          **cfg.attack_overrides.get(name, {}))
        except TypeError as err:
            raise UserError(f"bad option for attack {name!r}: {err}")
    return attacks


def check_gate_config(cfg: ScanConfig, attack_names: Sequence[str]) -> None:
    """Reject gates that can never be evaluated sensibly, before anything runs."""
    if cfg.fail_under_worst is not None and not (
            math.isfinite(cfg.fail_under_worst) and 0 <= cfg.fail_under_worst <= 1):
        raise UserError(f"--fail-under-worst {cfg.fail_under_worst} must be a fraction in [0, 1] "
                        "(e.g. 0.3 for 30%)")
    if cfg.fail_over_nsd is not None and not (math.isfinite(cfg.fail_over_nsd) and cfg.fail_over_nsd >= 0):
        raise UserError(f"--fail-over-nsd {cfg.fail_over_nsd} must be a non-negative number")
    if cfg.gate_attack is not None and cfg.gate_attack not in (*attack_names, "ensemble"):
        raise UserError(f"the gate reads attack {cfg.gate_attack!r}, which is not in --attacks")


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


def _gathered_clean_predictions(module, data, cfg, device, num_classes, positions) -> torch.Tensor:
    """Each rank predicts its shard; every rank gets the full vector (subset order)."""
    error, mine = None, None
    try:
        mine = clean_predictions(module, data.x, cfg.batch_size, device, num_classes, positions)
    except UserError as err:
        error = err
    distributed.agree_or_raise(error)
    full = torch.zeros(len(data.y), dtype=torch.long)
    for pos, pred in distributed.all_gather_objects((positions, mine)):
        full[torch.from_numpy(pos)] = pred
    return full


def run_scan(cfg: ScanConfig, *, model, data, extra: Optional[dict] = None) -> dict:
    """Audit `model` (a LoadedModel) on `data` (an EvalData); write OUT files; return results.
    On CUDA the audit runs exact fp32 unless cfg.allow_tf32 (audit/precision.py)."""
    with tf32_policy(cfg.allow_tf32):
        return _run_scan(cfg, model=model, data=data, extra=extra)


def _run_scan(cfg: ScanConfig, *, model, data, extra: Optional[dict] = None) -> dict:
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    if cfg.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    attacks = build_attacks(cfg)
    check_gate_config(cfg, list(attacks))
    if not model.white_box and all(attack.white_box for attack in attacks.values()):
        raise UserError(f"none of the requested attacks can run: white-box attacks are refused for this "
                        f"model ({model.refusal or 'no trustworthy gradients'}); add the black-box "
                        "attack 'square' (and 'clean')")
    num_classes = len(data.classes)
    if len(data.y) == 0:
        raise UserError("the dataset selection is empty; check --limit / --n-per-class")
    # Everything that can fail on the user's input fails here, before a file is written
    # (or a folder created): the cheap --out check first, then the model's outputs.
    out_dir = Path(cfg.out_dir) if cfg.out_dir is not None else None
    if out_dir is not None:
        try:
            check_writable_dir(out_dir)
        except OSError as err:
            raise UserError(f"cannot write to --out {out_dir}: {err.strerror or err}")
    module = model.module.to(device).eval()

    ctx = distributed.current()
    y_np = data.y.numpy()
    my_positions = distributed.shard_positions(y_np, ctx.rank, ctx.world_size)
    # Clean predictions come from the artifact's own runtime (audit/replay.py), like every failure.
    replayer = replay_mod.scan_replayer(cfg, model, device)
    clean_pred = _gathered_clean_predictions(replayer.module if replayer else module, data, cfg, device,
                                             num_classes, my_positions)
    # The probe takes gradients of a whole batch at once: --batch-size bounds its memory
    # as it bounds the attacks' (64 ResNet-50 images at 224 px would need several GB).
    probe = slice(0, min(64, cfg.batch_size, len(data.y)))
    probe_info: dict = {}
    flags = checks_mod.model_checks(module, data.x[probe].to(device).contiguous(),
                                    data.y[probe].to(device), model.white_box, info=probe_info)
    if probe_info.get("input_gradients") is False:
        white = [name for name, attack in attacks.items() if attack.white_box]
        if white:
            raise UserError(f"the model gives no input gradients, so the white-box attack {white[0]!r} "
                            "cannot run on it; use the black-box attack 'square'")

    # A chunk is only reused by the exact same model, data, predictions and settings.
    run_key = {"model": model.sha256, "index": hash_array(data.index), "y": hash_array(data.y),
               "x": images_fingerprint(data.x), "clean_pred": hash_array(clean_pred),
               "dataset": [data.name, data.split, list(data.classes)],
               "eps": cfg.eps, "seed": cfg.seed, "batch": cfg.batch_size, "device": str(device),
               "iterates": cfg.iterates, "score": cfg.score,
               "adapt": run_hash(model.adaptations), **({"tf32": True} if cfg.allow_tf32 else {})}
    run_key["replay"] = replayer.runtime if replayer else None
    with hold_out_dir(out_dir):  # one run per --out; taken only now that the input checks passed
        state = ScanState(out_dir / STATE_DIR, run_key) if out_dir is not None else None
        per_sample = {"index": data.index.numpy().astype(np.int64), "y": y_np.astype(np.int64),
                      "clean_pred": clean_pred.numpy().astype(np.int64)}
        attacked = _run_attacks(cfg, attacks, model, module, data, clean_pred, my_positions, device, state,
                                per_sample, flags, replayer)
        results = _assemble_results(cfg, model, data, device, attacked, per_sample, flags,
                                    started_at, t_start, extra)
        if out_dir is not None and ctx.is_main:
            _write_outputs(out_dir, results, per_sample)
            if cfg.write_evidence and replayer is not None:
                evidence_mod.write_scan_evidence(out_dir, results, attacked.replays, data, cfg.batch_size)
    check_gates(results, cfg)
    return results


@dataclass
class _AttackedBlocks:
    """What the attack loop produced, per attack name."""
    blocks: Dict[str, dict]
    flows: Dict[str, dict]
    seconds: Dict[str, float]
    examples: Dict[str, tuple]
    config: Dict[str, dict]
    robust: Dict[str, np.ndarray]
    extras: Dict[str, Dict[str, np.ndarray]] = field(default_factory=dict)  # attack -> per-sample arrays
    replays: Dict[str, dict] = field(default_factory=dict)  # attack -> failures replayed (audit/replay.py)


def _run_attacks(cfg, attacks, model, module, data, clean_pred, positions, device, state,
                 per_sample, flags, replayer=None) -> _AttackedBlocks:
    """Every attack over this rank's shard, gathered; fills per_sample and flags in place."""
    num_classes, n, y_np = len(data.classes), len(data.y), data.y.numpy()
    out = _AttackedBlocks({}, {}, {}, {}, {}, {})
    for name, attack in attacks.items():
        params = attack.params()
        out.config[name] = params
        if attack.white_box and not model.white_box:
            flags.append(checks_mod.refused_attack_flag(name, model.refusal or "no gradients"))
            continue
        shard, error = None, None
        try:
            shard = attack_shard(name, attack, params, module, data, clean_pred, positions,
                                 cfg.batch_size, device, state, num_classes,
                                 replayer if name != "clean" else None)
        except Exception as err:  # every rank must learn of it, or the others wait forever
            error = err
        distributed.agree_or_raise(error)
        merged = merge_shards(distributed.all_gather_objects(shard), clean_pred.numpy(), y_np,
                              data.x.shape[1:])
        robust, adv_pred = merged["robust"], merged["adv_pred"]
        out.seconds[name] = round(merged["seconds"], 3)
        out.robust[name] = robust
        out.extras[name] = merged["extras"]
        per_sample[f"robust_{name}"] = robust
        per_sample[f"adv_pred_{name}"] = adv_pred.astype(np.int64)
        for key, values in merged["extras"].items():  # e.g. min_norm_fmn
            per_sample[f"{key}_{name}"] = values
        block = class_summary(robust, y_np, data.classes)
        fooled = fooled_mask(robust, adv_pred, y_np, per_sample["clean_pred"], cfg.score)
        block["n_attacked"] = int(n if cfg.score == "adv-only" else (per_sample["clean_pred"] == y_np).sum())
        block["seconds"] = out.seconds[name]
        block["description"] = repr(attack)
        if merged["stats"]:  # summed over every sample (e.g. PGD's per-step losses)
            block["diagnostics"] = attack.diagnostics(merged["stats"])
        if merged["replay"] is not None:
            out.replays[name] = merged["replay"]
            block["replay"] = replay_mod.class_counts(merged["replay"], y_np, num_classes, replayer.runtime)
        elif replayer is not None:
            block["replay"] = None
        out.blocks[name] = block
        if name != "clean":
            # results.json keeps only the non-zero cells (docs/results-schema.md, target_flow)
            out.flows[name] = results_schema.sparse_flow(target_flow(y_np, adv_pred, fooled, num_classes))
            out.examples[name] = (merged["ex_pos"], merged["ex_img"])
    return out


def _ensemble_block(cfg, attacked: _AttackedBlocks, per_sample, data) -> Optional[dict]:
    names = [a for a in attacked.robust if a != "clean"]
    if not names:
        return None
    y_np = per_sample["y"]
    robust_all = np.logical_and.reduce([attacked.robust[a] for a in names])
    if cfg.score == "robust":
        robust_all &= per_sample["clean_pred"] == y_np
    ensemble = class_summary(robust_all, y_np, data.classes)
    ensemble["attacks"] = names
    ensemble["n_attacked"] = max(attacked.blocks[a]["n_attacked"] for a in names)
    ensemble["seconds"] = round(sum(attacked.seconds[a] for a in names), 3)
    ensemble["description"] = "robust against every attack run: " + ", ".join(names)
    return ensemble


def _assemble_results(cfg, model, data, device, attacked: _AttackedBlocks, per_sample, flags,
                      started_at, t_start, extra) -> dict:
    ensemble = _ensemble_block(cfg, attacked, per_sample, data)
    finished_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results = results_schema.results_document(
        command=cfg.command, started_at=started_at, finished_at=finished_at,
        model={"path": str(model.path), "format": model.format, "sha256": model.sha256,
               "num_params": model.num_params, "arch": model.arch,
               "arch_inferred": getattr(model, "arch_inferred", None), "white_box": model.white_box,
               "adaptations": model.adaptations},
        dataset={"name": data.name, "split": data.split, "n": len(data.y), "num_classes": len(data.classes),
                 "classes": list(data.classes), "source": str(data.source), "subset": data.subset,
                 "preprocessing": getattr(data, "preprocessing", None)},
        config={"eps": cfg.eps, "eps_255": eps_as_255(cfg.eps) if cfg.norm == "linf" else None, "norm": cfg.norm, "seed": cfg.seed,
                "device": str(device), "batch_size": cfg.batch_size,
                "scoring": {"iterates": cfg.iterates, "score": cfg.score},
                "precision": audit_precision_record(device, cfg.allow_tf32),
                "attacks": attacked.config},
        attacks=attacked.blocks, ensemble=ensemble, target_flow=attacked.flows,
        examples=_select_examples(attacked.examples, attacked.blocks, ensemble, data, per_sample),
        checks=flags,
        timing={"total_seconds": round(time.perf_counter() - t_start, 3), "per_attack": attacked.seconds},
        environment={**_versions(), "device": str(device),
                     "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                     else platform.processor() or platform.machine()),
                     "world_size": distributed.current().world_size},
        notes=_notes(cfg))
    if extra:
        results.update(extra)
    curves = scan_curves(attacked.config, attacked.extras, per_sample["y"], per_sample["clean_pred"],
                         data.classes, audited_eps=cfg.eps, norm=cfg.norm)
    if curves:  # only when a minimal-norm attack ran (fmn); its flags come from result_checks
        results["curves"] = curves
    flags = flags + replay_mod.unconfirmed_flags({a: b.get("replay") for a, b in attacked.blocks.items()})
    results["checks"] = flags + checks_mod.result_checks(results)
    results["checks_ledger"] = build_ledger(results)   # every known check: passed, failed or not run
    return results


def _write_outputs(out_dir: Path, results: dict, per_sample: dict) -> None:
    # Serialise first: a value JSON cannot hold fails here, before either file is written.
    # results.json goes last, so its presence means the whole scan finished. The report is
    # rendered by the caller (audit/scan_outputs.py scan_and_report), not here.
    results_text = results_schema.results_json_text(results)
    write_npz_atomic(out_dir / "samples.npz", **per_sample)
    write_text_atomic(out_dir / "results.json", results_text)


def _notes(cfg: ScanConfig) -> List[str]:
    notes = list(NOTES)
    if cfg.iterates == "final":
        notes[0] = ("Only the final iterate of each attack is scored (--iterates final), as the "
                    "papers' evaluators do; no early stopping.")
    if cfg.score == "adv-only":
        notes.insert(1, "Accuracy is measured on the adversarial inputs alone (--score adv-only, the "
                        "Fair-ARD evaluation convention): clean-wrong points are attacked too.")
    return notes


def _select_examples(kept, attack_blocks, ensemble, data, per_sample) -> List[dict]:
    """A few clean/adversarial pairs for the worst classes (by ensemble robust accuracy).

    `kept[attack] = (positions, images)` holds at most EXAMPLES_PER_CLASS fooled points
    per class and attack; the candidates of a class are taken strongest attack first
    (lowest average robust accuracy), then dataset order, each point once.
    """
    if not kept:
        return []
    ranking = ensemble or attack_blocks[next(iter(kept))]
    evaluated = [k for k, c in enumerate(ranking["per_class"]) if c["n"] > 0]
    # sort by accuracy; ties go to the lower class index (sorted is stable)
    worst = sorted(evaluated, key=lambda k: ranking["per_class"][k]["accuracy"])[:REPORT_WORST_CLASSES]
    # Strongest attack first (lowest average robust accuracy): its failures are the ones to show.
    names = sorted(kept, key=lambda a: (attack_blocks[a].get("avg") is None, attack_blocks[a].get("avg") or 0.0))
    positions = np.concatenate([kept[a][0] for a in names]).astype(np.int64)
    if len(positions) == 0:
        return []
    images = np.concatenate([kept[a][1] for a in names])
    attack_of = np.repeat(np.arange(len(names)), [len(kept[a][0]) for a in names])
    labels = per_sample["y"][positions]
    examples = []
    for k in worst:
        candidates = np.flatnonzero(labels == k)
        _, first = np.unique(positions[candidates], return_index=True)
        chosen = candidates[np.sort(first)][:REPORT_PAIRS_PER_CLASS]
        if len(chosen) == 0:
            continue
        clean_imgs = to_uint8_hwc(data.x[torch.as_tensor(positions[chosen])])
        for j, c in enumerate(chosen.tolist()):
            name, pos = names[attack_of[c]], int(positions[c])
            examples.append({
                "attack": name, "index": int(per_sample["index"][pos]), "class": data.classes[k],
                "clean_pred": data.classes[int(per_sample["clean_pred"][pos])],
                "adv_pred": data.classes[int(per_sample[f"adv_pred_{name}"][pos])],
                "clean_png": png_base64(clean_imgs[j]),
                "adv_png": png_base64(images[c]),
            })
    return examples


def check_gates(results: dict, cfg: ScanConfig) -> None:
    """Raise GateFailed with the first failing gate (audit/gates.py)."""
    if cfg.fail_under_worst is None and cfg.fail_over_nsd is None:
        return
    for outcome in gate_outcomes(results, fail_under_worst=cfg.fail_under_worst, fail_over_nsd=cfg.fail_over_nsd,
                                 gate_attack=cfg.gate_attack):
        if not outcome.passed:
            raise GateFailed(outcome.message)
