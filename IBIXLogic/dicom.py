"""DICOM image series as inputs: a folder of DICOM files read as one volume, on the geometry of its slices.

SimpleITK (GDCM) lists the folder's series and reads the pixels, in slice order, with the rescale of each file
(RescaleSlope/Intercept: the values are the modality's, e.g. HU); pydicom reads every header first, and IBIX checks
what GDCM would read silently wrong or warn about only: a missing or damaged slice, uneven slice spacing, a gantry
tilt, mixed orientations, several images at one position. An enhanced (multi-frame) image, such as an Enhanced MR
file, is read with pydicom: its frames are placed by their own positions and rescaled by their own functional
groups, and pass the same checks. Nothing is ever written into the folder.

Physical space is LPS (DICOM's patient coordinates), as everywhere in IBIX: the geometry of a series equals that of
the same volume saved as NRRD or NIfTI by Slicer or SimpleITK.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import InputError, short_path
from .geometry import Geometry
from .io import check_voxel_data


#: Slice gaps may differ from their median by this fraction (positions are decimal strings of limited precision);
#: a larger difference is a missing slice or uneven spacing, which a regular grid cannot represent.
SPACING_TOLERANCE = 0.01
#: Direction cosines (and pixel spacings, relatively) that differ by less than this are the same.
ORIENTATION_TOLERANCE = 1e-4
#: A slice may sit off the line through the first slice along the normal by this fraction of a pixel (more is a
#: gantry tilt or a sheared stack, which an orthogonal grid cannot represent).
TILT_TOLERANCE = 0.01
#: Series listed in a message at most.
LISTED = 20

#: SOP classes that hold no image to explain (structures, plans, reports, ...), by their names in messages.
NON_IMAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "DICOM SEG segmentation",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT structure set",
    "1.2.840.10008.5.1.4.1.1.481.5": "RT plan",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT dose",
    "1.2.840.10008.5.1.4.1.1.66.1": "spatial registration",
    "1.2.840.10008.5.1.4.1.1.66.3": "deformable registration",
    "1.2.840.10008.1.3.10": "DICOMDIR",
}
NON_IMAGE_MODALITIES = {"SEG": "DICOM SEG segmentation", "RTSTRUCT": "RT structure set", "RTPLAN": "RT plan",
                        "RTDOSE": "RT dose", "RTRECORD": "RT record", "REG": "registration", "PR": "presentation state",
                        "SR": "structured report", "KO": "key object selection"}


# -- headers ------------------------------------------------------------------------------------------------
def pydicom_module():
    """pydicom, imported when DICOM is read (not when IBIX is)."""
    try:
        import pydicom
    except ImportError:
        raise InputError("reading DICOM needs pydicom, which is not installed here: pip install pydicom") from None
    return pydicom


def read_header(path: Path, pixels: bool = False, force: bool = True) -> Any:
    """The pydicom dataset of a file (with its pixel data when ``pixels``), or an InputError naming the file."""
    pydicom = pydicom_module()
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=not pixels, force=force)
    except pydicom.errors.InvalidDicomError:
        raise InputError(f"{short_path(path)}: not a DICOM file") from None
    except (OSError, EOFError, ValueError, TypeError, KeyError, AttributeError, NotImplementedError) as exc:
        raise InputError(f"{short_path(path)}: a damaged DICOM file that pydicom cannot read "
                         f"({type(exc).__name__}: {exc})") from None


def is_dicom_file(path: Path) -> bool:
    """True for a DICOM Part 10 file (the 'DICM' marker after its 128-byte preamble)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def kind_of(ds: Any) -> str | None:
    """What a non-image DICOM object is (e.g. "RT structure set"), or None for an image."""
    sop = str(getattr(ds, "SOPClassUID", ""))
    modality = str(getattr(ds, "Modality", "")).upper()
    if sop in NON_IMAGE_CLASSES:
        return NON_IMAGE_CLASSES[sop]
    if modality in NON_IMAGE_MODALITIES:
        return NON_IMAGE_MODALITIES[modality]
    if "Rows" not in ds or "Columns" not in ds:
        return "DICOM object without an image"
    return None


def _number(value: Any, default: float | None = None) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def frame_count(ds: Any) -> int:
    """NumberOfFrames of a dataset (1 for a single-frame image)."""
    return int(_number(getattr(ds, "NumberOfFrames", 1), 1) or 1)


