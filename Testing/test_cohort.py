"""Cohorts: the manifest, running the shipped T1 demo's cases on Dask (one broken), resuming, and the report."""
import csv
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import IBIXLogic as ibx
from IBIXLogic import cohort, report

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "Resources" / "SampleData"
T1_MODEL = ROOT / "Resources" / "Models" / "t1_to_t2_cae.onnx"


def write_manifest(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return path


# -- manifest -------------------------------------------------------------------------------------------------
def test_manifest_paths_labels_and_parameters(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", [
        ["case", "input", "mask", "label", "n_jitters", "channels", "coarse_blocks", "tiles"],
        ["a", "in/a1.nrrd; in/a2.nrrd", "masks/a.nrrd", "3", "2", "fat", "10;60", "false"],
        ["b", "/abs/b.nrrd", "b.nrrd", "", "", "water;fat", "", ""]])
    a, b = cohort.read_manifest(manifest, "backward")
    assert a.inputs == (tmp_path / "in" / "a1.nrrd", tmp_path / "in" / "a2.nrrd")
    assert a.mask == tmp_path / "masks" / "a.nrrd" and a.label == 3
    assert a.parameters == {"n_jitters": 2, "channels": "fat", "coarse_blocks": [10, 60], "tiles": False}
    assert b.inputs == (Path("/abs/b.nrrd"),) and b.label is None
    assert b.parameters == {"channels": ["water", "fat"]}


@pytest.mark.parametrize("rows, message", [
    ([["case", "input"], ["a", "x.nrrd"]], "lacks the column"),
    ([["case", "input", "mask", "n_blocks"], ["a", "x", "m", "5"]], "unknown column"),
    ([["case", "input", "mask"], ["a", "x", "m"], ["a", "y", "m"]], "appears twice"),
    ([["case", "input", "mask"], ["../up", "x", "m"]], "case name"),
    ([["case", "input", "mask", "label"], ["a", "x", "m", "two"]], "whole number"),
    ([["case", "input", "mask"]], "no case"),
])
def test_bad_manifests_name_the_line_and_the_fix(tmp_path, rows, message):
    manifest = write_manifest(tmp_path / "m.csv", rows)
    with pytest.raises(ibx.InputError, match=message):
        cohort.read_manifest(manifest, "forward")  # n_blocks is a backward parameter only


