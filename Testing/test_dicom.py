"""DICOM series as inputs (IBIXLogic.dicom): the T1 demo written as a DICOM series reads back as the NRRD does
(values, geometry, maps of the demo model), enhanced multi-frame and rescaled series too, and each hostile folder
ends in a named error or is read correctly; nothing is ever written into a DICOM folder."""
import json
import shutil

import numpy as np
import pytest

import clinical_data as cd
import IBIXLogic as ibx
from IBIXLogic import dicom
from IBIXLogic.cli import main

MODEL = cd.ROOT / "Resources" / "Models" / "t1_to_t2_cae.onnx"


@pytest.fixture(scope="module")
def small():
    """A 12-slice, 48 x 40 crop of the T1 demo around the ventricle: hostile folders are made from it."""
    x, geometry = ibx.read_volume(cd.T1)
    return cd.crop(x, geometry, (slice(86, 98), slice(96, 144), slice(66, 106)))


def assert_same_grid(geometry, expected):
    assert geometry.shape == expected.shape
    np.testing.assert_allclose(geometry.origin, expected.origin, rtol=0, atol=1e-9)
    np.testing.assert_allclose(geometry.spacing, expected.spacing, rtol=1e-12)
    np.testing.assert_allclose(geometry.direction, expected.direction, rtol=0, atol=1e-12)


# -- the T1 demo as a DICOM series ----------------------------------------------------------------------------
def test_series_reads_as_the_nrrd_and_its_folder_is_untouched(t1_dicom):
    before = cd.snapshot(t1_dicom.folder)
    array, geometry, series = dicom.read_series(t1_dicom.folder)
    assert array.shape == t1_dicom.x.shape and np.array_equal(array, t1_dicom.x)  # stored uint16, slope 1, same values
    assert_same_grid(geometry, t1_dicom.geometry)
    # the files are named at random: slice order comes from the positions, not the names
    assert list(series.files) == t1_dicom.series.files and list(series.instances) == t1_dicom.series.instances
    assert series.uid == t1_dicom.series.uid and series.frame_of_reference == t1_dicom.series.frame_of_reference
    assert series.to_dict()["files"] == 156 and series.to_dict()["shape"] == [156, 233, 197]
    volume, same = ibx.read_volume(t1_dicom.folder)  # the read_volume hook
    assert np.array_equal(volume, array) and same.matches(geometry, tolerance=1e-12)
    assert cd.snapshot(t1_dicom.folder) == before


def test_forward_and_backward_maps_from_the_series_equal_those_from_the_nrrd(t1_dicom, tmp_path):
    """The acceptance: the demo model on the real series; both maps equal the NRRD's to float rounding."""
    before = cd.snapshot(t1_dicom.folder)
    runs = {}
    for name, source in (("dicom", t1_dicom.folder), ("nrrd", cd.T1)):
        out = tmp_path / name
        assert main(["forward", "--model", str(MODEL), "--input", str(source), "--mask", str(cd.T1_INPUT_MASK),
                     "--n-jitters", "2", "-o", str(out / "f"), "--no-png", "--quiet"]) == 0
        assert main(["backward", "--model", str(MODEL), "--input", str(source), "--out-mask",
                     str(cd.T1_OUTPUT_MASK), "--n-jitters", "1", "-o", str(out / "b"), "--no-png", "--quiet"]) == 0
        runs[name] = out
    for stem in ("f/forward_signed", "f/forward_normalized", "b/backward", "b/backward_blocks"):
        a, ga = ibx.read_volume(runs["dicom"] / f"{stem}.nrrd")
        b, gb = ibx.read_volume(runs["nrrd"] / f"{stem}.nrrd")
        assert_same_grid(ga, gb)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * max(1.0, float(np.abs(b).max())))
        assert np.abs(b).max() > 0
    summary = json.loads((runs["dicom"] / "f" / "summary.json").read_text())
    assert summary["series"][0]["series_uid"] == t1_dicom.series.uid
    assert summary["series"][0]["files"] == 156
    assert json.loads((runs["nrrd"] / "f" / "summary.json").read_text())["series"] == [None]
    assert cd.snapshot(t1_dicom.folder) == before


def test_output_inside_the_dicom_folder_is_refused(t1_dicom, tmp_path, capsys):
    before = cd.snapshot(t1_dicom.folder)
    code = main(["predict", "--model", str(MODEL), "--input", str(t1_dicom.folder), "-o",
                 str(t1_dicom.folder / "out")])
    assert code == 2 and "inside the input folder" in capsys.readouterr().err
    assert cd.snapshot(t1_dicom.folder) == before


def test_a_dicom_file_as_a_volume_points_to_its_folder(t1_dicom):
    with pytest.raises(ibx.InputError, match=f"a DICOM file; IBIX reads a DICOM series from its folder: give the "
                                             f"folder {t1_dicom.folder} \\(with --series {t1_dicom.series.uid}"):
        ibx.read_volume(t1_dicom.series.files[0])