def stored_layout(ds: Any) -> tuple[tuple[int, int, int], Fraction]:
    """The sizes of a file's pixel data as its header declares them, (columns, rows, frames), and the bytes one
    voxel takes as stored (SamplesPerPixel × BitsAllocated / 8: a fraction for one-bit segmentations)."""
    bits = int(getattr(ds, "BitsAllocated", 16)) * int(getattr(ds, "SamplesPerPixel", 1))
    return (int(ds.Columns), int(ds.Rows), frame_count(ds)), Fraction(bits, 8)


def check_pixel_data(ds: Any, path: Path, budget: int | None = None) -> None:
    """:func:`IBIXLogic.io.check_voxel_data` on a file's pixel data: sizes and memory as its header declares them,
    and, for an uncompressed transfer syntax, the bytes it holds (a truncated file is refused, naming both sizes)."""
    if "PixelData" not in ds:
        raise InputError(f"{short_path(path)}: a DICOM image without pixel data (a truncated or damaged file); "
                         "copy the series again from its source")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    compressed = syntax is not None and getattr(syntax, "is_compressed", False)
    # encapsulated pixel data has no length to expect: GDCM or pydicom refuse damaged fragments when they decode them
    check_voxel_data(short_path(path), *stored_layout(ds), found=None if compressed else len(ds.PixelData),
                     budget=budget, what="pixel data")


# -- planes and stacks --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plane:
    """One image plane: a single-frame file or one frame of a multi-frame file, in LPS (mm).

    ``row`` and ``column`` are the direction cosines of ImageOrientationPatient (the directions along a row, i.e.
    of increasing column index, and along a column); ``spacing`` is (between columns, between rows) in mm, i.e.
    PixelSpacing reversed, in ITK's x, y order.
    """

    position: np.ndarray
    row: np.ndarray
    column: np.ndarray
    spacing: tuple[float, float]
    size: tuple[int, int]  # rows, columns
    label: str

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row, self.column)


def plane(position: Any, orientation: Any, pixel_spacing: Any, rows: Any, columns: Any, label: str) -> Plane:
    """A :class:`Plane` from DICOM attribute values, or an InputError naming what is missing."""
    try:
        position = np.asarray([float(v) for v in position], float)
        orientation = np.asarray([float(v) for v in orientation], float)
        spacing = [float(v) for v in pixel_spacing]
        size = (int(rows), int(columns))
    except (TypeError, ValueError):
        raise InputError(f"{label}: no usable image position, orientation or pixel spacing (ImagePositionPatient, "
                         "ImageOrientationPatient, PixelSpacing); IBIX needs them to place the image") from None
    if position.shape != (3,) or orientation.shape != (6,) or len(spacing) != 2 or min(spacing) <= 0 \
            or not np.all(np.isfinite(np.concatenate([position, orientation]))):
        raise InputError(f"{label}: invalid image position, orientation or pixel spacing ({position.tolist()}, "
                         f"{orientation.tolist()}, {spacing})")
    return Plane(position, orientation[:3], orientation[3:], (spacing[1], spacing[0]), size, label)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.allclose(a, b, atol=ORIENTATION_TOLERANCE))


