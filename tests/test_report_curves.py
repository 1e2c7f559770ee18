"""Issue 18, report side: per-class robustness curves (results["curves"], docs/results-schema.md).

The curves here are built from seeded per-sample minimal perturbation norms exactly as the
schema defines them (accuracy_k(e) = share of class-k points whose minimal norm is > e;
clean-wrong points 0, never-fooled points +inf; Wilson 95% bounds; median of the norms),
so every expectation below (worst classes, "not reached", ranks) is computed from the norms
independently of the report code.
"""

from __future__ import annotations

import copy
import html
import json
import re

import numpy as np
import pytest
from scipy.stats import spearmanr

from report_fixtures import make_results, set_accuracy
from robaudit.audit.metrics import wilson_interval
from robaudit.audit.report.render import build_context, render_html
from robaudit.audit.report.curves import (
    EMBEDDED_CURVES_BUDGET, MANY_WORST, MAX_ALL_CURVES, RANKING_HEAD, spearman,
)
from robaudit.audit.report.sections import preprocessing_text
from robaudit.errors import UserError
from test_report import RENDERED_AT, parse

HOSTILE = "<b>cat&"
CLASSES10 = ["airplane", "automobile", "bird", HOSTILE, "deer", "dog", "frog", "horse", "ship", "truck"]
MB = 1024 * 1024


def _rounded(values) -> list:
    return [round(float(v), 6) for v in values]


def add_curves(results: dict, *, attack: str = "fmn", norm: str = "linf", grid: int = 41, seed: int = 0,
               scales=None, never=None) -> dict:
    """results["curves"][attack] from seeded minimal norms; returns the norms per class.
    scales[k]: mean minimal norm of class k's clean-correct points (as a multiple of the
    audited eps); never[k]: how many of them the attack never fooled (+inf)."""
    rng = np.random.default_rng(seed)
    classes = results["dataset"]["classes"]
    clean = results["attacks"]["clean"]["per_class"]
    audited = float(results["config"]["eps"])
    cap = 4 * audited
    eps = np.linspace(0.0, cap, grid)
    eps[np.argmin(np.abs(eps - audited))] = audited          # the schema puts the audited eps on the grid
    scales = rng.uniform(0.5, 2.0, len(classes)) if scales is None else np.asarray(scales, float)
    never = [0] * len(classes) if never is None else never
    per_class, medians, not_found, norms_by_class = [], [], [], []
    for k, entry in enumerate(clean):
        norms = np.zeros(entry["n"])
        norms[:entry["correct"]] = rng.exponential(scales[k] * audited, entry["correct"])
        norms[:min(never[k], entry["correct"])] = np.inf
        norms_by_class.append(norms)
        survived = (norms[None, :] > eps[:, None]).sum(axis=1)
        low, high = wilson_interval(survived, norms.size)
        per_class.append({"class": classes[k], "n": int(norms.size), "accuracy": _rounded(survived / norms.size),
                          "low": _rounded(low), "high": _rounded(high)})
        median = float(np.median(norms))
        medians.append(round(median, 6) if np.isfinite(median) else None)
        not_found.append(int(np.isinf(norms).sum()))
    every = np.concatenate(norms_by_class)
    survived = (every[None, :] > eps[:, None]).sum(axis=1)
    low, high = wilson_interval(survived, every.size)
    results.setdefault("curves", {})[attack] = {
        "norm": norm, "audited_eps": audited, "cap": cap, "eps": _rounded(eps), "per_class": per_class,
        "overall": {"n": int(every.size), "accuracy": _rounded(survived / every.size), "low": _rounded(low),
                    "high": _rounded(high)},
        "median_eps": medians, "not_found": not_found,
        "description": f"FMN(eps={cap:.4f}, norm={norm}, steps=100)",
    }
    return {"norms": norms_by_class, "eps": eps}


def expected_worst(norms_by_class: list, k: int) -> list[int]:
    medians = [float(np.median(norms)) for norms in norms_by_class]
    return sorted(range(len(medians)), key=lambda i: medians[i])[:k]


@pytest.fixture(scope="module")
def ten():
    """10 classes, 60 images each; classes 3 (hostile name), 6 and 1 break first (mean minimal
    norm 0.1, 0.2, 0.3 x eps against 1-3 x eps for the rest); class 8
    is never fooled for 40 of its points, so its median is +inf -> null."""
    results = make_results(classes=CLASSES10, attacks=("pgd",), n_per_class=60, seed=4)
    scales = [1.0, 0.3, 1.5, 0.1, 2.0, 1.2, 0.2, 2.5, 3.0, 1.8]
    never = [0, 0, 0, 0, 0, 0, 0, 0, 40, 0]
    generated = add_curves(results, scales=scales, never=never)
    return results, generated


