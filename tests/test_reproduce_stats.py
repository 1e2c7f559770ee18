"""benchmarks/reproduce_stats.py: the paired statistics of the ABSLD reproduction study."""

import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reproduce_stats as rs  # noqa: E402


def brute_force_sign_flip(diffs):
    """The same test written as a plain loop over sign patterns (an independent computation)."""
    observed = abs(sum(diffs) / len(diffs))
    hits = 0
    patterns = list(itertools.product((1, -1), repeat=len(diffs)))
    for signs in patterns:
        if abs(sum(s * d for s, d in zip(signs, diffs)) / len(diffs)) >= observed - 1e-12:
            hits += 1
    return hits / len(patterns)


def test_sign_flip_all_same_sign_reaches_the_floor_of_five_seeds():
    # Five positive differences: only the all-plus and all-minus patterns are as extreme, 2/32.
    assert rs.sign_flip_p([0.1, 0.3, 0.2, 0.05, 0.4]) == pytest.approx(1 / 16)
    assert rs.smallest_sign_flip_p(5) == pytest.approx(1 / 16)
    assert rs.sign_flip_p([1.0, -1.0]) == 1.0   # mean 0: every pattern is at least as extreme


def test_sign_flip_matches_a_brute_force_loop():
    rng = np.random.default_rng(3)
    for n in (3, 5, 7):
        diffs = list(rng.normal(0.2, 1.0, size=n))
        assert rs.sign_flip_p(diffs) == pytest.approx(brute_force_sign_flip(diffs), abs=1e-12)


def test_t_interval_against_the_tabulated_quantile():
    # d = 1, 2, 3: mean 2, SD 1, t(0.975, 2) = 4.303 (printed tables, 3 decimals) -> 2 -+ 4.303 / sqrt(3).
    lo, hi = rs.t_interval([1.0, 2.0, 3.0])
    half = 4.303 / math.sqrt(3)
    assert lo == pytest.approx(2 - half, abs=1e-3) and hi == pytest.approx(2 + half, abs=1e-3)
    assert all(math.isnan(v) for v in rs.t_interval([1.0]))


def test_paired_difference_pairs_by_seed():
    a = {0: 0.30, 1: 0.20, 2: 0.25, 7: 0.9}
    b = {0: 0.10, 1: 0.25, 2: 0.20}
    d = rs.paired_difference(a, b)   # seed 7 has no partner and drops out
    assert d["seeds"] == [0, 1, 2] and d["n"] == 3
    assert d["diffs"] == pytest.approx([0.20, -0.05, 0.05])
    assert d["positive"] == 2 and d["negative"] == 1
    assert d["p_min"] == pytest.approx(0.25)


def test_pooled_mcnemar_sums_discordant_pairs_over_seeds():
    first = [np.array([1, 1, 0, 0], bool), np.array([1, 0, 1], bool)]
    second = [np.array([0, 1, 1, 0], bool), np.array([0, 0, 0], bool)]
    out = rs.pooled_mcnemar(list(zip(first, second)))
    assert (out["only_first"], out["only_second"], out["n"]) == (3, 1, 7)
    # exact two-sided binomial on 4 discordant pairs, 3 one way: 2 * P(X >= 3 | 4, 1/2) = 2 * 5/16
    assert out["p"] == pytest.approx(2 * (math.comb(4, 3) + math.comb(4, 4)) / 16)


def test_temperature_summary_finds_bounds():
    traj = [[1.0, 1.0], [0.8, 1.3], [0.5, 1.6], [0.5, 5.0]]
    t = rs.temperature_summary(traj, (0.5, 5.0))
    assert t["first_epoch_at_bound"] == 3 and t["final_at_lower"] == 1 and t["final_at_upper"] == 1
    assert t["max_abs_move"] == pytest.approx(4.0)
    assert rs.temperature_summary([[1.0, 1.1]], (0.5, 5.0))["first_epoch_at_bound"] is None


def test_weakest_mean_takes_the_lowest_classes():
    block = {"per_class": [{"accuracy": a} for a in (0.5, 0.0, 0.2, 0.1, 0.9)]}
    assert rs.weakest_mean(block, 3) == pytest.approx((0.0 + 0.1 + 0.2) / 3)
