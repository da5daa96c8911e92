"""Volumes and masks keep their geometry through SimpleITK; masks are resampled onto the reference grid; an
interrupted or failed write leaves no partial file (io.py)."""
import os
import struct
from fractions import Fraction

import numpy as np
import pytest

import IBIXLogic as ibx
from IBIXLogic import io as ibx_io

OBLIQUE = np.array([[0.8660254, -0.5, 0.0], [0.5, 0.8660254, 0.0], [0.0, 0.0, -1.0]])


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_write_read_round_trip_keeps_geometry(tmp_path, rng, suffix):
    array = rng.normal(size=(4, 5, 6)).astype(np.float32)
    geometry = ibx.Geometry((10.0, -20.0, 5.5), (0.8, 1.2, 3.0), OBLIQUE)
    path = ibx.write_volume(tmp_path / f"volume{suffix}", array, geometry)
    back, back_geometry = ibx.read_volume(path)
    np.testing.assert_array_equal(back, array)
    assert back_geometry.matches(geometry.with_shape(array.shape))
    assert [p.name for p in tmp_path.iterdir()] == [f"volume{suffix}"]  # no temporary file left


def test_mask_on_another_grid_is_resampled_onto_the_reference(tmp_path):
    reference = ibx.Geometry((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), np.eye(3), (10, 10, 10))
    coarse = ibx.Geometry((0.5, 0.5, 0.5), (2.0, 2.0, 2.0), np.eye(3))
    labels = np.zeros((5, 5, 5), np.uint8)
    labels[2, 1, 3] = 7  # physical centre x = 0.5 + 2*3 = 6.5, y = 2.5, z = 4.5
    ibx.write_volume(tmp_path / "labels.nrrd", labels, coarse)
    mask = ibx.read_mask(tmp_path / "labels.nrrd", label=7, reference=reference)
    assert mask.shape == (10, 10, 10)
    np.testing.assert_array_equal(np.argwhere(mask), [[z, y, x] for z in (4, 5) for y in (2, 3) for x in (6, 7)])


def test_read_mask_errors(tmp_path):
    ibx.write_volume(tmp_path / "labels.nrrd", np.zeros((3, 3, 3), np.uint8), ibx.Geometry())
    with pytest.raises(ibx.InputError, match="mask is empty"):
        ibx.read_mask(tmp_path / "labels.nrrd")
    with pytest.raises(ibx.InputError, match="no such file"):
        ibx.read_volume(tmp_path / "missing.nrrd")
    (tmp_path / "junk.nrrd").write_bytes(b"\x00garbage")
    with pytest.raises(ibx.InputError, match="not a readable volume"):
        ibx.read_volume(tmp_path / "junk.nrrd")


def test_write_refuses_unknown_format_and_missing_folder(tmp_path):
    with pytest.raises(ibx.InputError, match="unknown volume format"):
        ibx.write_volume(tmp_path / "volume.png", np.zeros((2, 2, 2)), ibx.Geometry())
    with pytest.raises(ibx.InputError, match="does not exist"):
        ibx.write_volume(tmp_path / "no" / "volume.nrrd", np.zeros((2, 2, 2)), ibx.Geometry())


def test_slice_axis_follows_direction_matrix():
    lps = ibx.Geometry((0, 0, 0), (1, 1, 1), np.diag([-1.0, -1.0, 1.0]))
    assert ibx.slice_array_axis(lps, "axial") == 0
    assert ibx.slice_array_axis(lps, "coronal") == 1
    assert ibx.slice_array_axis(lps, "sagittal") == 2
    with pytest.raises(ibx.InputError, match="too oblique"):
        diagonal = np.array([[1, 0, 0], [0, 0.70710678, -0.70710678], [0, 0.70710678, 0.70710678]])
        ibx.slice_array_axis(ibx.Geometry((0, 0, 0), (1, 1, 1), diagonal), "axial")


def test_a_mask_file_with_several_values_needs_a_label(tmp_path):
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1, 1:3, 1:3] = 3
    labels[2, 3:5, 4:6] = 9
    ibx.write_volume(tmp_path / "labels.nrrd", labels, ibx.Geometry())
    with pytest.raises(ibx.InputError, match=r"holds 2 different nonzero values \(3, 9\).*pick one label"):
        ibx.read_mask(tmp_path / "labels.nrrd")
    np.testing.assert_array_equal(ibx.read_mask(tmp_path / "labels.nrrd", label=9), labels == 9)
    binary = (labels > 0).astype(np.float32) * 255  # one nonzero value, whatever it is: a mask
    ibx.write_volume(tmp_path / "binary.nrrd", binary, ibx.Geometry())
    np.testing.assert_array_equal(ibx.read_mask(tmp_path / "binary.nrrd"), labels > 0)


