"""The HTML report: context building, the rendered page's structure, safety and size.

Gold files: tests/gold/report_single.html and tests/gold/report_compare.html are the
rendered pages for tiny fixtures with the volatile parts scrubbed (render timestamp,
robaudit version, the inlined plotly.js bundle and its version). After an intended
change to the template or context, regenerate them and review the diff:

    ROBAUDIT_UPDATE_GOLD=1 python -m pytest tests/test_report.py -k gold
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from report_fixtures import XSS_CLASS, cifar10_scale_results, make_results, set_accuracy, tiny_png
from robaudit.audit.report import render as report
from robaudit.audit.report.redaction import redact_command, redact_text
from robaudit.audit.report.training import shown_epochs
from robaudit.audit.report.render import build_context, load_results, render_html, render_report
from robaudit.errors import UserError

GOLD_DIR = Path(__file__).parent / "gold"
RENDERED_AT = "2026-11-22T13:00:00+00:00"


# --------------------------------------------------------------------------- helpers


class PageParser(HTMLParser):
    """Collects what the structural checks need from one HTML page."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict]] = []
        self.ids: set[str] = set()
        self.scripts: list[dict] = []
        self._script: dict | None = None
        self.html_lang = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.elements.append((tag, attributes))
        if "id" in attributes:
            self.ids.add(attributes["id"])
        if tag == "html":
            self.html_lang = attributes.get("lang")
        if tag == "script":
            self._script = {"attrs": attributes, "text": ""}
            self.scripts.append(self._script)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag):
        if tag == "script":
            self._script = None

    def handle_data(self, data):
        if self._script is not None:
            self._script["text"] += data

    def all(self, tag: str) -> list[dict]:
        return [attrs for name, attrs in self.elements if name == tag]

    def script(self, script_id: str) -> dict:
        matches = [s for s in self.scripts if s["attrs"].get("id") == script_id]
        assert len(matches) == 1, f"expected one script#{script_id}, found {len(matches)}"
        return matches[0]


def parse(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    parser.close()
    return parser


def scrub_volatile(page: str) -> str:
    # the render stamp names the renderer's git commit (audit/report/integrity.py; tested there)
    page = re.sub(r'<script type="application/json" id="robaudit-render">.*?</script>\n', "", page, count=1)
    return re.sub(r'(<span data-volatile="[a-z-]+">)[^<]*(</span>)', r"\1[scrubbed]\2", page)


@pytest.fixture(scope="module")
def single_page() -> tuple[dict, str]:
    results = make_results(training=False)
    return results, render_html(results, rendered_at=RENDERED_AT)


@pytest.fixture(scope="module")
def compare_page() -> tuple[dict, dict, str]:
    after = make_results(training=True, seed=0)
    before = make_results(seed=1, strength=0.7)
    return after, before, render_html(after, baseline=before, rendered_at=RENDERED_AT)


# --------------------------------------------------------------------------- loading


def test_load_results_round_trips_a_results_file(tmp_path):
    results = make_results()
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results), encoding="utf-8")
    assert load_results(path) == results


@pytest.mark.parametrize("content, expected", [
    (None, "results file not found"),
    ("{not json", "is not valid JSON (line 1"),
    ("[1, 2]", "expected a JSON object"),
    ('{"schema_version": 2}', "schema_version is 2"),
    ('{"schema_version": 1, "tool": {}}', "missing required keys: command"),
    ("{}", "no schema_version"),
])
def test_load_results_names_the_problem_in_one_line(tmp_path, content, expected):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as caught:
        load_results(path)
    message = str(caught.value)
    assert expected in message and "\n" not in message and str(path) in message


def test_load_results_rejects_non_utf8_and_directories(tmp_path):
    binary = tmp_path / "results.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="not UTF-8"):
        load_results(binary)
    with pytest.raises(UserError, match="is a directory"):
        load_results(tmp_path)


def test_validation_catches_per_class_lists_that_do_not_match_the_classes():
    results = make_results()
    results["attacks"]["pgd"]["per_class"].pop()
    with pytest.raises(UserError, match=r"attacks\.pgd\.per_class must list 3 classes"):
        build_context(results)
    results = make_results()
    results["target_flow"]["fgsm"] = [[0, 0], [0, 0]]
    with pytest.raises(UserError, match=r"target_flow\.fgsm must be a 3x3 matrix"):
        build_context(results)