def test_rescale_slope_and_intercept_per_slice(small, tmp_path):
    """RescaleSlope varies from slice to slice (as in PET or some CT): every slice keeps its own values."""
    x, geometry = small
    slopes = np.where(np.arange(x.shape[0]) % 3 == 0, 0.5, 1.0)
    cd.write_series(tmp_path / "s", x.astype(np.float64) - 1000, geometry, slope=slopes, intercept=-1000)
    array, read, _ = dicom.read_series(tmp_path / "s")
    assert np.array_equal(array, x.astype(np.float64) - 1000)
    assert_same_grid(read, geometry)
    cd.write_series(tmp_path / "ct", x.astype(np.float64) - 1024, geometry, intercept=-1024)  # one rescale: HU
    array, _, _ = dicom.read_series(tmp_path / "ct")
    assert np.array_equal(array, x.astype(np.float64) - 1024)


def test_enhanced_multiframe_mr_is_read_frame_by_frame(t1_dicom, tmp_path):
    """An Enhanced MR file with shuffled frames and a shared rescale: handled, equal to the NRRD."""
    cd.write_enhanced(tmp_path / "enhanced" / "MR.dcm", t1_dicom.x, t1_dicom.geometry, slope=0.5, intercept=-20)
    array, geometry, series = dicom.read_series(tmp_path / "enhanced")
    assert np.array_equal(array, t1_dicom.x) and array.shape == (156, 233, 197)
    assert_same_grid(geometry, t1_dicom.geometry)
    assert series.shape == (156, 233, 197) and len(series.instances) == 1


def test_a_one_slice_series_is_one_slice_at_its_position(t1_dicom, tmp_path):
    x, geometry = cd.crop(t1_dicom.x, t1_dicom.geometry, (slice(93, 94), slice(0, 233), slice(0, 197)))
    cd.write_series(tmp_path / "slice", x, geometry)
    array, read, _ = dicom.read_series(tmp_path / "slice")
    assert np.array_equal(array, x)
    assert_same_grid(read, geometry)  # the slice's own position; its thickness (1 mm) as the third spacing


# -- hostile folders -------------------------------------------------------------------------------------------
def _missing_slice(folder, x, geometry):
    written = cd.write_series(folder, x, geometry)
    written.files[5].unlink()


def _uneven(folder, x, geometry):
    cd.write_series(folder, x, geometry, positions=[k + (0.3 if k >= 7 else 0.0) for k in range(x.shape[0])])


def _tilted(folder, x, geometry):
    cd.write_series(folder, x, geometry, shear=geometry.direction[:, 1] * np.tan(np.radians(12.0)))


def _mixed(folder, x, geometry):
    written = cd.write_series(folder, x, geometry)
    cd.reorient(written.files[0])


def _truncated(folder, x, geometry):
    written = cd.write_series(folder, x, geometry)
    cd.truncate(written.files[4])


def _truncated_last(folder, x, geometry):
    written = cd.write_series(folder, x, geometry)
    cd.truncate(written.files[-1], keep=0.3)


def _echoes(folder, x, geometry):
    cd.write_enhanced(folder / "MR.dcm", x, geometry, repeats=2)


def _legacy_multiframe(folder, x, geometry):
    import pydicom

    path = cd.write_enhanced(folder / "MR.dcm", x, geometry).files[0]
    ds = pydicom.dcmread(str(path))
    del ds.PerFrameFunctionalGroupsSequence, ds.SharedFunctionalGroupsSequence
    ds.save_as(str(path))


def _two_series(folder, x, geometry):
    cd.write_series(folder, x, geometry, description="T1 axial")
    cd.write_series(folder, x[:6], geometry, description="T1 post-contrast", number=7, seed=1)


def _only_structures(folder, x, geometry):
    written = cd.write_series(folder / "elsewhere", x, geometry)
    cd.write_rtstruct(folder / "RS.dcm", written, {"box": x > 100}, geometry)


