"""Issue 17: sparse target flows in results.json, and a report that stays readable at many classes.

results.json stores each attack's target flow as {"format": "sparse", "entries": [[s, t, n], ...]}
(docs/results-schema.md); old dense C x C matrices still validate and render. Above 100 classes the
per-class section is a sorted accuracy curve + the worst ceil(C/10) classes' table with the full table
collapsed, and the target flow lists the top 20 source -> target pairs instead of a C x C heatmap.
"""

from __future__ import annotations

import copy
import html
import json
import re

import numpy as np
import pytest

from report_fixtures import XSS_CLASS, make_results
from robaudit.audit.metrics import target_flow
from robaudit.audit.report.render import build_context, render_html
from robaudit.audit.report.sections import MAX_BAR_CLASSES, TOP_FLOWS
from robaudit.audit.results_schema import dense_flow, sparse_flow, validate_results
from robaudit.errors import UserError
from test_report import RENDERED_AT, parse

MB = 1024 * 1024


def sparsify(results: dict) -> dict:
    out = copy.deepcopy(results)
    out["target_flow"] = {name: sparse_flow(m) for name, m in results["target_flow"].items()}
    return out


@pytest.fixture(scope="module")
def thousand() -> dict:
    """A 1000-class audit, 5 images per class (ImageNet-val-subset scale), one hostile class name."""
    classes = [f"class{i:04d}" for i in range(1000)]
    classes[7] = XSS_CLASS
    return sparsify(make_results(classes=classes, attacks=("fgsm", "pgd"), n_per_class=5,
                                 examples_per_class=1, seed=3))


@pytest.fixture(scope="module")
def thousand_page(thousand) -> str:
    return render_html(thousand, rendered_at=RENDERED_AT)


# --------------------------------------------------------------------------- sparse target flows


def test_sparse_flow_round_trips_the_dense_matrix():
    rng = np.random.default_rng(0)
    y, pred = rng.integers(0, 7, 300), rng.integers(0, 7, 300)
    dense = target_flow(y, pred, rng.random(300) < 0.6, 7)
    sparse = sparse_flow(dense)
    assert sparse["format"] == "sparse"
    assert all(n > 0 and s != t for s, t, n in sparse["entries"])
    assert sparse["entries"] == sorted(sparse["entries"])
    assert dense_flow(sparse, 7) == dense and dense_flow(dense, 7) == dense


def test_a_thousand_class_results_json_stays_small(thousand):
    validate_results(thousand)
    # At most 5 fooled images per class -> at most 5,000 non-zero cells per attack (~15 bytes
    # each), against 1,000,000 cells ("0," = 2 bytes each, 2 MB) for one dense matrix. What is
    # left is 4 per-class blocks x 1,000 entries x ~100 bytes.
    size = len(json.dumps(thousand, separators=(",", ":")))
    assert size < 2 * MB, size
    assert all(len(f["entries"]) <= 5000 for f in thousand["target_flow"].values())
    dense = {name: dense_flow(f, 1000) for name, f in thousand["target_flow"].items()}
    assert len(json.dumps(dense, separators=(",", ":"))) > 2 * 2_000_000   # 2 attacks x 10^6 "0,"


def test_a_thousand_class_results_json_with_curves_stays_under_5_mb(thousand):
    """Issue 17's bound on the file robaudit writes (results_json_text, the engine's writer),
    with an fmn curve block of 1000 classes x 101 eps values (issue 18)."""
    from robaudit.audit.curves import robustness_curve
    from robaudit.audit.results_schema import results_json_text

    classes = thousand["dataset"]["classes"]
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(1000), 5)
    norms = rng.exponential(8 / 255, size=y.size)
    norms[rng.random(y.size) < 0.3] = 0.0                        # clean-wrong points
    with_curves = {**thousand, "curves": {"fmn": robustness_curve(
        norms, y, classes, audited_eps=8 / 255, cap=32 / 255, norm="linf", description="FMN()")}}
    text = results_json_text(with_curves)
    assert json.loads(text) == json.loads(json.dumps(with_curves))   # the same JSON value
    assert len(text.encode("utf-8")) < 5 * 1_000_000, len(text)
    # one number per line (json.dumps(indent=2)) would not fit: the reason for the writer
    assert len(json.dumps(with_curves, indent=2)) > 5 * 1_000_000


def _without_embedded_results(page: str) -> str:
    """The page less its embedded results, the digest of their bytes (which names the form given)
    and the render stamp (which names it too)."""
    page = re.sub(r'(<span class="mono small" id="results-digest"[^>]*>).*?(</span>)', r"\1\2", page, count=1)
    page = re.sub(r'<script type="application/json" id="robaudit-render">.*?</script>', "", page, count=1)
    return re.sub(r'(<script type="application/json" id="results-data">).*?(</script>)', r"\1\2", page,
                  count=1, flags=re.S)