# --------------------------------------------------------------------------- verdict


def _four_classes(corrects: list[int], n: int) -> dict:
    results = make_results(classes=("ant", "bee", "cat", "dog"), n_per_class=n, attacks=("pgd",))
    for name, correct in zip(("ant", "bee", "cat", "dog"), corrects):
        set_accuracy(results, "pgd", name, correct)
        set_accuracy(results, "ensemble", name, correct)
    return results


def test_worst_class_whose_ci_lies_below_the_average_is_significant():
    results = _four_classes([10, 80, 85, 90], n=100)  # ant: 10% (CI ~5.5-17.4%), average 66%
    verdict = build_context(results)["verdict"]
    assert verdict["worst"]["class"] == "ant"
    assert verdict["worst"]["ci"][1] < verdict["average"]
    assert verdict["significance"]["status"] == "significant"
    assert verdict["significance"]["answer"] == "Yes"
    assert "ant" in verdict["significance"]["explanation"]


def test_worst_class_whose_ci_reaches_the_average_is_not_significant():
    results = _four_classes([9, 10, 11, 12], n=20)  # ant: 45% (CI ~26-66%), average 52.5%
    verdict = build_context(results)["verdict"]
    assert verdict["worst"]["ci"][1] >= verdict["average"]
    assert verdict["significance"]["status"] == "not_significant"
    assert "sampling noise" in verdict["significance"]["explanation"]


def test_a_class_without_images_cannot_be_judged():
    results = _four_classes([9, 10, 11, 12], n=20)
    entry = results["ensemble"]["per_class"][0]
    entry.update({"n": 0, "correct": 0, "accuracy": 0.0, "ci95": [None, None]})
    results["ensemble"]["worst_class"] = "ant"
    assert build_context(results)["verdict"]["significance"]["status"] == "unknown"


def test_headline_is_the_ensemble_else_the_strongest_attack_else_clean():
    results = make_results(attacks=("fgsm", "pgd"))
    assert report.headline_key(results) == "ensemble"
    results["ensemble"] = None
    strongest = min(("fgsm", "pgd"), key=lambda name: results["attacks"][name]["avg"])
    assert report.headline_key(results) == strongest
    clean_only = make_results(attacks=(), ensemble=False)
    assert report.headline_key(clean_only) == "clean"
    assert build_context(clean_only)["verdict"]["is_robustness"] is False


def test_verdict_quotes_eps_as_k_over_255():
    verdict = build_context(make_results())["verdict"]
    assert verdict["eps_255"] == "8/255"
    assert report.eps_as_fraction_of_255(0.5 / 255) == "0.50/255"
    assert report.eps_as_fraction_of_255(None, 4.0) == "4/255"


def test_checks_list_warnings_first_with_why():
    checks = build_context(make_results())["checks"]
    assert [c["severity"] for c in checks] == ["warning", "info"]
    assert all(c["why"] for c in checks)


# --------------------------------------------------------------------------- per-class view


def test_per_class_rows_run_from_least_to_most_robust_with_the_worst_marked():
    results = _four_classes([15, 5, 12, 9], n=20)
    per_class = build_context(results)["per_class"]
    assert [row["class"] for row in per_class["rows"]] == ["bee", "dog", "cat", "ant"]
    assert [row["is_worst"] for row in per_class["rows"]] == [True, False, False, False]
    assert [c["key"] for c in per_class["columns"]] == ["clean", "pgd", "ensemble"]
    figure = build_context(results)["figures"][per_class["figure_id"]]
    assert figure["layout"]["xaxis"]["categoryarray"] == ["bee", "dog", "cat", "ant"]
    assert "worst" in figure["layout"]["xaxis"]["ticktext"][0]  # marked in text, not only by colour


def test_ties_put_the_reported_worst_class_first():
    results = _four_classes([5, 5, 12, 9], n=20)
    results["ensemble"]["worst_class"] = "bee"
    rows = build_context(results)["per_class"]["rows"]
    assert [row["class"] for row in rows[:2]] == ["bee", "ant"] and rows[0]["is_worst"]


