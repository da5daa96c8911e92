"""Structures by name: a segment of a Slicer segmentation (.seg.nrrd), an ROI of a DICOM RT structure set or a
segment of a DICOM SEG, as a boolean mask on the input's grid.

- ``.seg.nrrd`` is read with slicerio (segment names, label values, overlapping segments in layers); a file on
  another grid (Slicer crops segmentations to their extent) is placed onto the input's grid by nearest neighbour.
- An RT structure set is read with pydicom; each closed planar contour is filled on the slice of the input's grid
  it lies on (``skimage.draw.polygon``: the voxels whose centres lie inside; contours in one plane combine
  even–odd, so an inner contour is a hole), after checking that the structure set refers to the input series.
- A DICOM SEG is read with pydicom; each frame of the segment is placed on the input's grid by its position (frames
  must lie on that grid, as a SEG made on the series does), after the same check. BINARY, FRACTIONAL (occupancy or
  probability ≥ 0.5) and LABELMAP segmentations are read.

Names are matched exactly, else case- and space-insensitively when that picks one structure; an unknown name lists
the names the file holds (:func:`list_structures`, ``ibix masks FILE``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import dicom
from .errors import InputError, is_folder, short_path
from .geometry import Geometry

SEG_NRRD, RTSTRUCT, DICOM_SEG, LABELS, FOLDER = "seg.nrrd", "rtstruct", "dicom-seg", "label volume", "folder"
#: How each format is named in messages.
FORMAT_NAMES = {SEG_NRRD: "Slicer segmentation", RTSTRUCT: "DICOM RT structure set", DICOM_SEG: "DICOM SEG",
                LABELS: "label volume", FOLDER: "DICOM folder"}
_DICOM_KINDS = {dicom.NON_IMAGE_CLASSES["1.2.840.10008.5.1.4.1.1.481.3"]: RTSTRUCT,
                dicom.NON_IMAGE_CLASSES["1.2.840.10008.5.1.4.1.1.66.4"]: DICOM_SEG}
#: A contour or SEG frame may lie this fraction of a voxel off the input's grid (decimal-string rounding).
GRID_TOLERANCE = 0.1


@dataclass(frozen=True)
class Structure:
    """One structure of a file: its name, its number (ROI number, segment number or label value) and where it is
    from, for messages and provenance."""

    file: Path
    format: str
    name: str | None
    number: int | None
    layer: int | None = None
    details: str = ""
    frame_of_reference: str = ""
    referenced_series: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """What ``summary.json`` records about the structure read."""
        return {"file": str(self.file), "format": self.format, "name": self.name, "number": self.number,
                "layer": self.layer, "frame_of_reference_uid": self.frame_of_reference or None,
                "referenced_series_uids": list(self.referenced_series)}


# -- what a file is -----------------------------------------------------------------------------------------
def _read_segmentation(path: Path, skip_voxels: bool = False) -> dict:
    """A Slicer .seg.nrrd read with slicerio (its header alone with ``skip_voxels``), or an InputError naming it."""
    import slicerio

    try:
        return slicerio.read_segmentation(str(path), skip_voxels=skip_voxels)
    except Exception as exc:  # pynrrd's and slicerio's errors for a damaged file
        raise InputError(f"{short_path(path)}: not a readable Slicer segmentation ({type(exc).__name__}: {exc})") \
            from None


def _has_segments(path: Path) -> bool:
    """Whether a NRRD file's header has Slicer's segment fields (read by SimpleITK, without the voxels)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:  # not a readable NRRD: the volume reader names the problem
        return False
    return "Segment0_ID" in reader.GetMetaDataKeys() or "Segment0_Name" in reader.GetMetaDataKeys()


def structure_format(path: str | os.PathLike) -> str | None:
    """What holds structures by name at ``path``: "seg.nrrd", "rtstruct", "dicom-seg" or "folder" (a DICOM folder);
    None for anything else (a label volume, or not a file)."""
    return _identify(Path(path))[0]