def _count(labels: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(labels[:limit])
    return f"{len(labels)} ({shown}{', …' if len(labels) > limit else ''})"


def stack_geometry(planes: Sequence[Plane], source: str, thickness: float | None = None
                   ) -> tuple[list[int], Geometry]:
    """Sort image planes into a stack and give its grid, or refuse a stack no regular grid can hold.

    Parameters
    ----------
    planes : sequence of Plane
        The images (single-frame files or frames), in any order.
    source : str
        The series or file, for messages.
    thickness : float, optional
        Slice spacing (mm) of a single plane (SpacingBetweenSlices or SliceThickness); 1 mm when not given.

    Returns
    -------
    order : list of int
        Indices of ``planes`` in slice order (increasing along the normal row x column).
    geometry : Geometry
        Origin (the first plane's position), spacing (columns, rows, slices; mm) and direction (row, column,
        normal) of the stack, shape (slices, rows, columns).
    """
    first = planes[0]
    sizes = {p.size for p in planes}
    if len(sizes) > 1:
        parts = [f"{r}×{c}: {_count([p.label for p in planes if p.size == (r, c)])}" for r, c in sorted(sizes)]
        raise InputError(f"{source}: images of different sizes in one series ({'; '.join(parts)}); select the "
                         "images of one volume")
    groups: list[list[Plane]] = []
    for p in planes:
        for group in groups:
            if _same(group[0].row, p.row) and _same(group[0].column, p.column):
                group.append(p)
                break
        else:
            groups.append([p])
    if len(groups) > 1:
        parts = [f"{_count([p.label for p in g])} oriented "
                 f"{np.round(np.concatenate([g[0].row, g[0].column]), 3).tolist()}" for g in groups]
        raise InputError(f"{source}: mixed orientations in one series: {'; '.join(parts)}; IBIX reads one stack of "
                         "parallel slices (remove localizer or reformatted images, or select another series)")
    spacings = np.asarray([p.spacing for p in planes])
    if not np.allclose(spacings, spacings[0], rtol=ORIENTATION_TOLERANCE, atol=0):
        found = sorted({tuple(s) for s in spacings.tolist()})
        raise InputError(f"{source}: pixel spacings differ between images ({found} mm); select the images of one "
                         "volume")
    normal = first.normal
    heights = np.asarray([float(p.position @ normal) for p in planes])
    order = [int(i) for i in np.argsort(heights, kind="stable")]
    heights = heights[order]
    pixel = min(first.spacing)
    if len(planes) == 1:
        gap = float(thickness) if thickness and thickness > 0 else 1.0
    else:
        gaps = np.diff(heights)
        same = np.flatnonzero(gaps <= TILT_TOLERANCE * pixel)
        if same.size:
            shared = sorted({planes[order[i]].label for j in same for i in (j, j + 1)})
            raise InputError(f"{source}: {_count(shared)} images share a slice position (at "
                             f"{heights[same[0]]:.2f} mm along the normal): the series holds several volumes (echoes, "
                             "time points, phases or repeats); IBIX reads one volume: split the series, or select one "
                             "of them")
        drift = [planes[i].position - planes[order[0]].position - (h - heights[0]) * normal
                 for i, h in zip(order, heights)]
        shift = max(float(np.linalg.norm(d)) for d in drift)
        if shift > TILT_TOLERANCE * pixel:
            extent = float(heights[-1] - heights[0])
            angle = float(np.degrees(np.arctan2(shift, extent)))
            raise InputError(f"{source}: the slices are sheared (gantry tilt of about {angle:.1f}°: they shift by "
                             f"{shift:.2f} mm in their plane over {extent:.1f} mm); a regular grid cannot hold this "
                             "volume without resampling: load the series in 3D Slicer (its DICOM module corrects "
                             "gantry tilt), save it as NRRD and give that file")
        median = float(np.median(gaps))
        uneven = np.flatnonzero(np.abs(gaps - median) > SPACING_TOLERANCE * median)
        if uneven.size:
            j = int(uneven[0])
            missing = gaps[j] > 1.5 * median
            raise InputError(
                f"{source}: {'a slice is missing' if missing else 'uneven slice spacing'}: the gap between "
                f"{planes[order[j]].label} and {planes[order[j + 1]].label} is {gaps[j]:.3f} mm where the series' "
                f"slices are {median:.3f} mm apart ({uneven.size} uneven gap{'s' if uneven.size > 1 else ''} among "
                f"{len(gaps)}, from {gaps.min():.3f} to {gaps.max():.3f} mm); a regular grid cannot hold it: "
                + ("copy the series again with all its files" if missing else
                   "resample the series onto a regular grid (e.g. in 3D Slicer) and give the NRRD"))
        gap = float((heights[-1] - heights[0]) / (len(planes) - 1))
    origin = planes[order[0]].position
    direction = np.column_stack([first.row, first.column, normal])
    geometry = Geometry(origin, (first.spacing[0], first.spacing[1], gap), direction,
                        (len(planes),) + first.size)
    return order, geometry


# -- series -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Series:
    """A DICOM series found in a folder: what IBIX records about where an input came from.

    ``files`` are in slice order once the series has been read (in GDCM's order when only listed).
    """

    uid: str
    folder: Path
    files: tuple[Path, ...]
    description: str = ""
    modality: str = ""
    number: int | None = None
    frame_of_reference: str = ""
    study: str = ""
    instances: tuple[str, ...] = ()
    shape: tuple[int, ...] | None = None
    kind: str | None = None  # None for images; else what the object is (see kind_of)
    unreadable: tuple[Path, ...] = ()  # files claiming this series that GDCM cannot read

    def describe(self) -> str:
        """One line for messages: UID, number, description, modality, size."""
        size = "" if self.shape is None else " × ".join(str(s) for s in self.shape) + " voxels, "
        number = "" if self.number is None else f"#{self.number} "
        return (f"{self.uid} ({number}'{self.description}', {self.kind or self.modality or 'unknown modality'}, "
                f"{size}{len(self.files)} file{'s' if len(self.files) != 1 else ''})")

    def to_dict(self) -> dict:
        """What ``summary.json`` records about the series."""
        return {"folder": str(self.folder), "series_uid": self.uid, "description": self.description,
                "modality": self.modality, "series_number": self.number, "files": len(self.files),
                "frame_of_reference_uid": self.frame_of_reference, "study_uid": self.study,
                "shape": None if self.shape is None else list(self.shape)}


def _folder(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    try:
        if not folder.is_dir():
            raise InputError(f"{short_path(folder)}: no such DICOM folder")
    except OSError as exc:
        raise InputError(f"{short_path(folder)}: cannot be opened ({exc.strerror or exc})") from None
    return folder


def _series_from(ds: Any, folder: Path, files: Sequence[Path], uid: str) -> Series:
    rows, columns = getattr(ds, "Rows", None), getattr(ds, "Columns", None)
    frames = frame_count(ds)
    kind = kind_of(ds)
    shape = None if kind or rows is None else ((frames if len(files) == 1 else len(files)), int(rows), int(columns))
    number = _number(getattr(ds, "SeriesNumber", None))
    return Series(uid, folder, tuple(files), str(getattr(ds, "SeriesDescription", "") or ""),
                  str(getattr(ds, "Modality", "") or ""), None if number is None else int(number),
                  str(getattr(ds, "FrameOfReferenceUID", "") or ""), str(getattr(ds, "StudyInstanceUID", "") or ""),
                  shape=shape, kind=kind)


def list_series(folder: str | os.PathLike) -> list[Series]:
    """Every DICOM series directly in ``folder`` (subfolders are not searched): image series first, as GDCM groups
    them by SeriesInstanceUID, then the objects GDCM does not list (structure sets, plans, ...) as pydicom reads
    them. Files that GDCM leaves out although they claim an image series (damaged files) are that series'
    ``unreadable`` files; files that are not DICOM are ignored."""
    import SimpleITK as sitk

    folder = _folder(folder)
    found, listed = [], set()
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
        files = [Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)]
        if files:
            found.append(_series_from(read_header(files[0]), folder, files, uid))
            listed.update(f.resolve() for f in files)
    pydicom = pydicom_module()
    others: dict[str, list[tuple[Path, Any]]] = {}
    for entry in sorted(folder.iterdir()):
        if entry.resolve() in listed or not entry.is_file():
            continue
        try:
            ds = pydicom.dcmread(str(entry), stop_before_pixels=True)
        except Exception:  # not DICOM (pydicom's errors for foreign files vary): ignored, as GDCM ignores it
            continue
        others.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((entry, ds))
    index = {s.uid: i for i, s in enumerate(found)}
    for uid, items in others.items():
        files = tuple(path for path, _ in items)
        if uid in index:
            found[index[uid]] = replace(found[index[uid]], unreadable=files)
            continue
        series = _series_from(items[0][1], folder, files, uid)
        found.append(series if series.kind else replace(series, kind="images GDCM cannot read", unreadable=files))
    return sorted(found, key=lambda s: s.kind is not None)


def _listing(series: Sequence[Series]) -> str:
    lines = [f"  {s.describe()}" for s in series[:LISTED]]
    if len(series) > LISTED:
        lines.append(f"  … and {len(series) - LISTED} more")
    return "\n".join(lines)


def choose_series(folder: str | os.PathLike, uid: str | None = None) -> Series:
    """The image series of ``folder`` to read: the one with SeriesInstanceUID ``uid``, or the only one."""
    folder = _folder(folder)
    found = list_series(folder)
    images = [s for s in found if s.kind is None]
    others = [s for s in found if s.kind is not None]
    if uid is not None:
        chosen = [s for s in images if s.uid == str(uid).strip()]
        if not chosen:
            held = (f"its image series are:\n{_listing(images)}" if images else "it holds no image series"
                    + (f" (only: {', '.join(sorted({s.kind for s in others}))})" if others else ""))
            raise InputError(f"{short_path(folder)}: no image series with UID {uid}; {held}")
        return chosen[0]
    if len(images) == 1:
        return images[0]
    if not images:
        what = (f"only {', '.join(sorted({s.kind for s in others}))}" if others else
                "no DICOM file (subfolders are not searched: give the folder that holds the series' files)")
        raise InputError(f"{short_path(folder)}: no DICOM image series in this folder: it holds {what}")
    raise InputError(f"{short_path(folder)}: {len(images)} image series in one folder; choose one by its UID "
                     f"(--series UID on the command line, a 'series' column in a cohort manifest, series= in "
                     f"Python):\n{_listing(images)}")


def _checked_header(path: Path, budget: int | None) -> Any:
    """A file's dataset after checking that its pixel data is complete. The pixels are kept only for a multi-frame
    file, which pydicom decodes; GDCM reads single-frame files again, so a long series is never held twice."""
    ds = read_header(path, pixels=True)
    check_pixel_data(ds, path, budget)
    if frame_count(ds) == 1:
        del ds.PixelData
    return ds


def read_series(folder: str | os.PathLike, series: str | None = None, budget: int | None = None
                ) -> tuple[np.ndarray, Geometry, Series]:
    """Read one DICOM image series of a folder as a volume.

    Parameters
    ----------
    folder : path-like
        A folder holding the series' files (other files, other series and non-image objects such as structure
        sets may be there too; subfolders are not searched).
    series : str, optional
        SeriesInstanceUID of the series to read; needed when the folder holds several image series.
    budget : int, optional
        Bytes the series may take in memory as stored plus IBIX's float32 copy; default
        :func:`IBIXLogic.io.memory_budget` (half of this machine's memory).

    Returns
    -------
    array : ndarray
        Voxel values in numpy order (slices, rows, columns) after each file's RescaleSlope/Intercept (the
        stored integers when those are 1 and 0).
    geometry : Geometry
        Origin, spacing and direction in LPS (mm), as for a NRRD or NIfTI file of the same volume.
    series : Series
        What was read (UIDs, description, files in slice order), for provenance.

    Raises
    ------
    InputError
        Naming the folder or file and the fix: no or several image series, a series declaring more voxels than the
        memory budget allows (before any pixel is read), a damaged or truncated file, a missing slice or uneven
        spacing, a gantry tilt, mixed orientations, several volumes in one series.
    """
    chosen = choose_series(folder, series)
    source = f"{short_path(chosen.folder)} (series {chosen.uid})"
    (columns, rows, frames), per_voxel = stored_layout(read_header(chosen.files[0]))
    count = len(chosen.files) + len(chosen.unreadable)  # every file that claims the series
    check_voxel_data(f"{source}, {count} file{'s' if count != 1 else ''}", (columns, rows, frames * count),
                     per_voxel, budget=budget)
    headers = [_checked_header(f, budget) for f in chosen.files]
    for path in chosen.unreadable:  # GDCM left them out silently: the volume would miss their slices
        check_pixel_data(read_header(path, pixels=True), path, budget)
        raise InputError(f"{short_path(path)}: a file of series {chosen.uid} that GDCM cannot read (a damaged "
                         "file); copy the series again from its source")
    if max(frame_count(ds) for ds in headers) > 1:
        if len(headers) > 1:
            raise InputError(f"{source}: {len(headers)} multi-frame files in one series; IBIX reads one "
                             "multi-frame file or a series of single-frame files: give a folder holding one of them")
        return _read_multiframe(chosen, headers[0])
    planes = [plane(getattr(ds, "ImagePositionPatient", None), getattr(ds, "ImageOrientationPatient", None),
                    getattr(ds, "PixelSpacing", None), ds.Rows, ds.Columns, f.name)
              for f, ds in zip(chosen.files, headers)]
    thickness = _number(getattr(headers[0], "SpacingBetweenSlices", None)) or \
        _number(getattr(headers[0], "SliceThickness", None))
    order, expected = stack_geometry(planes, source, thickness)
    files = [chosen.files[i] for i in order]
    rescales = {(_number(getattr(ds, "RescaleSlope", 1), 1), _number(getattr(ds, "RescaleIntercept", 0), 0))
                for ds in headers}
    array, geometry = _read_pixels(files, len(rescales) > 1, source)
    if len(files) == 1:  # one slice: its thickness is GDCM's choice among the header's fields
        expected = Geometry(expected.origin, expected.spacing[:2] + geometry.spacing[2:], expected.direction,
                            expected.shape)
    if not geometry.matches(expected, tolerance=1e-3):
        raise InputError(f"{source}: GDCM reads a grid (origin {geometry.origin}, spacing {geometry.spacing}) "
                         f"other than the files' headers give (origin {expected.origin}, spacing {expected.spacing}); "
                         "IBIX cannot tell which is right: convert the series with 3D Slicer and give the NRRD")
    instances = tuple(str(getattr(headers[i], "SOPInstanceUID", "")) for i in order)
    return array, geometry, replace(chosen, files=tuple(files), instances=instances, shape=array.shape)


def _read_pixels(files: Sequence[Path], varying_rescale: bool, source: str) -> tuple[np.ndarray, Geometry]:
    """The pixels of single-frame files in the given (slice) order, with SimpleITK (GDCM)."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    if varying_rescale:  # GDCM picks the pixel type from the first file's rescale: keep every slice's own values
        reader.SetOutputPixelType(sitk.sitkFloat64)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{source}: GDCM cannot read the series ({str(exc).strip().splitlines()[-1]}); a file may be "
                         "damaged or compressed in a way GDCM does not decode") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{source}: a colour series ({image.GetNumberOfComponentsPerPixel()} components per "
                         "voxel); IBIX reads one channel per input")
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    return sitk.GetArrayFromImage(image), Geometry.from_sitk(image)


# -- enhanced (multi-frame) images ----------------------------------------------------------------------------
def frame_item(ds: Any, index: int, sequence: str) -> Any:
    """The item of functional group ``sequence`` (e.g. "PlanePositionSequence") that applies to frame ``index``:
    the frame's own, else the shared one; None when neither has it."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    for group in ([per_frame[index]] if per_frame and index < len(per_frame) else []) + ([shared[0]] if shared else []):
        item = group.get(sequence)
        if item:
            return item[0]
    return None


def frame_plane(ds: Any, index: int, label: str) -> Plane:
    """The :class:`Plane` of frame ``index`` of an enhanced multi-frame object (image or SEG)."""
    position = frame_item(ds, index, "PlanePositionSequence")
    orientation = frame_item(ds, index, "PlaneOrientationSequence")
    measures = frame_item(ds, index, "PixelMeasuresSequence")
    return plane(getattr(position, "ImagePositionPatient", None), getattr(orientation, "ImageOrientationPatient", None),
                 getattr(measures, "PixelSpacing", None), ds.Rows, ds.Columns, label)


def pixel_frames(ds: Any, path: Path) -> np.ndarray:
    """The stored pixel values of every frame, (frames, rows, columns), decoded by pydicom."""
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many kinds for missing decoders and damaged data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax)
        raise InputError(f"{short_path(path)}: pydicom cannot decode its pixel data (transfer syntax {name}: "
                         f"{type(exc).__name__}: {exc}); install a decoder (pip install pylibjpeg pylibjpeg-libjpeg "
                         "pylibjpeg-openjpeg) or convert the file to an uncompressed transfer syntax") from None
    return pixels.reshape((-1,) + pixels.shape[-2:]) if pixels.ndim >= 2 else pixels


