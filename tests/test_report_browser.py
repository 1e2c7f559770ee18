"""The report in a real browser: headless Chromium opens the file from disk, offline.

Needs the Debian packages `chromium` and `chromium-driver` (/usr/bin/chromium,
/usr/bin/chromedriver) and selenium; skips with the reason when they are missing.
Screenshots land in pytest's tmp_path (printed in the failure message if a check fails).
"""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from report_fixtures import XSS_CLASS, make_results
from robaudit.audit.report.render import render_report

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

pytestmark = pytest.mark.browser

# Without these Chromium phones home (updates, sync, field trials, QUIC probes).
OFFLINE_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1400,1000",
    # Belt and braces: any host name fails to resolve, so nothing can leave the machine.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost",
]


def _chrome(javascript: bool = True):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip("Chromium not installed: apt-get install chromium chromium-driver "
                    "(needs /usr/bin/chromium and /usr/bin/chromedriver)")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="robaudit-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in OFFLINE_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    if not javascript:
        options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    # Offline at the network layer too: any request other than file:/data: fails.
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.emulateNetworkConditions",
                           {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
    return driver, profile


@pytest.fixture
def chrome():
    driver, profile = _chrome()
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _full_page_screenshot(driver, path: Path) -> None:
    # Grow the window to the page, then shoot the whole of it.
    width = driver.execute_script("return window.outerWidth")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, height + 200)
    time.sleep(0.5)
    driver.save_screenshot(str(path))


def _requested_urls(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def _wait_for_figures(driver) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 60).until(
        lambda d: d.execute_script("return document.querySelectorAll('.chart svg').length > 0 && "
                                   "Array.from(document.querySelectorAll('.chart')).every("
                                   "c => c.querySelector('svg.figure-svg').getBoundingClientRect().height > 50)"))


def test_report_renders_offline_without_console_errors(chrome, tmp_path):
    results = make_results(classes=("airplane", XSS_CLASS, "bird", "cat"), attacks=("fgsm", "pgd"),
                           training=True, image_size=32, examples_per_class=2)
    baseline = make_results(classes=("airplane", XSS_CLASS, "bird", "cat"), attacks=("fgsm", "pgd"),
                            seed=1, strength=0.7)
    report = render_report(results, tmp_path / "report.html", baseline=baseline)

    _requested_urls(chrome)  # drain what the start-up tab fetched; only the report's requests count
    chrome.get(report.resolve().as_uri())
    _wait_for_figures(chrome)
    screenshot = tmp_path / "report.png"
    _full_page_screenshot(chrome, screenshot)

    severe = [entry for entry in chrome.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == [], f"console errors (screenshot: {screenshot}): {severe}"

    chart_ids = chrome.execute_script("return Array.from(document.querySelectorAll('.chart')).map(c => c.id)")
    assert "fig-per-class" in chart_ids and "fig-compare" in chart_ids and "fig-training-curves" in chart_ids
    drawn = chrome.execute_script(
        "return Array.from(document.querySelectorAll('.chart')).filter(c => c.querySelector('svg.figure-svg')).length")
    assert drawn == len(chart_ids), f"only {drawn} of {len(chart_ids)} figures drew (screenshot: {screenshot})"
    bars = chrome.execute_script("return document.querySelectorAll('#fig-per-class svg g > rect').length")
    assert bars >= 4 * 3, "per-class chart drew no bars"   # 4 classes x (clean, fgsm, pgd) at least

    # The hostile class name is text on the page and in the chart, never an element.
    assert chrome.execute_script("return document.querySelectorAll('img[src=\"x\"], img[onerror]').length") == 0
    assert XSS_CLASS in chrome.find_element("css selector", "#table-per-class").text
    assert XSS_CLASS in chrome.execute_script("return document.getElementById('fig-per-class').textContent")

    # The print stylesheet lays the report out on paper without errors.
    pdf = chrome.execute_cdp_cmd("Page.printToPDF", {"printBackground": True})
    assert base64.b64decode(pdf["data"]).startswith(b"%PDF")
    (tmp_path / "report.pdf").write_bytes(base64.b64decode(pdf["data"]))

    # Nothing but the file itself and its inline data: images was requested
    # (chrome: URLs are the browser's own pages, not the network).
    external = [url for url in _requested_urls(chrome) if not url.startswith(("file:", "data:", "blob:", "chrome:"))]
    assert external == [], f"the report tried to reach the network: {external}"


def test_sorting_reorders_the_per_class_table(chrome, tmp_path):
    report = render_report(make_results(classes=("zebra", "ant", "moth", "bee")), tmp_path / "report.html")
    chrome.get(report.resolve().as_uri())
    _wait_for_figures(chrome)

    def classes_in_table():
        return chrome.execute_script(
            "return Array.from(document.querySelectorAll('#table-per-class tbody th')).map(th => th.dataset.sort)")

    before = classes_in_table()
    chrome.find_element("css selector", "#table-per-class thead th:nth-child(2) button").click()
    assert classes_in_table() == sorted(before)
    chrome.find_element("css selector", "#table-per-class thead th:nth-child(2) button").click()
    assert classes_in_table() == sorted(before, reverse=True)
    assert chrome.find_element("css selector", "#table-per-class thead th:nth-child(2)").get_attribute(
        "aria-sort") == "descending"


def test_tables_read_without_javascript(tmp_path):
    driver, profile = _chrome(javascript=False)
    try:
        results = make_results()
        report = render_report(results, tmp_path / "report.html")
        driver.get(report.resolve().as_uri())
        rows = driver.find_elements("css selector", "#table-per-class tbody tr")
        assert len(rows) == len(results["dataset"]["classes"])
        assert rows[0].find_element("css selector", "th").text.endswith("▲ worst")
        # The charts are static SVG: drawn in full with scripts off.
        height = driver.execute_script(
            "return document.querySelector('#fig-per-class svg').getBoundingClientRect().height")
        assert height > 200
        assert len(driver.find_elements("css selector", "#fig-per-class svg g > rect")) >= 3 * 3
        _full_page_screenshot(driver, tmp_path / "report-nojs.png")
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
