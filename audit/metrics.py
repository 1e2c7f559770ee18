"""Per-class robustness metrics (docs/results-schema.md, shared/specs/methods.md "Metrics").

Pure numpy and vectorised. Everything `class_summary` and `target_flow` return is made
of plain Python ints/floats/None, so it drops straight into results.json.

Rules chosen here (the reports state them):
- Wilson interval with n = 0 is (0, 1): no data means every accuracy is possible, and
  unlike NaN it stays valid JSON.
- NSD uses the population SD (ddof 0); it is None when the mean accuracy is 0.
- Worst-10% = mean of the lowest ceil(C/10) class accuracies, only for C >= 50.
- A class with no samples in the evaluated subset (n = 0) is still listed in
  `per_class` (n 0, correct 0, accuracy None, ci95 [0, 1]) but takes no part in avg,
  worst, worst_class, worst10 or nsd; C in the worst-10% rule counts the evaluated
  classes only.
- Ties for the worst class go to the lowest class index.
- Target flow counts only fooled points whose adversarial prediction differs from the
  true class, so its diagonal is always 0 as the schema promises.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(correct, n, z: float = Z_95):
    """Wilson score interval for `correct` successes out of `n` trials.

    Accepts scalars or arrays (broadcast together); returns (lo, hi) as floats for
    scalar input, else as float arrays. n = 0 gives (0, 1).
    """
    correct_arr = np.asarray(correct, dtype=np.float64)
    n_arr = np.asarray(n, dtype=np.float64)
    if np.any(n_arr < 0) or np.any(correct_arr < 0) or np.any(correct_arr > n_arr):
        raise ValueError("wilson_interval needs 0 <= correct <= n")
    correct_arr, n_arr = np.broadcast_arrays(correct_arr, n_arr)
    has_data = n_arr > 0
    # Substitute n = 1 where n = 0 so the formula stays finite; those entries are overwritten.
    safe_n = np.where(has_data, n_arr, 1.0)
    p = correct_arr / safe_n
    z2 = z * z
    denom = 1.0 + z2 / safe_n
    center = (p + z2 / (2.0 * safe_n)) / denom
    half_width = z * np.sqrt(p * (1.0 - p) / safe_n + z2 / (4.0 * safe_n * safe_n)) / denom
    # At p = 0 (p = 1) the exact lower (upper) bound is 0 (1); the subtraction leaves
    # rounding residue on either side of it (e.g. 3.5e-18), so set those ends exactly.
    lo = np.where(has_data & (correct_arr > 0), np.clip(center - half_width, 0.0, 1.0), 0.0)
    hi = np.where(has_data & (correct_arr < n_arr), np.clip(center + half_width, 0.0, 1.0), 1.0)
    if lo.ndim == 0:
        return float(lo), float(hi)
    return lo, hi


def nsd(accs) -> Optional[float]:
    """Normalised SD of class accuracies: population SD (ddof 0) / mean; None if mean is 0 or no classes."""
    accs = np.asarray(accs, dtype=np.float64)
    if accs.size == 0:
        return None
    mean = accs.mean()
    if mean == 0:
        return None
    return float(accs.std(ddof=0) / mean)


def worst10(accs) -> Optional[float]:
    """Mean of the lowest ceil(C/10) class accuracies; None for C < 50 (the papers report it for C >= 50)."""
    accs = np.asarray(accs, dtype=np.float64)
    num_classes = accs.size
    if num_classes < 50:
        return None
    k = math.ceil(num_classes / 10)
    return float(np.partition(accs, k - 1)[:k].mean())


def _as_labels(y, num_classes: int, what: str = "y") -> np.ndarray:
    labels = np.asarray(y).reshape(-1)
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what} must hold integer class indices, got dtype {labels.dtype}")
    labels = labels.astype(np.int64, copy=False)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{what} must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return labels


def class_summary(correct, y, classes: Sequence[str]) -> dict:
    """Per-class accuracies with 95% Wilson intervals plus avg/worst/worst10/nsd.

    `correct` is bool [N] (robust or clean-correct per sample), `y` int [N] true labels,
    `classes` the class names in label order. Returns the per-attack block of
    results.json without n_attacked/seconds/description.
    """
    classes = [str(c) for c in classes]
    num_classes = len(classes)
    labels = _as_labels(y, num_classes)
    correct_mask = np.asarray(correct).reshape(-1).astype(bool)
    if correct_mask.shape != labels.shape:
        raise ValueError(f"correct has {correct_mask.size} entries but y has {labels.size}")

    n_per_class = np.bincount(labels, minlength=num_classes)
    correct_per_class = np.bincount(labels[correct_mask], minlength=num_classes)
    evaluated = n_per_class > 0
    accuracy = np.divide(correct_per_class, n_per_class,
                         out=np.zeros(num_classes, dtype=np.float64), where=evaluated)
    ci_lo, ci_hi = wilson_interval(correct_per_class, n_per_class)

    per_class = [
        {
            "class": classes[k],
            "n": int(n_per_class[k]),
            "correct": int(correct_per_class[k]),
            "accuracy": float(accuracy[k]) if evaluated[k] else None,
            "ci95": [float(ci_lo[k]), float(ci_hi[k])],
        }
        for k in range(num_classes)
    ]

    evaluated_accs = accuracy[evaluated]
    if evaluated_accs.size == 0:
        return {"per_class": per_class, "avg": None, "worst": None, "worst_class": None,
                "worst10": None, "nsd": None}
    evaluated_ids = np.flatnonzero(evaluated)
    worst_id = int(evaluated_ids[np.argmin(evaluated_accs)])  # argmin: first (lowest index) on ties
    return {
        "per_class": per_class,
        "avg": float(evaluated_accs.mean()),
        "worst": float(accuracy[worst_id]),
        "worst_class": classes[worst_id],
        "worst10": worst10(evaluated_accs),
        "nsd": nsd(evaluated_accs),
    }


def target_flow(y, adv_pred, fooled, num_classes: int) -> list:
    """C x C counts: row = true class, column = adversarial prediction of its fooled points.

    Fooled points whose prediction equals the true class are not counted (the diagonal
    stays 0), so the matrix shows only where successful attacks send each class.
    """
    labels = _as_labels(y, num_classes, "y")
    preds = _as_labels(adv_pred, num_classes, "adv_pred")
    fooled_mask = np.asarray(fooled).reshape(-1).astype(bool)
    if not (labels.shape == preds.shape == fooled_mask.shape):
        raise ValueError(
            f"y, adv_pred and fooled must have the same length, got "
            f"{labels.size}, {preds.size}, {fooled_mask.size}"
        )
    counted = fooled_mask & (labels != preds)
    flat = np.bincount(labels[counted] * num_classes + preds[counted],
                       minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(int).tolist()


def binomial_upper_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exact (summed in log space)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                 + (i * math.log(p) if i else 0.0) + ((n - i) * math.log1p(-p) if n - i else 0.0)
                 for i in range(k, n + 1)]
    top = max(log_terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms))


def mcnemar_exact_p(only_first: int, only_second: int) -> float:
    """Exact two-sided McNemar test on paired outcomes: only the discordant pairs (right under
    one model, wrong under the other) carry information; under "no change" each is a fair coin."""
    discordant = int(only_first) + int(only_second)
    if discordant == 0:
        return 1.0
    return min(1.0, 2.0 * binomial_upper_tail(max(int(only_first), int(only_second)), discordant, 0.5))
