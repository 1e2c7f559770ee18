"""Issue 25's page rules in a real browser (headless Chromium, offline) and on the bytes:
the first screen at 1280x800 holds the summary, nothing scrolls sideways at 1280 px, the A4
print keeps the whole headline table on page 1, the page works with JavaScript off, no URL
appears anywhere in the file, and pages stay small (10 and 1000 classes).

Browser parts skip when Chromium/selenium are missing (see test_report_browser.py); the
print check also needs pypdf (the `test` extra) to read the PDF's text.
"""

from __future__ import annotations

import base64
import io
import re
import os
import shutil
from pathlib import Path

import pytest

from report_fixtures import CIFAR10_CLASSES, XSS_CLASS, make_results
from robaudit.audit.report.render import render_html, render_nway_html, render_report
from test_report import RENDERED_AT

MB = 1024 * 1024
URL = re.compile(r"(https?|ftp|wss?)://|//[a-z0-9-]+\.[a-z]{2,}", re.I)


def _pages(tmp_path) -> dict:
    """The three page kinds at CIFAR-10 size, written to disk: single (with gates), compare, N-way."""
    from test_report_nway import _audit

    classes = list(CIFAR10_CLASSES)
    classes[3] = "a-rather-long-class-name-that-could-push-tables-sideways"
    before = make_results(classes=classes, attacks=("fgsm", "pgd", "cw", "tpgd"), seed=1, strength=0.6,
                          examples_per_class=2, image_size=32)
    after = make_results(classes=classes, attacks=("fgsm", "pgd", "cw", "tpgd"), seed=2, training=True,
                         examples_per_class=2, image_size=32)
    pages = {
        "single": render_html(before, rendered_at=RENDERED_AT, gates={"fail_under_worst": 0.2}),
        "compare": render_html(after, baseline=before, rendered_at=RENDERED_AT),
    }
    nway_dir = tmp_path / "nway"
    nway_dir.mkdir()
    pages["nway"] = render_nway_html([_audit(nway_dir, "teacher", 1, 0.6), _audit(nway_dir, "absld", 2, 1.4, "absld"),
                                      _audit(nway_dir, "rslad", 3, 1.0, "rslad")], rendered_at=RENDERED_AT)
    files = {}
    for name, page in pages.items():
        files[name] = tmp_path / f"{name}.html"
        files[name].write_text(page, encoding="utf-8")
    return {**files, **_demo_pages()}


def _demo_pages() -> dict:
    """With ROBAUDIT_DEMO_OUT=<robaudit demo --out folder>, the demo's own four pages are checked too
    (the demo takes minutes, so the suite does not run it)."""
    folder = os.environ.get("ROBAUDIT_DEMO_OUT")
    if not folder:
        return {}
    root = Path(folder)
    pages = {"demo-single": root / "report.html", "demo-compare": root / "remediate" / "report.html",
             "demo-compare-rslad": root / "remediate-rslad" / "report.html", "demo-nway": root / "comparison.html"}
    missing = [str(p) for p in pages.values() if not p.is_file()]
    assert not missing, f"ROBAUDIT_DEMO_OUT lacks {missing}"
    return pages


HEADLINE_TABLE = {"single": "table-attacks", "compare": "table-compare-summary", "nway": "table-leaderboard",
                  "demo-single": "table-attacks", "demo-compare": "table-compare-summary",
                  "demo-compare-rslad": "table-compare-summary", "demo-nway": "table-leaderboard"}


# --------------------------------------------------------------------------- bytes


def test_no_url_anywhere_in_any_page_and_ten_classes_stay_under_1_5_mb(tmp_path):
    for name, path in _pages(tmp_path).items():
        data = path.read_bytes()
        assert len(data) < 1.5 * MB, (name, len(data))
        match = URL.search(data.decode("utf-8"))
        assert match is None, (name, data[max(0, match.start() - 80):match.end() + 80])


def test_url_rule_catches_a_url():
    # the rule above must be able to fail: a bundled map-tile host is found
    assert URL.search('var t="https://a.tile.openstreetmap.org/{z}"') and URL.search("src=//cdn.example.com/x.js")