def test_an_image_given_as_a_mask_is_refused_and_left_unchanged(tmp_path):
    import hashlib
    from pathlib import Path
    t1 = Path(__file__).resolve().parents[1] / "Resources" / "SampleData" / "IBIX-T1.nrrd"
    before = hashlib.sha256(t1.read_bytes()).hexdigest()
    with pytest.raises(ibx.InputError, match="is an image or a map of several labels"):
        ibx.read_mask(t1)
    assert hashlib.sha256(t1.read_bytes()).hexdigest() == before


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_interrupted_rename_leaves_no_file(tmp_path, monkeypatch, suffix):
    geometry = ibx.Geometry.identity((4, 5, 6))
    target = tmp_path / f"result{suffix}"

    def fail(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(ibx.InputError, match="cannot write .*No space left"):
        ibx.write_volume(target, np.ones((4, 5, 6), np.float32), geometry)
    assert _listing(tmp_path) == []


def test_failed_write_keeps_the_previous_file_intact(tmp_path, monkeypatch):
    geometry = ibx.Geometry.identity((4, 5, 6))
    target = tmp_path / "result.nrrd"
    ibx.write_volume(target, np.full((4, 5, 6), 3.0, np.float32), geometry)
    real_write = ibx_io.sitk.WriteImage

    def write_half_then_fail(image, name, *args):
        real_write(image, name, *args)
        with open(name, "r+b") as handle:
            handle.truncate(10)
        raise RuntimeError("disk went away")
    monkeypatch.setattr(ibx_io.sitk, "WriteImage", write_half_then_fail)
    with pytest.raises(ibx.InputError, match="cannot write"):
        ibx.write_volume(target, np.zeros((4, 5, 6), np.float32), geometry)
    assert _listing(tmp_path) == ["result.nrrd"]
    np.testing.assert_array_equal(ibx.read_volume(target)[0], 3.0)


def test_keyboard_interrupt_during_a_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def interrupted(image, name, *args):
        with open(name, "wb") as handle:
            handle.write(b"NRRD0004\n")
        raise KeyboardInterrupt
    monkeypatch.setattr(ibx_io.sitk, "WriteImage", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ibx.write_volume(tmp_path / "result.nrrd", np.zeros((2, 3, 4), np.float32), ibx.Geometry.identity((2, 3, 4)))
    assert _listing(tmp_path) == []


# -- wrong arguments of the file, geometry and block helpers (found by Testing/hostile.py) --------------------------

def _identity2():
    return ibx.Geometry.identity((2, 2))


@pytest.mark.parametrize("call, message", [
    (lambda p: ibx.read_volume(None), "path must be the path of a file"),
    (lambda p: ibx.read_volume(5), "path must be the path of a file"),
    (lambda p: ibx.read_volume("x" * 5000), r"volume .* \(5000 characters\) cannot be opened"),
    (lambda p: ibx.read_mask(None), "path must be the path of a file"),
    (lambda p: ibx.read_mask(p / "m.nrrd", label="1"), "label must be an integer"),
    (lambda p: ibx.read_mask(p / "m.nrrd", reference="g"), "reference must be an IBIXLogic.Geometry"),
    (lambda p: ibx.write_volume(p / "v.nrrd", "abc", _identity2()), "volume to write has dtype <U3"),
    (lambda p: ibx.write_volume(p / "v.nrrd", np.zeros((2, 2)), "g"), "geometry must be an IBIXLogic.Geometry"),
    (lambda p: ibx.write_volume(None, np.zeros((2, 2)), _identity2()), "path must be the path of a file"),
    (lambda p: ibx.write_volume(p / "v.nrrd", np.zeros((2, 3)), _identity2()),
     r"geometry \(2D, shape \(2, 2\)\) does not describe the array's grid \(2D, shape \(2, 3\)\)"),
    (lambda p: ibx.write_volume(p / "v.nrrd", np.zeros((2, 2, 2)), _identity2()), "does not describe the array's grid"),
    (lambda p: ibx.resample_mask(np.ones((2, 2)), "g", _identity2()), "geometry must be an IBIXLogic.Geometry"),
    (lambda p: ibx.Geometry.identity("x"), "geometry shape must be a sequence of integers"),
    (lambda p: ibx.Geometry.identity(None), "geometry shape must be a sequence of integers"),
    (lambda p: ibx.Geometry.identity((2, 2.5)), "geometry takes numbers"),
    (lambda p: ibx.Geometry("x", 1, 2), "geometry takes numbers"),
    (lambda p: ibx.Geometry((0.0, 0.0), (1.0, 1.0), np.eye(2), (2, 2, 2)), r"geometry shape \(2, 2, 2\) must hold 2"),
    (lambda p: ibx.grid_blocks((0, 5), 3), "shape must be an integer of at least 1, got 0"),
    (lambda p: ibx.grid_blocks((4, 5), "3"), r"n_blocks \(K\) must be an integer"),
    (lambda p: ibx.superpixel_blocks(np.zeros((4, 4)), "x"), r"n_blocks \(K\) must be an integer"),
    (lambda p: ibx.superpixel_blocks(np.zeros((4, 4)), 3, compactness="x"), "compactness must be"),
    (lambda p: ibx.superpixel_blocks("abc", 3), "image has dtype <U3"),
])
def test_wrong_arguments_of_the_helpers_are_named(tmp_path, call, message):
    ibx.write_volume(tmp_path / "m.nrrd", np.ones((2, 2), np.uint8), _identity2())
    with pytest.raises(ibx.InputError, match=message):
        call(tmp_path)
    assert not list(tmp_path.glob("v.*")) and not list(tmp_path.glob(".*"))


def test_half_precision_volumes_are_written_as_float32(tmp_path):
    array = np.linspace(0, 1, 6, dtype=np.float16).reshape(2, 3)
    ibx.write_volume(tmp_path / "half.nrrd", array, ibx.Geometry.identity((2, 3)))
    read, _ = ibx.read_volume(tmp_path / "half.nrrd")
    assert read.dtype == np.float32
    np.testing.assert_array_equal(read, array.astype(np.float32))


# -- files read to the last voxel ------------------------------------------------------------------------------------
SHAPE = (6, 10, 12)


def _volume(tmp_path, fmt):
    import faults

    geometry = ibx.Geometry((4.0, -3.0, 12.0), (0.9, 0.9, 2.0), np.diag([-1.0, -1.0, 1.0]), SHAPE)
    array = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) % 97 + 1
    return faults.write_format(array, geometry, tmp_path, "v", fmt), array, geometry


@pytest.mark.parametrize("fmt", [f for f in __import__("faults").FORMATS], ids=lambda f: f[0])
def test_a_file_holding_fewer_voxels_than_its_header_declares_is_refused_with_both_sizes(tmp_path, fmt):
    """ITK's NIfTI reader fills the missing voxels with zeros; every format is now refused, naming the file."""
    (path, data), array, geometry = _volume(tmp_path, fmt)
    back, back_geometry = ibx.read_volume(path)
    np.testing.assert_array_equal(back, array)
    assert back_geometry.matches(geometry)
    raw = data.read_bytes()
    data.write_bytes(raw[:len(raw) * 2 // 3])
    with pytest.raises(ibx.InputError) as info:
        ibx.read_volume(path)
    message = str(info.value)
    assert str(path) in message and ("incomplete" in message or "damaged" in message)
    assert f"{int(np.prod(SHAPE)) * 4} bytes of voxel data" in message  # what the header declares, and what is there


def test_a_valid_gzip_stream_holding_half_the_voxels_is_refused(tmp_path):
    import gzip

    (path, _), _, _ = _volume(tmp_path, ("nii.gz", ".nii.gz", True, None))
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:352 + (len(raw) - 352) // 2]))
    with pytest.raises(ibx.InputError, match=r"incomplete: its header declares 12×10×6 voxels, 2880 bytes of voxel "
                                             r"data, but it holds 1440 bytes \(50 %\)"):
        ibx.read_volume(path)


def test_check_voxel_data_is_the_one_size_check():
    """The check every reader calls (DICOM series too): degenerate sizes, memory before any allocation, short
    data, each message naming the file and the sizes."""
    assert ibx_io.check_voxel_data("f.nii", (4, 5, 6), 2, found=240) == 240
    assert ibx_io.check_voxel_data("seg.dcm", (3, 5, 7), Fraction(1, 8), found=14) == 14  # 105 bits: 14 bytes
    with pytest.raises(ibx.InputError, match=r"seg.dcm: the file is incomplete: .* 3×5×7 voxels, 14 bytes of voxel "
                                             r"data, but it holds 13 bytes"):
        ibx_io.check_voxel_data("seg.dcm", (3, 5, 7), Fraction(1, 8), found=13)
    with pytest.raises(ibx.InputError, match=r"f.nii: its header declares 16×16×0 voxels: size 0 along axis 3 is a "
                                             "degenerate dimension"):
        ibx_io.check_voxel_data("f.nii", (16, 16, 0), 4)
    with pytest.raises(ibx.InputError, match=r"declares 2000×2400×600 voxels \(10.7 GiB as stored, 21.5 GiB with "
                                             r"IBIX's float32 copy\), more than the 1 GiB"):
        ibx_io.check_voxel_data("f.nii", (2000, 2400, 600), 4, budget=2**30)
    with pytest.raises(ibx.InputError, match=r"series/: the file is incomplete: .* 480 bytes of pixel data of slice 3, "
                                             r"but it holds 100 bytes"):
        ibx_io.check_voxel_data("series/", (1, 12, 20), 2, found=100, what="pixel data of slice 3")
    assert ibx_io.memory_budget() is None or ibx_io.memory_budget() > 2**28


def test_a_header_declaring_more_voxels_than_memory_allows_is_refused_before_reading(tmp_path, monkeypatch):
    (path, _), _, _ = _volume(tmp_path, ("nrrd raw", ".nrrd", False, None))
    path.write_bytes(path.read_bytes().replace(b"sizes: 12 10 6", b"sizes: 200000 240000 60000"))
    monkeypatch.setattr(ibx_io.sitk.ImageFileReader, "Execute", lambda self: pytest.fail("the voxels were read"))
    with pytest.raises(ibx.InputError, match=r"v.nrrd: its header declares 200000×240000×60000 voxels .* more than "
                                             "the .* this machine allows one volume"):
        ibx.read_volume(path)


def _nifti(tmp_path, edit):
    import faults

    (path, _), array, geometry = _volume(tmp_path, ("nii", ".nii", False, None))
    faults._nifti_edit(path, edit)
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda d: struct.pack_into("<f", d, 80, 0.0),
     r"inconsistent NIfTI geometry: its voxel size pixdim is \(0, 0.9, 2\) mm, which is not a size: ITK reads it as "
     r"\(1, 0.9, 2\) mm, the sform \(sform_code 1\) gives \(0.9, 0.9, 2\) mm"),
    (lambda d: struct.pack_into("<f", d, 80, 1.0),
     r"its voxel size is \(1, 0.9, 2\) mm as ITK reads it \(pixdim \(1, 0.9, 2\) mm\) but \(0.9, 0.9, 2\) mm from the "
     r"sform"),
    (lambda d: struct.pack_into("<f", d, 284, 0.4), r"from the sform"),
    (lambda d: struct.pack_into("<h", d, 46, 0), r"16×16×0 voxels|12×10×0 voxels: size 0 along axis 3"),
    (lambda d: struct.pack_into("<f", d, 108, 1e6), r"incomplete: .* but it holds 0 bytes"),
])
def test_damaged_nifti_headers_are_refused_naming_the_cause(tmp_path, edit, message):
    with pytest.raises(ibx.InputError, match=message):
        ibx.read_volume(_nifti(tmp_path, edit))


