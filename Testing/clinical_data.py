"""Clinical test data made from the demo volumes: DICOM image series (single-frame and enhanced multi-frame), RT
structure sets traced from masks, DICOM SEG and Slicer .seg.nrrd segmentations, and the hostile variants the DICOM
tests need. Written with pydicom and slicerio as a scanner, a planning system or Slicer would write them."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "Resources" / "SampleData"
T1 = SAMPLES / "IBIX-T1.nrrd"
T1_INPUT_MASK = SAMPLES / "IBIX-T1-input-mask.nrrd"
T1_OUTPUT_MASK = SAMPLES / "IBIX-T1-output-mask.nrrd"

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4.1"
RT_STRUCTURE_SET = "1.2.840.10008.5.1.4.1.1.481.3"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
PYDICOM3 = int(pydicom.__version__.split(".")[0]) >= 3


def _ds(value: float) -> float:
    """A number as a DICOM decimal string holds it (at most 16 characters)."""
    return float(f"{value:.10g}")


def _save(ds: FileDataset, path: Path) -> Path:
    """Save as a DICOM Part 10 file, explicit VR little endian (pydicom 2.4 and 3)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if PYDICOM3:
        ds.save_as(str(path), enforce_file_format=True)
    else:
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(str(path), write_like_original=False)
    return path


def _dataset(sop_class: str, modality: str, study: str, series: str, frame: str, description: str,
             number: int) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "IBIX^Demo", "IBIX-0001", "", "O"
    ds.StudyID, ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = \
        "1", "20240101", "120000", "", ""
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.Modality, ds.SeriesDescription, ds.SeriesNumber = modality, description, number
    return ds


def _image_pixels(ds: Dataset, rows: int, columns: int, bits: int = 16) -> None:
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0


def _orientation(geometry) -> list[float]:
    return [_ds(v) for v in list(geometry.direction[:, 0]) + list(geometry.direction[:, 1])]


def _position(geometry, k: float, shear: np.ndarray | None = None) -> np.ndarray:
    position = np.asarray(geometry.origin) + k * geometry.spacing[2] * geometry.direction[:, 2]
    return position if shear is None else position + k * shear


@dataclass
class WrittenSeries:
    """What a written series is: its folder, UIDs and files (in slice order)."""

    folder: Path
    study: str
    uid: str
    frame_of_reference: str
    files: list[Path] = field(default_factory=list)
    instances: list[str] = field(default_factory=list)
    description: str = ""


def write_series(folder: Path, array: np.ndarray, geometry, description: str = "T1 axial", modality: str = "MR",
                 slope: float | Sequence[float] = 1.0, intercept: float = 0.0, study: str | None = None,
                 frame: str | None = None, number: int = 3, shear: Sequence[float] | None = None,
                 positions: Sequence[float] | None = None, seed: int = 0) -> WrittenSeries:
    """One single-frame MR file per slice of ``array`` (numpy order, on ``geometry``), stored as unsigned 16-bit
    integers with RescaleSlope/Intercept so that stored · slope + intercept equals the array; files are named at
    random so that their names do not give the slice order. ``slope`` may vary per slice; ``shear`` (mm per slice,
    LPS) moves each slice in its plane, as a gantry tilt does; ``positions`` puts slice k at that (fractional) slice
    index instead of k."""
    rng = np.random.default_rng(seed)
    written = WrittenSeries(Path(folder), study or generate_uid(), generate_uid(), frame or generate_uid(),
                            description=description)
    slopes = np.broadcast_to(np.asarray(slope, float), (array.shape[0],))
    shear = None if shear is None else np.asarray(shear, float)
    names = rng.permutation(10**6)[: array.shape[0]]
    for k in range(array.shape[0]):
        ds = _dataset(MR_IMAGE, modality, written.study, written.uid, written.frame_of_reference, description, number)
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(v) for v in _position(geometry, k if positions is None else positions[k],
                                                              shear)]
        ds.ImageOrientationPatient = _orientation(geometry)
        ds.PixelSpacing = [_ds(geometry.spacing[1]), _ds(geometry.spacing[0])]
        ds.SliceThickness = _ds(geometry.spacing[2])
        _image_pixels(ds, *array.shape[1:])
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = _ds(slopes[k]), _ds(intercept), "US"
        stored = np.round((array[k].astype(np.float64) - intercept) / slopes[k])
        assert stored.min() >= 0 and stored.max() < 2**16 and np.allclose(stored * slopes[k] + intercept, array[k])
        ds.PixelData = stored.astype("<u2").tobytes()
        written.files.append(_save(ds, Path(folder) / f"IM{names[k]:06d}"))
        written.instances.append(ds.SOPInstanceUID)
    return written


