"""Render a cohort report in headless Chromium and check the screenshot, as a user would see the page.

CI has no Chromium, so this is a script, not a test (the tests check the HTML's structure):

    apt-get install -y chromium
    ibix cohort manifest.csv --model M.onnx --mapping forward -o DIR
    .venv/bin/python Testing/screenshot_report.py DIR/report.html report.png

It fails (exit 1) when Chromium writes no PNG or the page renders blank, and prints the screenshot's size and the
share of non-white pixels.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def screenshot(report: Path, png: Path, width: int, height: int) -> Path:
    """Render ``report`` with headless Chromium into ``png`` (a width x height window)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise SystemExit("no Chromium found: install it (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={png.resolve()}",
                        f"--window-size={width},{height}", report.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="the report.html to render")
    parser.add_argument("png", type=Path, help="where to write the screenshot")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=2600)
    args = parser.parse_args(argv)
    if not args.report.is_file():
        print(f"{args.report}: no such report", file=sys.stderr)
        return 1
    screenshot(args.report, args.png, args.width, args.height)
    if not args.png.is_file():
        print("Chromium wrote no screenshot", file=sys.stderr)
        return 1
    pixels = np.asarray(Image.open(args.png).convert("L"))
    inked = float(np.mean(pixels < 245))
    print(f"{args.png}: {pixels.shape[1]} x {pixels.shape[0]} pixels, {inked:.1%} not white")
    return 0 if inked > 0.02 else 1


if __name__ == "__main__":
    sys.exit(main())