def test_a_nifti_sform_that_agrees_with_pixdim_is_read_as_itk_and_nibabel_read_it(tmp_path):
    """A moved sform (its own origin; the qform another): ITK takes the sform, as nibabel does, so it is read."""
    path = _nifti(tmp_path, lambda d: struct.pack_into("<f", d, 292, 55.0))  # srow_x[3]: the x origin (RAS)
    _, geometry = ibx.read_volume(path)
    assert geometry.origin[0] == pytest.approx(-55.0)  # LPS


def test_a_nifti2_file_is_named_as_such(tmp_path):
    import faults

    (path, _), _, _ = _volume(tmp_path, ("nii", ".nii", False, None))
    faults._nifti2(path)
    with pytest.raises(ibx.InputError, match="it is a NIfTI-2 file, which ITK .* does not read: convert it to NIfTI-1"):
        ibx.read_volume(path)


@pytest.mark.parametrize("name", ["volume.nii.gz", "volume.nii"])
def test_a_short_write_is_refused_and_leaves_nothing(tmp_path, monkeypatch, name):
    """ITK's NIfTI writer reports a full disk only on stderr and leaves a short file: the write is checked."""
    write = ibx_io.sitk.WriteImage

    def short(image, path, *args):
        write(image, path, *args)
        os.truncate(path, os.path.getsize(path) * 2 // 3)
    monkeypatch.setattr(ibx_io.sitk, "WriteImage", short)
    with pytest.raises(ibx.InputError, match=rf"{name}: cannot write \(the file written is incomplete, is the disk "
                                             r"full\?"):
        ibx.write_volume(tmp_path / name, np.ones(SHAPE, np.float32), ibx.Geometry.identity(SHAPE))
    assert list(tmp_path.iterdir()) == []
