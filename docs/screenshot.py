"""A full-page PNG of a report.html, for putting a picture of a real report into docs/.

    python docs/screenshot.py out/eval/report.html docs/report.png [--width 1280] [--max-height 2400]

Uses headless chromium and the chromedriver on PATH (Debian: apt-get install chromium chromium-driver),
through selenium (the dev extras). Japanese text needs a CJK font on the machine that takes the picture
(Debian: fonts-ipafont-gothic, fonts-noto-color-emoji for emoji), or it is drawn as empty boxes.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service


def screenshot(report: Path, out: Path, width: int = 1280, max_height: int | None = None) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not chromium or not chromedriver:
        raise SystemExit("needs chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars", f"--window-size={width},900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        driver.get(report.resolve().as_uri())
        height = driver.execute_script("return document.documentElement.scrollHeight")
        if max_height:
            height = min(height, max_height)  # the top of a long report: summary, distances, the first plots
        # a viewport as tall as the page: one capture, no stitching, sticky boxes drawn once
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        out.write_bytes(driver.get_screenshot_as_png())
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="report.html")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--width", type=int, default=1280, help="page width in CSS pixels (default 1280)")
    parser.add_argument("--max-height", type=int, default=None, help="keep only the top of the page (CSS pixels)")
    args = parser.parse_args()
    screenshot(args.report, args.out, args.width, args.max_height)


if __name__ == "__main__":
    main()