@pytest.mark.parametrize("classes", [("a", "b", "c"), tuple(f"c{i}" for i in range(25))])
def test_dense_and_sparse_results_render_the_same_page(classes):
    dense = make_results(classes=classes, attacks=("fgsm", "pgd"))
    sparse = sparsify(dense)
    dense_page = render_html(dense, rendered_at=RENDERED_AT)
    sparse_page = render_html(sparse, rendered_at=RENDERED_AT)
    # Only the embedded results JSON differs: it holds the flows in the form they were given.
    assert dense_page != sparse_page
    assert _without_embedded_results(dense_page) == _without_embedded_results(sparse_page)
    embedded = json.loads(parse(sparse_page).script("results-data")["text"])
    assert embedded["target_flow"] == sparse["target_flow"]


@pytest.mark.parametrize("flow, message", [
    ({"format": "dense", "entries": []}, r"target_flow\.pgd has format 'dense'"),
    ({"format": "sparse"}, r"target_flow\.pgd\.entries must be a list"),
    ({"format": "sparse", "entries": [[0, 1, 2], [1, 2]]}, r"target_flow\.pgd\.entries\[1\] must be \[source"),
    ({"format": "sparse", "entries": [[0, 3, 2]]}, r"entries\[0\] .*got \[0, 3, 2\]"),
    ({"format": "sparse", "entries": [[-1, 1, 2]]}, r"entries\[0\]"),
    ({"format": "sparse", "entries": [[1, 1, 2]]}, r"source != target"),
    ({"format": "sparse", "entries": [[0, 1, 0]]}, r"count a positive integer"),
    ({"format": "sparse", "entries": [[0, 1, 1.5]]}, r"entries\[0\]"),
    ({"format": "sparse", "entries": [[0, 1, True]]}, r"entries\[0\]"),
    ({"format": "sparse", "entries": [[0, 1, 2], [0, 1, 3]]}, r"entries\[1\] repeats the pair \[0, 1\]"),
    ([[0, 1], [1, 0]], r"target_flow\.pgd must be a 3x3 matrix"),
])
def test_validation_rejects_malformed_sparse_flows_in_one_line(flow, message):
    results = make_results(classes=("a", "b", "c"), attacks=("pgd",))
    results["target_flow"]["pgd"] = flow
    with pytest.raises(UserError, match=message) as caught:
        validate_results(results)
    assert "\n" not in str(caught.value)


def test_old_dense_and_new_sparse_flows_both_validate():
    results = make_results(classes=("a", "b", "c"), attacks=("fgsm", "pgd"))
    validate_results(results)
    results["target_flow"]["pgd"] = sparse_flow(results["target_flow"]["pgd"])   # mixed is fine too
    validate_results(results)
    results["target_flow"]["pgd"] = {"format": "sparse", "entries": []}          # nothing fooled
    flow = build_context(results)["target_flow"]["attacks"][1]
    assert flow["total_fooled"] == 0 and flow["largest"] is None


# --------------------------------------------------------------------------- many classes


def test_up_to_100_classes_keep_the_bar_chart():
    results = make_results(classes=[f"c{i}" for i in range(MAX_BAR_CLASSES)], attacks=("pgd",), n_per_class=5,
                           examples_per_class=0)
    context = build_context(results)
    assert context["per_class"]["many_classes"] is False
    assert context["figures"]["fig-per-class"]["data"][0]["type"] == "bar"
    assert context["target_flow"]["attacks"][0]["top_flows"] is None
    assert "fig-flow-0" in context["figures"]
    assert 'id="table-per-class-worst"' not in render_html(results, rendered_at=RENDERED_AT)


def test_thousand_class_context_has_the_curve_worst_table_and_top_flows(thousand):
    context = build_context(thousand)
    section = context["per_class"]
    assert section["many_classes"] and section["worst_k"] == 100
    assert section["worst_rows"] == section["rows"][:100]
    accuracies = [row["cells"][-1]["accuracy"] for row in section["rows"]]   # ensemble = headline column
    assert accuracies == sorted(accuracies)
    assert section["worst10"] == pytest.approx(sum(accuracies[:100]) / 100, abs=1e-6)
    curve = context["figures"]["fig-per-class"]
    assert [t["type"] for t in curve["data"]] == ["scatter"] * 3
    line = curve["data"][2]["y"]
    assert len(line) == 1000 and line == sorted(line)
    assert curve["data"][1]["fill"] == "tonexty"                            # the CI band
    assert all(lo <= hi for lo, hi in zip(curve["data"][1]["y"], curve["data"][0]["y"]))
    assert not any(key.startswith("fig-flow") for key in context["figures"])
    for flow in context["target_flow"]["attacks"]:
        top = flow["top_flows"]
        assert len(top) == TOP_FLOWS
        counts = [t["count"] for t in top]
        assert counts == sorted(counts, reverse=True) and counts[0] == flow["largest"]["count"]
        assert len(flow["rows"]) == 1000 and flow["matrix"] is None