def test_bar_error_bars_are_the_confidence_interval():
    results = make_results()
    context = build_context(results)
    trace = next(t for t in context["figures"]["fig-per-class"]["data"] if t["name"] == "pgd")
    first = context["per_class"]["rows"][0]["index"]
    entry = results["attacks"]["pgd"]["per_class"][first]
    assert trace["y"][0] + trace["error_y"]["array"][0] == pytest.approx(entry["ci95"][1])
    assert trace["y"][0] - trace["error_y"]["arrayminus"][0] == pytest.approx(entry["ci95"][0])


def test_target_flow_tables_rank_destinations():
    results = make_results(classes=("a", "b", "c"), attacks=("pgd",))
    results["target_flow"]["pgd"] = [[0, 1, 7], [2, 0, 0], [0, 0, 0]]
    flow = build_context(results)["target_flow"]["attacks"][0]
    assert flow["rows"][0]["fooled"] == 8
    assert [(t["class"], t["count"]) for t in flow["rows"][0]["top"]] == [("c", 7), ("b", 1)]
    assert flow["largest"] == {"source": "a", "target": "c", "count": 7}
    assert flow["rows"][2]["top"] == []


def test_many_classes_drop_heatmaps_but_keep_tables():
    classes = [f"class{i:03d}" for i in range(120)]
    results = make_results(classes=classes, attacks=("pgd",), n_per_class=5, examples_per_class=0)
    context = build_context(results)
    assert not any(key.startswith("fig-flow") for key in context["figures"])
    assert len(context["target_flow"]["attacks"][0]["rows"]) == 120
    assert context["target_flow"]["attacks"][0]["matrix"] is None
    assert context["verdict"]["worst10"] is not None


def test_examples_follow_robustness_order_and_skip_non_png_data():
    results = make_results(examples_per_class=2)
    results["examples"][0]["adv_png"] = "javascript:alert(1)"
    context = build_context(results)
    examples = context["examples"]
    assert examples["skipped"] == 1
    order = [row["class"] for row in context["per_class"]["rows"]]
    shown = [group["class"] for group in examples["groups"]]
    assert shown == sorted(shown, key=order.index)
    for group in examples["groups"]:
        for pair in group["pairs"]:
            assert pair["clean_src"].startswith("data:image/png;base64,")
            assert pair["adv_src"].startswith("data:image/png;base64,")


# --------------------------------------------------------------------------- comparison mode


def test_comparison_reports_per_class_deltas_worst_class_and_nsd_change():
    before = _four_classes([4, 10, 12, 14], n=20)
    after = _four_classes([9, 11, 12, 13], n=20)
    comparison = build_context(after, baseline=before)["comparison"]
    assert comparison["key"] == "ensemble"
    deltas = {row["class"]: row["delta"] for row in comparison["rows"]}
    assert deltas == pytest.approx({"ant": 0.25, "bee": 0.05, "cat": 0.0, "dog": -0.05})
    changes = {row["class"]: row["change"] for row in comparison["rows"]}
    assert changes == {"ant": "better", "bee": "better", "cat": "unchanged", "dog": "worse"}
    summary = {item["label"].split(" (")[0]: item for item in comparison["summary"]}
    assert summary["Worst-class robust accuracy"]["delta"] == pytest.approx(0.45 - 0.2)
    nsd = summary["NSD"]
    assert nsd["delta"] == pytest.approx(after["ensemble"]["nsd"] - before["ensemble"]["nsd"])
    assert nsd["change"] == "better"  # NSD fell: classes became more even
    assert comparison["worst_before"] == "ant" and comparison["worst_after"] == "ant"
    assert "fig-compare" in build_context(after, baseline=before)["figures"]


def test_comparison_flags_settings_that_are_not_like_for_like():
    before = make_results(seed=1)
    after = make_results(seed=0)
    after["config"]["eps"], after["config"]["eps_255"] = 4 / 255, 4.0
    warnings = build_context(after, baseline=before)["comparison"]["warnings"]
    assert any("budget differs" in w and "4/255" in w for w in warnings)


def test_comparison_refuses_different_class_lists():
    with pytest.raises(UserError, match="different class lists"):
        build_context(make_results(classes=("a", "b")), baseline=make_results(classes=("a", "c")))


