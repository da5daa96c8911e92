"""Structures by name (IBIXLogic.structures): an RT structure set traced from the demo masks rasterises back onto
them, DICOM SEG and .seg.nrrd give exactly each (overlapping) segment's voxels, names are listed and matched, and a
structure drawn on another series or frame of reference is refused."""
import json
import shutil

import numpy as np
import pytest
from pydicom.uid import generate_uid

import clinical_data as cd
import IBIXLogic as ibx
from IBIXLogic import dicom, structures
from IBIXLogic.cli import main

MODEL = cd.ROOT / "Resources" / "Models" / "t1_to_t2_cae.onnx"


def dice(a, b):
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="module")
def series(t1_dicom):
    return dicom.read_series(t1_dicom.folder)[2]


# -- RT structure set -----------------------------------------------------------------------------------------
def test_rtstruct_contours_rasterise_onto_the_masks_they_were_traced_from(t1_dicom, series):
    for name, expected in t1_dicom.masks.items():
        mask, structure, notes = structures.read_structure(t1_dicom.rtstruct, name, t1_dicom.geometry, series)
        assert structure.name == name and structure.format == "rtstruct" and notes == []
        assert dice(mask, expected) >= 0.95  # the acceptance; contours along voxel edges give back every voxel
        assert np.array_equal(mask, expected)


def test_rtstruct_inner_contours_are_holes(t1_dicom, series, tmp_path):
    ring = np.zeros(t1_dicom.x.shape, bool)
    ring[80, 100:130, 80:110] = True
    ring[80, 108:122, 88:102] = False
    ring[81, 100:104, 80:84] = True  # and a second, separate island on the next slice
    path = cd.write_rtstruct(tmp_path / "RS.dcm", t1_dicom.series, {"ring": ring}, t1_dicom.geometry)
    mask = ibx.read_mask(path, segment="ring", reference=t1_dicom.geometry, series=series)
    assert np.array_equal(mask, ring)


