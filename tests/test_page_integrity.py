"""`check_page(report.html)`: a page is what robaudit renders from its embedded results, or it fails.

Edits are made the way a forger would make them: one digit of a visible table cell, the
embedded JSON alone, the digest alone, a consistent re-render from edited results that keeps
the old digest. The redacted, trimmed (curve bounds left out) and comparison pages, which
embed something other than the results.json as written, are checked too.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from report_fixtures import make_results, set_accuracy
from robaudit.audit.integrity import results_digest
from robaudit.audit.paired import PairedOutcomes
from robaudit.audit.report import curves as report_curves
from robaudit.audit.report.integrity import STAMP_ID, check_page, inspect_page
from robaudit.audit.report.render import render_html, render_report
from robaudit.audit.results_schema import results_json_text
from robaudit.errors import UserError
from test_report_curves import add_curves

RENDERED_AT = "2026-12-07T12:00:00+00:00"


def write_results(path, results):
    path.write_text(results_json_text(results), encoding="utf-8")
    return path


def stamp_of(page: str) -> dict:
    match = re.search(rf'<script type="application/json" id="{STAMP_ID}">(.*?)</script>', page)
    return json.loads(match.group(1))


def edit_visible_percentage(page: str) -> str:
    """One digit of the first percentage in a table cell, outside every script."""
    match = re.search(r"<td[^>]*>\s*(\d+)\.(\d)%", page)
    assert match, "no percentage in a table cell"
    at = match.start(2)
    digit = "1" if page[at] != "1" else "2"
    return page[:at] + digit + page[at + 1:]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    folder = tmp_path_factory.mktemp("single")
    results = make_results()
    results_path = write_results(folder / "results.json", results)
    page_path = render_report(results, folder / "report.html", rendered_at=RENDERED_AT)
    return results, results_path, page_path, page_path.read_text(encoding="utf-8")


def test_an_untouched_page_passes_and_names_the_results_digest(single):
    results, results_path, page_path, page = single
    check = inspect_page(page_path)
    assert check.problems == [] and check.notes == []
    assert check.results_digest == results_digest(results) == __import__("hashlib").sha256(
        results_path.read_bytes()).hexdigest()
    assert check_page(page_path, results_path=results_path) == []


def test_one_edited_digit_in_a_table_cell_fails(single, tmp_path):
    *_, page = single
    edited = tmp_path / "report.html"
    edited.write_text(edit_visible_percentage(page), encoding="utf-8")
    problems = check_page(edited)
    assert len(problems) == 1 and "not what robaudit renders" in problems[0] and "line" in problems[0]


def test_edited_embedded_json_alone_fails(single, tmp_path):
    results, _, _, page = single
    forged = json.loads(json.dumps(results))
    set_accuracy(forged, "pgd", forged["dataset"]["classes"][0], 20)
    match = re.search(r'(<script type="application/json" id="results-data">)(.*?)(</script>)', page, re.S)
    from robaudit.audit.report.formatting import script_json

    edited = tmp_path / "report.html"
    edited.write_text(page[:match.start(2)] + script_json(forged) + page[match.end(2):], encoding="utf-8")
    problems = check_page(edited)
    assert len(problems) == 1 and "embedded results have sha256" in problems[0]


def test_edited_digest_alone_fails(single, tmp_path):
    results, _, _, page = single
    digest = results_digest(results)
    assert page.count(digest) >= 1
    forged_digest = ("0" if digest[0] != "0" else "1") + digest[1:]
    for occurrence in range(page.count(digest)):     # every place the page shows it
        at = [m.start() for m in re.finditer(digest, page)][occurrence]
        edited = tmp_path / f"report-{occurrence}.html"
        edited.write_text(page[:at] + forged_digest + page[at + len(digest):], encoding="utf-8")
        assert check_page(edited), occurrence


def test_a_consistent_rerender_of_edited_results_keeping_the_old_digest_fails(single, tmp_path):
    results, results_path, _, _ = single
    forged = json.loads(json.dumps(results))
    set_accuracy(forged, "pgd", forged["dataset"]["classes"][0], 20)
    page = render_html(forged, rendered_at=RENDERED_AT, digests=(results_digest(results), None))
    edited = tmp_path / "report.html"
    edited.write_text(page, encoding="utf-8")
    assert any("embedded results have sha256" in p for p in check_page(edited))
    # and a page honestly rendered from the forged results names their digest, not the file's
    honest = render_report(forged, tmp_path / "honest.html", rendered_at=RENDERED_AT)
    assert check_page(honest) == []
    assert any("has sha256" in p for p in check_page(honest, results_path=results_path))


def test_removed_stamp_and_bad_input(single, tmp_path):
    *_, page = single
    stripped = tmp_path / "stripped.html"
    stripped.write_text(re.sub(rf'<script type="application/json" id="{STAMP_ID}">.*?</script>\n', "", page),
                        encoding="utf-8")
    assert any("no render stamp" in p for p in check_page(stripped))
    doubled = tmp_path / "doubled.html"
    stamp = re.search(rf'<script type="application/json" id="{STAMP_ID}">.*?</script>\n', page).group(0)
    doubled.write_text(page.replace("</body>", stamp + "</body>"), encoding="utf-8")
    assert any("2 script elements" in p for p in check_page(doubled))
    with pytest.raises(UserError, match="no report file"):
        check_page(tmp_path / "missing.html")
    (tmp_path / "other.html").write_text("<html><body>hello</body></html>")
    with pytest.raises(UserError, match="no embedded results"):
        check_page(tmp_path / "other.html")


def test_a_page_from_another_renderer_is_refused_not_failed(single, tmp_path):
    *_, page = single
    stamp = stamp_of(page)
    other = dict(stamp, renderer=dict(stamp["renderer"], robaudit="0.0.1"))
    from robaudit.audit.report.formatting import script_json

    edited = tmp_path / "report.html"
    edited.write_text(page.replace(script_json(stamp), script_json(other)), encoding="utf-8")
    with pytest.raises(UserError, match="rendered by robaudit 0.0.1"):
        check_page(edited)


def test_redacted_page_checks_its_rendering_and_the_digest_when_given_the_results(tmp_path):
    results = make_results()
    results_path = write_results(tmp_path / "results.json", results)
    page_path = render_report(results, tmp_path / "report.html", redact_paths=True, rendered_at=RENDERED_AT)
    page = page_path.read_text(encoding="utf-8")
    assert "/home/alice" not in page
    assert stamp_of(page)["results_digest"] == results_digest(results)   # of the results as given
    alone = inspect_page(page_path)
    assert alone.problems == [] and len(alone.notes) == 1 and "--redact-paths" in alone.notes[0]
    given = inspect_page(page_path, results_path=results_path)
    assert given.problems == [] and given.notes == []
    other = write_results(tmp_path / "other.json", make_results(seed=5))
    assert any("has sha256" in p for p in check_page(page_path, results_path=other))
    page_path.write_text(edit_visible_percentage(page), encoding="utf-8")
    assert check_page(page_path) and check_page(page_path, results_path=results_path)


def test_trimmed_page_needs_its_results_json(tmp_path, monkeypatch):
    monkeypatch.setattr(report_curves, "EMBEDDED_CURVES_BUDGET", 1_000)    # trim these small curves
    results = make_results()
    add_curves(results)
    results_path = write_results(tmp_path / "results.json", results)
    page_path = render_report(results, tmp_path / "report.html", rendered_at=RENDERED_AT)
    page = page_path.read_text(encoding="utf-8")
    assert stamp_of(page)["embedded"]["results"] == {"as_given": False, "curve_bounds_left_out": True}
    with pytest.raises(UserError, match="without the curves' 95% bounds.*pass the results.json"):
        check_page(page_path)
    assert check_page(page_path, results_path=results_path) == []
    page_path.write_text(edit_visible_percentage(page), encoding="utf-8")
    assert check_page(page_path, results_path=results_path)


def test_comparison_page_with_paired_tests(tmp_path):
    before, after = make_results(seed=1), make_results(seed=2, strength=1.5)
    rng = np.random.default_rng(0)
    n = 60
    outcomes = PairedOutcomes(y=np.repeat(np.arange(3), n // 3), before=rng.random(n) < 0.4,
                              after=rng.random(n) < 0.6)
    page_path = render_report(after, tmp_path / "comparison.html", baseline=before, paired=(outcomes, ""),
                              rendered_at=RENDERED_AT)
    page = page_path.read_text(encoding="utf-8")
    assert "McNemar" in page
    check = inspect_page(page_path)
    assert check.problems == [] and check.baseline_digest == results_digest(before)
    before_path = write_results(tmp_path / "before.json", before)
    assert check_page(page_path, baseline_path=before_path) == []

    stamp = stamp_of(page)   # flip one image's "after" outcome: the paired tests change
    from robaudit.audit.report.formatting import script_json
    import base64

    bits = bytearray(base64.b64decode(stamp["paired"]["outcomes"]["after"]))
    bits[0] ^= 0x80
    forged = json.loads(json.dumps(stamp))
    forged["paired"]["outcomes"]["after"] = base64.b64encode(bytes(bits)).decode("ascii")
    page_path.write_text(page.replace(script_json(stamp), script_json(forged)), encoding="utf-8")
    assert check_page(page_path)
    hostile = json.loads(json.dumps(stamp))   # the page is untrusted input: no object arrays from it
    hostile["paired"]["outcomes"]["y_dtype"] = "|O"
    page_path.write_text(page.replace(script_json(stamp), script_json(hostile)), encoding="utf-8")
    assert any("paired outcomes are malformed" in p for p in check_page(page_path))
    page_path.write_text(edit_visible_percentage(page), encoding="utf-8")
    assert check_page(page_path)


def test_redacted_comparison_without_paired_tests_hides_the_samples_path(tmp_path):
    before, after = make_results(seed=1), make_results(seed=2, strength=1.5)
    why = "/home/alice/audits/before/samples.npz cannot be read for this comparison"
    page_path = render_report(after, tmp_path / "comparison.html", baseline=before, paired=(None, why),
                              redact_paths=True, rendered_at=RENDERED_AT)
    page = page_path.read_text(encoding="utf-8")
    assert "/home/alice" not in page and "samples.npz cannot be read" in page
    check = inspect_page(page_path)
    assert check.problems == [] and len(check.notes) == 2     # neither digest recomputable from the page
