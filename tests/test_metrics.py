"""Metrics against values computed by hand (closed formulas, literal references)."""

import json
import math

import numpy as np
import pytest

from robaudit.audit.metrics import class_summary, nsd, target_flow, wilson_interval, worst10

Z = 1.959963984540054


def wilson_by_formula(correct, n, z=Z):
    p = correct / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return center - half, center + half


def test_wilson_31_of_100_matches_closed_formula_and_literal_values():
    lo, hi = wilson_interval(31, 100)
    ref_lo, ref_hi = wilson_by_formula(31, 100)
    assert lo == pytest.approx(ref_lo, abs=1e-12) and hi == pytest.approx(ref_hi, abs=1e-12)
    # Literal values worked out with 30-digit decimal arithmetic.
    assert lo == pytest.approx(0.2277969721, abs=1e-9)
    assert hi == pytest.approx(0.4062605572, abs=1e-9)
    assert isinstance(lo, float) and isinstance(hi, float)


@pytest.mark.parametrize("correct,n,ref_lo,ref_hi", [
    (5, 10, 0.2365930905, 0.7634069095),   # the textbook 5/10 example
    (0, 10, 0.0, 0.2775327999),            # lower bound exactly 0 at p = 0
    (10, 10, 0.7224672001, 1.0),           # upper bound exactly 1 at p = 1
    (87, 100, 0.7901964856, 0.9224283257),
])
def test_wilson_reference_values(correct, n, ref_lo, ref_hi):
    lo, hi = wilson_interval(correct, n)
    assert lo == pytest.approx(ref_lo, abs=1e-9) and hi == pytest.approx(ref_hi, abs=1e-9)
    assert 0.0 <= lo <= hi <= 1.0


def test_wilson_is_vectorised_and_n0_gives_full_range():
    lo, hi = wilson_interval(np.array([31, 0, 0]), np.array([100, 10, 0]))
    assert lo.shape == hi.shape == (3,)
    assert lo[0] == pytest.approx(0.2277969721, abs=1e-9)
    assert hi[1] == pytest.approx(0.2775327999, abs=1e-9)
    assert (lo[2], hi[2]) == (0.0, 1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("n", [10, 87, 92, 104, 1017])
def test_wilson_ends_are_exact_at_zero_and_all(n):
    # 0/n and n/n: the bound at the edge is exactly 0 / 1, not rounding residue (0/104 gave 3.5e-18).
    assert wilson_interval(0, n)[0] == 0.0
    assert wilson_interval(n, n)[1] == 1.0
    lo, hi = wilson_interval(np.array([0, n]), np.array([n, n]))
    assert lo[0] == 0.0 and hi[1] == 1.0 and 0.0 < hi[0] < 1.0 and 0.0 < lo[1] < 1.0


def test_wilson_rejects_impossible_counts():
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_nsd_uses_population_sd():
    # mean 0.3, population variance (0.04 + 0 + 0.04) / 3 -> SD sqrt(0.08/3)
    assert nsd([0.5, 0.3, 0.1]) == pytest.approx(math.sqrt(0.08 / 3) / 0.3, rel=1e-12)
    assert nsd([0.4, 0.4]) == 0.0
    assert nsd([0.0, 0.0, 0.0]) is None


def test_worst10_only_from_50_classes():
    assert worst10(np.linspace(0, 1, 49)) is None
    accs50 = np.arange(50)[::-1] / 100.0            # lowest five: 0.00 .. 0.04
    assert worst10(accs50) == pytest.approx(0.02)
    accs100 = np.random.default_rng(0).permutation(np.arange(100) / 100.0)  # lowest ten: 0.00 .. 0.09
    assert worst10(accs100) == pytest.approx(0.045)
    assert worst10(np.full(51, 0.5)) == pytest.approx(0.5)  # ceil(51/10) = 6 classes


def test_class_summary_hand_computed():
    classes = ["cat", "dog", "frog"]
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    correct = np.array([1, 1, 0, 0, 1, 1, 1, 0, 0, 0], dtype=bool)
    summary = class_summary(correct, y, classes)
    assert set(summary) == {"per_class", "avg", "worst", "worst_class", "worst10", "nsd"}
    rows = summary["per_class"]
    assert [r["class"] for r in rows] == classes
    assert [(r["n"], r["correct"]) for r in rows] == [(4, 2), (2, 2), (4, 1)]
    assert [r["accuracy"] for r in rows] == [0.5, 1.0, 0.25]
    assert rows[0]["ci95"] == pytest.approx(list(wilson_by_formula(2, 4)))
    assert summary["avg"] == pytest.approx(1.75 / 3)
    assert summary["worst"] == 0.25 and summary["worst_class"] == "frog"
    assert summary["worst10"] is None
    assert summary["nsd"] == pytest.approx(np.std([0.5, 1.0, 0.25]) / (1.75 / 3))
    json.dumps(summary)  # plain Python types only


def test_class_summary_empty_class_is_listed_but_not_averaged():
    summary = class_summary(np.array([True, False]), np.array([0, 2]), ["a", "b", "c"])
    empty = summary["per_class"][1]
    assert (empty["n"], empty["correct"], empty["accuracy"], empty["ci95"]) == (0, 0, None, [0.0, 1.0])
    assert summary["avg"] == 0.5 and summary["worst"] == 0.0 and summary["worst_class"] == "c"


def test_class_summary_ties_zero_average_and_many_classes():
    tied = class_summary(np.array([False, False]), np.array([0, 1]), ["a", "b"])
    assert tied["worst_class"] == "a" and tied["avg"] == 0.0 and tied["nsd"] is None
    y = np.repeat(np.arange(50), 2)
    correct = np.ones(100, dtype=bool)
    correct[:10] = False                              # classes 0..4 at accuracy 0
    many = class_summary(correct, y, [f"c{k}" for k in range(50)])
    assert many["worst10"] == 0.0 and many["avg"] == pytest.approx(0.9)


def test_class_summary_rejects_labels_outside_classes():
    with pytest.raises(ValueError):
        class_summary(np.array([True]), np.array([3]), ["a", "b"])


def test_target_flow_counts_fooled_points_only():
    y = np.array([0, 0, 0, 1, 1, 2, 2])
    adv_pred = np.array([1, 1, 2, 1, 0, 2, 0])
    fooled = np.array([1, 1, 1, 0, 1, 1, 0], dtype=bool)   # index 5: fooled but pred == y, not counted
    flow = target_flow(y, adv_pred, fooled, 3)
    assert flow == [[0, 2, 1], [1, 0, 0], [0, 0, 0]]
    assert all(type(v) is int for row in flow for v in row)
