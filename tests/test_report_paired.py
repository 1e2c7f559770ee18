"""Paired intervals and tests of the comparison page's headline changes (issue 25)."""

from __future__ import annotations

import numpy as np
import pytest

from report_fixtures import make_results
from robaudit.audit.paired import PairedOutcomes
from robaudit.audit.report.paired_stats import paired_deltas, pooled_mcnemar
from robaudit.audit.report.render import build_context, render_html
from test_report import RENDERED_AT


def _outcomes(seed: int, n_per_class: int = 50, classes: int = 4, gain: float = 0.0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per_class)
    before = rng.random(len(y)) < 0.4
    after = before | (rng.random(len(y)) < gain)
    return y, before, after


def test_identical_models_change_nothing_and_the_interval_is_zero():
    y, before, _ = _outcomes(0)
    deltas = paired_deltas(y, before, before.copy(), 4)
    for name in ("avg", "worst", "nsd"):
        assert deltas[name]["delta"] == 0 and deltas[name]["low"] == 0 and deltas[name]["high"] == 0
        assert not deltas[name]["excludes_zero"]
    assert pooled_mcnemar(before, before)["p"] == 1.0


def test_a_real_gain_excludes_zero_and_the_point_estimate_is_the_class_average_change():
    y, before, after = _outcomes(1, gain=0.3)
    deltas = paired_deltas(y, before, after, 4)
    per_class = lambda ok: np.array([ok[y == k].mean() for k in range(4)])   # noqa: E731
    assert deltas["avg"]["delta"] == pytest.approx(per_class(after).mean() - per_class(before).mean(), abs=1e-12)
    assert deltas["worst"]["delta"] == pytest.approx(per_class(after).min() - per_class(before).min(), abs=1e-12)
    assert deltas["avg"]["excludes_zero"] and deltas["avg"]["low"] > 0
    assert deltas["avg"]["low"] <= deltas["avg"]["delta"] <= deltas["avg"]["high"]
    # deterministic: the same inputs give the same interval (the page must be byte-stable)
    assert paired_deltas(y, before, after, 4) == deltas
    test = pooled_mcnemar(before, after)
    assert test["only_before"] == 0 and test["only_after"] == int((after & ~before).sum()) and test["p"] < 1e-6


def test_a_small_random_change_includes_zero():
    y, before, _ = _outcomes(2)
    flip = np.zeros_like(before)
    flip[[3, 60]] = True
    deltas = paired_deltas(y, before, before ^ flip, 4)
    assert not deltas["avg"]["excludes_zero"]


def test_comparison_page_leads_with_intervals_and_every_class_that_got_worse():
    classes = ("airplane", "automobile", "bird")
    before_results = make_results(classes=classes, seed=1, strength=0.6, training=False)
    after_results = make_results(classes=classes, seed=2, training=True)
    n = before_results["dataset"]["n"]
    y = np.repeat(np.arange(3), n // 3)
    rng = np.random.default_rng(0)
    paired = PairedOutcomes(y=y, before=rng.random(n) < 0.2, after=rng.random(n) < 0.4,
                            clean_before=rng.random(n) < 0.8, clean_after=rng.random(n) < 0.8)
    context = build_context(after_results, baseline=before_results, paired=(paired, ""))
    section = context["comparison"]
    measures = [item["measure"] for item in section["summary"]]
    assert measures[:4] == ["worst", "nsd", "avg", "clean"]
    assert all(item["interval"] is not None for item in section["summary"][:4])
    assert section["summary"][2]["test"] is not None and section["summary"][3]["test"] is not None
    worse = {r["class"] for r in section["rows"] if (r["delta"] or 0) < -0.0005 or (r["clean_delta"] or 0) < -0.0005}
    assert {r["class"] for r in section["got_worse"]} == worse
    page = render_html(after_results, baseline=before_results, paired=(paired, ""), rendered_at=RENDERED_AT)
    assert "paired class-stratified bootstrap" in page and 'id="compare-got-worse"' in page
    assert page == render_html(after_results, baseline=before_results, paired=(paired, ""), rendered_at=RENDERED_AT)