def test_training_curves_and_temperature_trajectories_are_shown():
    results = make_results(training=True)
    training = build_context(results, baseline=make_results(seed=1))["training"]
    assert [c["key"] for c in training["curves"]["columns"]] == [
        "loss", "val_clean_avg", "val_robust_avg", "val_robust_worst"]
    assert [t["key"] for t in training["trajectories"]] == ["tau_adv", "tau_nat"]
    tau_adv = training["trajectories"][0]
    assert tau_adv["rows"][2]["change"] == pytest.approx(
        results["training"]["temperatures"]["tau_adv"][-1][2] - results["training"]["temperatures"]["tau_adv"][0][2])


def test_long_trajectories_show_at_most_ten_epochs_in_the_table():
    shown = shown_epochs(37)
    assert len(shown) == 10 and shown[0] == 0 and shown[-1] == 36
    assert shown_epochs(4) == [0, 1, 2, 3]


# --------------------------------------------------------------------------- redaction


def test_redaction_cuts_paths_to_basenames_everywhere():
    results = make_results(training=True)
    results["checks"][0]["message"] = "weights read from /home/alice/secret/w.pt, fine"
    context = build_context(results, redact_paths=True)
    embedded = context["embedded"]["results"]
    assert embedded["model"]["path"] == "resnet18.pt2"
    assert embedded["dataset"]["source"] == "cifar10"
    assert embedded["training"]["teacher"] == "teacher.pt2"
    assert embedded["command"] == ("robaudit scan resnet18.pt2 --dataset cifar10 --data-dir=cifar10 "
                                   "--eps 8/255 --out audit1")
    assert embedded["checks"][0]["message"] == "weights read from w.pt, fine"
    assert embedded["examples"] == results["examples"]  # base64 contains "/" and must survive
    assert "/home/alice" not in json.dumps(context["provenance"])
    assert results["model"]["path"].startswith("/home/alice")  # the caller's dict is untouched


def test_redacted_page_holds_no_directory_names(compare_page):
    after, before, _ = compare_page
    page = (render_html(after, baseline=before, redact_paths=True, rendered_at=RENDERED_AT))
    for secret in ("/home/alice", "/srv/datasets", "home/alice", "alice"):
        assert secret not in page
    assert "file paths redacted" in page


def test_redaction_leaves_class_names_alone():
    results = make_results(classes=("/m/01g317", "/m/0199g", "cat"))
    embedded = build_context(results, redact_paths=True)["embedded"]["results"]
    assert embedded["dataset"]["classes"] == ["/m/01g317", "/m/0199g", "cat"]
    assert embedded["attacks"] == results["attacks"]


def test_redacting_text_keeps_fractions_and_urls():
    assert redact_text("eps 8/255 and n/a") == "eps 8/255 and n/a"
    assert redact_text("see https://example.org/a/b") == "see https://example.org/a/b"
    assert redact_text("C:\\Users\\bob\\m.onnx and ~/x/y.pt") == "m.onnx and y.pt"
    assert redact_command('robaudit scan "/a b/m.pt" --eps 8/255') == 'robaudit scan "m.pt" --eps 8/255'


# --------------------------------------------------------------------------- the rendered page


def test_rendering_twice_gives_identical_bytes(compare_page):
    after, before, page = compare_page
    assert render_html(after, baseline=before, rendered_at=RENDERED_AT) == page
    other_time = render_html(after, baseline=before, rendered_at="2030-01-01T00:00:00+00:00")
    assert other_time != page and scrub_volatile(other_time) == scrub_volatile(page)


@pytest.mark.parametrize("name", ["single", "compare"])
def test_page_matches_gold_file(name, single_page, compare_page):
    page = scrub_volatile(single_page[1] if name == "single" else compare_page[2])
    gold = GOLD_DIR / f"report_{name}.html"
    if os.environ.get("ROBAUDIT_UPDATE_GOLD") == "1":
        GOLD_DIR.mkdir(exist_ok=True)
        gold.write_text(page, encoding="utf-8")
    assert gold.exists(), f"{gold} missing; create it with ROBAUDIT_UPDATE_GOLD=1"
    assert page == gold.read_text(encoding="utf-8"), (
        f"report differs from {gold}; if the change is intended, regenerate with ROBAUDIT_UPDATE_GOLD=1 "
        "and review the diff")


