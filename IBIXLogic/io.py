"""Read and write volumes and masks with SimpleITK (NIfTI, NRRD, MHA), keeping their geometry."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .checks import check_arguments, check_array, check_geometry, check_path
from .errors import InputError, is_file, is_folder
from .geometry import Geometry

VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in VOLUME_SUFFIXES if name.endswith(s)), "")


def read_volume(path: str | os.PathLike, series: str | None = None) -> tuple[np.ndarray, Geometry]:
    """Read a scalar volume.

    Parameters
    ----------
    path : path-like
        A NIfTI, NRRD or MHA file, or a folder of DICOM files (see :func:`IBIXLogic.dicom.read_series`).
    series : str, optional
        For a DICOM folder holding several image series: the SeriesInstanceUID of the one to read.

    Returns
    -------
    array : ndarray
        Voxel values in numpy order (slices, rows, cols), the file's pixel type.
    geometry : Geometry
        Origin, spacing and direction of the file (LPS).
    """
    path = check_path("path", path)
    from . import dicom

    if series is not None or is_folder(path):
        return dicom.read_series(path, series)[:2]
    if dicom.is_dicom_file(path):  # one file of a series: GDCM would read it alone, without the series' checks
        raise InputError(f"{path}: a DICOM file; IBIX reads a DICOM series from its folder: give the folder "
                         f"{path.parent} (with --series {dicom.read_header(path).get('SeriesInstanceUID', 'UID')} "
                         "if it holds several series)")
    if not is_file(path, "volume", InputError):
        raise InputError(f"{path}: no such file")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"{path}: not a readable volume (NIfTI, NRRD or MHA expected): "
                         f"{str(exc).strip().splitlines()[-1]}") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                         "IBIX reads one channel per file (pass one file per channel)")
    return sitk.GetArrayFromImage(image), Geometry.from_sitk(image)


def write_volume(path: str | os.PathLike, array: np.ndarray, geometry: Geometry) -> Path:
    """Write a volume with the given geometry.

    The file is written under a temporary name in the same folder and renamed when complete, so an
    interrupted write never leaves a partial file under the final name.
    """
    path = check_path("path", path)
    suffix = _suffix(path)
    if not suffix:
        raise InputError(f"{path}: unknown volume format; use one of {', '.join(VOLUME_SUFFIXES)}")
    if not path.parent.is_dir():
        raise InputError(f"{path.parent}: output folder does not exist")
    array = check_array("volume to write", array)
    geometry = check_geometry("geometry", geometry)
    if geometry is None or geometry.dimension != array.ndim or geometry.shape not in (None, array.shape):
        raise InputError(f"{path}: the geometry ({'none' if geometry is None else f'{geometry.dimension}D, shape '}"
                         f"{'' if geometry is None else geometry.shape}) does not describe the array's grid "
                         f"({array.ndim}D, shape {array.shape}); give the geometry of the array")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:  # no half-precision pixel type in SimpleITK
        array = array.astype(np.float32)
    image = sitk.GetImageFromArray(array)
    geometry.to_sitk(image)
    temporary = path.with_name(f".{path.name[: -len(suffix)]}.{uuid.uuid4().hex[:8]}.partial{suffix}")
    try:
        sitk.WriteImage(image, str(temporary), True)
        os.replace(temporary, path)
    except (RuntimeError, OSError) as exc:
        raise InputError(f"{path}: cannot write ({exc}); check the folder is writable") from None
    finally:  # also on KeyboardInterrupt or any other interruption: never leave the partial file
        temporary.unlink(missing_ok=True)
    return path


def resample_mask(mask: np.ndarray, geometry: Geometry, reference: Geometry) -> np.ndarray:
    """Nearest-neighbour resampling of a boolean mask onto a reference grid (reference.shape needed)."""
    mask = check_array("mask", mask)
    geometry, reference = check_geometry("geometry", geometry), check_geometry("reference", reference)
    if geometry is None or reference is None or reference.shape is None:
        raise InputError("resampling a mask needs its geometry and a reference geometry with a shape")
    if geometry.dimension != reference.dimension:
        raise InputError(f"the mask is {geometry.dimension}D (shape {tuple(np.shape(mask))}) but the volume is "
                         f"{reference.dimension}D (shape {tuple(reference.shape)}); give a mask of the volume's "
                         "dimension, on its grid")
    image = sitk.GetImageFromArray(np.asarray(mask, dtype=np.uint8))
    geometry.to_sitk(image)
    target = sitk.Image([int(s) for s in reversed(reference.shape)], sitk.sitkUInt8)
    reference.to_sitk(target)
    resampled = sitk.Resample(image, target, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(resampled).astype(bool)


def read_mask(path: str | os.PathLike, label: int | None = None, reference: Geometry | None = None,
              segment: str | None = None, series=None) -> np.ndarray:
    """Read a label volume, or a structure by name, as a boolean mask.

    Parameters
    ----------
    path : path-like
        Label volume (NIfTI, NRRD or MHA), or a file of named structures: a Slicer .seg.nrrd, a DICOM RT
        structure set or DICOM SEG (or a DICOM folder holding one); see :mod:`IBIXLogic.structures`.
    label : int, optional
        Voxels equal to this label form the mask. By default the file must hold one nonzero value (a binary
        mask, whatever that value is); a file with several (an image, or a map of several labels) is refused
        rather than read as the union of everything nonzero.
    reference : Geometry, optional
        Grid the mask must lie on. A mask on another grid is resampled onto it (nearest neighbour).
    segment : str, optional
        The name of the structure (segment or ROI) to read; needed when the file holds several.
    series : Series or sequence of Series, optional
        The input's DICOM series, which a DICOM structure must refer to.
    """
    path = check_path("path", path)
    label = check_arguments(label=label)["label"]
    reference = check_geometry("reference", reference)
    if segment is not None and not isinstance(segment, str):
        raise InputError(f"segment must be a structure name (text), got {segment!r}")
    from . import structures

    if structures.is_structure_source(path, label, segment):
        return structures.read_structure(path, segment, reference, series)[0]
    array, geometry = read_volume(path)
    if label is None:
        mask = array != 0
        values = array[mask]
        if values.size and np.any(values != values[0]):
            distinct = np.unique(values)
            shown = ", ".join(f"{v:g}" for v in distinct[:8]) + (", …" if len(distinct) > 8 else "")
            raise InputError(f"{path}: the mask file holds {len(distinct)} different nonzero values ({shown}), so it "
                             "is an image or a map of several labels, not one mask; pick one label (label= in "
                             "Python, --label or --out-label on the command line) or give a binary mask")
    else:
        mask = array == label
    if not mask.any():
        present = np.unique(array)[:10].tolist()
        raise InputError(f"{path}: the mask is empty" + (f" for label {label} (labels present: {present})"
                                                         if label is not None else ""))
    if reference is not None and not geometry.matches(reference):
        try:
            mask = resample_mask(mask, geometry, reference)
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from None
        if not mask.any():
            raise InputError(f"{path}: the mask does not overlap the reference volume after resampling onto "
                             "its grid; check that mask and volume belong together")
    return mask