# -- a cohort on the shipped sample data ---------------------------------------------------------------------
class Page(HTMLParser):
    """The tags and text of an HTML page, for structural checks."""

    def __init__(self):
        super().__init__()
        self.images, self.links, self.headings, self.text, self._heading = [], [], [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        if tag in ("a", "link", "script") and (attrs.get("href") or attrs.get("src")):
            self.links.append(attrs)
        if tag in ("h1", "h2", "h3"):
            self._heading = tag

    def handle_endtag(self, tag):
        self._heading = None if tag == self._heading else self._heading

    def handle_data(self, data):
        self.text.append(data)
        if self._heading:
            self.headings.append(data.strip())


def sample_manifest(tmp_path: Path) -> Path:
    """Cases of the T1 demo: the ventricle, the output mask's region, two labels of one label map, and two broken
    cases (a missing input file; the T1 image given as a mask, which holds many values)."""
    t1 = SAMPLES / "IBIX-T1.nrrd"
    _, geometry = ibx.read_volume(t1)
    labels = np.zeros(geometry.shape, np.uint8)
    labels[70:73, 100:105, 90:95] = 1
    labels[80:82, 140:146, 60:64] = 2
    ibx.write_volume(tmp_path / "regions.nrrd", labels, geometry)
    return write_manifest(tmp_path / "manifest.csv", [
        ["case", "input", "mask", "label", "n_jitters"],
        ["ventricle", str(t1), str(SAMPLES / "IBIX-T1-input-mask.nrrd"), "", "2"],
        ["output-region", str(t1), str(SAMPLES / "IBIX-T1-output-mask.nrrd"), "", "2"],
        ["cube1", str(t1), "regions.nrrd", "1", ""],
        ["cube2", str(t1), "regions.nrrd", "2", "1"],
        ["missing-input", "no-such-T1.nrrd", str(SAMPLES / "IBIX-T1-input-mask.nrrd"), "", "2"],
        ["image-as-mask", str(t1), str(t1), "", "2"]])


def test_cohort_on_sample_data_runs_resumes_and_reports(tmp_path):
    manifest = sample_manifest(tmp_path)
    out = tmp_path / "cohort"
    seen = []
    first = cohort.run_cohort(manifest, T1_MODEL, "forward", out, workers=2,
                              progress=lambda done, total, message: seen.append((done, total)))
    status = {row["case"]: row["status"] for row in first.rows}
    assert status == {"ventricle": "ok", "output-region": "ok", "cube1": "ok", "cube2": "ok",
                      "missing-input": "failed", "image-as-mask": "failed"}
    errors = {row["case"]: row["error"] for row in first.rows}
    assert "no-such-T1.nrrd: no such file" in errors["missing-input"]
    assert "different nonzero values" in errors["image-as-mask"]
    assert seen[0] == (0, 6) and seen[-1] == (6, 6)
    assert (first.ran, first.skipped, first.failed) == (6, 0, 2)
    # each ok case holds what 'ibix forward' writes; nothing half-written is left
    for case in ("ventricle", "output-region", "cube1", "cube2"):
        summary = json.loads((out / case / "summary.json").read_text())
        assert {Path(p).name for p in summary["files"]} >= {"forward_signed.nrrd", "forward_normalized.nrrd",
                                                           "forward.png", "summary.json"}
        assert all(Path(p).parent == out / case for p in summary["files"])
    assert sorted(p.name for p in out.iterdir()) == ["cohort.csv", "cube1", "cube2", "output-region",
                                                      "report.html", "ventricle"]
    rows = cohort.read_rows(first.csv)
    assert [r["case"] for r in rows] == ["ventricle", "output-region", "cube1", "cube2", "missing-input",
                                         "image-as-mask"]
    by_case = {r["case"]: r for r in rows}
    assert by_case["cube2"]["evaluations"] == 2 * 1 * 2 + 2  # N = 1 on the 2 slices the cube touches, + f(x)
    assert by_case["missing-input"]["evaluations"] is None
    stamps = {case: (out / case / "summary.json").stat().st_mtime_ns for case in status if status[case] == "ok"}

    # the rerun joins an existing cluster, skips the 4 ok cases and retries only the 2 failed ones
    from distributed import LocalCluster
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        second = cohort.run_cohort(manifest, T1_MODEL, "forward", out, scheduler=cluster.scheduler_address)
    assert (second.ran, second.skipped, second.failed) == (2, 4, 2)
    assert sum(r["evaluations"] or 0 for r in second.rows if r["status"] == "failed") == 0
    assert {case: (out / case / "summary.json").stat().st_mtime_ns for case in stamps} == stamps
    assert cohort.read_rows(second.csv) == rows[:4] + cohort.read_rows(second.csv)[4:]

    page = Page()
    page.feed(second.report.read_text())
    assert page.links == []  # self-contained
    assert all(image["src"].startswith("data:image/png;base64,") for image in page.images)
    thumbnails = [i for i in page.images if i["alt"].startswith("forward map of")]
    assert sorted(i["alt"] for i in thumbnails) == sorted(f"forward map of {c}" for c in stamps)
    text = " ".join(page.text)
    assert "missing-input" in text and "different nonzero values" in text


def test_unreachable_scheduler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(cohort, "SCHEDULER_TIMEOUT_S", 1)
    manifest = sample_manifest(tmp_path)
    with pytest.raises(ibx.InputError, match="cannot reach the Dask scheduler"):
        cohort.run_cohort(manifest, T1_MODEL, "forward", tmp_path / "out", scheduler="tcp://127.0.0.1:9")


# -- report -----------------------------------------------------------------------------------------------
def test_tukey_fences_by_hand():
    # quartiles of 1, 2, 3, 4, 100 are 2 and 4: fences 2 - 3 = -1 and 4 + 3 = 7
    found, fences = report.tukey_outliers(list("abcde"), [1, 2, 3, 4, 100], "peak")
    assert fences == (-1.0, 7.0)
    assert [(o.case, o.value) for o in found] == [("e", 100.0)]
    assert report.tukey_outliers(list("abc"), [1, 2, 100], "peak") == ([], None)  # too few cases
    assert report.tukey_outliers(list("abcde"), [1, None, 2, 3, 4], "peak")[0] == []


def test_report_names_outliers_and_failures(tmp_path):
    rows = [{"case": f"c{i}", "status": "ok", "error": "", "evaluations": 10, "seconds": 1.0,
             "reach95_mm": value, "inside_fraction": 0.5, "peak": 1.0, "peak_r_mm": 0.0, "peak_a_mm": 0.0,
             "peak_s_mm": 0.0} for i, value in enumerate([3.0, 3.2, 2.9, 3.1, 30.0])]
    rows.append({"case": "bad <one>", "status": "failed", "error": "x.nrrd: no such file"})
    path = report.write_report(tmp_path, rows, "forward", cohort.statistic_columns("forward"))
    page = Page()
    page.feed(path.read_text())
    assert page.headings[0].startswith("IBIX cohort report: forward maps")
    assert {"Distributions", "Outliers", "Failed cases", "Maps"} <= set(page.headings)
    text = " ".join(page.text)
    assert "c4" in text and "reach95_mm" in text and "bad <one>" in text  # escaped in the HTML, text again here
    assert "<one>" not in path.read_text()
    plots = [i for i in page.images if i["alt"].startswith("distribution of")]
    assert len(plots) == 5  # reach95, inside fraction, peak, evaluations, seconds
