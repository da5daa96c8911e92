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
                                "--output", str(output), "--token", TOKEN, "--quiet", "--upload-limit", "1"],
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


def _pixels_to_voxels(xy_to_ras, geometry, shape):
    """Index (k, j, i) of the voxel nearest each pixel of a view's frame (rows top to bottom), from the view's
    XY-to-RAS matrix (16 numbers, row-major) and the volume's geometry; -1 outside the volume."""
    h, w = shape
    y, x = np.mgrid[0:h, 0:w]
    xy = np.stack([x.ravel() + 0.5, (h - 1 - y.ravel()) + 0.5, np.zeros(x.size), np.ones(x.size)])
    ras = (np.asarray(xy_to_ras, float).reshape(4, 4) @ xy)[:3]
    lps = ras * np.array([[-1], [-1], [1]])
    direction = np.asarray(geometry.direction, float).reshape(3, 3)
    ijk = np.linalg.solve(direction @ np.diag(geometry.spacing), lps - np.asarray(geometry.origin)[:, None])
    i, j, k = np.round(ijk).astype(int)
    inside = ((i >= 0) & (i < geometry.shape[2]) & (j >= 0) & (j < geometry.shape[1]) & (k >= 0)
              & (k < geometry.shape[0]))
    return [np.where(inside, a, -1).reshape(h, w) for a in (k, j, i)]


def _expected(array, geometry, xy_to_ras, shape, margin=3):
    """On each pixel of a view's frame: where the map is at least the display threshold (5 % of its maximum),
    where it is clearly coloured (at least 35 %: the colour maps start near black), and a ``margin`` of pixels
    around the thresholded region (resampling; JPEG in the browser)."""
    from scipy import ndimage

    k, j, i = _pixels_to_voxels(xy_to_ras, geometry, shape)
    value = np.where(k >= 0, array[k, j, i], 0.0) / max(float(array.max()), 1e-30)
    shown, strong = value >= 0.05, value >= 0.35
    edge = ndimage.binary_dilation(shown, iterations=margin) & ~ndimage.binary_erosion(shown, iterations=margin)
    return shown, strong & ~ndimage.binary_dilation(edge, iterations=1), edge


def _expected_from_file(web, kind, geometry_state, shape):
    """:func:`_expected` of the newest map of ``kind`` the page wrote for download."""
    import IBIXLogic as ibx

    path = sorted((web["output"] / "results").glob(f"*-{kind}.nrrd"))[-1]
    array, geometry = ibx.read_volume(str(path))
    return _expected(array, geometry, geometry_state["xy_to_ras"], shape)


#: In the page: the time of each click on a button with an id, of each change of the status line, and of each new
#: frame of a view with its count of coloured pixels (as _coloured counts them), in window.ibixEvents.
WATCH = """() => {
  const events = window.ibixEvents = [];
  const canvas = document.createElement('canvas');
  const views = () => Array.from(document.querySelectorAll('#views .layout-grid-item'));
  function coloured(img) {
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    const context = canvas.getContext('2d');
    context.drawImage(img, 0, 0);
    const d = context.getImageData(0, 0, canvas.width, canvas.height).data;
    let n = 0;
    for (let i = 0; i < d.length; i += 4) {
      if (Math.max(d[i], d[i + 1], d[i + 2]) - Math.min(d[i], d[i + 1], d[i + 2]) > 30) n++;
    }
    return n;
  }
  document.addEventListener('click', e => {
    const button = e.target.closest('button');
    if (button && button.id) events.push({what: 'click', name: button.id, t: performance.now()});
  }, true);
  let status = '';
  new MutationObserver(() => {
    const element = document.querySelector('#status');
    const text = element ? element.innerText : '';
    if (text !== status) { status = text; events.push({what: 'status', name: text, t: performance.now()}); }
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
  new MutationObserver(changes => {
    for (const change of changes) {
      const img = change.target;
      if (img.tagName !== 'IMG') continue;
      const view = ['Input', 'Output'][views().findIndex(v => v.contains(img))];
      const t = performance.now();
      const seen = () => events.push({what: 'frame', name: view, t: t, coloured: coloured(img)});
      if (img.complete && img.naturalWidth) seen(); else img.addEventListener('load', seen, {once: true});
    }
  }).observe(document.querySelector('#views'), {subtree: true, attributes: true, attributeFilter: ['src']});
}"""