@pytest.fixture(scope="module")
def ten_page(ten):
    return render_html(ten[0], rendered_at=RENDERED_AT)


def figures_of(page: str) -> dict:
    """The figure specs the page drew: its <figure class="chart"> ids, specs from build_context."""
    ids = [a["id"] for a in parse(page).all("figure") if "chart" in a.get("class", "").split()]
    results = json.loads(parse(page).script("results-data")["text"])
    specs = build_context(results)["figures"]
    assert sorted(ids) == sorted(specs)
    return specs


def named_lines(figure: dict) -> list[dict]:
    return [t for t in figure["data"] if t.get("hoverinfo") != "skip"]


# --------------------------------------------------------------------------- single audit, 10 classes


def test_section_renders_with_figure_table_and_nav(ten_page):
    parsed = parse(ten_page)
    assert {"curves-fmn", "fig-curves-fmn", "table-curves-fmn"} <= parsed.ids
    assert "Robustness curves (fmn)" in ten_page
    assert any(a.get("href") == "#curves-fmn" for a in parsed.all("a"))
    body = (ten_page)
    # the section sits between the per-class section and the target flow
    assert body.index('id="per-class"') < body.index('id="curves-fmn"') < body.index('id="target-flow"')
    assert "fig-curves-fmn" in figures_of(ten_page)


def test_worst_three_by_median_are_highlighted_with_bands(ten):
    results, generated = ten
    context = build_context(results)
    section = context["curves"][0]
    worst = expected_worst(generated["norms"], 3)
    assert set(worst) == {1, 3, 6}                              # the planted weak classes (order: clean errors too)
    assert section["highlighted"] == [CLASSES10[i] for i in worst]
    figure = context["figures"]["fig-curves-fmn"]
    lines = named_lines(figure)
    coloured = [t["name"] for t in lines if t["line"]["width"] == 2.5]
    assert coloured == [f"#{r + 1} {html.escape(CLASSES10[i], quote=False)}" for r, i in enumerate(worst)]
    grey = [t for t in lines if t["line"]["width"] == 1]
    assert len(grey) == 10 - 3                                   # every other class, thin grey
    assert {t["name"] for t in grey} == {html.escape(CLASSES10[i], quote=False) for i in range(10)
                                         if i not in worst}
    assert all(t["line"]["shape"] == "hv" for t in figure["data"])
    bands = [t for t in figure["data"] if t.get("fill") == "tonexty"]
    assert len(bands) == 3 + 1                                   # the highlighted classes and the overall curve
    # the vertical marker sits at the audited eps, in 1/255 units under L-inf
    assert figure["layout"]["shapes"][0]["x0"] == pytest.approx(results["config"]["eps"] * 255, abs=1e-3)
    assert figure["layout"]["xaxis"]["ticktext"][1].endswith("/255")


def test_drawn_curves_are_step_curves_inside_their_bands(ten):
    results, generated = ten
    figure = build_context(results)["figures"]["fig-curves-fmn"]
    data = figure["data"]
    for position, trace in enumerate(data):
        if trace.get("fill") == "tonexty":
            upper, lower, line = data[position - 1]["y"], trace["y"], data[position + 1]["y"]
            # chart values are rounded to 4 decimals (0.01 pp): the comparison allows that rounding
            assert all(lo - 1e-4 <= a <= hi + 1e-4 for lo, a, hi in zip(lower, line, upper))
    for trace in named_lines(figure):
        assert all(b <= a for a, b in zip(trace["y"], trace["y"][1:]))      # non-increasing
    overall = named_lines(figure)[-1]
    clean = results["attacks"]["clean"]
    n_correct = sum(e["correct"] for e in clean["per_class"])
    assert overall["y"][0] == pytest.approx(n_correct / results["dataset"]["n"], abs=1e-4)   # accuracy(0) = clean