def _identify(path: Path) -> tuple[str | None, Any]:
    """:func:`structure_format` of ``path``, and the pydicom header it read to tell (None for other files)."""
    if is_folder(path):
        return FOLDER, None
    try:
        if not path.is_file():
            return None, None
    except OSError:
        return None, None
    name = path.name.lower()
    if name.endswith((".nrrd", ".nhdr")):
        return (SEG_NRRD if _has_segments(path) else None), None
    if name.endswith((".nii", ".nii.gz", ".mha", ".mhd")) or not dicom.is_dicom_file(path):
        return None, None
    header = dicom.read_header(path)
    return _DICOM_KINDS.get(dicom.kind_of(header)), header


def is_structure_source(path: str | os.PathLike, label: int | None = None, segment: str | None = None) -> bool:
    """Whether a mask is read as a structure (by name) rather than as a label volume: a name is given, or the file
    holds named structures and no label value is asked for (a label value picks voxels of a .seg.nrrd's labelmap,
    as of any label volume). Refuses a label value for a DICOM structure file, and a name with a label value."""
    if segment is not None and label is not None:
        raise InputError(f"{short_path(Path(path))}: give a structure name or a label value, not both")
    if segment is not None:
        return True
    found = structure_format(path)
    layered = found == SEG_NRRD and any(s.get("layer", 0)
                                        for s in _read_segmentation(Path(path), skip_voxels=True)["segments"])
    if (found in (RTSTRUCT, DICOM_SEG, FOLDER) or layered) and label is not None:
        raise InputError(f"{short_path(Path(path))}: a {FORMAT_NAMES[found]} holds named structures"
                         + (" (overlapping, in layers)" if layered else "") + ": select one by its name (--segment "
                         "NAME, segment= in Python), not by a label value")
    return found is not None and not (found == SEG_NRRD and label is not None)


# -- listing ------------------------------------------------------------------------------------------------
def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"


def _rtstruct(ds: Any, path: Path) -> list[Structure]:
    referenced = tuple(str(series.SeriesInstanceUID)
                       for frame in ds.get("ReferencedFrameOfReferenceSequence", [])
                       for study in frame.get("RTReferencedStudySequence", [])
                       for series in study.get("RTReferencedSeriesSequence", []) if "SeriesInstanceUID" in series)
    contours = {int(item.ReferencedROINumber): item.get("ContourSequence", [])
                for item in ds.get("ROIContourSequence", []) if "ReferencedROINumber" in item}
    found = []
    for roi in ds.get("StructureSetROISequence", []):
        number = int(roi.ROINumber)
        items = contours.get(number, [])
        kinds = sorted({str(c.get("ContourGeometricType", "")) for c in items})
        found.append(Structure(path, RTSTRUCT, str(roi.get("ROIName", "")), number,
                               details=_plural(len(items), "contour")
                                       + (f" ({', '.join(kinds)})" if kinds else ""),
                               frame_of_reference=str(roi.get("ReferencedFrameOfReferenceUID", "")),
                               referenced_series=referenced))
    return found


def _segment_frames(ds: Any) -> dict[int, list[int]]:
    """Frame indices of each segment number of a DICOM SEG (LABELMAP: every frame holds every segment)."""
    numbers = [int(s.SegmentNumber) for s in ds.get("SegmentSequence", [])]
    count = int(getattr(ds, "NumberOfFrames", 1))
    if str(getattr(ds, "SegmentationType", "")).upper() == "LABELMAP":
        return {n: list(range(count)) for n in numbers}
    frames: dict[int, list[int]] = {n: [] for n in numbers}
    for index in range(count):
        item = dicom.frame_item(ds, index, "SegmentIdentificationSequence")
        number = int(getattr(item, "ReferencedSegmentNumber", -1))
        frames.setdefault(number, []).append(index)
    return frames