def _read_multiframe(chosen: Series, ds: Any) -> tuple[np.ndarray, Geometry, Series]:
    path = chosen.files[0]
    source = f"{short_path(path)} (series {chosen.uid})"
    if "PerFrameFunctionalGroupsSequence" not in ds:
        raise InputError(f"{source}: a multi-frame image without per-frame functional groups (a legacy multi-frame "
                         f"{ds.get('Modality', '')} file, e.g. a cine or a dose grid); IBIX reads enhanced multi-frame "
                         "images and series of single-frame files")
    if int(getattr(ds, "SamplesPerPixel", 1)) != 1:
        raise InputError(f"{source}: a colour image; IBIX reads one channel per input")
    count = int(ds.NumberOfFrames)
    planes = [frame_plane(ds, i, f"frame {i + 1}") for i in range(count)]
    order, geometry = stack_geometry(planes, source, _number(getattr(
        frame_item(ds, 0, "PixelMeasuresSequence"), "SpacingBetweenSlices", None)))
    stored = pixel_frames(ds, path)[order]
    rescale = [frame_item(ds, i, "PixelValueTransformationSequence") for i in order]
    slopes = np.asarray([_number(getattr(r, "RescaleSlope", 1), 1) for r in rescale])
    intercepts = np.asarray([_number(getattr(r, "RescaleIntercept", 0), 0) for r in rescale])
    if np.all(slopes == 1) and np.all(intercepts == 0):
        values = stored
    else:
        values = stored * slopes[:, None, None] + intercepts[:, None, None]
    return values, geometry, replace(chosen, instances=(str(getattr(ds, "SOPInstanceUID", "")),),
                                     shape=values.shape)
