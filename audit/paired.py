"""Paired before/after outcomes: the same images under both models, and McNemar's test on them.

A comparison of two audits on the same test images is a paired experiment: each image is
right or wrong under the model before and under the model after. Two interval estimates
that overlap can still hide a real change (and the per-class Wilson intervals are wide on
small classes), so the comparison report tests each class with the exact McNemar test on
the images that changed outcome. The per-image outcomes come from the audits' samples.npz
(written next to results.json); they are used only if they are the audits' own: the same
image indices on both sides, and per-class counts equal to those in each results.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from robaudit.audit.metrics import mcnemar_exact_p
from robaudit.audit.results_schema import ENSEMBLE_KEY

SIGNIFICANCE_LEVEL = 0.05   # two-sided, per test; the report says it is per class, not corrected


@dataclass
class PairedOutcomes:
    """Per image (aligned by dataset index): the class, right before, right after."""

    y: np.ndarray
    before: np.ndarray
    after: np.ndarray
    # Clean correctness of the same images (for the clean-accuracy change), when samples.npz had it.
    clean_before: Optional[np.ndarray] = None
    clean_after: Optional[np.ndarray] = None


def correct_under(samples, results: dict, key: str) -> np.ndarray:
    """Per-image bool: counted correct under `key` (an attack, "clean" or the ensemble) as results counts it."""
    clean_ok = samples["clean_pred"] == samples["y"]
    if key == "clean":
        return clean_ok
    if key == ENSEMBLE_KEY:
        members = (results.get("ensemble") or {}).get("attacks") or []
        ok = np.logical_and.reduce([samples[f"robust_{name}"] for name in members]) if members else clean_ok
        scoring = (results.get("config") or {}).get("scoring") or {}
        return ok & clean_ok if scoring.get("score", "robust") == "robust" else ok
    return np.asarray(samples[f"robust_{key}"], dtype=bool)


def _record(results: dict, key: str) -> Optional[dict]:
    return results.get("ensemble") if key == ENSEMBLE_KEY else results["attacks"].get(key)


def _load(results_dir: Path, results: dict, key: str) -> Tuple[Optional[Tuple[np.ndarray, ...]], Optional[str]]:
    path = Path(results_dir) / "samples.npz"
    if not path.is_file():
        return None, f"{path.name} is not next to {results_dir / 'results.json'}"
    try:
        with np.load(path, allow_pickle=False) as samples:
            ok = correct_under(samples, results, key)
            index, y = samples["index"].astype(np.int64), samples["y"].astype(np.int64)
            clean = np.asarray(samples["clean_pred"] == samples["y"], dtype=bool)
    except (OSError, KeyError, ValueError) as err:
        return None, f"{path} cannot be read for this comparison ({type(err).__name__}: {err})".splitlines()[0]
    record = _record(results, key)
    counts = np.bincount(y[ok], minlength=len(results["dataset"]["classes"]))
    if record is None or [int(c) for c in counts] != [int(e["correct"]) for e in record["per_class"]]:
        return None, f"{path} does not hold the per-image outcomes behind {results_dir / 'results.json'}"
    return (index, y, ok, clean), None


def load_paired(before_dir, after_dir, before: dict, after: dict, key: str) -> Tuple[Optional[PairedOutcomes], str]:
    """(outcomes, "") when both audits' samples.npz pair up image by image; else (None, why not)."""
    loaded_before, why = _load(Path(before_dir), before, key)
    if loaded_before is None:
        return None, why
    loaded_after, why = _load(Path(after_dir), after, key)
    if loaded_after is None:
        return None, why
    (i_b, y_b, ok_b, clean_b), (i_a, y_a, ok_a, clean_a) = loaded_before, loaded_after
    order_b, order_a = np.argsort(i_b, kind="stable"), np.argsort(i_a, kind="stable")
    if len(i_b) != len(i_a) or not np.array_equal(i_b[order_b], i_a[order_a]):
        return None, "the two audits ran on different images (dataset indices differ)"
    if not np.array_equal(y_b[order_b], y_a[order_a]):
        return None, "the two audits give the same images different labels"
    return PairedOutcomes(y=y_b[order_b], before=ok_b[order_b], after=ok_a[order_a],
                          clean_before=clean_b[order_b], clean_after=clean_a[order_a]), ""


def paired_test(before: np.ndarray, after: np.ndarray) -> dict:
    """{"n", "only_before", "only_after", "p", "significant"} for one group of paired images."""
    only_before = int(np.sum(before & ~after))
    only_after = int(np.sum(after & ~before))
    p = mcnemar_exact_p(only_before, only_after)
    return {"n": int(len(before)), "only_before": only_before, "only_after": only_after, "p": p,
            "significant": p < SIGNIFICANCE_LEVEL}


def per_class_tests(paired: PairedOutcomes, num_classes: int) -> List[dict]:
    """paired_test for each class (in class order); classes without images get n = 0, p = 1."""
    return [paired_test(paired.before[paired.y == k], paired.after[paired.y == k]) for k in range(num_classes)]