def _dicom_seg(ds: Any, path: Path) -> list[Structure]:
    referenced = tuple(str(s.SeriesInstanceUID) for s in ds.get("ReferencedSeriesSequence", [])
                       if "SeriesInstanceUID" in s)
    frames = _segment_frames(ds)
    return [Structure(path, DICOM_SEG, str(s.get("SegmentLabel", "")), int(s.SegmentNumber),
                      details=f"{_plural(len(frames.get(int(s.SegmentNumber), [])), 'frame')}, "
                              f"{str(getattr(ds, 'SegmentationType', '')).lower()}",
                      frame_of_reference=str(getattr(ds, "FrameOfReferenceUID", "")), referenced_series=referenced)
            for s in ds.get("SegmentSequence", [])]


def _seg_nrrd(segmentation: dict, path: Path) -> list[Structure]:
    return [Structure(path, SEG_NRRD, segment.get("name"), segment.get("labelValue", 1), segment.get("layer", 0),
                      details=f"label {segment.get('labelValue', 1)}, layer {segment.get('layer', 0)}")
            for segment in segmentation["segments"]]


def _label_values(path: Path) -> list[Structure]:
    from .io import read_volume

    array, _ = read_volume(path)
    values, counts = np.unique(array[array != 0], return_counts=True)
    return [Structure(path, LABELS, None, int(v) if float(v).is_integer() else None,
                      details=f"value {v:g}, {c} voxels") for v, c in zip(values, counts)]


def _folder_files(folder: Path) -> list[Path]:
    """The structure files of a folder: DICOM RT structure sets and SEGs, and Slicer .seg.nrrd files."""
    files = [f for s in dicom.list_series(folder) if _DICOM_KINDS.get(s.kind) for f in s.files]
    return files + sorted(f for f in folder.iterdir() if f.name.lower().endswith(".seg.nrrd") and f.is_file())


def list_structures(path: str | os.PathLike) -> list[Structure]:
    """The structures a file holds, in file order: the segments of a .seg.nrrd or DICOM SEG, the ROIs of an RT
    structure set, the values of a label volume (unnamed), or those of every structure file in a DICOM folder."""
    path = Path(path)
    found, header = _identify(path)
    if found == FOLDER:
        return [s for f in _folder_files(path) for s in list_structures(f)]
    if found == SEG_NRRD:
        return _seg_nrrd(_read_segmentation(path, skip_voxels=True), path)
    if found == RTSTRUCT:
        return _rtstruct(header, path)
    if found == DICOM_SEG:
        return _dicom_seg(header, path)
    return _label_values(path)


def _names(structures: Sequence[Structure]) -> str:
    return ", ".join(repr(s.name) for s in structures if s.name is not None) or "none"


def _key(name: str) -> str:
    return " ".join(name.split()).casefold()


def matching(structures: Sequence[Structure], name: str) -> list[Structure]:
    """The structures called ``name``: exact matches, else those equal ignoring case and repeated spaces."""
    exact = [s for s in structures if s.name == name]
    return exact or [s for s in structures if s.name is not None and _key(s.name) == _key(name)]


def select(structures: Sequence[Structure], name: str | None, path: Path) -> Structure:
    """The one structure of ``path`` called ``name`` (or its only one when ``name`` is None)."""
    what = FORMAT_NAMES[structures[0].format] if structures else "file"
    if name is None:
        if len(structures) == 1:
            return structures[0]
        raise InputError(f"{short_path(path)}: a {what} holding {len(structures)} structures ({_names(structures)}); "
                         "pick one by name (--segment / --out-segment NAME on the command line, a 'segment' column "
                         "in a cohort manifest, segment= in Python)")
    found = matching(structures, name)
    if len(found) == 1:
        return found[0]
    if found:
        raise InputError(f"{short_path(path)}: {len(found)} structures are called {name!r} (numbers "
                         f"{[s.number for s in found]}); rename them so that the name picks one")
    raise InputError(f"{short_path(path)}: no structure called {name!r}; this {what} holds: {_names(structures)}")


# -- reading ------------------------------------------------------------------------------------------------
def _series_list(series: Any) -> list:
    if series is None:
        return []
    return [series] if isinstance(series, dicom.Series) else [s for s in series if s is not None]