def test_maps_are_made_on_the_rtstruct_and_seg_structures(t1_dicom, series, tmp_path):
    model = ibx.load_model(MODEL)
    out = tmp_path / "forward"
    assert main(["forward", "--model", str(MODEL), "--input", str(t1_dicom.folder), "--mask", str(t1_dicom.rtstruct),
                 "--segment", "left VENTRICLE", "--n-jitters", "1", "--no-png", "--quiet", "-o", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["structure"]["name"] == "Left ventricle" and summary["structure"]["file"] == str(t1_dicom.rtstruct)
    assert summary["structure"]["referenced_series_uids"] == [t1_dicom.series.uid]
    mask = ibx.read_mask(t1_dicom.rtstruct, segment="Left ventricle", reference=t1_dicom.geometry, series=series)
    expected = ibx.forward_mapping(model, t1_dicom.x, mask, n_jitters=1, geometry=t1_dicom.geometry)
    written, _ = ibx.read_volume(out / "forward_signed.nrrd")
    np.testing.assert_allclose(written, expected.signed, rtol=0, atol=1e-6 * float(np.abs(expected.signed).max()))

    out = tmp_path / "backward"
    assert main(["backward", "--model", str(MODEL), "--input", str(t1_dicom.folder), "--out-mask", str(t1_dicom.seg),
                 "--out-segment", "Ventricle (output)", "--n-jitters", "1", "--no-png", "--quiet", "-o",
                 str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["structure"]["name"], summary["structure"]["format"]) == ("Ventricle (output)", "dicom-seg")
    expected = ibx.backward_mapping(model, t1_dicom.x, t1_dicom.masks["Ventricle (output)"], n_jitters=1,
                                    geometry=t1_dicom.geometry)
    written, _ = ibx.read_volume(out / "backward.nrrd")
    np.testing.assert_allclose(written, expected.map, rtol=0, atol=1e-6)


def test_a_structure_set_of_another_series_or_frame_of_reference_is_refused(t1_dicom, series, tmp_path):
    other = generate_uid()
    path = cd.write_rtstruct(tmp_path / "other-series.dcm", t1_dicom.series, t1_dicom.masks, t1_dicom.geometry,
                             referenced_series=other)
    with pytest.raises(ibx.InputError, match=f"refers to series {other}, not to the input series "
                                             f"{t1_dicom.series.uid}; give the series it was drawn on"):
        ibx.read_mask(path, segment="Left ventricle", reference=t1_dicom.geometry, series=series)
    frame = generate_uid()
    path = cd.write_rtstruct(tmp_path / "other-frame.dcm", t1_dicom.series, t1_dicom.masks, t1_dicom.geometry,
                             frame=frame)
    with pytest.raises(ibx.InputError, match=f"is in frame of reference {frame}"):
        ibx.read_mask(path, segment="Left ventricle", reference=t1_dicom.geometry, series=series)
    seg = cd.write_seg(tmp_path / "seg.dcm", cd.WrittenSeries(tmp_path, t1_dicom.series.study, other,
                                                              t1_dicom.series.frame_of_reference,
                                                              instances=t1_dicom.series.instances),
                       t1_dicom.masks, t1_dicom.geometry)
    with pytest.raises(ibx.InputError, match=f"refers to series {other}"):
        ibx.read_mask(seg, segment="Left ventricle", reference=t1_dicom.geometry, series=series)


def test_contours_between_the_inputs_slices_are_refused(t1_dicom, series):
    shifted = ibx.Geometry(np.asarray(t1_dicom.geometry.origin) + [0.0, 0.0, 0.5], t1_dicom.geometry.spacing,
                           t1_dicom.geometry.direction, t1_dicom.geometry.shape)
    with pytest.raises(ibx.InputError, match="contour 1 of 'Left ventricle' does not lie on a slice of the input"):
        structures.read_structure(t1_dicom.rtstruct, "Left ventricle", shifted)


def test_a_structure_on_a_non_dicom_input_is_placed_by_coordinates_and_says_so(t1_dicom, tmp_path, capsys):
    mask, _, notes = structures.read_structure(t1_dicom.rtstruct, "Left ventricle", t1_dicom.geometry)
    assert np.array_equal(mask, t1_dicom.masks["Left ventricle"])
    assert notes == ["the input is not a DICOM series, so IBIX cannot check that 'Left ventricle' was drawn on it; "
                     "it is placed by its patient coordinates (LPS)"]
    assert main(["forward", "--model", str(MODEL), "--input", str(cd.T1), "--mask", str(t1_dicom.rtstruct),
                 "--segment", "Left ventricle", "--n-jitters", "1", "--no-png", "-o", str(tmp_path / "f")]) == 0
    assert "cannot check that 'Left ventricle' was drawn on it" in capsys.readouterr().err


# -- DICOM SEG and .seg.nrrd ----------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["seg", "seg_nrrd"])
def test_segments_are_exactly_their_voxels(t1_dicom, series, source):
    path = getattr(t1_dicom, source)
    for name, expected in t1_dicom.segments.items():  # "Ventricles" overlaps the other two
        mask = ibx.read_mask(path, segment=name, reference=t1_dicom.geometry, series=series)
        assert np.array_equal(mask, expected), name


def test_seg_nrrd_keeps_overlapping_segments_in_layers(t1_dicom):
    found = structures.list_structures(t1_dicom.seg_nrrd)
    assert [(s.name, s.number, s.layer) for s in found] == [
        ("Left ventricle", 1, 0), ("Ventricle (output)", 1, 1), ("Ventricles", 1, 2)]
    # without a reference grid, the segment on its own (cropped) grid
    mask, structure, _ = structures.read_structure(t1_dicom.seg_nrrd, "Ventricles")
    assert mask.sum() == t1_dicom.segments["Ventricles"].sum() and mask.shape != t1_dicom.x.shape


def test_a_seg_nrrd_on_another_grid_is_resampled_and_says_so(t1_dicom, tmp_path):
    coarse = ibx.Geometry(t1_dicom.geometry.origin, (2.0, 2.0, 2.0), t1_dicom.geometry.direction, (78, 117, 99))
    mask = np.zeros(coarse.shape, bool)
    mask[46, 50:60, 40:45] = True
    path = cd.write_seg_nrrd(tmp_path / "coarse.seg.nrrd", {"box": mask}, coarse, crop=False)
    read, _, notes = structures.read_structure(path, "box", t1_dicom.geometry)
    assert "placed onto the input's grid (nearest neighbour)" in notes[0]
    # a fine voxel is in the mask when its centre lies in a coarse voxel of the box (centres on a boundary: either)
    inside, outside = [], []
    for axis, (low, high) in enumerate([(46, 46), (50, 59), (40, 44)]):
        coarse = np.arange(t1_dicom.x.shape[axis]) / 2.0
        inside.append((coarse > low - 0.5) & (coarse < high + 0.5))
        outside.append((coarse < low - 0.5) | (coarse > high + 0.5))
    assert read[np.ix_(*inside)].all() and read[np.ix_(*inside)].size == 1 * 19 * 9
    far = np.logical_or.reduce(np.meshgrid(*outside, indexing="ij"))
    assert not read[far].any()


def test_fractional_seg_is_thresholded_at_one_half(t1_dicom, series, tmp_path):
    values = np.zeros(t1_dicom.x.shape)
    values[90, 100:110, 80:90] = 0.8
    values[90, 110:112, 80:90] = 0.3
    values[91, 100:102, 80:82] = 0.5
    path = cd.write_seg(tmp_path / "fractional.dcm", t1_dicom.series, {}, t1_dicom.geometry,
                        fractional={"probability": values})
    mask = ibx.read_mask(path, segment="probability", reference=t1_dicom.geometry, series=series)
    assert np.array_equal(mask, np.round(values * 255) >= 127.5)


def test_a_truncated_seg_is_refused(t1_dicom, series, tmp_path):
    path = tmp_path / "SEG.dcm"
    shutil.copy(t1_dicom.seg, path)
    ds = dicom.read_header(path)
    declared = -(-ds.Columns * ds.Rows * ds.NumberOfFrames // 8)  # one bit a voxel, rounded up to whole bytes
    assert ds.BitsAllocated == 1
    cd.truncate(path, keep=0.8)
    with pytest.raises(ibx.InputError, match=f"SEG.dcm: the file is incomplete: its header declares {ds.Columns}×"
                                             f"{ds.Rows}×{ds.NumberOfFrames} voxels, {declared} bytes of pixel data"):
        ibx.read_mask(path, segment="Ventricles", reference=t1_dicom.geometry, series=series)


def test_a_seg_nrrd_that_slicerio_cannot_read_is_named_in_every_use(tmp_path):
    """SimpleITK sees the segment fields but slicerio refuses the header (a space it does not know): a clear error
    when the mask is read, listed, or read by its label value."""
    path = tmp_path / "odd.seg.nrrd"
    path.write_bytes(b"NRRD0004\ntype: uint8\ndimension: 3\nspace: scanner-xyz\nsizes: 2 2 2\n"
                     b"space directions: (1,0,0) (0,1,0) (0,0,1)\nencoding: raw\nspace origin: (0,0,0)\n"
                     b"Segment0_ID:=a\nSegment0_Name:=a\nSegment0_LabelValue:=1\nSegment0_Layer:=0\n\n" + bytes(8))
    message = "odd.seg.nrrd: not a readable Slicer segmentation"
    for read in (lambda: ibx.read_mask(path, segment="a"), lambda: structures.list_structures(path),
                 lambda: ibx.read_mask(path)):
        with pytest.raises(ibx.InputError, match=message):
            read()


# -- names ----------------------------------------------------------------------------------------------------
def test_names_are_matched_and_unknown_names_list_the_file(t1_dicom, series, tmp_path):
    geometry = t1_dicom.geometry
    mask = ibx.read_mask(t1_dicom.seg_nrrd, segment="  left   ventricle ", reference=geometry)
    assert np.array_equal(mask, t1_dicom.masks["Left ventricle"])
    with pytest.raises(ibx.InputError, match="no structure called 'Bladder'; this DICOM SEG holds: 'Left ventricle', "
                                             "'Ventricle \\(output\\)', 'Ventricles'"):
        ibx.read_mask(t1_dicom.seg, segment="Bladder", reference=geometry, series=series)
    with pytest.raises(ibx.InputError, match="a DICOM RT structure set holding 2 structures .*pick one by name"):
        ibx.read_mask(t1_dicom.rtstruct, reference=geometry, series=series)
    with pytest.raises(ibx.InputError, match="select one by its name .* not by a label value"):
        ibx.read_mask(t1_dicom.rtstruct, label=1, reference=geometry)
    with pytest.raises(ibx.InputError, match="holds named structures \\(overlapping, in layers\\)"):
        ibx.read_mask(t1_dicom.seg_nrrd, label=1)
    single = cd.write_seg_nrrd(tmp_path / "one-layer.seg.nrrd", {"a": t1_dicom.masks["Left ventricle"]}, geometry)
    assert np.array_equal(ibx.read_mask(single, label=1, reference=geometry), t1_dicom.masks["Left ventricle"])
    with pytest.raises(ibx.InputError, match="not both"):
        ibx.read_mask(t1_dicom.seg_nrrd, label=1, segment="Ventricles")
    with pytest.raises(ibx.InputError, match="a label volume has no structure names; select its voxels by value"):
        ibx.read_mask(cd.T1_INPUT_MASK, segment="Left ventricle", reference=geometry)
    same = {"ventricle": t1_dicom.masks["Left ventricle"], "Ventricle": t1_dicom.masks["Ventricle (output)"]}
    path = cd.write_rtstruct(tmp_path / "RS.dcm", t1_dicom.series, same, geometry)
    assert np.array_equal(ibx.read_mask(path, segment="Ventricle", reference=geometry), same["Ventricle"])  # exact
    with pytest.raises(ibx.InputError, match="2 structures are called 'VENTRICLE' \\(numbers \\[1, 2\\]\\)"):
        ibx.read_mask(path, segment="VENTRICLE", reference=geometry)


def test_a_dicom_folder_is_searched_for_the_structure(t1_dicom, series, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(t1_dicom.folder, folder)
    shutil.copy(t1_dicom.rtstruct, folder / "RS.dcm")
    shutil.copy(t1_dicom.seg, folder / "SEG.dcm")
    _, geometry, copied = dicom.read_series(folder)
    mask, structure, _ = structures.read_structure(folder, "Ventricles", geometry, copied)
    assert structure.file == folder / "SEG.dcm" and np.array_equal(mask, t1_dicom.segments["Ventricles"])
    with pytest.raises(ibx.InputError, match="2 structure files hold 'Left ventricle'"):
        structures.read_structure(folder, "Left ventricle", geometry, copied)


def test_ibix_masks_lists_the_names(t1_dicom, capsys):
    assert main(["masks", str(t1_dicom.rtstruct)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"{t1_dicom.rtstruct}: DICOM RT structure set, 2 structures; refers to series "
                      f"{t1_dicom.series.uid}")
    assert out[1].split() == ["1", "Left", "ventricle", "7", "contours", "(CLOSED_PLANAR)"]
    assert main(["masks", str(t1_dicom.seg), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["name"], r["number"], r["details"]) for r in rows] == [
        ("Left ventricle", 1, "5 frames, binary"), ("Ventricle (output)", 2, "1 frame, binary"),
        ("Ventricles", 3, "5 frames, binary")]
    assert main(["masks", str(t1_dicom.seg_nrrd)]) == 0
    assert "Slicer segmentation, 3 structures" in capsys.readouterr().out
    assert main(["masks", str(cd.T1_INPUT_MASK)]) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["1", "value", "1,", "1680", "voxels"]
    assert main(["masks", str(t1_dicom.root / "none.dcm")]) == 2