def test_page_structure(compare_page):
    after, before, page = compare_page
    parsed = parse(page)
    assert parsed.html_lang == "en"

    # Self-contained: nothing points off the page.
    references = ([a.get("src") for a in parsed.all("script")] + [a.get("href") for a in parsed.all("link")]
                  + [a.get("src") for a in parsed.all("img")] + [a.get("src") for a in parsed.all("iframe")])
    for reference in filter(None, references):
        assert not re.match(r"^\s*(https?:)?//", reference, re.I), reference
        assert reference.startswith("data:"), reference
    assert not any(tag == "link" and a.get("rel") == "stylesheet" for tag, a in parsed.elements)

    # Every internal anchor lands on an element.
    anchors = [a["href"][1:] for a in parsed.all("a") if a.get("href", "").startswith("#")]
    assert anchors and all(anchor in parsed.ids for anchor in anchors), set(anchors) - parsed.ids

    # Every chart has a table beside it, and every figure has a chart to draw into.
    charts = [a for a in parsed.all("figure") if "chart" in a.get("class", "").split()]
    figures = build_context(after, baseline=before)["figures"]
    assert sorted(c["id"] for c in charts) == sorted(figures)
    assert {"fig-per-class", "fig-flow-0", "fig-flow-1", "fig-compare", "fig-training-curves"} <= set(figures)
    tables = {a["id"] for a in parsed.all("table") if "id" in a}
    for chart in charts:
        assert chart["data-table-id"] in tables, chart["id"]

    # Every figure is drawn as inline SVG (no charting library), and the page's own scripts
    # are the known ones: two JSON blocks, the table sorter and the render stamp.
    assert page.count("<svg ") == len(figures)
    assert [s["attrs"].get("id") for s in parsed.scripts] == ["results-data", "baseline-data", "report-js",
                                                              "robaudit-render"]

    # The embedded JSON is the results, exactly.
    assert json.loads(parsed.script("results-data")["text"]) == after
    assert json.loads(parsed.script("baseline-data")["text"]) == before

    # Sections in the order the issues ask for: a comparison opens with the before/after (issue 15).
    order = ["comparison", "verdict", "checks", "per-class", "target-flow", "examples", "provenance"]
    positions = [page.index(f'<section id="{section}"') for section in order]
    assert positions == sorted(positions)


def test_single_report_has_no_comparison_section(single_page):
    results, page = single_page
    parsed = parse((page))
    assert "comparison" not in parsed.ids and "baseline-data" not in parsed.ids
    assert json.loads(parsed.script("results-data")["text"]) == results


def test_tables_are_in_the_html_for_readers_without_javascript(single_page):
    results, page = single_page
    body = (page)
    for name in results["dataset"]["classes"]:
        assert f'data-sort="{name}">{name}' in body
    # Charts need no script either: they are drawn as inline SVG at render time.
    assert "<noscript>" not in body and body.count("<svg ") == len(build_context(results)["figures"])


def test_hostile_strings_render_only_as_text():
    results = make_results(classes=("airplane", XSS_CLASS, "bird"), training=True,
                           model_path="/tmp/<script>alert(2)</script>/model.pt")
    results["checks"][0]["message"] = "</script><script>alert(3)</script>"
    results["examples"][0]["adv_pred"] = '"><img src=y onerror=alert(4)>'
    results["command"] += " --note '<b onmouseover=alert(5)>'"
    page = render_html(results, baseline=make_results(classes=("airplane", XSS_CLASS, "bird"), seed=1),
                       rendered_at=RENDERED_AT)
    body = (page)
    for raw in ("<img src=x", "<img src=y", "<script>alert", "<b onmouseover"):
        assert raw not in body
    assert html.escape(XSS_CLASS, quote=False) in body

    parsed = parse(page)
    assert not [a for a in parsed.all("img") if not a.get("src", "").startswith("data:image/png;base64,")]
    assert not [(tag, a) for tag, a in parsed.elements if any(key.startswith("on") for key in a)]
    assert len(parsed.scripts) == 4  # nothing injected a script element (3 + the render stamp)
    # The script-embedded JSON keeps the exact strings, and plotly labels are entity-escaped
    # (plotly.js reads a small HTML subset in labels and decodes entities back to text).
    assert json.loads(parsed.script("results-data")["text"])["dataset"]["classes"][1] == XSS_CLASS
    figures = build_context(results)["figures"]
    assert html.escape(XSS_CLASS, quote=False) in figures["fig-per-class"]["layout"]["xaxis"]["categoryarray"]
    assert XSS_CLASS not in json.dumps(figures)
    # In the drawn SVG the class name is XML-escaped text.
    svg = body[body.index('<figure class="chart" id="fig-per-class"'):]
    assert html.escape(XSS_CLASS, quote=False) in svg[:svg.index("</figure>")]


