"""Per-class robustness curves from a minimal-norm attack's per-sample norms (issue 18).

A minimal-norm attack (fmn) gives each point the smallest perturbation norm that fooled
it: 0 for a clean-wrong point, +inf for a point it never fooled. A point is robust at
eps exactly when its norm is > eps, so one run gives robust accuracy at every eps:

    accuracy_k(e) = #{i in class k : min_norm_i > e} / n_k

which is non-increasing in e and equals clean accuracy at e = 0. `robustness_curve`
evaluates it on a grid from 0 to the attack's cap (the audited eps on it exactly), with
95% Wilson intervals on the counts, plus per class the median minimal norm and the count
of points never fooled. The layout is results.json `curves.<attack>`
(docs/results-schema.md; /work/notes/curves_schema.md).

Vectorised: each point's grid position comes from one np.searchsorted, the per-class
robust counts at every eps from one bincount over (class, position) and a reversed
cumulative sum, the medians from one lexsort; no loop over samples or classes.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from robaudit.audit.metrics import wilson_interval

# Grid points from 0 to cap (the audited eps replaces its nearest one): a step of 1% of
# the cap, 1.3/255 at the default cap of 32/255 -- finer than anyone reads off a curve.
GRID_POINTS = 101
# Per-sample extra of a minimal-norm attack (AttackResult.extras) that the curves read.
MIN_NORM_KEY = "min_norm"


def eps_grid(eps: float, cap: float, points: int = GRID_POINTS) -> np.ndarray:
    """Ascending grid: 0 first, `cap` last, `eps` on it exactly (it replaces its nearest
    point, so the grid stays strictly increasing); needs 0 < eps <= cap."""
    if not (0 < eps <= cap and np.isfinite(cap)):
        raise ValueError(f"a curve grid needs 0 < eps <= cap, got eps={eps}, cap={cap}")
    grid = np.linspace(0.0, cap, points)
    nearest = int(np.argmin(np.abs(grid[1:] - eps))) + 1   # never replaces the 0
    grid[nearest] = eps
    grid[-1] = cap
    return grid


CURVE_DECIMALS = 6


def _interval_lists(counts: np.ndarray, n: np.ndarray) -> Dict[str, list]:
    """{"accuracy", "low", "high"} rows ([..., G] arrays -> lists), null where n == 0."""
    n_b = np.broadcast_to(n[..., None], counts.shape)
    low, high = wilson_interval(counts, n_b)
    acc = counts / np.where(n_b > 0, n_b, 1)
    empty = n_b == 0

    def as_list(values):
        # 6 decimals: exact enough to recover every k/n for n < 500,000, and it keeps a
        # 1000-class x 100-point curve block at ~2 MB of results.json instead of ~4.5 MB.
        return np.where(empty, None, np.round(values, CURVE_DECIMALS).astype(object)).tolist()

    return {"accuracy": as_list(acc), "low": as_list(low), "high": as_list(high)}


def _class_medians(norms: np.ndarray, y: np.ndarray, num_classes: int) -> list:
    """Per-class median of `norms` (the mean of the two middle values for an even count);
    None where the class is empty or the median is not finite."""
    order = np.lexsort((norms, y))               # by class, then by norm
    sorted_norms = norms[order]
    n = np.bincount(y, minlength=num_classes)
    start = np.concatenate([[0], np.cumsum(n)[:-1]])
    safe = np.maximum(n, 1)
    low = start + (safe - 1) // 2
    high = start + safe // 2
    padded = np.concatenate([sorted_norms, [np.inf]])  # empty classes index one past the end
    with np.errstate(invalid="ignore"):
        median = (padded[np.minimum(low, len(norms))] + padded[np.minimum(high, len(norms))]) / 2.0
    ok = (n > 0) & np.isfinite(median)
    return [float(m) if keep else None for m, keep in zip(median.tolist(), ok.tolist())]


def robustness_curve(min_norm, y, classes: Sequence[str], *, audited_eps: float, cap: float,
                     norm: str, description: str, clean_pred=None,
                     points: int = GRID_POINTS) -> dict:
    """The `curves.<attack>` block from per-sample minimal norms (subset order).

    min_norm: float [N], 0 for clean-wrong points and +inf for points never fooled; y: int
    [N] labels; clean_pred (optional): clean predictions, whose wrong points are set to 0
    whatever the attack wrote (a clean-wrong point needs no perturbation).
    """
    norms = np.asarray(min_norm, dtype=np.float64).reshape(-1)
    labels = np.asarray(y, dtype=np.int64).reshape(-1)
    num_classes = len(classes)
    if norms.shape != labels.shape:
        raise ValueError(f"min_norm has {norms.size} entries but y has {labels.size}")
    if np.isnan(norms).any() or (norms < 0).any():
        raise ValueError("min_norm must be >= 0 (0: clean-wrong, +inf: never fooled), without NaN")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    if clean_pred is not None:
        norms = np.where(np.asarray(clean_pred).reshape(-1) != labels, 0.0, norms)
    grid = eps_grid(float(audited_eps), float(cap), points)
    # robust at grid[j] <=> norm > grid[j] <=> j < position (the number of grid values < norm)
    position = np.searchsorted(grid, norms, side="left")
    table = np.bincount(labels * (len(grid) + 1) + position,
                        minlength=num_classes * (len(grid) + 1)).reshape(num_classes, len(grid) + 1)
    # robust[k, j] = sum_{p > j} table[k, p]
    robust = np.cumsum(table[:, ::-1], axis=1)[:, ::-1][:, 1:]
    n = table.sum(axis=1)
    rows = _interval_lists(robust, n)
    per_class = [{"class": str(name), "n": int(count),
                  "accuracy": rows["accuracy"][k], "low": rows["low"][k], "high": rows["high"][k]}
                 for k, (name, count) in enumerate(zip(classes, n.tolist()))]
    overall = {"n": int(n.sum()), **{key: value[0] for key, value in
                                    _interval_lists(robust.sum(axis=0)[None], n.sum()[None]).items()}}
    not_found = np.bincount(labels[np.isinf(norms)], minlength=num_classes)
    return {"norm": norm, "audited_eps": float(audited_eps), "cap": float(grid[-1]),
            "eps": grid.tolist(), "per_class": per_class, "overall": overall,
            "median_eps": _class_medians(norms, labels, num_classes),
            "not_found": [int(v) for v in not_found.tolist()], "description": description}


def scan_curves(config: Mapping[str, dict], extras: Mapping[str, Mapping[str, np.ndarray]], y,
                clean_pred, classes: Sequence[str], *, audited_eps: float,
                norm: str) -> Optional[Dict[str, dict]]:
    """results["curves"] for a scan: one block per attack that handed back per-sample
    minimal norms (`extras[name]["min_norm"]`), its cap read off its params ("cap");
    None when no such attack ran (the key is then left out of results.json)."""
    curves = {}
    for name, arrays in extras.items():
        if MIN_NORM_KEY not in arrays:
            continue
        params = config[name]
        curves[name] = robustness_curve(arrays[MIN_NORM_KEY], y, classes, audited_eps=audited_eps,
                                        cap=params["cap"], norm=norm, description=params["repr"],
                                        clean_pred=clean_pred)
    return curves or None