def test_table_rows_follow_median_order_with_not_reached(ten, ten_page):
    results, generated = ten
    rows = build_context(results)["curves"][0]["rows"]
    medians = [float(np.median(norms)) for norms in generated["norms"]]
    assert [r["index"] for r in rows] == sorted(range(10), key=lambda i: medians[i])   # inf last
    never_fooled = rows[-1]
    assert never_fooled["class"] == "ship" and never_fooled["median"]["text"] == "not reached"
    assert never_fooled["not_found"] == 40
    section = re.search(r'<section id="curves-fmn".*?</section>', ten_page, re.S).group(0)
    row_html = re.search(r'<tr>\s*<td data-sort="10">10</td>(?:(?!</tr>).)*?>ship</th>.*?</tr>', section, re.S).group(0)
    assert "not reached" in row_html and "40 of 60 never fooled" in row_html
    # the finite medians are shown as k/255 under L-inf
    first = rows[0]
    assert first["median"]["text"] == f"{medians[first['index']] * 255:.2f}/255"


def test_class_names_are_escaped_in_html_and_figures(ten_page):
    body = (ten_page)
    assert HOSTILE not in re.sub(r'<script type="application/json" id="results-data">.*?</script>', "", body,
                                 flags=re.S)
    section = re.search(r'<section id="curves-fmn".*?</section>', body, re.S).group(0)
    assert html.escape(HOSTILE) in section or html.escape(HOSTILE, quote=False) in section
    figure_text = json.dumps(figures_of(ten_page)["fig-curves-fmn"])
    assert "<b>" not in figure_text and "&lt;b&gt;cat&amp;" in figure_text


def test_rankings_agree_or_say_how_far_they_disagree(ten):
    results, generated = ten
    agreement = build_context(results)["curves"][0]["agreement"]
    # make the fixed-eps headline rank the (curve) most robust classes worst
    disagreeing = copy.deepcopy(results)
    for name, correct in (("truck", 0), ("horse", 1), ("deer", 2)):
        set_accuracy(disagreeing, "pgd", name, correct)
        set_accuracy(disagreeing, "ensemble", name, correct)
    changed = build_context(disagreeing)["curves"][0]
    worst_median = [CLASSES10[i] for i in expected_worst(generated["norms"], 3)]
    worst_fixed = [row["class"] for row in sorted(changed["rows"], key=lambda r: r["fixed_rank"])[:3]]
    shared = len(set(worst_median) & set(worst_fixed))
    assert worst_fixed == ["truck", "horse", "deer"] and shared == 0
    assert changed["agreement"]["shared"] == shared and not changed["agreement"]["agree"]
    assert "disagree: 0 of the 3" in changed["agreement"]["sentence"]
    assert agreement["sentence"] != changed["agreement"]["sentence"]


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 5, 40).tolist(), rng.normal(size=40).tolist()
    x[3] = float("inf")                                          # a "not reached" median ranks last
    # the same rank statistic: only float rounding separates them
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_curve_flags_are_linked_from_the_section(ten):
    results = copy.deepcopy(ten[0])
    results["checks"].append({"id": "curve_not_reaching_zero", "severity": "warning",
                              "message": "fmn left 2% unfooled", "why": "masking"})
    page = render_html(results, rendered_at=RENDERED_AT)
    section = re.search(r'<section id="curves-fmn".*?</section>', page, re.S).group(0)
    assert 'href="#checks"' in section and "curve_not_reaching_zero" in section
    assert "fgsm_beats_pgd" not in section                       # flags about other things stay in checks


def test_l2_curves_use_plain_radii():
    results = make_results(classes=("a", "b", "c"), attacks=("pgd",), n_per_class=30)
    results["config"].update({"eps": 0.5, "eps_255": None, "norm": "l2"})
    add_curves(results, norm="l2", grid=21)
    context = build_context(results)
    axis = context["figures"]["fig-curves-fmn"]["layout"]["xaxis"]
    assert "L2" in axis["title"]["text"] and "ticktext" not in axis
    assert context["figures"]["fig-curves-fmn"]["layout"]["shapes"][0]["x0"] == pytest.approx(0.5)
    assert context["curves"][0]["audited"] == "0.5" and "/255" not in context["curves"][0]["cap"]


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.update(norm="l3"), r"curves\.fmn\.norm is 'l3'"),
    (lambda c: c["per_class"].pop(), r"curves\.fmn\.per_class must list 10 classes"),
    (lambda c: c["per_class"][2]["accuracy"].pop(), r"curves\.fmn\.per_class\[2\]\.accuracy must list 41"),
    (lambda c: c.update(eps=list(reversed(c["eps"]))), r"curves\.fmn\.eps must start at 0"),
    (lambda c: c["not_found"].__setitem__(0, -1), r"curves\.fmn\.not_found"),
])
def test_malformed_curves_are_refused_in_one_line(ten, mutate, message):
    results = copy.deepcopy(ten[0])
    mutate(results["curves"]["fmn"])
    with pytest.raises(UserError, match=message) as caught:
        build_context(results)
    assert "\n" not in str(caught.value)