def _check_reference(structure: Structure, series: Sequence[dicom.Series], notes: list[str]) -> None:
    """Refuse a DICOM structure drawn on another series or frame of reference than the input's."""
    where = f"{short_path(structure.file)}: {structure.name!r}"
    if not series:
        notes.append(f"the input is not a DICOM series, so IBIX cannot check that {structure.name!r} was drawn on it; "
                     "it is placed by its patient coordinates (LPS)")
        return
    frames = {s.frame_of_reference for s in series}
    if structure.frame_of_reference and structure.frame_of_reference not in frames:
        raise InputError(f"{where} is in frame of reference {structure.frame_of_reference}, the input series in "
                         f"{', '.join(sorted(frames))}: its coordinates do not describe the input; give the series "
                         "it was drawn on")
    uids = {s.uid for s in series}
    if structure.referenced_series and not uids & set(structure.referenced_series):
        raise InputError(f"{where} refers to series {', '.join(structure.referenced_series)}, not to the input series "
                         f"{', '.join(sorted(uids))}; give the series it was drawn on (--series UID), or a structure "
                         "file made on this series")


def _need_grid(reference: Geometry | None, path: Path) -> Geometry:
    if reference is None or reference.shape is None or reference.dimension != 3:
        raise InputError(f"{short_path(path)}: placing a DICOM structure needs the 3D grid of the input volume "
                         "(reference= a Geometry with its shape)")
    return reference


def _rasterise(ds: Any, structure: Structure, reference: Geometry) -> tuple[np.ndarray, list[str]]:
    """Fill the closed planar contours of an ROI on the slices of ``reference`` (even–odd within a slice)."""
    from skimage.draw import polygon

    contours = next((item.get("ContourSequence", []) for item in ds.get("ROIContourSequence", [])
                     if int(item.get("ReferencedROINumber", -1)) == structure.number), [])
    to_index = np.linalg.inv(reference.direction @ np.diag(reference.spacing))
    origin = np.asarray(reference.origin)
    mask = np.zeros(reference.shape, bool)
    skipped, outside = {}, 0
    for number, contour in enumerate(contours, start=1):
        kind = str(contour.get("ContourGeometricType", "")).upper()
        if kind not in ("CLOSED_PLANAR", "CLOSED_PLANAR_XOR"):
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        points = np.asarray([float(v) for v in contour.get("ContourData", [])], float)
        if points.size < 9 or points.size % 3:
            raise InputError(f"{short_path(structure.file)}: contour {number} of {structure.name!r} has "
                             f"{points.size} coordinates; a closed contour needs at least 3 points (x, y, z each)")
        ijk = (points.reshape(-1, 3) - origin) @ to_index.T
        k = float(np.mean(ijk[:, 2]))
        if np.ptp(ijk[:, 2]) > GRID_TOLERANCE or abs(k - round(k)) > GRID_TOLERANCE:
            raise InputError(f"{short_path(structure.file)}: contour {number} of {structure.name!r} does not lie on a "
                             f"slice of the input (slice index {ijk[:, 2].min():.2f} to {ijk[:, 2].max():.2f}); it was "
                             "drawn on other slices: give the series it was drawn on")
        k = int(round(k))
        if not 0 <= k < reference.shape[0]:
            outside += 1
            continue
        rows, columns = polygon(ijk[:, 1], ijk[:, 0], shape=reference.shape[1:])
        mask[k, rows, columns] ^= True
    notes = []
    if skipped:
        notes.append(f"{structure.name!r}: {', '.join(f'{n} {k} contour(s)' for k, n in skipped.items())} skipped "
                     "(only closed planar contours enclose voxels)")
    if outside:
        notes.append(f"{structure.name!r}: {outside} contour(s) outside the input's slices left out")
    return mask, notes