HOSTILE = {
    "missing slice": (_missing_slice, "a slice is missing: the gap between"),
    "uneven spacing": (_uneven, "uneven slice spacing"),
    "gantry tilt": (_tilted, r"gantry tilt of about 12\.0°"),
    "mixed orientations": (_mixed, "mixed orientations in one series: 1 "),
    "truncated file": (_truncated, "the file is incomplete"),
    "truncated last slice": (_truncated_last, "the file is incomplete"),  # GDCM would drop it without a gap
    "several echoes in one file": (_echoes, "share a slice position"),
    "legacy multi-frame file": (_legacy_multiframe, "a multi-frame image without per-frame functional groups"),
    "two series": (_two_series, "2 image series in one folder; choose one by its UID"),
    "only a structure set": (_only_structures, "no DICOM image series in this folder: it holds only RT structure "
                                               "set"),
    "empty folder": (lambda folder, x, geometry: folder.mkdir(), "no DICOM file"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_folders_end_in_named_errors(case, small, tmp_path):
    make, message = HOSTILE[case]
    folder = tmp_path / "dicom"
    make(folder, *small)
    before = cd.snapshot(folder)
    with pytest.raises(ibx.InputError, match=message) as error:
        dicom.read_series(folder)
    assert str(folder) in str(error.value)
    assert cd.snapshot(folder) == before


def test_a_truncated_file_is_named(small, tmp_path):
    written = cd.write_series(tmp_path / "dicom", *small)
    cd.truncate(written.files[4])
    with pytest.raises(ibx.InputError, match=rf"{written.files[4].name}: the file is incomplete: its header declares "
                                             r"40×48×1 voxels, 3840 bytes of pixel data, but it holds \d+ bytes"):
        dicom.read_series(tmp_path / "dicom")


def test_a_series_declaring_more_voxels_than_the_budget_is_refused_before_its_pixels_are_read(small, tmp_path):
    """The memory check of the whole series (12 slices of 48 x 40 16-bit pixels, each with a float32 copy: 6 bytes a
    voxel) comes before any file's pixel data is read: a truncated file behind it is not even reached."""
    x, geometry = small
    written = cd.write_series(tmp_path / "dicom", x, geometry)
    needed = 12 * 48 * 40 * (2 + 4)
    array, _, _ = dicom.read_series(tmp_path / "dicom", budget=needed)
    assert np.array_equal(array, x)
    cd.truncate(written.files[4])
    with pytest.raises(ibx.InputError, match=rf"{tmp_path / 'dicom'} \(series {written.uid}\), 12 files: its header "
                                             r"declares 40×48×12 voxels \(46080 bytes as stored, 138240 bytes with "
                                             r"IBIX's float32 copy\), more than the 138239 bytes") as error:
        dicom.read_series(tmp_path / "dicom", budget=needed - 1)
    assert written.files[4].name not in str(error.value)
    with pytest.raises(ibx.InputError, match=f"{written.files[4].name}: the file is incomplete"):
        dicom.read_series(tmp_path / "dicom", budget=needed)


def test_two_series_are_listed_and_chosen_by_uid(small, tmp_path):
    x, geometry = small
    folder = tmp_path / "dicom"
    cd.write_series(folder, x, geometry, description="T1 axial")
    post = cd.write_series(folder, x[:6] + 7, geometry, description="T1 post-contrast", number=7, seed=1)
    with pytest.raises(ibx.InputError) as error:
        dicom.read_series(folder)
    message = str(error.value)
    assert "'T1 axial', MR, 12 × 48 × 40 voxels, 12 files" in message
    assert f"{post.uid} (#7 'T1 post-contrast', MR, 6 × 48 × 40 voxels, 6 files)" in message
    array, read, series = dicom.read_series(folder, post.uid)
    assert np.array_equal(array, x[:6] + 7) and series.uid == post.uid and read.shape == (6, 48, 40)
    with pytest.raises(ibx.InputError, match="no image series with UID 1.2.3; its image series are"):
        dicom.read_series(folder, "1.2.3")


def test_other_files_in_the_folder_are_ignored(small, tmp_path):
    """Non-DICOM files, a DICOMDIR-like stray file and a structure set beside the series: handled, the same
    volume."""
    x, geometry = small
    folder = tmp_path / "dicom"
    written = cd.write_series(folder, x, geometry)
    (folder / "README.txt").write_text("exported by a PACS\n")
    (folder / ".DS_Store").write_bytes(np.random.default_rng(0).bytes(6148))
    cd.write_rtstruct(folder / "RS.dcm", written, {"box": x > 100}, geometry)
    array, read, series = dicom.read_series(folder)
    assert np.array_equal(array, x) and len(series.files) == 12
    assert_same_grid(read, geometry)
    kinds = [s.kind for s in dicom.list_series(folder)]
    assert kinds == [None, "RT structure set"]


def test_series_option_on_the_command_line(small, tmp_path, capsys):
    x, geometry = small
    folder = tmp_path / "dicom"
    first = cd.write_series(folder, x, geometry, description="T1 axial")
    cd.write_series(folder, x[:6], geometry, description="T1 post-contrast", number=7, seed=1)
    mask = np.zeros(x.shape, np.uint8)
    mask[5:7, 20:26, 18:24] = 1
    ibx.write_volume(tmp_path / "mask.nrrd", mask, geometry)
    args = ["forward", "--model", str(MODEL), "--input", str(folder), "--mask", str(tmp_path / "mask.nrrd"),
            "--n-jitters", "1", "--no-png", "-o"]
    assert main(args + [str(tmp_path / "a")]) == 2
    assert "2 image series in one folder" in capsys.readouterr().err
    assert main(args + [str(tmp_path / "b"), "--series", first.uid]) == 0
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["series"][0]["series_uid"] == first.uid and summary["series"][0]["description"] == "T1 axial"
    assert main(args + [str(tmp_path / "c"), "--series", first.uid, "--series", first.uid]) == 2
    assert "2 series UID(s) given for 1 DICOM folder input(s)" in capsys.readouterr().err
