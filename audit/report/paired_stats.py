"""Paired intervals for the headline changes between two models on the same images.

The headline measures (class-average accuracy, worst-class accuracy, NSD) are functions
of the per-class accuracies, so their change between two models scored on the same
images gets a paired, class-stratified bootstrap: each resample draws, within every
class, n_k of that class's images with replacement and scores both models on the SAME
drawn images; the 95% interval is the 2.5th to 97.5th percentile of the resampled
changes. Stratifying keeps every class's image count fixed, as the audit had it.
The seed and resample count are fixed, so the page stays a deterministic function of
its inputs. Pooled per-image changes (clean accuracy, robust accuracy) also get the
exact McNemar test (audit/metrics.mcnemar_exact_p).

An interval that excludes 0 says the change is unlikely to be resampling noise of the
test images; it says nothing about training noise (another seed may train differently).
"""

from __future__ import annotations

import numpy as np

from robaudit.audit.metrics import mcnemar_exact_p

RESAMPLES = 2000
SEED = 0
METHOD_TEXT = (f"paired class-stratified bootstrap over the test images ({RESAMPLES:,} resamples, fixed seed; "
               "both models scored on the same resampled images), 95% percentile interval")


def _class_accuracies(y: np.ndarray, ok: np.ndarray, num_classes: int) -> np.ndarray:
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    correct = np.bincount(y, weights=ok.astype(np.float64), minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, correct / np.maximum(counts, 1), np.nan)


def _measures(per_class: np.ndarray) -> dict:
    """avg, worst and NSD (population SD / mean) over the last axis, ignoring classes without images."""
    avg = np.nanmean(per_class, axis=-1)
    worst = np.nanmin(per_class, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        nsd = np.where(avg > 0, np.nanstd(per_class, axis=-1) / np.where(avg > 0, avg, 1), np.nan)
    return {"avg": avg, "worst": worst, "nsd": nsd}


def _resampled_per_class(y: np.ndarray, oks: list[np.ndarray], num_classes: int, resamples: int,
                         seed: int) -> list[np.ndarray]:
    """(resamples, classes) accuracies of each outcome array, on the same stratified resamples."""
    rng = np.random.Generator(np.random.PCG64(seed))
    out = [np.full((resamples, num_classes), np.nan) for _ in oks]
    for k in range(num_classes):
        members = np.flatnonzero(y == k)
        if len(members) == 0:
            continue
        draw = members[rng.integers(0, len(members), size=(resamples, len(members)))]
        for target, ok in zip(out, oks):
            target[:, k] = ok[draw].mean(axis=1)
    return out


def paired_deltas(y: np.ndarray, before: np.ndarray, after: np.ndarray, num_classes: int,
                  resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """{measure: {"delta", "low", "high", "excludes_zero"}} for avg, worst and NSD (after - before)."""
    y = np.asarray(y, dtype=np.int64)
    point_before = _measures(_class_accuracies(y, before, num_classes))
    point_after = _measures(_class_accuracies(y, after, num_classes))
    boot_before, boot_after = (_measures(a) for a in _resampled_per_class(
        y, [np.asarray(before, bool), np.asarray(after, bool)], num_classes, resamples, seed))
    result = {}
    for name in ("avg", "worst", "nsd"):
        change = boot_after[name] - boot_before[name]
        change = change[np.isfinite(change)]
        delta = float(point_after[name] - point_before[name])
        if len(change) == 0 or not np.isfinite(delta):
            result[name] = {"delta": None, "low": None, "high": None, "excludes_zero": False}
            continue
        low, high = (float(v) for v in np.percentile(change, [2.5, 97.5]))
        result[name] = {"delta": delta, "low": low, "high": high, "excludes_zero": low > 0 or high < 0}
    return result


def pooled_mcnemar(before: np.ndarray, after: np.ndarray) -> dict:
    """Exact McNemar test on all images: {"only_before", "only_after", "p"}."""
    before, after = np.asarray(before, bool), np.asarray(after, bool)
    only_before, only_after = int(np.sum(before & ~after)), int(np.sum(after & ~before))
    return {"only_before": only_before, "only_after": only_after, "p": mcnemar_exact_p(only_before, only_after)}