def _events(page, what=None, since=0.0):
    return [e for e in page.evaluate("() => window.ibixEvents") if (what is None or e["what"] == what)
            and e["t"] >= since]


def _wait_event(page, test, since, timeout=120, what="status"):
    """The first event of kind ``what`` after ``since`` (ms, page clock) for which ``test(event)`` holds."""
    end = time.time() + timeout
    while time.time() < end:
        found = [e for e in _events(page, what, since) if test(e)]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no such {what} event; status {page.inner_text('#status')!r}, "
                         f"error {_state(page, 'error')!r}")


def _state(page, name):
    return page.evaluate(f"() => window.trame.state.get('{name}')")


def _click(page, selector):
    """Click; returns the click's time on the page's clock (ms)."""
    page.click(selector)
    return [e for e in _events(page, "click") if e["name"] == selector.lstrip("#")][-1]["t"]


def _wait_download(web, kind, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        found = sorted((web["output"] / "results").glob(f"*-{kind}-summary.json"))
        if found:
            return json.loads(found[-1].read_text())
        time.sleep(0.1)
    raise AssertionError(f"the page wrote no {kind} result for download")


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium driven by Playwright (no browser download)."""
    pytest.importorskip("playwright")
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def _open(browser, web):
    page = browser.new_page(viewport={"width": 1280, "height": 760})
    page.goto(web["url"])
    page.wait_for_selector("#status")
    page.evaluate(WATCH)
    return page


def test_paint_run_forward_and_backward_in_the_browser(web, browser, tmp_path):
    page = _open(browser, web)
    _wait_status(page, "output done")
    page.click("#fit-views")
    time.sleep(1.5)
    before = _frame(page, "Output")
    assert not _coloured(before).any()  # grey T2, no overlay yet

    _drag(page, "Input", [(0.40, 0.45), (0.45, 0.47), (0.50, 0.45)])  # M^x on the input
    time.sleep(0.5)
    clicked = _click(page, "#run-forward")
    done = _wait_event(page, lambda e: "forward done" in e["name"], clicked)
    # the first frame of the Output view after the run's end, with F: the overlay of the final map (a progressive
    # run's previews come earlier)
    shown = _wait_event(page, lambda e: e["name"] == "Output" and e["coloured"] > 200, done["t"], what="frame")
    overlay_s = (shown["t"] - clicked) / 1000
    summary = _wait_download(web, "forward")
    timings = _state(page, "run_timings")
    time.sleep(0.5)
    frame = _frame(page, "Output")
    geometry = _state(page, "view_geometry")["Output"]
    shown, strong, margin = _expected_from_file(web, "forward", geometry, frame.shape[:2])
    coloured = _coloured(frame)
    assert strong.sum() > 50, "F is non-zero on the shown slice"
    assert not (coloured & ~shown & ~margin).any(), "overlay colour where F is zero"
    assert coloured[strong].mean() > 0.95, "F non-zero but no overlay colour"
    engine_s, wall_s = float(summary["seconds_total"]), timings["engine_wall"]
    print(f"\nRun forward -> overlay in the browser {overlay_s:.2f} s; the engine's seconds_total {engine_s:.2f} s "
          f"(page adds {overlay_s - engine_s:.2f} s); the engine process's wall time {wall_s:.2f} s (page adds "
          f"{overlay_s - wall_s:.2f} s); server steps {timings} ({done['name']})")
    page.screenshot(path=str(tmp_path / "web_forward.png"))

    page.click("#paint-output")
    time.sleep(0.3)
    input_before = _coloured(_frame(page, "Input")).sum()
    _drag(page, "Output", [(0.55, 0.40), (0.58, 0.42)])  # M^f on the output
    time.sleep(0.5)
    clicked = _click(page, "#run-backward")
    _wait_event(page, lambda e: "backward done" in e["name"], clicked, timeout=300)
    _wait_download(web, "backward")
    time.sleep(1.0)
    frame = _frame(page, "Input")
    geometry = _state(page, "view_geometry")["Input"]
    shown, strong, margin = _expected_from_file(web, "backward", geometry, frame.shape[:2])
    assert strong.sum() > 50 and _coloured(frame).sum() > input_before + 50
    assert _coloured(frame)[strong].mean() > 0.95, "B non-zero but no overlay colour"
    assert page.locator("#statistics tr").count() == 4
    page.screenshot(path=str(tmp_path / "web_backward.png"))
    shots = os.environ.get("IBIX_WEB_SCREENSHOTS")
    if shots:  # the README's screenshots
        for name in ("web_forward.png", "web_backward.png"):
            shutil.copy(tmp_path / name, Path(shots) / name)
    page.close()


def _wait_state(page, name, test, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        value = _state(page, name)
        if test(value):
            return value
        time.sleep(0.05)
    raise AssertionError(f"state {name} stayed {_state(page, name)!r}; status {page.inner_text('#status')!r}")


def _choose(page, select_id, option):
    """Pick an entry of a select as a user does: open its menu, click the entry."""
    page.locator(f".v-select:has(#{select_id})").click()
    page.get_by_role("option", name=option, exact=True).click()


def _upload(page, files):
    page.set_input_files("input[type=file]", [{"name": name, "mimeType": "application/octet-stream", "buffer": data}
                                              for name, data in files])


def _error_shown(page, text):
    """The page shows an error holding ``text``; it is closed."""
    _wait_state(page, "error", lambda error: text in (error or ""))
    page.wait_for_selector("#error", state="visible")
    assert text in page.inner_text("#error")
    page.locator("#error button").click()
    _wait_state(page, "show_error", lambda shown: not shown)


def test_live_map_uploads_bad_input_and_a_closed_tab_in_the_browser(web, browser, tmp_path):
    """What else the page offers, as a user meets it: a file over the upload limit is refused with a message and
    never written; a model with its card and a small volume are uploaded; a wrong card and an empty mask get the
    engine's and the module's messages in the page; the live backward map follows M^f as it is painted (no model
    run); closing the tab cancels the run in flight."""
    import IBIXLogic as ibx

    page = _open(browser, web)
    _wait_state(page, "enabled", lambda enabled: enabled.get("runForward"))

    _upload(page, [("big.nrrd", bytes(3 * 2**19))])  # 1.5 MiB: over the server's --upload-limit 1
    _error_shown(page, "big.nrrd: 1.5 MiB is more than the upload limit of 1.0 MiB")
    uploads = web["output"] / "uploads"
    assert not (uploads / "big.nrrd").exists()

    card = json.loads((ROOT / "Resources" / "Models" / "t1_to_t2_cae.json").read_text())
    card["input"]["channels"] = ["T1", "FLAIR"]  # the model takes one channel
    t1, geometry = ibx.read_volume(str(ROOT / "Resources" / "SampleData" / "IBIX-T1.nrrd"))
    k = t1.shape[0] // 2 - 4  # 8 axial slices of the T1, where they lie
    origin = np.asarray(geometry.origin) + np.asarray(geometry.direction) @ (np.asarray(geometry.spacing) * [0, 0, k])
    small = ibx.write_volume(tmp_path / "small-t1.nrrd", np.ascontiguousarray(t1[k:k + 8]),
                             ibx.Geometry(tuple(origin), geometry.spacing, geometry.direction, (8, *t1.shape[1:])))
    _upload(page, [("wrongcard.onnx", (ROOT / "Resources" / "Models" / "t1_to_t2_cae.onnx").read_bytes()),
                   ("wrongcard.json", json.dumps(card).encode()), ("small-t1.nrrd", small.read_bytes())])
    _wait_state(page, "models", lambda models: "uploads/wrongcard.onnx" in models)
    _choose(page, "model", "uploads/wrongcard.onnx")
    page.click("#load-model")
    with pytest.raises(ibx.IBIXError) as refused:  # what ibix says of this card
        ibx.load_model(str(uploads / "wrongcard.onnx"))
    _error_shown(page, str(refused.value))

    _choose(page, "input-0", "uploads/small-t1.nrrd")
    page.click("#load-input")  # new, empty masks on it
    _wait_state(page, "status", lambda status: "Input loaded: uploads/small-t1.nrrd (8 x 233 x 197" in status)
    page.click("#run-forward")
    _error_shown(page, "(input mask) is empty: paint it")

    clicked = _click(page, "#generate-output")
    _wait_event(page, lambda e: "output done" in e["name"], clicked)
    page.fill("#n-blocks", "2")
    page.fill("#n-backward", "1")
    page.click("#paint-output")
    page.check("#live")
    live = _wait_event(page, lambda e: "Live backward map" in e["name"], clicked)
    time.sleep(0.5)
    before = _coloured(_frame(page, "Input")).sum()
    _drag(page, "Output", [(0.45, 0.45), (0.55, 0.50)])  # M^f: B follows in the Input view
    time.sleep(1.0)  # the stroke applied, B answered (at most every 150 ms), its frame sent
    after = _frame(page, "Input")
    assert _coloured(after).sum() > before + 2000, "B does not follow M^f"
    page.click("#undo")  # M^f empty again: B is zero
    time.sleep(1.0)
    assert _coloured(_frame(page, "Input")).sum() < before + 500, "B does not follow M^f"
    assert not [e for e in _events(page, "status", live["t"]) if "Running" in e["name"]], "a model run while painting"
    page.uncheck("#live")

    _drag(page, "Output", [(0.45, 0.45), (0.55, 0.50)])
    time.sleep(0.5)
    page.fill("#n-blocks", "500")
    page.fill("#n-backward", "4")
    backward = len(list((web["output"] / "results").glob("*-backward.nrrd")))
    clicked = _click(page, "#run-backward")
    _wait_event(page, lambda e: "backward" in e["name"] and "done" not in e["name"], clicked)
    page.close()  # the only tab: its run is cancelled
    again = _open(browser, web)
    _wait_state(again, "status", lambda status: status.startswith("Cancelled"))
    assert _state(again, "enabled")["runBackward"]
    assert len(list((web["output"] / "results").glob("*-backward.nrrd"))) == backward
    again.close()


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


# ------------------------------------------------------------------------------------------------------------------
# The page's slice views rendered offscreen (no browser): overlay pixels against known maps
# ------------------------------------------------------------------------------------------------------------------

VIEW_SIZE = (360, 440)


@pytest.fixture
def page(tmp_path, monkeypatch):
    """The IBIX page as ``ibix web`` builds it (trame-slicer scene, two linked slice views), its server not started,
    the T1 demo loaded, each view VIEW_SIZE pixels; ``slicer.mrmlScene`` and ``slicer.modules`` restored after."""
    pytest.importorskip("trame_slicer")
    import slicer
    from trame.app import get_server
    from vtkmodules.vtkCommonCore import vtkCommand

    from IBIXWeb.app import VIEWS, Page
    from IBIXWeb.files import DataFolder

    monkeypatch.setenv("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")  # as ibix web: offscreen, no X server
    for name in ("mrmlScene", "modules"):
        monkeypatch.setattr(slicer, name, getattr(slicer, name, None), raising=False)
    page = Page(get_server(f"ibix-test-{tmp_path.name}", client_type="vue3"),
                DataFolder(ROOT / "Resources", tmp_path / "output"), device="cpu")
    page.load_inputs(["SampleData/IBIX-T1.nrrd"])
    for name in VIEWS:  # what the browser's layout does
        interactor = page.slice_view(name).interactor()
        interactor.UpdateSize(*VIEW_SIZE)
        interactor.InvokeEvent(vtkCommand.WindowResizeEvent)
    page.fit_views()
    yield page
    page.close()


def _render(page, view):
    """The RGB frame of a view as the server sends it (before JPEG), rows top to bottom."""
    from slicer import vtkMRMLLayerDisplayableManager
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkCommonDataModel import vtkImageData

    window = page.slice_view(view).render_window()
    window.Render()
    image = vtkImageData()
    vtkMRMLLayerDisplayableManager.RenderWindowBufferToImage(window, image)
    w, h, _ = image.GetDimensions()
    return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)[::-1, :, :3].astype(int)


def _blend(background, colormap, value, opacity):
    """The colour Slicer composites: the colour map's entry for ``value`` (window 0..1) over the background."""
    from IBIXLib import scene

    rgb = scene._rgba_table(scene.color_node(colormap))[int(round(value * 255)), :3] * 255
    return (1 - opacity) * background + opacity * rgb


def test_overlays_in_the_pages_slice_views_rendered_offscreen(page):
    """F is drawn over the output in the Output view and B over the input in the Input view, each only there, with
    the module's colour maps and opacity: colour where the map reaches the display threshold and nowhere else."""
    import slicer

    from IBIXLib import scene

    p = page.controller.parameters
    t1 = p.inputVolume0
    geometry = scene.geometry_from_volume_node(t1)
    t1_array = slicer.util.arrayFromVolume(t1).astype(np.float32)
    shape = VIEW_SIZE[::-1]
    xy = {name: page.view_geometry()[name]["xy_to_ras"] for name in ("Input", "Output")}
    k, j, i = _pixels_to_voxels(xy["Output"], geometry, shape)
    shown_k = int(np.median(k[k >= 0]))  # the slice both views show
    assert xy["Input"] == xy["Output"]  # linked views

    def box(center, half, value, array=None):
        array = np.zeros(geometry.shape, np.float32) if array is None else array
        (cj, ci), (hj, hi) = center, half
        array[shown_k - 2:shown_k + 3, cj - hj:cj + hj + 1, ci - hi:ci + hi + 1] = value
        return array

    def paint(segmentation, segment, center):
        slicer.util.updateSegmentBinaryLabelmapFromArray(box(center, (3, 3), 1).astype(np.uint8), segmentation,
                                                         segment, t1)

    output = scene.add_result(scene.prepare_request("output", ["T1"], [t1]), t1_array.max() - t1_array, geometry,
                              **page.controller.displayOptions("output"))
    paint(p.inputSegmentation, p.inputSegmentId, (70, 70))
    paint(p.outputSegmentation, p.outputSegmentId, (160, 140))
    frames = [{name: _render(page, name) for name in ("Input", "Output")}]
    masks = {name: _coloured(frames[0][name]) for name in ("Input", "Output")}  # M^x and M^f

    # F: 1 in a core, 0.6 around it, 0.03 (under the 5 % threshold) in a faint box, zero elsewhere; then B: 1 in a
    # box on the input, zero elsewhere. Each is checked in both views once it is shown.
    f = box((110, 100), (14, 14), 0.6)
    f = box((110, 100), (6, 6), 1.0, f)
    f = box((170, 60), (8, 8), 0.03, f)
    b = box((60, 150), (10, 10), 1.0)
    drawn = {"Output": None, "Input": None}
    for kind, array, view, colormap, segmentation, segment in (
            ("forward", f, "Output", "Inferno", p.inputSegmentation, p.inputSegmentId),
            ("backward", b, "Input", "Viridis", p.outputSegmentation, p.outputSegmentId)):
        request = scene.prepare_request(kind, ["T1"], [t1], segmentation, segment, output_node=output)
        scene.add_result(request, array, geometry, **page.controller.displayOptions(kind))
        drawn[view] = (array, colormap)
        frames.append({name: _render(page, name) for name in ("Input", "Output")})
        for name, shown_map in drawn.items():
            coloured = _coloured(frames[-1][name]) & ~masks[name]
            if shown_map is None:
                assert not coloured.any(), f"{kind}: a map drawn in the {name} view"
                continue
            shown, strong, edge = _expected(shown_map[0], geometry, xy[name], shape, margin=2)
            assert strong.sum() > 100, "the map lies on the shown slice"
            assert coloured[strong].all(), f"{name}: the map reaches the threshold but is not coloured"
            assert not (coloured & ~shown & ~edge).any(), f"{name}: colour where the map is under the threshold"
        before = frames[0][view]
        for value in (1.0, 0.6) if kind == "forward" else (1.0,):
            core = np.where(k >= 0, array[k, j, i], 0) == np.float32(value)
            core &= ~_dilate(~core, 2)  # inside the region: no resampling at its border
            assert core.sum() > 20
            expected = _blend(before[core], colormap, value, p.opacity)
            assert np.abs(frames[-1][view][core] - expected).max() <= 6, (view, value)


def _dilate(mask, iterations):
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=iterations)