def write_enhanced(path: Path, array: np.ndarray, geometry, repeats: int = 1, slope: float = 1.0,
                   intercept: float = 0.0, seed: int = 0) -> WrittenSeries:
    """An Enhanced MR Image file: every slice of ``array`` a frame, frames in shuffled order, each placed by its
    PlanePositionSequence, orientation, spacing and rescale shared; ``repeats`` > 1 writes that many frames per
    position (as echoes would be)."""
    path = Path(path)
    written = WrittenSeries(path.parent, generate_uid(), generate_uid(), generate_uid(), description="T1 enhanced")
    ds = _dataset(ENHANCED_MR_IMAGE, "MR", written.study, written.uid, written.frame_of_reference,
                  written.description, 5)
    order = np.random.default_rng(seed).permutation(np.repeat(np.arange(array.shape[0]), repeats))
    ds.NumberOfFrames = len(order)
    _image_pixels(ds, *array.shape[1:])
    shared = Dataset()
    orientation, measures, rescale = Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = _orientation(geometry)
    measures.PixelSpacing = [_ds(geometry.spacing[1]), _ds(geometry.spacing[0])]
    measures.SliceThickness = measures.SpacingBetweenSlices = _ds(geometry.spacing[2])
    rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = _ds(slope), _ds(intercept), "US"
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PixelValueTransformationSequence = DicomSequence([rescale])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for n, k in enumerate(order):
        group, position, content = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = [_ds(v) for v in _position(geometry, int(k))]
        content.InStackPositionNumber = int(k) + 1
        content.TemporalPositionIndex = n // array.shape[0] + 1
        group.PlanePositionSequence = DicomSequence([position])
        group.FrameContentSequence = DicomSequence([content])
        frames.append(group)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    stored = np.round((array[order].astype(np.float64) - intercept) / slope)
    ds.PixelData = stored.astype("<u2").tobytes()
    written.files.append(_save(ds, path))
    written.instances.append(ds.SOPInstanceUID)
    return written


def trace_contours(mask: np.ndarray, geometry) -> list[tuple[int, np.ndarray]]:
    """Closed planar contours of a mask, slice by slice: (slice index, points (n, 3) in LPS mm).

    The marching-squares contour at level 0.5 runs half-way between the voxel centres inside and outside the mask,
    as a planning system's contour follows the edge of the voxels it was drawn on."""
    from skimage.measure import find_contours

    contours = []
    matrix = geometry.direction @ np.diag(geometry.spacing)
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        padded = np.pad(mask[k].astype(float), 1)
        for line in find_contours(padded, 0.5):
            rows, columns = line[:-1, 0] - 1, line[:-1, 1] - 1  # the last point repeats the first
            ijk = np.column_stack([columns, rows, np.full(len(rows), float(k))])
            contours.append((int(k), np.asarray(geometry.origin) + ijk @ matrix.T))
    return contours


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return code


