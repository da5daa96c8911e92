"""ibix web: the page in a real browser (Playwright driving Debian's chromium), its files and its token.

The browser test starts ``ibix web --demo`` (the T1 demo: model checked, output generated), paints an input mask
with mouse drags, runs forward, and checks the Output view's frame: overlay colours where F (the map the page wrote
for download) is non-zero on the shown slice and nowhere else; then paints an output mask and runs backward. It
prints the time from the click on *Run forward* to the overlay in the browser beside the engine's own time.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest_slicer import MODULE_DIR  # noqa: F401  (puts the module folder on the path)

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run"]
TOKEN = "test-token-0123456789"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """``ibix web --demo`` in its own process (ended with the tests), its URL and output folder."""
    pytest.importorskip("trame_slicer")
    pytest.importorskip("onnxruntime")
    output = tmp_path_factory.mktemp("web-output")
    port = _free_port()
    log = open(output.parent / "web.log", "w+")
    process = subprocess.Popen([str(Path(sys.executable).parent / "ibix"), "web", "--demo", "--port", str(port),
                                "--output", str(output), "--token", TOKEN, "--quiet"],
                               stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/index.html?token={TOKEN}"
    try:
        end = time.time() + 120
        while time.time() < end and "IBIX page:" not in Path(log.name).read_text():
            assert process.poll() is None, Path(log.name).read_text()[-3000:]
            time.sleep(0.2)
        yield dict(url=url, port=port, output=output, process=process)
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def test_every_request_needs_the_token(web):
    base = f"http://127.0.0.1:{web['port']}"
    status, text = _get(f"{base}/index.html")
    assert status == 403 and "start your own page" in text
    assert _get(f"{base}/index.html?token=wrong")[0] == 403
    assert _get(web["url"])[0] == 200
    assert _get(f"{base}/ibix-download/x.nrrd")[0] == 403  # downloads too
    status, _ = _get(f"{base}/ibix-download/..%2F..%2Fetc%2Fpasswd?token={TOKEN}")
    assert status == 404


def test_the_server_listens_on_loopback_only(web):
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout if shutil.which("ss") else ""
    lines = [line for line in out.splitlines() if f":{web['port']} " in line]
    if not lines:
        pytest.skip("ss is not available to list listening sockets")
    assert all("127.0.0.1:" in line for line in lines), lines


# ------------------------------------------------------------------------------------------------------------------
# The browser
# ------------------------------------------------------------------------------------------------------------------

def _frame(page, view):
    """The RGB frame of a view as the browser shows it (rows top to bottom)."""
    from PIL import Image

    element = page.locator(f"#views .layout-grid-item >> nth={0 if view == 'Input' else 1}")
    return np.asarray(Image.open(io.BytesIO(element.screenshot())).convert("RGB")).astype(int)


def _coloured(rgb):
    """Pixels with a colour (the grey volumes have none; JPEG noise stays well below this)."""
    return (rgb.max(axis=2) - rgb.min(axis=2)) > 30


def _drag(page, view, points):
    box = page.locator(f"#views .layout-grid-item >> nth={0 if view == 'Input' else 1}").bounding_box()
    page.mouse.move(box["x"] + points[0][0] * box["width"], box["y"] + points[0][1] * box["height"])
    page.mouse.down()
    for fx, fy in points[1:]:
        page.mouse.move(box["x"] + fx * box["width"], box["y"] + fy * box["height"], steps=8)
    page.mouse.up()


def _wait_status(page, text, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        status = page.inner_text("#status")
        if text in status:
            return status
        time.sleep(0.05)
    raise AssertionError(f"status never said {text!r}: {page.inner_text('#status')!r}")


def _expected(web, kind, geometry_state, shape):
    """On each pixel of a view's frame, from the map file the page wrote and the view's XY-to-RAS matrix: where
    the map is at least the display threshold (5 % of its maximum), where it is clearly coloured (at least 35 %:
    the colour maps start near black), and a 3-pixel margin around the thresholded region (resampling, JPEG)."""
    import IBIXLogic as ibx

    path = sorted((web["output"] / "results").glob(f"*-{kind}.nrrd"))[-1]
    array, geometry = ibx.read_volume(str(path))
    h, w = shape
    xy_to_ras = np.array(geometry_state["xy_to_ras"]).reshape(4, 4)
    y, x = np.mgrid[0:h, 0:w]
    xy = np.stack([x.ravel() + 0.5, (h - 1 - y.ravel()) + 0.5, np.zeros(x.size), np.ones(x.size)])
    ras = (xy_to_ras @ xy)[:3]
    lps = ras * np.array([[-1], [-1], [1]])
    direction = np.asarray(geometry.direction, float).reshape(3, 3)
    ijk = np.linalg.solve(direction @ np.diag(geometry.spacing), lps - np.asarray(geometry.origin)[:, None])
    i, j, k = np.round(ijk).astype(int)
    inside = (i >= 0) & (i < array.shape[2]) & (j >= 0) & (j < array.shape[1]) & (k >= 0) & (k < array.shape[0])
    value = np.zeros(x.size)
    value[inside] = array[k[inside], j[inside], i[inside]] / max(float(array.max()), 1e-30)
    from scipy import ndimage

    shown, strong = (value >= 0.05).reshape(h, w), (value >= 0.35).reshape(h, w)
    margin = ndimage.binary_dilation(shown, iterations=3) & ~ndimage.binary_erosion(shown, iterations=3)
    return shown, strong & ~ndimage.binary_dilation(margin, iterations=1), margin


def test_paint_run_forward_and_backward_in_the_browser(web, tmp_path):
    pytest.importorskip("playwright")
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            page.goto(web["url"])
            _wait_status(page, "output done")
            page.click("#fit-views")
            time.sleep(1.5)
            before = _frame(page, "Output")
            assert not _coloured(before).any()  # grey T2, no overlay yet

            _drag(page, "Input", [(0.40, 0.45), (0.45, 0.47), (0.50, 0.45)])  # M^x on the input
            time.sleep(0.5)
            page.click("#run-forward")
            clicked = time.perf_counter()
            status = _wait_status(page, "forward done")
            while not _coloured(_frame(page, "Output")).sum() > 20 and time.perf_counter() - clicked < 60:
                time.sleep(0.05)
            overlay_s = time.perf_counter() - clicked
            time.sleep(1.0)  # the final frame (full quality)
            frame = _frame(page, "Output")
            geometry = page.evaluate("() => window.trame.state.get('view_geometry')")["Output"]
            shown, strong, margin = _expected(web, "forward", geometry, frame.shape[:2])
            coloured = _coloured(frame)
            assert strong.sum() > 50, "F is non-zero on the shown slice"
            assert not (coloured & ~shown & ~margin).any(), "overlay colour where F is zero"
            assert coloured[strong].mean() > 0.95, "F non-zero but no overlay colour"
            summary = json.loads(sorted((web["output"] / "results").glob("*-forward-summary.json"))[-1].read_text())
            engine_s = float(summary.get("seconds_total") or 0)
            print(f"\nRun forward -> overlay in the browser: {overlay_s:.2f} s; engine seconds_total "
                  f"{engine_s:.2f} s; difference {overlay_s - engine_s:.2f} s ({status})")
            page.screenshot(path=str(tmp_path / "web_forward.png"))

            page.click("#paint-output")
            time.sleep(0.3)
            input_before = _coloured(_frame(page, "Input")).sum()
            _drag(page, "Output", [(0.55, 0.40), (0.58, 0.42)])  # M^f on the output
            time.sleep(0.5)
            page.click("#run-backward")
            _wait_status(page, "backward done", timeout=300)
            time.sleep(1.0)
            frame = _frame(page, "Input")
            geometry = page.evaluate("() => window.trame.state.get('view_geometry')")["Input"]
            shown, strong, margin = _expected(web, "backward", geometry, frame.shape[:2])
            assert strong.sum() > 50 and _coloured(frame).sum() > input_before + 50
            assert _coloured(frame)[strong].mean() > 0.95, "B non-zero but no overlay colour"
            assert page.locator("#statistics tr").count() == 4
            page.screenshot(path=str(tmp_path / "web_backward.png"))
            shots = os.environ.get("IBIX_WEB_SCREENSHOTS")
            if shots:  # the README's screenshots
                for name in ("web_forward.png", "web_backward.png"):
                    shutil.copy(tmp_path / name, Path(shots) / name)
        finally:
            browser.close()


# ------------------------------------------------------------------------------------------------------------------
# Files: reads under --data only, writes under the output folder only
# ------------------------------------------------------------------------------------------------------------------

def test_the_page_reads_only_under_its_data_folder(tmp_path):
    import IBIXLogic as ibx
    from IBIXWeb.files import DataFolder

    data, outside = tmp_path / "data", tmp_path / "secret"
    (data / "sub").mkdir(parents=True)
    outside.mkdir()
    (data / "sub" / "t1.nrrd").write_bytes(b"x")
    (outside / "other.nrrd").write_bytes(b"private")
    (data / "link.nrrd").symlink_to(outside / "other.nrrd")
    (data / "linkdir").symlink_to(outside)
    folder = DataFolder(data, data / "ibix-web-output", upload_limit=10)
    assert folder.resolve("sub/t1.nrrd") == (data / "sub" / "t1.nrrd").resolve()
    for name in ("../secret/other.nrrd", "sub/../../secret/other.nrrd", str(outside / "other.nrrd"), "/etc/passwd",
                 "link.nrrd", "linkdir/other.nrrd", "", "C:/x.nrrd"):
        with pytest.raises(ibx.InputError):
            folder.resolve(name)
    assert folder.listing((".nrrd",)) == ["sub/t1.nrrd"]  # links leading outside are not listed
    with pytest.raises(ibx.InputError, match="upload limit"):
        folder.save_upload("big.nrrd", b"x" * 11)
    for name in ("../evil.nrrd", "..", "a/../../b.nrrd"):
        path = None
        try:
            path = folder.save_upload(name, b"1")
        except ibx.InputError:
            pass
        assert path is None or path.parent == (data / "ibix-web-output" / "uploads").resolve()
    assert sorted(p.name for p in outside.iterdir()) == ["other.nrrd"]
