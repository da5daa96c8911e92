"""Cohorts: the manifest, running the shipped T1 demo's cases on Dask (one broken), resuming, and the report."""
import csv
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

import IBIXLogic as ibx
from IBIXLogic import cli, cohort

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
    ([["case", "input", "mask"], ["cohort.csv", "x", "m"]], "the cohort's own files"),
    ([["case", "input", "mask"], ["Report.HTML", "x", "m"]], "the cohort's own files"),
    ([["case", "input", "mask"], ["summary.json", "x", "m"]], "the cohort's own files"),
])
def test_bad_manifests_name_the_line_and_the_fix(tmp_path, rows, message):
    manifest = write_manifest(tmp_path / "m.csv", rows)
    with pytest.raises(ibx.InputError, match=message):
        cohort.read_manifest(manifest, "forward")  # n_blocks is a backward parameter only


# -- a cohort on the shipped sample data ---------------------------------------------------------------------
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


def test_cohort_on_sample_data_runs_resumes_and_reports(tmp_path, capsys):
    manifest = sample_manifest(tmp_path)
    out = tmp_path / "cohort"
    code = cli.main(["cohort", str(manifest), "--model", str(T1_MODEL), "--mapping", "forward", "-o", str(out),
                     "--workers", "2", "--progress-format", "jsonl"])
    assert code == cli.CASES_FAILED == 3  # the cohort ran; two of its cases failed
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert records[0] == {"stage": "cases", "done": 0, "total": 6}
    assert records[-2] == {"stage": "cases", "done": 6, "total": 6}
    assert records[-1]["stage"] == "finished" and Path(records[-1]["files"]["cohort_csv"]) == out / "cohort.csv"
    assert records[-1]["cases"] == {"total": 6, "failed": 2, "run": 6, "skipped": 0}
    rows = cohort.read_rows(out / "cohort.csv")
    assert [(r["case"], r["status"]) for r in rows] == [
        ("ventricle", "ok"), ("output-region", "ok"), ("cube1", "ok"), ("cube2", "ok"),
        ("missing-input", "failed"), ("image-as-mask", "failed")]
    by_case = {r["case"]: r for r in rows}
    assert "no-such-T1.nrrd: no such file" in by_case["missing-input"]["error"]
    assert "different nonzero values" in by_case["image-as-mask"]["error"]
    assert by_case["missing-input"]["evaluations"] is None
    # each ok case holds what 'ibix forward' writes, its statistics are in the row; nothing half-written is left
    ok = [r["case"] for r in rows if r["status"] == "ok"]
    for case in ok:
        summary = json.loads((out / case / "summary.json").read_text())
        assert {Path(p).name for p in summary["files"]} == {"forward_signed.nrrd", "forward_normalized.nrrd",
                                                            "forward.png", "summary.json"}
        assert all(Path(p).parent == out / case for p in summary["files"])
        statistics = summary["forward"]["statistics"]
        assert by_case[case]["evaluations"] == summary["forward"]["evaluations"] > 0
        assert by_case[case]["reach95_mm"] == pytest.approx(statistics["reach95_mm"])
        assert 0 < by_case[case]["inside_fraction"] <= 1
        assert [by_case[case][f"peak_{a}_mm"] for a in "ras"] == pytest.approx(statistics["peak_ras_mm"])
    assert sorted(p.name for p in out.iterdir()) == sorted(["cohort.csv", "report.html", "summary.json"] + ok)
    summary = json.loads((out / "summary.json").read_text())  # the cohort's own: its files, its cases
    assert sorted(summary["files"]) == sorted(str(out / n) for n in ("cohort.csv", "report.html", "summary.json"))
    assert summary["case_folders"] == ok and summary["cases"]["failed"] == 2
    stamps = {case: (out / case / "summary.json").stat().st_mtime_ns for case in ok}

    # the rerun joins an existing cluster, skips the 4 ok cases and retries only the 2 failed ones
    from distributed import LocalCluster
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster:
        again = cohort.run_cohort(manifest, T1_MODEL, "forward", out, scheduler=cluster.scheduler_address)
    assert (again.ran, again.skipped, again.failed) == (2, 4, 2)
    assert all(r["evaluations"] is None for r in again.rows if r["status"] == "failed")
    assert {case: (out / case / "summary.json").stat().st_mtime_ns for case in ok} == stamps
    assert cohort.read_rows(again.csv)[:4] == rows[:4]

    # the report renders: self-contained, one thumbnail per ok case, the failures named
    page = again.report.read_text()
    assert not re.search(r"""(src|href)="(?!data:image/png;base64,)""", page)
    assert sorted(re.findall(r'<img alt="forward map of ([^"]+)" src="data:image/png;base64,', page)) == sorted(ok)
    assert "missing-input" in page and "different nonzero values" in page


def test_unreachable_scheduler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(cohort, "SCHEDULER_TIMEOUT_S", 1)
    manifest = sample_manifest(tmp_path)
    with pytest.raises(ibx.InputError, match="cannot reach the Dask scheduler"):
        cohort.run_cohort(manifest, T1_MODEL, "forward", tmp_path / "out", scheduler="tcp://127.0.0.1:9")