def _place_frames(ds: Any, path: Path, structure: Structure, reference: Geometry) -> np.ndarray:
    """OR each frame of a SEG segment into a mask on ``reference`` at the frame's own position."""
    kind = str(getattr(ds, "SegmentationType", "BINARY")).upper()
    dicom.check_pixel_data(ds, path)
    pixels = dicom.pixel_frames(ds, path)
    if kind == "FRACTIONAL":
        pixels = pixels >= 0.5 * float(getattr(ds, "MaximumFractionalValue", 255))
    elif kind == "LABELMAP":
        pixels = pixels == structure.number
    else:
        pixels = pixels != 0
    to_index = np.linalg.inv(reference.direction @ np.diag(reference.spacing))
    origin, shape = np.asarray(reference.origin), reference.shape
    mask = np.zeros(shape, bool)
    for index in _segment_frames(ds).get(structure.number, []):
        frame = dicom.frame_plane(ds, index, f"{short_path(path)}, frame {index + 1}")
        start = (frame.position - origin) @ to_index.T
        aligned = (np.allclose(frame.row, reference.direction[:, 0], atol=dicom.ORIENTATION_TOLERANCE)
                   and np.allclose(frame.column, reference.direction[:, 1], atol=dicom.ORIENTATION_TOLERANCE)
                   and np.allclose(frame.spacing, reference.spacing[:2], rtol=dicom.ORIENTATION_TOLERANCE)
                   and np.all(np.abs(start - np.round(start)) <= GRID_TOLERANCE))
        if not aligned:
            raise InputError(f"{frame.label} ({structure.name!r}) does not lie on the input's grid (orientation "
                             f"{np.round(np.concatenate([frame.row, frame.column]), 4).tolist()}, spacing "
                             f"{frame.spacing} mm, at voxel {np.round(start, 2).tolist()}); IBIX reads a SEG made on "
                             "the grid of the input series")
        i, j, k = (int(v) for v in np.round(start))
        if not 0 <= k < shape[0]:
            continue
        rows, columns = frame.size
        target = mask[k, max(j, 0):min(j + rows, shape[1]), max(i, 0):min(i + columns, shape[2])]
        target |= pixels[index][max(-j, 0):max(-j, 0) + target.shape[0], max(-i, 0):max(-i, 0) + target.shape[1]]
    return mask


def _read_seg_nrrd(path: Path, name: str | None, reference: Geometry | None
                   ) -> tuple[np.ndarray, Structure, list[str]]:
    import slicerio

    from .io import resample_mask

    segmentation = _read_segmentation(path)
    structures = _seg_nrrd(segmentation, path)
    structure = select(structures, name, path)
    segment = segmentation["segments"][structures.index(structure)]
    mask = np.ascontiguousarray(slicerio.segment_mask(segmentation, segment).transpose(2, 1, 0))
    matrix = np.asarray(segmentation["ijkToLPS"], float)[:3]
    spacing = np.linalg.norm(matrix[:, :3], axis=0)
    geometry = Geometry(matrix[:, 3], spacing, matrix[:, :3] / spacing, mask.shape)
    notes = []
    if reference is None or geometry.matches(reference):
        return mask, structure, notes
    offset = _lattice_offset(geometry, reference)
    if offset is not None:  # Slicer's crop of the input's grid: the same voxels, placed exactly
        placed = np.zeros(reference.shape, bool)
        source = tuple(slice(max(-o, 0), min(n, r - o)) for o, n, r in zip(offset, mask.shape, reference.shape))
        target = tuple(slice(s.start + o, s.stop + o) for s, o in zip(source, offset))
        if all(s.stop > s.start for s in source):
            placed[target] = mask[source]
        mask = placed
    else:
        mask = resample_mask(mask, geometry, reference)
        notes.append(f"{structure.name!r}: the segmentation's grid (shape {geometry.shape}, origin "
                     f"{tuple(round(v, 3) for v in geometry.origin)}) differs from the input's; placed onto the "
                     "input's grid (nearest neighbour)")
    return mask, structure, notes


