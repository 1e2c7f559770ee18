"""The README's report pictures, taken from a `robaudit demo` folder in headless Chromium.

    python benchmarks/report_screenshots.py robaudit-demo --out docs

Writes report-{single,compare,nway}-1280.png (the first screen at 1280x800) and
report-{single,compare}-print-a4.png (the print stylesheet at A4 width, 794 px: what page 1
of the print holds). Needs chromium + chromedriver (setup.sh installs them as root).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service

PAGES = {"single": "report.html", "compare": "remediate/report.html", "nway": "comparison.html"}
PRINTED = ("single", "compare")
A4_CSS_PX = (794, 1123)   # 210 x 297 mm at 96 px per inch


def driver() -> webdriver.Chrome:
    options = Options()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium") or ""
    # the installed driver: Selenium Manager would otherwise look for one on the network
    return webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    chrome = driver()
    try:
        for name, page in PAGES.items():
            url = (args.demo_dir / page).resolve().as_uri()
            chrome.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": "screen"})
            chrome.set_window_size(1280, 800)
            chrome.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                   {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})
            chrome.get(url)
            chrome.save_screenshot(str(args.out / f"report-{name}-1280.png"))
            if name in PRINTED:
                width, height = A4_CSS_PX
                chrome.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                       {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
                chrome.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": "print"})
                chrome.get(url)
                chrome.save_screenshot(str(args.out / f"report-{name}-print-a4.png"))
            print(f"{name}: {url}")
    finally:
        chrome.quit()


if __name__ == "__main__":
    main()