def test_a_backward_case_with_block_labels_gives_the_oracle_row(tmp_path):
    """One backward case run directly (no cluster) on the box-blur oracle of test_statistics: a 1x5 blur, output
    mask cols 20..26, blocks of 3 cols given as a label file -> reach95 1.4 mm, blocks90 3, peak 14/15."""
    import onnx_models as om

    model = om.save(om.box_blur((1, 5)), tmp_path, "blur")
    geometry = ibx.Geometry((5.0, 6.0, 7.0), (0.7, 1.3, 3.0), np.eye(3), (3, 9, 40))
    out_mask = np.zeros(geometry.shape, np.uint8)
    out_mask[1, 4, 20:27] = 1
    blocks = np.zeros(geometry.shape, np.int16)
    for label in range(1, 9):
        blocks[1, 4, 11 + 3 * (label - 1):14 + 3 * (label - 1)] = label
    for name, array in [("x", np.random.default_rng(5).normal(50, 5, geometry.shape).astype(np.float32)),
                        ("mask", out_mask), ("blocks", blocks)]:
        ibx.write_volume(tmp_path / f"{name}.nrrd", array, geometry)
    manifest = write_manifest(tmp_path / "m.csv", [["case", "input", "mask", "n_jitters", "block_labels"],
                                                   ["blur", "x.nrrd", "mask.nrrd", "2", "blocks.nrrd"]])
    (case,) = cohort.read_manifest(manifest, "backward")
    settings = cohort.Settings("backward", model, None, tmp_path / "out")
    row = cohort.run_case(case, settings)
    assert row["status"] == "ok", row["error"]
    assert row["reach95_mm"] == pytest.approx(1.4) and row["blocks90"] == 3
    assert row["peak"] == pytest.approx(14 / 15, rel=1e-5)
    assert [row[f"peak_{a}_mm"] for a in "ras"] == pytest.approx([-21.8, -11.2, 10.0])
    summary = json.loads((tmp_path / "out" / "blur" / "summary.json").read_text())
    assert summary["case"] == "blur" and summary["block_labels"] == str(tmp_path / "blocks.nrrd")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["blur"]  # no temporary folder left
    # the same case again fails cleanly: its folder exists, and nothing is overwritten
    again = cohort.run_case(case, settings)
    assert again["status"] == "failed" and "exists already" in again["error"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["blur"]


def test_folders_of_another_run_are_reported_not_overwritten(tmp_path, capsys):
    """Nothing left to run starts no cluster: a folder holding a forward result fails a backward cohort, a folder
    IBIX did not write fails its case; both stay as they were. A bad manifest is exit code 2."""
    manifest = write_manifest(tmp_path / "m.csv", [["case", "input", "mask"], ["a", "x.nrrd", "m.nrrd"],
                                                   ["b", "x.nrrd", "m.nrrd"]])
    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    (out / "a" / "summary.json").write_text(json.dumps({"command": "forward", "forward": {"evaluations": 3}}))
    (out / "b").mkdir()
    result = cohort.run_cohort(manifest, T1_MODEL, "backward", out)
    assert (result.ran, result.failed) == (0, 2)
    assert "holds a forward result, not a backward one" in result.rows[0]["error"]
    assert "no readable summary.json" in result.rows[1]["error"]
    assert sorted(p.name for p in (out / "b").iterdir()) == []
    bad = write_manifest(tmp_path / "bad.csv", [["case", "input", "mask", "speed"], ["a", "x", "m", "1"]])
    assert cli.main(["cohort", str(bad), "--model", str(T1_MODEL), "--mapping", "forward", "-o", str(out)]) == 2
    assert "unknown column(s) ['speed']" in capsys.readouterr().err


# -- a cohort of DICOM folders with structures by name ---------------------------------------------------------
def test_manifest_series_and_segment_columns(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", [
        ["case", "input", "mask", "segment", "series"],
        ["a", "p1/MR;p1/MR", "p1/RS.dcm", "Bladder wall", "1.2.3; 1.2.4"],
        ["b", "p2/t1.nrrd", "p2/labels.nrrd", "", ""]])
    a, b = cohort.read_manifest(manifest, "forward")
    assert a.segment == "Bladder wall" and a.series == ("1.2.3", "1.2.4") and a.mask == tmp_path / "p1" / "RS.dcm"
    assert b.segment is None and b.series == ()
    bad = write_manifest(tmp_path / "bad.csv", [["case", "input", "mask", "label", "segment"],
                                                ["a", "x", "m", "1", "B"]])
    with pytest.raises(ibx.InputError, match="line 2: case 'a' has a label and a segment"):
        cohort.read_manifest(bad, "forward")