def test_results_without_curves_have_no_curve_section():
    results = make_results()
    page = render_html(results, rendered_at=RENDERED_AT)
    assert 'id="curves-' not in page and "fig-curves" not in page
    assert build_context(results)["curves"] == []


# --------------------------------------------------------------------------- comparison


@pytest.fixture(scope="module")
def pair():
    after = make_results(classes=CLASSES10, attacks=("pgd",), n_per_class=60, seed=4)
    before = make_results(classes=CLASSES10, attacks=("pgd",), n_per_class=60, seed=5, strength=0.7)
    after_norms = add_curves(after, scales=[1.0, 0.3, 1.5, 0.1, 2.0, 1.2, 0.2, 2.5, 3.0, 1.8], seed=0)
    add_curves(before, scales=[0.5] * 10, seed=1)
    return after, before, after_norms


def test_comparison_overlays_before_and_after_curves(pair):
    after, before, after_norms = pair
    context = build_context(after, baseline=before)
    item = context["comparison"]["curves"][0]
    assert item["figure_id"] == "fig-curves-compare-fmn" and item["note"] == ""
    names = [t["name"] for t in named_lines(context["figures"]["fig-curves-compare-fmn"])]
    worst = [html.escape(CLASSES10[i], quote=False) for i in expected_worst(after_norms["norms"], 3)]
    assert names == (["all classes, before", "all classes, after"]
                     + [f"{w}, {side}" for w in worst for side in ("before", "after")])
    page = render_html(after, baseline=before, rendered_at=RENDERED_AT)
    assert "fig-curves-compare-fmn" in parse(page).ids
    assert "fig-curves-fmn" in parse(page).ids                   # the after audit's own section too


@pytest.mark.parametrize("side", ["after", "before"])
def test_comparison_with_curves_on_one_side_says_so_in_one_line(pair, side):
    after, before, _ = copy.deepcopy(pair)
    (before if side == "after" else after).pop("curves")
    context = build_context(after, baseline=before)
    item = context["comparison"]["curves"][0]
    assert item["figure_id"] is None and not any(k.startswith("fig-curves-compare") for k in context["figures"])
    expected = "after (this audit)" if side == "after" else "before (the baseline)"
    assert item["note"] == f"Only the {expected} results have robustness curves for fmn; there is no before/after overlay."
    assert html.escape(item["note"], quote=False) in render_html(after, baseline=before, rendered_at=RENDERED_AT)


# --------------------------------------------------------------------------- 1000 classes


@pytest.fixture(scope="module")
def thousand():
    """A 1000-class audit (5 images a class) with curves on a 101-point grid, one hostile name."""
    from test_report_many_classes import sparsify
    classes = [f"class{i:04d}" for i in range(1000)]
    classes[7] = HOSTILE
    results = sparsify(make_results(classes=classes, attacks=("fgsm", "pgd"), n_per_class=5,
                                    examples_per_class=1, seed=3))
    generated = add_curves(results, grid=101, seed=2)
    return results, generated


def test_thousand_classes_draw_few_traces_and_collapse_the_table(thousand):
    results, generated = thousand
    context = build_context(results)
    section = context["curves"][0]
    assert section["reduced_figure"] and section["collapsed"] and len(results["dataset"]["classes"]) > MAX_ALL_CURVES
    figure = context["figures"]["fig-curves-fmn"]
    lines = named_lines(figure)
    assert len(lines) == MANY_WORST + 1 + 1                      # worst 5, most robust, overall
    assert len(figure["data"]) == len(lines) + 2 * 2             # + bands of the worst class and overall
    medians = [float(np.median(n)) for n in generated["norms"]]
    assert lines[0]["name"].startswith("most robust: ") and lines[0]["line"]["dash"] == "dot"
    assert lines[0]["name"].endswith(results["dataset"]["classes"][int(np.argmax(medians))])
    assert len(section["head_rows"]) == RANKING_HEAD and len(section["rows"]) == 1000