def _lattice_offset(geometry: Geometry, reference: Geometry) -> tuple[int, ...] | None:
    """The whole-voxel offset (numpy order) of a grid that lies on the reference's lattice, else None."""
    if geometry.dimension != reference.dimension or not (
            np.allclose(geometry.spacing, reference.spacing, rtol=dicom.ORIENTATION_TOLERANCE)
            and np.allclose(geometry.direction, reference.direction, atol=dicom.ORIENTATION_TOLERANCE)):
        return None
    start = np.linalg.solve(reference.direction @ np.diag(reference.spacing),
                            np.asarray(geometry.origin) - np.asarray(reference.origin))
    if np.any(np.abs(start - np.round(start)) > dicom.ORIENTATION_TOLERANCE):
        return None
    return tuple(int(v) for v in np.round(start)[::-1])


def _in_folder(folder: Path, name: str | None, series: Sequence[dicom.Series]) -> Path:
    """The structure file of a DICOM folder that holds ``name`` (and refers to the input series when known)."""
    files = _folder_files(folder)
    if not files:
        raise InputError(f"{short_path(folder)}: no structure file in this folder (DICOM RT structure set or SEG, "
                         "or .seg.nrrd)")
    held = {f: list_structures(f) for f in files}
    candidates = [f for f, found in held.items() if name is None or matching(found, name)]
    if series and len(candidates) > 1:
        uids = {s.uid for s in series}
        candidates = [f for f in candidates if not held[f] or uids & set(held[f][0].referenced_series)] or candidates
    if len(candidates) == 1:
        return candidates[0]
    listing = "; ".join(f"{f.name}: {_names(found)}" for f, found in held.items())
    if not candidates:
        raise InputError(f"{short_path(folder)}: no structure called {name!r} in this folder's structure files "
                         f"({listing})")
    raise InputError(f"{short_path(folder)}: {len(candidates)} structure files hold "
                     f"{'structures' if name is None else repr(name)} ({', '.join(f.name for f in candidates)}); "
                     "give the file itself as the mask")


def read_structure(path: str | os.PathLike, name: str | None, reference: Geometry | None = None,
                   series: Any = None) -> tuple[np.ndarray, Structure, list[str]]:
    """A structure of a segmentation or structure set file as a mask on the input's grid.

    Parameters
    ----------
    path : path-like
        A Slicer .seg.nrrd, a DICOM RT structure set or DICOM SEG file, or a DICOM folder holding one.
    name : str or None
        The segment or ROI name (exact, else ignoring case and repeated spaces); None for a file holding one.
    reference : Geometry
        The input's grid (with its shape); needed for DICOM structures, optional for .seg.nrrd (without it, the
        mask is on the segmentation's own grid).
    series : Series or sequence of Series, optional
        The input's DICOM series (from :func:`IBIXLogic.dicom.read_series`): a DICOM structure must refer to one of
        them and share its frame of reference.

    Returns
    -------
    mask : ndarray of bool
    structure : Structure
        What was read (file, format, name as the file spells it, number).
    notes : list of str
        What the caller should tell the user (resampled, reference not checkable, contours left out).
    """
    path = Path(path)
    found, header = _identify(path)
    series = _series_list(series)
    if found == FOLDER:
        return read_structure(_in_folder(path, name, series), name, reference, series)
    if found == SEG_NRRD:
        mask, structure, notes = _read_seg_nrrd(path, name, reference)
    elif found in (RTSTRUCT, DICOM_SEG):
        reference = _need_grid(reference, path)
        ds = dicom.read_header(path, pixels=True) if found == DICOM_SEG else header  # a SEG's frames: read again
        structure = select(_rtstruct(ds, path) if found == RTSTRUCT else _dicom_seg(ds, path), name, path)
        notes = []
        _check_reference(structure, series, notes)
        if found == RTSTRUCT:
            mask, more = _rasterise(ds, structure, reference)
            notes += more
        else:
            mask = _place_frames(ds, path, structure, reference)
    else:
        raise InputError(f"{short_path(path)}: a label volume has no structure names; select its voxels by value "
                         f"(--label N, label= in Python; values present: "
                         f"{[s.number for s in _label_values(path)][:20]})")
    if not mask.any():
        raise InputError(f"{short_path(path)}: {structure.name!r} has no voxel on the input's grid (its contours or "
                         "frames lie outside the volume, or enclose no voxel centre)")
    return mask, structure, notes
