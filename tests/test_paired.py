"""Paired before/after tests (audit/paired.py): the exact McNemar p-value against scipy, and
the rule that per-image outcomes are used only when they are the two audits' own."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from robaudit.audit.metrics import mcnemar_exact_p
from robaudit.audit.paired import load_paired, paired_test, per_class_tests


@pytest.mark.parametrize("only_before, only_after", [(0, 0), (0, 1), (3, 9), (10, 10), (0, 12), (40, 61)])
def test_mcnemar_equals_scipy_two_sided_binomial_test(only_before, only_after):
    n = only_before + only_after
    expected = 1.0 if n == 0 else binomtest(only_after, n, 0.5, alternative="two-sided").pvalue
    assert mcnemar_exact_p(only_before, only_after) == pytest.approx(expected, rel=1e-9)
    assert mcnemar_exact_p(only_before, only_after) == mcnemar_exact_p(only_after, only_before)


def _write_audit(folder, index, y, correct, classes=("a", "b")):
    """results.json-like dict + samples.npz whose clean predictions are right where `correct`."""
    folder.mkdir(parents=True, exist_ok=True)
    clean_pred = np.where(correct, y, (y + 1) % len(classes))
    np.savez(folder / "samples.npz", index=index, y=y, clean_pred=clean_pred)
    counts = np.bincount(y[correct], minlength=len(classes))
    per_class = [{"class": c, "correct": int(counts[k])} for k, c in enumerate(classes)]
    return {"dataset": {"classes": list(classes)}, "attacks": {"clean": {"per_class": per_class}},
            "ensemble": None, "config": {}}


def test_outcomes_pair_by_dataset_index_and_are_refused_when_they_are_not_the_audits_own(tmp_path):
    index = np.arange(10, 30)
    y = index % 2
    before_ok = np.zeros(20, dtype=bool)
    after_ok = np.zeros(20, dtype=bool)
    after_ok[y == 1] = True                       # class b: 10 images become correct, none worse
    before = _write_audit(tmp_path / "before", index, y, before_ok)
    shuffled = np.random.default_rng(0).permutation(20)   # the other audit stored them in another order
    after = _write_audit(tmp_path / "after", index[shuffled], y[shuffled], after_ok[shuffled])
    paired, why = load_paired(tmp_path / "before", tmp_path / "after", before, after, "clean")
    assert paired is not None and why == ""
    tests = per_class_tests(paired, 2)
    assert (tests[0]["only_after"], tests[0]["p"]) == (0, 1.0)
    assert (tests[1]["only_after"], tests[1]["only_before"]) == (10, 0)
    assert tests[1]["p"] == pytest.approx(2 * 0.5 ** 10) and tests[1]["significant"]
    # clean outcomes come along, aligned the same way (key "clean": they equal the compared ones)
    assert np.array_equal(paired.clean_before, paired.before) and np.array_equal(paired.clean_after, paired.after)

    other = _write_audit(tmp_path / "other", index + 100, y, after_ok)
    assert load_paired(tmp_path / "before", tmp_path / "other", before, other, "clean") == (
        None, "the two audits ran on different images (dataset indices differ)")
    after["attacks"]["clean"]["per_class"][1]["correct"] = 9      # results that samples.npz does not match
    paired, why = load_paired(tmp_path / "before", tmp_path / "after", before, after, "clean")
    assert paired is None and "does not hold the per-image outcomes" in why
    paired, why = load_paired(tmp_path / "before", tmp_path / "missing", before, after, "clean")
    assert paired is None and "samples.npz is not next to" in why


def test_paired_test_counts_only_discordant_images():
    before = np.array([1, 1, 0, 0, 1, 0], dtype=bool)
    after = np.array([1, 0, 1, 1, 1, 0], dtype=bool)
    test = paired_test(before, after)
    assert (test["n"], test["only_before"], test["only_after"]) == (6, 1, 2)
    assert test["p"] == pytest.approx(mcnemar_exact_p(1, 2)) and not test["significant"]