def test_thousand_classes_stay_bounded():
    classes = [f"class{i:04d}" for i in range(1000)]
    classes[7] = XSS_CLASS
    page = render_html(make_results(classes=classes, attacks=("fgsm", "pgd"), n_per_class=5, examples_per_class=1),
                       rendered_at=RENDERED_AT)
    assert len(page.encode("utf-8")) < 5 * MB and URL.search(page) is None


# --------------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def chrome():
    from test_report_browser import _chrome

    driver, profile = _chrome()
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _bottom(driver, element_id: str) -> float:
    return driver.execute_script(f"return document.getElementById('{element_id}').getBoundingClientRect().bottom"
                                 " + window.scrollY")


@pytest.mark.browser
def test_first_screen_and_no_sideways_scroll_at_1280(chrome, tmp_path):
    files = _pages(tmp_path)
    chrome.set_window_size(1280, 800)
    for name, path in files.items():
        chrome.get(path.resolve().as_uri())
        inner = chrome.execute_script("return window.innerHeight")
        client = chrome.execute_script("return document.documentElement.clientWidth")
        scroll = chrome.execute_script("return document.documentElement.scrollWidth")
        assert scroll <= client, f"{name}: page is {scroll} px wide in a {client} px window"
        clipped = chrome.execute_script(
            "return Array.from(document.querySelectorAll('.table-wrap')).filter("
            "w => w.scrollWidth > w.clientWidth + 1).map(w => w.querySelector('table').id)")
        assert clipped == [], f"{name}: tables wider than their box: {clipped}"
        first_screen = (["summary-verdict", "summary-worst", "results-digest", "summary-identity"]
                        if not name.endswith("nway") else ["summary-verdict", HEADLINE_TABLE["nway"]])
        if name == "single":
            first_screen.append("summary-policy")
        for element_id in first_screen:
            assert _bottom(chrome, element_id) <= inner, f"{name}: #{element_id} is below the first screen"


@pytest.mark.browser
def test_a4_print_keeps_the_headline_table_on_page_one(chrome, tmp_path):
    pypdf = pytest.importorskip("pypdf", reason="pypdf reads the printed text (pip install pypdf)")
    for name, path in _pages(tmp_path).items():
        chrome.get(path.resolve().as_uri())
        last_row = chrome.execute_script(
            f"var rows = document.querySelectorAll('#{HEADLINE_TABLE[name]} tbody tr');"
            "return rows[rows.length - 1].querySelector('th').childNodes[0].textContent.trim()")
        pdf = chrome.execute_cdp_cmd("Page.printToPDF", {"paperWidth": 8.27, "paperHeight": 11.69,
                                                         "preferCSSPageSize": True, "printBackground": True})
        reader = pypdf.PdfReader(io.BytesIO(base64.b64decode(pdf["data"])))
        # Compared without whitespace: the PDF's text breaks lines wherever the table cells wrap.
        first = re.sub(r"\s+", "", reader.pages[0].extract_text())
        caption = chrome.execute_script(
            f"return document.querySelector('#{HEADLINE_TABLE[name]} caption').textContent.trim()")
        assert re.sub(r"\s+", "", caption)[:30] in first, f"{name}: the headline table does not start on page 1"
        assert re.sub(r"\s+", "", last_row) in first, \
            f"{name}: page 1 ends before the headline table's last row ({last_row})"
        # Nothing is cut sideways on paper: every page's text fits (pypdf sees no clipped page box).
        assert len(reader.pages) >= 2


@pytest.mark.browser
def test_javascript_off_draws_every_chart(tmp_path):
    from test_report_browser import _chrome

    driver, profile = _chrome(javascript=False)
    try:
        for name, path in _pages(tmp_path).items():
            driver.get(path.resolve().as_uri())
            assert driver.execute_script("return typeof document.querySelector('button.sort-button')") == "object"
            heights = driver.execute_script("return Array.from(document.querySelectorAll('.chart svg'))"
                                            ".map(s => s.getBoundingClientRect().height)")
            assert heights and min(heights) > 100, (name, heights)
            assert not driver.find_elements("css selector", "button.sort-button")   # the script did not run
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
