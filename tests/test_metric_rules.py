"""The three degenerate-data rules of audit/metrics.py, asserted through `class_summary` (what the
engine calls), each with numbers that change when the rule is broken (issue 27 item 3):

1. classes with no audited image are left out of NSD;
2. they are left out of the worst-10% mean (and of its C >= 50 threshold);
3. the worst-10% mean takes ceil(C/10) classes when C is not a multiple of 10.

Small --n-per-class / --limit subsets and CIFAR-100 subsets hit exactly these cases. Expected
values are worked out by hand below; they are sums and quotients of a few exact binary
fractions or of small integers over 60, so the only difference allowed (1e-12) is rounding.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from robaudit.audit.metrics import class_summary

EXACT = 1e-12


def samples(correct_counts, n_per_class):
    """(correct bool [N], y [N]) with class k holding n_per_class[k] samples, the first correct_counts[k] right."""
    correct, labels = [], []
    for k, (right, n) in enumerate(zip(correct_counts, n_per_class)):
        correct += [True] * right + [False] * (n - right)
        labels += [k] * n
    return np.asarray(correct, dtype=bool), np.asarray(labels, dtype=np.int64)


def test_nsd_leaves_out_classes_with_no_audited_image():
    # class a: 1 of 2 right (0.5); class b: 1 of 1 (1.0); class c: no image in the subset
    correct, y = samples([1, 1, 0], [2, 1, 0])
    summary = class_summary(correct, y, ["a", "b", "c"])
    assert summary["per_class"][2] == {"class": "c", "n": 0, "correct": 0, "accuracy": None, "ci95": [0.0, 1.0]}
    # over {0.5, 1.0}: mean 0.75, population SD 0.25 -> 1/3. With c counted as 0 it would be
    # SD([0.5, 1, 0]) / 0.5 = 0.8165; with c dropped from the mean only, something else again.
    assert summary["nsd"] == pytest.approx(1 / 3, abs=EXACT)
    assert summary["avg"] == pytest.approx(0.75, abs=EXACT)
    assert summary["worst"] == 0.5 and summary["worst_class"] == "a"


def test_worst10_leaves_out_classes_with_no_audited_image():
    # 60 classes, the last 9 with no image: C = 51 evaluated, k = ceil(5.1) = 6.
    # Evaluated class k (0..50) has k+1 of 60 right; the lowest six are 1..6 of 60 -> 3.5/60.
    # Counting the empty classes as accuracy 0 would give 0.
    classes = [f"c{k}" for k in range(60)]
    correct, y = samples(list(range(1, 52)) + [0] * 9, [60] * 51 + [0] * 9)
    summary = class_summary(correct, y, classes)
    assert summary["worst10"] == pytest.approx(3.5 / 60, abs=EXACT)


def test_worst10_threshold_counts_evaluated_classes_only():
    # 60 classes listed but 45 audited: C = 45 < 50, so no worst-10% mean (the papers report
    # it for C >= 50); counting the 15 empty classes would give one.
    classes = [f"c{k}" for k in range(60)]
    correct, y = samples([5] * 45 + [0] * 15, [10] * 45 + [0] * 15)
    assert class_summary(correct, y, classes)["worst10"] is None
    correct, y = samples([5] * 50 + [0] * 10, [10] * 50 + [0] * 10)   # C = 50 evaluated: it is reported
    assert class_summary(correct, y, classes)["worst10"] == pytest.approx(0.5, abs=EXACT)


@pytest.mark.parametrize("num_classes", [51, 55, 59, 60, 101])
def test_worst10_takes_ceil_of_a_tenth_of_the_classes(num_classes):
    # class k has k of 120 right (accuracies 0, 1/120, 2/120, ...): the lowest k classes
    # average (k - 1) / 2 / 120, so every other k (floor, round) gives another number.
    correct, y = samples(list(range(num_classes)), [120] * num_classes)
    expected_k = {51: 6, 55: 6, 59: 6, 60: 6, 101: 11}[num_classes]   # ceil(C / 10), by hand
    assert expected_k == math.ceil(num_classes / 10)
    summary = class_summary(correct, y, [f"c{k}" for k in range(num_classes)])
    assert summary["worst10"] == pytest.approx((expected_k - 1) / 2 / 120, abs=EXACT)