def write_rtstruct(path: Path, series: WrittenSeries, rois: dict[str, np.ndarray], geometry,
                   referenced_series: str | None = None, frame: str | None = None) -> Path:
    """An RT structure set whose ROIs (name -> mask on ``geometry``) are contours traced from the masks, each
    contour referencing the image of its slice; ``referenced_series`` / ``frame`` override what it refers to."""
    ds = _dataset(RT_STRUCTURE_SET, "RTSTRUCT", series.study, generate_uid(), frame or series.frame_of_reference,
                  "RT structures", 90)
    del ds.FrameOfReferenceUID  # an RT structure set names its frame of reference in the sequences below
    ds.StructureSetLabel, ds.StructureSetDate, ds.StructureSetTime = "IBIX", "20240101", "120000"
    frame = frame or series.frame_of_reference
    images = []
    for uid in series.instances:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = MR_IMAGE, uid
        images.append(item)
    referenced = Dataset()
    referenced.SeriesInstanceUID = referenced_series or series.uid
    referenced.ContourImageSequence = DicomSequence(images)
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study.ReferencedSOPInstanceUID = series.study
    study.RTReferencedSeriesSequence = DicomSequence([referenced])
    reference = Dataset()
    reference.FrameOfReferenceUID = frame
    reference.RTReferencedStudySequence = DicomSequence([study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([reference])
    roi_items, contour_items, observations = [], [], []
    for number, (name, mask) in enumerate(rois.items(), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID, roi.ROIName = number, frame, name
        roi.ROIGenerationAlgorithm = "MANUAL"
        roi_items.append(roi)
        contours = []
        for k, points in trace_contours(mask, geometry):
            contour = Dataset()
            image = Dataset()
            image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID = MR_IMAGE, series.instances[k]
            contour.ContourImageSequence = DicomSequence([image])
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            contour.ContourData = [_ds(v) for v in points.ravel()]
            contours.append(contour)
        item = Dataset()
        item.ReferencedROINumber, item.ROIDisplayColor = number, [255, 0, 0]
        item.ContourSequence = DicomSequence(contours)
        contour_items.append(item)
        observation = Dataset()
        observation.ObservationNumber, observation.ReferencedROINumber = number, number
        observation.RTROIInterpretedType, observation.ROIInterpreter = "ORGAN", ""
        observations.append(observation)
    ds.StructureSetROISequence = DicomSequence(roi_items)
    ds.ROIContourSequence = DicomSequence(contour_items)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    return _save(ds, Path(path))


def write_seg(path: Path, series: WrittenSeries, segments: dict[str, np.ndarray], geometry,
              fractional: dict[str, np.ndarray] | None = None, seed: int = 0) -> Path:
    """A DICOM SEG (BINARY, bit-packed across frame boundaries) holding each segment (name -> mask on
    ``geometry``, overlaps allowed) as one frame per slice it touches, frames in shuffled order; with
    ``fractional`` (name -> values in [0, 1]) a FRACTIONAL SEG (8 bits, maximum 255) instead."""
    kind = "FRACTIONAL" if fractional else "BINARY"
    planes = fractional or segments
    ds = _dataset(SEGMENTATION, "SEG", series.study, generate_uid(), series.frame_of_reference, "Segmentation", 91)
    ds.SegmentationType = kind
    if fractional:
        ds.SegmentationFractionalType, ds.MaximumFractionalValue = "PROBABILITY", 255
    shape = next(iter(planes.values())).shape
    _image_pixels(ds, shape[1], shape[2], 8 if fractional else 1)
    ds.ImageType, ds.ContentLabel = ["DERIVED", "PRIMARY"], "IBIX"
    referenced = Dataset()
    referenced.SeriesInstanceUID = series.uid
    instances = []
    for uid in series.instances:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = MR_IMAGE, uid
        instances.append(item)
    referenced.ReferencedInstanceSequence = DicomSequence(instances)
    ds.ReferencedSeriesSequence = DicomSequence([referenced])
    descriptions, frames, groups = [], [], []
    for number, (name, values) in enumerate(planes.items(), start=1):
        segment = Dataset()
        segment.SegmentNumber, segment.SegmentLabel, segment.SegmentAlgorithmType = number, name, "MANUAL"
        segment.SegmentedPropertyCategoryCodeSequence = DicomSequence([_code("123037004", "SCT",
                                                                             "Anatomical Structure")])
        segment.SegmentedPropertyTypeCodeSequence = DicomSequence([_code("35764002", "SCT", "Brain ventricle")])
        descriptions.append(segment)
        for k in np.flatnonzero(np.asarray(values).any(axis=(1, 2))):
            frames.append(np.round(values[k] * 255).astype(np.uint8) if fractional else values[k].astype(np.uint8))
            group, position, identification = Dataset(), Dataset(), Dataset()
            position.ImagePositionPatient = [_ds(v) for v in _position(geometry, int(k))]
            identification.ReferencedSegmentNumber = number
            source, derivation = Dataset(), Dataset()
            source.ReferencedSOPClassUID, source.ReferencedSOPInstanceUID = MR_IMAGE, series.instances[k]
            source.PurposeOfReferenceCodeSequence = DicomSequence([_code(
                "121322", "DCM", "Source image for image processing operation")])
            derivation.SourceImageSequence = DicomSequence([source])
            derivation.DerivationCodeSequence = DicomSequence([_code("113076", "DCM", "Segmentation")])
            group.DerivationImageSequence = DicomSequence([derivation])
            content = Dataset()
            content.DimensionIndexValues = [number, int(k) + 1]
            group.FrameContentSequence = DicomSequence([content])
            group.PlanePositionSequence = DicomSequence([position])
            group.SegmentIdentificationSequence = DicomSequence([identification])
            groups.append(group)
    order = np.random.default_rng(seed).permutation(len(frames))
    ds.SegmentSequence = DicomSequence(descriptions)
    organisation = Dataset()
    organisation.DimensionOrganizationUID = generate_uid()
    ds.DimensionOrganizationSequence = DicomSequence([organisation])
    dimensions = []
    for pointer, group_pointer, label in ((0x0062000B, 0x0062000A, "ReferencedSegmentNumber"),
                                          (0x00200032, 0x00209113, "ImagePositionPatient")):
        dimension = Dataset()
        dimension.DimensionOrganizationUID = organisation.DimensionOrganizationUID
        dimension.DimensionIndexPointer, dimension.FunctionalGroupPointer = pointer, group_pointer
        dimension.DimensionDescriptionLabel = label
        dimensions.append(dimension)
    ds.DimensionIndexSequence = DicomSequence(dimensions)
    shared, orientation, measures = Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = _orientation(geometry)
    measures.PixelSpacing = [_ds(geometry.spacing[1]), _ds(geometry.spacing[0])]
    measures.SliceThickness = measures.SpacingBetweenSlices = _ds(geometry.spacing[2])
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    shared.PixelMeasuresSequence = DicomSequence([measures])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    ds.PerFrameFunctionalGroupsSequence = DicomSequence([groups[i] for i in order])
    ds.NumberOfFrames = len(frames)
    stack = np.stack([frames[i] for i in order])
    if fractional:
        ds.PixelData = stack.tobytes()
    else:
        pack_bits = (pydicom.pixels.pack_bits if PYDICOM3 else
                     pydicom.pixel_data_handlers.numpy_handler.pack_bits)
        ds.PixelData = pack_bits(stack.ravel())
    return _save(ds, Path(path))


def write_seg_nrrd(path: Path, segments: dict[str, np.ndarray], geometry, crop: bool = True) -> Path:
    """A Slicer segmentation file (.seg.nrrd) written by slicerio: overlapping segments go to separate layers;
    ``crop`` stores only the box around the segments (as Slicer does), with its origin moved accordingly."""
    import slicerio

    masks = {name: np.asarray(mask, bool) for name, mask in segments.items()}
    union = np.logical_or.reduce(list(masks.values()))
    box = [slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(union)] if crop else \
        [slice(0, s) for s in union.shape]
    start = np.asarray([b.start for b in box][::-1], float)  # i, j, k
    matrix = geometry.direction @ np.diag(geometry.spacing)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = matrix
    ijk_to_lps[:3, 3] = np.asarray(geometry.origin) + matrix @ start
    shape = tuple(b.stop - b.start for b in box)[::-1]
    segmentation = slicerio.create_segmentation(shape, ijk_to_lps)
    for name, mask in masks.items():
        slicerio.add_segment(segmentation, mask[tuple(box)].transpose(2, 1, 0), {"id": name.replace(" ", "_"),
                                                                                   "name": name})
    slicerio.write_segmentation(str(path), segmentation)
    return Path(path)


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut a file to a fraction of its length, as an interrupted copy leaves it."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])
    return Path(path)


def reorient(path: Path) -> Path:
    """Make one image of a series sagittal (as a localizer stored in the series would be)."""
    ds = pydicom.dcmread(str(path))
    ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    return _save(ds, Path(path))


def crop(array: np.ndarray, geometry, box: Sequence[slice]):
    """A box of a volume and the geometry of that box (same lattice, origin moved)."""
    start = np.asarray([b.start for b in box][::-1], float)
    origin = np.asarray(geometry.origin) + geometry.direction @ (np.asarray(geometry.spacing) * start)
    cropped = np.ascontiguousarray(array[tuple(box)])
    return cropped, type(geometry)(origin, geometry.spacing, geometry.direction, cropped.shape)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under a folder with its size and modification time (ns): equal snapshots, untouched folder."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*"))}