def test_cohort_of_dicom_folders_records_what_it_read_and_fails_hostile_cases_alone(t1_dicom, tmp_path):
    import clinical_data as cd
    from pydicom.uid import generate_uid

    x, geometry = cd.crop(t1_dicom.x, t1_dicom.geometry, (slice(88, 98), slice(96, 144), slice(66, 106)))
    box = np.zeros(x.shape, bool)
    box[4:7, 20:30, 15:25] = True
    data = tmp_path / "data"

    def series(name, **kw):
        return cd.write_series(data / name, x, geometry, **kw)

    export = series("export")  # a PACS export: the series and its structure set in one folder
    cd.write_rtstruct(data / "export" / "RS.dcm", export, {"PTV": box}, geometry)
    two = series("two-series", description="T1 axial")
    cd.write_series(data / "two-series", x[:4], geometry, description="T1 post", number=9, seed=1)
    cd.write_rtstruct(data / "two-series-RS.dcm", two, {"PTV": box}, geometry)
    gap = series("missing-slice")
    gap.files[3].unlink()
    cd.write_rtstruct(data / "missing-slice-RS.dcm", gap, {"PTV": box}, geometry)
    tilted = series("tilted", shear=geometry.direction[:, 1] * 0.2)
    cd.write_rtstruct(data / "tilted-RS.dcm", tilted, {"PTV": box}, geometry)
    stray = series("stray-files")
    (data / "stray-files" / "notes.txt").write_text("not DICOM\n")
    cd.write_rtstruct(data / "stray-files-RS.dcm", stray, {"PTV": box}, geometry)
    cut = series("truncated")
    cd.truncate(cut.files[2])
    cd.write_rtstruct(data / "truncated-RS.dcm", cut, {"PTV": box}, geometry)
    other = series("other")
    cd.write_rtstruct(data / "other-RS.dcm", other, {"PTV": box}, geometry, referenced_series=generate_uid())
    before = cd.snapshot(data), cd.snapshot(t1_dicom.root)

    t1 = str(t1_dicom.folder)
    manifest = write_manifest(tmp_path / "manifest.csv", [
        ["case", "input", "mask", "segment", "series", "n_jitters"],
        ["rtstruct", t1, str(t1_dicom.rtstruct), "Left ventricle", "", "1"],
        ["seg", t1, str(t1_dicom.seg), "ventricles", "", "1"],
        ["seg-nrrd", t1, str(t1_dicom.seg_nrrd), "Ventricle (output)", "", "1"],
        ["export", "data/export", "data/export", "PTV", "", "1"],
        ["two-series-chosen", "data/two-series", "data/two-series-RS.dcm", "PTV", two.uid, "1"],
        ["stray-files", "data/stray-files", "data/stray-files-RS.dcm", "PTV", "", "1"],
        ["two-series", "data/two-series", "data/two-series-RS.dcm", "PTV", "", "1"],
        ["missing-slice", "data/missing-slice", "data/missing-slice-RS.dcm", "PTV", "", "1"],
        ["tilted", "data/tilted", "data/tilted-RS.dcm", "PTV", "", "1"],
        ["truncated", "data/truncated", "data/truncated-RS.dcm", "PTV", "", "1"],
        ["other-series", "data/other", "data/other-RS.dcm", "PTV", "", "1"],
        ["unknown-name", "data/export", "data/export", "Bladder", "", "1"]])
    out = tmp_path / "cohort"
    result = cohort.run_cohort(manifest, T1_MODEL, "forward", out, workers=2)
    rows = {r["case"]: r for r in cohort.read_rows(result.csv)}
    ok = ["rtstruct", "seg", "seg-nrrd", "export", "two-series-chosen", "stray-files"]
    assert [c for c, r in rows.items() if r["status"] == "ok"] == ok
    errors = {
        "two-series": "2 image series in one folder; choose one by its UID",
        "missing-slice": "a slice is missing",
        "tilted": "gantry tilt of about",
        "truncated": f"{cut.files[2].name}: the file is incomplete",
        "other-series": "'PTV' refers to series",
        "unknown-name": "no structure called 'Bladder' in this folder's structure files (RS.dcm: 'PTV')"}
    files = {case: tmp_path / f"data/{case}-RS.dcm" for case in errors}
    files.update({"other-series": data / "other-RS.dcm", "unknown-name": data / "export"})
    for case, message in errors.items():
        assert rows[case]["status"] == "failed" and message in rows[case]["error"], (case, rows[case]["error"])
        assert (rows[case]["structure"], rows[case]["structure_file"]) == (
            "Bladder" if case == "unknown-name" else "PTV", str(files[case]))
    # what each case read: the series, the structure's name as its file spells it, and the file
    assert rows["rtstruct"]["series_uid"] == t1_dicom.series.uid
    assert (rows["seg"]["structure"], rows["seg"]["structure_file"]) == ("Ventricles", str(t1_dicom.seg))
    assert rows["seg-nrrd"]["structure"] == "Ventricle (output)"
    assert (rows["export"]["structure"], rows["export"]["structure_file"]) == ("PTV", str(data / "export" / "RS.dcm"))
    assert rows["two-series-chosen"]["series_uid"] == two.uid
    summary = json.loads((out / "rtstruct" / "summary.json").read_text())
    assert summary["structure"]["name"] == "Left ventricle" and summary["series"][0]["files"] == 156
    assert rows["rtstruct"]["evaluations"] == summary["forward"]["evaluations"] > 0
    assert (cd.snapshot(data), cd.snapshot(t1_dicom.root)) == before  # nothing written into any input folder