def test_non_finite_numbers_become_null_not_invalid_json():
    results = make_results()
    results["attacks"]["pgd"]["nsd"] = math.nan
    results["attacks"]["pgd"]["seconds"] = math.inf
    parsed = parse(render_html(results, rendered_at=RENDERED_AT))
    text = parsed.script("results-data")["text"]
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["attacks"]["pgd"]["nsd"] is None


def _clean_only():
    return make_results(attacks=(), ensemble=False, checks=False)


def _black_box_without_ensemble():
    results = make_results(attacks=("square",), ensemble=False)
    results["model"]["white_box"] = False
    results["examples"] = []
    return results


def _training_without_baseline():
    results = make_results(training=True)
    results["training"]["temperatures"] = None
    results["training"]["class_weights"] = [[1.0, 2.0, 0.5]] * 3
    return results


def _empty_class():
    results = make_results(classes=("a", "b", "c"))
    for block in list(results["attacks"].values()) + [results["ensemble"]]:
        block["per_class"][1].update({"n": 0, "correct": 0, "accuracy": None, "ci95": [None, None]})
    return results


@pytest.mark.parametrize("variant", [_clean_only, _black_box_without_ensemble, _training_without_baseline,
                                     _empty_class])
def test_unusual_results_still_render(variant):
    results = variant()
    parsed = parse((render_html(results, rendered_at=RENDERED_AT)))
    assert json.loads(parsed.script("results-data")["text"]) == json.loads(json.dumps(results))
    charts = [a for a in parsed.all("div") if "chart" in a.get("class", "").split()]
    tables = {a["id"] for a in parsed.all("table") if "id" in a}
    assert all(chart["data-table-id"] in tables for chart in charts)


def test_black_box_only_scans_say_so():
    page = (render_html(_black_box_without_ensemble(), rendered_at=RENDERED_AT))
    assert "Black-box attacks only." in page


def test_clean_only_results_do_not_claim_robustness():
    verdict = build_context(_clean_only())["verdict"]
    assert "no attack ran" in verdict["summary"]
    assert "robust" not in verdict["significance"]["explanation"]


def test_training_alone_gets_its_own_section():
    context = build_context(_training_without_baseline())
    assert context["comparison"] is None
    assert ("comparison", "Remediation training") in [(n["id"], n["label"]) for n in context["nav"]]
    assert [t["key"] for t in context["training"]["trajectories"]] == ["class_weights"]


def test_cifar10_size_report_stays_under_6_mb(tmp_path):
    results = cifar10_scale_results()
    assert len(results["examples"]) == 30 and len(results["attacks"]) == 6  # clean + 5 attacks
    path = render_report(results, tmp_path / "report.html", rendered_at=RENDERED_AT)
    assert path.stat().st_size < 6 * 1024 * 1024


def test_render_report_writes_atomically_and_returns_the_path(tmp_path):
    out = tmp_path / "sub" / "report.html"
    assert render_report(make_results(), out) == out
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    render_report(make_results(seed=3), out)  # replaces an existing report
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html"]  # no temporary left behind
    with pytest.raises(UserError, match="is a directory"):
        render_report(make_results(), tmp_path)


def test_render_report_stamps_the_current_time_by_default(tmp_path):
    page = render_report(make_results(), tmp_path / "r.html").read_text(encoding="utf-8")
    stamp = re.search(r'<span data-volatile="rendered-at">([^<]+)</span>', page).group(1)
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$", stamp)


def test_fixture_pngs_are_real_pngs():
    import base64

    assert base64.b64decode(tiny_png(4, 4, 0)).startswith(b"\x89PNG\r\n\x1a\n")