def test_thousand_class_report_stays_under_8_mb(thousand, capsys):
    results, _ = thousand
    page = render_html(results, rendered_at=RENDERED_AT)
    size = len(page.encode("utf-8"))
    with capsys.disabled():
        print(f"\n1000-class report with curves (101 eps values): {size:,} bytes ({size / MB:.2f} MiB)")
    assert size < 8 * 10 ** 6, size                              # issue 17's budget, in decimal MB
    body = (page)
    head = re.search(r'<table class="data sortable" id="table-curves-fmn-worst">.*?</table>', body, re.S).group(0)
    assert head.count("<tr") == RANKING_HEAD + 1
    assert any('id="table-curves-fmn"' in d for d in re.findall(r"<details>.*?</details>", body, re.S))
    # the embedded copy drops the per-class bounds (derivable from accuracy x n) and says so
    embedded = json.loads(parse(page).script("results-data")["text"])["curves"]["fmn"]
    assert "low" not in embedded["per_class"][0] and embedded["per_class"][0]["accuracy"]
    assert embedded["per_class"][0]["accuracy"] == results["curves"]["fmn"]["per_class"][0]["accuracy"]
    assert "omitted_in_report" in embedded and "no 95% bounds" in body
    assert len(json.dumps(results["curves"]["fmn"]["per_class"], separators=(",", ":"))) > EMBEDDED_CURVES_BUDGET
    assert HOSTILE not in re.sub(r'<script type="application/json" id="results-data">.*?</script>', "", body,
                                 flags=re.S)


def test_curves_as_the_scan_writes_them_stay_under_8_mb_at_1000_classes(capsys):
    """The scan's own writer (audit/curves.py) writes unrounded floats; 7 images a class makes
    accuracies like 0.14285714285714285, the longest JSON numbers there are."""
    curves = pytest.importorskip("robaudit.audit.curves")
    classes = [f"class{i:04d}" for i in range(1000)]
    results = make_results(classes=classes, attacks=("fgsm", "pgd"), n_per_class=7, examples_per_class=1, seed=3)
    from test_report_many_classes import sparsify
    results = sparsify(results)
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(1000), 7)
    norms = rng.exponential(results["config"]["eps"], y.size)
    norms[rng.random(y.size) < 0.2], norms[rng.random(y.size) < 0.02] = 0.0, np.inf
    results["curves"] = {"fmn": curves.robustness_curve(norms, y, classes, audited_eps=results["config"]["eps"],
                                                        cap=4 * results["config"]["eps"], norm="linf",
                                                        description="FMN(steps=100)")}
    page = render_html(results, rendered_at=RENDERED_AT)
    size = len(page.encode("utf-8"))
    with capsys.disabled():
        print(f"\n1000 classes x 7 images, curves from audit/curves.py: {size:,} bytes")
    assert size < 8 * 10 ** 6, size
    embedded = json.loads(parse(page).script("results-data")["text"])["curves"]["fmn"]["per_class"]
    full = results["curves"]["fmn"]["per_class"]
    # 6 decimals still name every k/7 exactly
    assert [round(a * 7) for a in embedded[0]["accuracy"]] == [round(a * 7) for a in full[0]["accuracy"]]


def test_small_reports_embed_the_curves_whole(ten_page, ten):
    embedded = json.loads(parse(ten_page).script("results-data")["text"])
    assert embedded["curves"] == ten[0]["curves"]
    assert "no 95% bounds" not in ten_page


# --------------------------------------------------------------------------- provenance: preprocessing


def test_provenance_shows_preprocessing_and_skipped_images():
    results = make_results()
    results["dataset"]["preprocessing"] = {"resize": 256, "center_crop": 224, "interpolation": "bilinear",
                                           "antialias": True, "preset": "robustbench-imagenet"}
    results["dataset"]["subset"]["skipped_bad_images"] = 3
    dataset_rows = dict(build_context(results)["provenance"][0]["dataset"])
    assert dataset_rows["Preprocessing"] == ("preset robustbench-imagenet: resize shorter side to 256, "
                                             "center crop 224, interpolation bilinear, antialias yes")
    assert dataset_rows["Unreadable images skipped"] == "3"
    assert "skipped_bad_images" not in dataset_rows["Subset"]
    page = render_html(results, rendered_at=RENDERED_AT)
    assert "<dt>Unreadable images skipped</dt><dd>3</dd>" in page
    results["dataset"]["preprocessing"] = None
    assert dict(build_context(results)["provenance"][0]["dataset"])["Preprocessing"].startswith("none")
    assert preprocessing_text({"resize": 256}) == "resize shorter side to 256"


def test_provenance_without_those_keys_is_unchanged():
    rows = dict(build_context(make_results())["provenance"][0]["dataset"])
    assert "Preprocessing" not in rows and "Unreadable images skipped" not in rows