def test_thousand_class_page_is_bounded_readable_and_escaped(thousand, thousand_page):
    body = (thousand_page)
    # The whole page (charts are inline SVG, no library bundle): the embedded results (< 2 MB, see
    # above), the full per-class table and the per-class flow tables.
    assert len(body.encode("utf-8")) < 5 * MB, len(body)
    parsed = parse(thousand_page)
    assert {"table-per-class-worst", "table-per-class", "table-flow-top-0", "table-flow-top-1"} <= parsed.ids
    worst_rows = re.search(r'<table class="data sortable" id="table-per-class-worst">.*?</table>', body, re.S)
    assert worst_rows.group(0).count("<tr") == 100 + 1                     # header + worst 10%
    # the worst table comes first, the full table sits inside a <details>
    assert body.index('id="table-per-class-worst"') < body.index('id="table-per-class"')
    details = re.findall(r"<details>.*?</details>", body, re.S)
    assert any('id="table-per-class"' in d for d in details)
    assert any('id="table-flow-0"' in d for d in details)
    top = re.search(r'<table class="data" id="table-flow-top-0">.*?</table>', body, re.S).group(0)
    assert top.count("<tr") == TOP_FLOWS + 1
    assert "intervals from about 5 images per class are wide" in body and "worst-10% mean" in body
    figures = build_context(thousand)["figures"]
    assert "heatmap" not in json.dumps(figures) and list(figures) == ["fig-per-class"]
    assert [a["id"] for a in parsed.all("figure") if "chart" in a.get("class", "")] == ["fig-per-class"]
    # hostile class name: text only, in HTML and in the chart
    assert "<img src=x" not in body
    assert html.escape(XSS_CLASS, quote=False) in body
    assert XSS_CLASS not in json.dumps(figures)
    assert not [(tag, a) for tag, a in parsed.elements if any(key.startswith("on") for key in a)]
    assert json.loads(parsed.script("results-data")["text"])["dataset"]["classes"][7] == XSS_CLASS


def test_thousand_class_comparison_has_sorted_curves_worst_table_and_worst10(thousand):
    before = sparsify(make_results(classes=thousand["dataset"]["classes"], attacks=("fgsm", "pgd"),
                                   n_per_class=5, examples_per_class=0, seed=4))
    context = build_context(thousand, baseline=before)
    section = context["comparison"]
    assert section["many_classes"] and section["worst_k"] == 100
    assert section["worst_rows"] == section["rows"][:100]
    figure = context["figures"]["fig-compare"]
    assert all(t["type"] == "scatter" for t in figure["data"])            # no 2000 grouped bars
    before_line, after_line = figure["data"][2]["y"], figure["data"][5]["y"]
    assert before_line == sorted(before_line) and after_line == sorted(after_line) and len(after_line) == 1000
    worst10 = next(m for m in section["summary"] if m["label"].startswith("Worst-10% mean"))
    key = section["key"]
    record = thousand["ensemble"] if key == "ensemble" else thousand["attacks"][key]
    assert worst10["after"] == pytest.approx(record["worst10"])
    body = (render_html(thousand, baseline=before, rendered_at=RENDERED_AT))
    worst_table = re.search(r'<table class="data sortable" id="table-compare-worst">.*?</table>', body, re.S)
    assert worst_table.group(0).count("<tr") == 100 + 1
    assert any('id="table-compare"' in d for d in re.findall(r"<details>.*?</details>", body, re.S))
    assert html.escape(XSS_CLASS, quote=False) in body and "<img src=x" not in body


def test_up_to_100_classes_the_comparison_keeps_grouped_bars():
    classes = [f"c{i}" for i in range(12)]
    after = make_results(classes=classes, attacks=("pgd",), n_per_class=5, examples_per_class=0, seed=1)
    before = make_results(classes=classes, attacks=("pgd",), n_per_class=5, examples_per_class=0, seed=2)
    context = build_context(after, baseline=before)
    assert context["comparison"]["many_classes"] is False
    assert {t["type"] for t in context["figures"]["fig-compare"]["data"]} == {"bar"}
    assert not any(m["label"].startswith("Worst-10%") for m in context["comparison"]["summary"])
