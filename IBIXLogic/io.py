"""Read and write volumes and masks with SimpleITK (NIfTI, NRRD, MHA), keeping their geometry.

Every volume is checked before its voxels are read (:func:`check_voxel_data`): a header that declares more voxels
than this machine's memory allows is refused before anything is allocated, and a file that holds fewer bytes of
voxel data than its header declares (a cut or half-written file) is refused with both sizes, rather than read with
zeros in place of the missing voxels. A NIfTI file whose geometry fields disagree (pixdim against the sform, a
sheared sform) is refused with both readings, since ITK-based and nibabel-based tools would place it differently.
"""
from __future__ import annotations

import math
import os
import re
import uuid
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import SimpleITK as sitk

from . import headers
from .checks import check_arguments, check_array, check_geometry, check_path
from .errors import InputError, is_file, is_folder
from .geometry import Geometry

VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
#: Formats whose voxels go into a data file of their own beside the header.
DETACHED_SUFFIXES = (".nhdr", ".mhd")
#: Share of this machine's memory one volume may take as read plus the float32 copy the engine works on.
MEMORY_SHARE = 0.5
#: Bytes per voxel of the float32 working copy every run makes of its inputs.
WORKING_BYTES = 4
#: Relative (spacing, direction) and absolute (mm, per mm of position) disagreement of two readings of a NIfTI
#: geometry beyond float32 rounding.
NIFTI_TOLERANCE = 1e-4
#: Name of a temporary file: ``.<name>.<pid>-<8 hex digits>.partial<suffix>`` (the writer's process id, so that the
#: temporary files of a dead writer can be told from those of a running one).
TEMPORARY_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.partial(?P<suffix>\..+)?$")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in VOLUME_SUFFIXES if name.endswith(s)), "")


# -- writing ------------------------------------------------------------------------------------------------------
def temporary_path(path: Path, suffix: str = "") -> Path:
    """A fresh temporary name beside ``path`` for writing it (``suffix``, e.g. ``.nrrd``, kept at the end so that
    writers choose the format by it): hidden, with this process's id and a random part (see
    :data:`TEMPORARY_NAME`)."""
    path = Path(path)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    return path.with_name(f".{stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial{suffix}")


@contextmanager
def atomic_write(path: Path, suffix: str = "") -> Iterator[Path]:
    """Write ``path`` under a temporary name (yielded) and rename it into place when the block ends without an
    exception, so that ``path`` is never seen incomplete; the temporary file is removed on any exit (also an
    interrupt)."""
    temporary = temporary_path(path, suffix)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:
            pass


# -- checks before reading -----------------------------------------------------------------------------------------
def _physical_memory() -> int | None:
    """Bytes of memory this process may use: the machine's memory, or a lower address-space limit."""
    total = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        try:
            import psutil  # Windows; installed with Dask
            total = int(psutil.virtual_memory().total)
        except (ImportError, AttributeError):
            return None
    try:
        import resource
        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit not in (resource.RLIM_INFINITY, -1) and limit > 0:
            total = min(total, limit)
    except (ImportError, ValueError, OSError):
        pass
    return total


def memory_budget() -> int | None:
    """Bytes one volume may take as read plus its float32 working copy (:data:`MEMORY_SHARE` of the memory this
    process may use); None when the memory cannot be found out."""
    total = _physical_memory()
    return None if total is None else int(total * MEMORY_SHARE)


def _gib(size: float) -> str:
    return f"{size / 2**30:.3g} GiB" if size >= 2**30 else f"{size / 2**20:.3g} MiB" if size >= 2**20 else \
        f"{int(size)} bytes"


def check_voxel_data(path: str | os.PathLike, shape: Sequence[int], bytes_per_voxel: int | Fraction,
                     found: int | None = None, budget: int | None = None, what: str = "voxel data") -> int:
    """The one check of a file's voxel data before it is read, for every reader of volumes.

    Parameters
    ----------
    path : path-like
        The file (or folder, for a series) named in the messages.
    shape : sequence of int
        The sizes its header declares (any order; every one must be at least 1).
    bytes_per_voxel : int or Fraction
        Bytes one voxel takes as stored (all components); a fraction for voxels packed in bits (``Fraction(1, 8)``
        for DICOM's one-bit segmentations), whose declared bytes are rounded up to whole bytes.
    found : int, optional
        Bytes of voxel data the file holds (after decompression); None checks the sizes and the memory only.
    budget : int, optional
        Bytes the voxels may take in memory with their float32 working copy; default :func:`memory_budget`.
    what : str
        What the data are, for the messages ("voxel data", "pixel data of slice 12", ...).

    Returns
    -------
    int
        The bytes of voxel data the header declares.

    Raises
    ------
    InputError
        For a degenerate size (0 or negative), a header that declares more voxels than the memory budget allows
        (raised before anything is allocated), or fewer bytes found than declared; each message names the file and
        the sizes.
    """
    sizes = [int(s) for s in shape]
    shown = "×".join(str(s) for s in sizes)
    if not sizes or min(sizes) < 1:
        axis = next((i for i, s in enumerate(sizes) if s < 1), 0)
        raise InputError(f"{path}: its header declares {shown or 'no'} voxels: size {sizes[axis] if sizes else 0} "
                         f"along axis {axis + 1} is a degenerate dimension (every size must be at least 1); the "
                         "file is damaged or not a volume: write it again")
    voxels = int(np.prod(sizes, dtype=object))
    per_voxel = Fraction(bytes_per_voxel)
    expected = math.ceil(voxels * per_voxel)
    budget = memory_budget() if budget is None else budget
    needed = math.ceil(voxels * (per_voxel + WORKING_BYTES))
    if budget is not None and needed > budget:
        raise InputError(f"{path}: its header declares {shown} voxels ({_gib(expected)} as stored, {_gib(needed)} "
                         f"with IBIX's float32 copy), more than the {_gib(budget)} this machine allows one volume "
                         f"({MEMORY_SHARE:.0%} of its memory); if the header is right, crop or resample the volume; "
                         "if not, the file is damaged")
    if found is not None and found < expected:
        raise InputError(f"{path}: the file is incomplete: its header declares {shown} voxels, {expected} bytes of "
                         f"{what}, but it holds {found} bytes ({100 * found / expected:.3g} %); the file was cut "
                         "short or not completely written: copy or export it again")
    return expected


def _bytes_per_voxel(reader: "sitk.ImageFileReader") -> int:
    text = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    bits = int(re.search(r"(\d+)-bit", text).group(1)) if re.search(r"(\d+)-bit", text) else 8
    return max(1, bits // 8) * (2 if "complex" in text else 1) * max(1, reader.GetNumberOfComponents())


def _check_stored_data(path: Path, reader: "sitk.ImageFileReader") -> headers.NiftiHeader | None:
    """:func:`check_voxel_data` on what the file's header declares (before any voxel is read) and on the bytes it
    holds (NIfTI, NRRD and MetaImage; other formats: sizes and memory only); returns a NIfTI file's header."""
    io_name = reader.GetImageIO() or sitk.ImageFileReader.GetImageIOFromFileName(str(path))
    shape, bytes_per_voxel = list(reader.GetSize()), _bytes_per_voxel(reader)
    nifti = data = None
    try:
        if io_name == "NiftiImageIO":
            nifti = headers.read_nifti_header(path)
            check_voxel_data(path, nifti.sizes, bytes_per_voxel)  # ITK reads a size of 0 as 1
            data = headers.nifti_data(path, nifti)
            shape, bytes_per_voxel = list(nifti.sizes), nifti.bitpix // 8  # as stored (ITK may rescale)
        else:
            check_voxel_data(path, shape, bytes_per_voxel)
            data = (headers.nrrd_data(path) if io_name == "NrrdImageIO" else
                    headers.meta_data(path) if io_name == "MetaImageIO" else None)
        if data is None or data.encoding is None:
            return nifti
        expected = int(np.prod(shape, dtype=object)) * bytes_per_voxel
        found, damage = headers.stored_bytes(data, expected)
    except headers.HeaderError as exc:
        raise InputError(f"{path}: {exc}; the file is damaged or incomplete") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    where = path if data.path == path else f"{path} (its data file {data.path.name})"
    if damage is not None and found < expected:
        raise InputError(f"{where}: the file is damaged: {damage} after {found} of the {expected} bytes of voxel "
                         f"data its header declares ({'×'.join(str(s) for s in shape)} voxels); the file was cut "
                         "short or changed: copy or export it again")
    check_voxel_data(where, shape, bytes_per_voxel, found=found)
    return nifti


def _itk_affine(reader: "sitk.ImageFileReader") -> np.ndarray:
    """The 4 x 4 RAS affine of what ITK read (spacing, origin, direction; 2D images padded to 3D)."""
    dim = reader.GetDimension()
    direction = np.eye(3)
    direction[:dim, :dim] = np.reshape(reader.GetDirection(), (dim, dim))[:3, :3]
    spacing, origin = np.ones(3), np.zeros(3)
    spacing[:min(dim, 3)] = reader.GetSpacing()[:3]
    origin[:min(dim, 3)] = reader.GetOrigin()[:3]
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ direction * spacing
    affine[:3, 3] = np.diag([-1.0, -1.0, 1.0]) @ origin
    return affine


def _check_nifti_geometry(path: Path, header: headers.NiftiHeader, reader: "sitk.ImageFileReader") -> None:
    """Refuse a NIfTI file that ITK reads with another geometry than the NIfTI rules (and nibabel) give: the sform
    when its code is set, else the qform, with the voxel sizes of pixdim; both readings are named."""
    axes = min(3, reader.GetDimension())
    itk = _itk_affine(reader)
    itk_spacing = np.linalg.norm(itk[:3, :axes], axis=0)
    pixdim = np.array(header.pixdim[1:1 + axes], float)
    if header.sform_code > 0:
        method, affine = f"the sform (sform_code {header.sform_code})", header.sform()
    elif header.qform_code > 0:
        method, affine = f"the qform (qform_code {header.qform_code}) with pixdim", header.qform()
    else:
        method, affine = "pixdim (no qform or sform)", None
    if affine is None:
        spacing = np.abs(pixdim)
    else:
        if not np.all(np.isfinite(affine)):
            raise InputError(f"{path}: {method} holds values that are not finite; fix the NIfTI header")
        spacing = np.linalg.norm(affine[:3, :axes], axis=0)

    def mm(values) -> str:
        return "(" + ", ".join(f"{v:.6g}" for v in values) + ") mm"

    problem = None
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0) or np.any(spacing <= 0):
        problem = (f"its voxel size pixdim is {mm(pixdim)}, which is not a size: ITK reads it as "
                   f"{mm(itk_spacing)}" + ("" if affine is None else f", {method} gives {mm(spacing)}"))
    elif not np.allclose(spacing, itk_spacing, rtol=NIFTI_TOLERANCE, atol=0):
        problem = (f"its voxel size is {mm(itk_spacing)} as ITK reads it (pixdim {mm(pixdim)}) but {mm(spacing)} "
                   f"from {method}")
    elif affine is not None:
        scale = NIFTI_TOLERANCE * max(1.0, float(np.abs(affine[:3, 3]).max()), float(np.abs(itk[:3, 3]).max()))
        directions = affine[:3, :axes] / spacing, itk[:3, :axes] / itk_spacing
        if not np.allclose(*directions, atol=NIFTI_TOLERANCE) or not np.allclose(affine[:3, 3], itk[:3, 3],
                                                                                  atol=scale):
            problem = (f"ITK reads its origin as {mm(itk[:3, 3])} (RAS) with axes "
                       f"{np.round(directions[1].T, 4).tolist()}, but {method} gives {mm(affine[:3, 3])} with axes "
                       f"{np.round(directions[0].T, 4).tolist()} (a sheared or otherwise inconsistent transform)")
    if problem:
        raise InputError(f"{path}: inconsistent NIfTI geometry: {problem}. ITK-based tools (3D Slicer, IBIX) and "
                         "nibabel-based tools would place this image differently, so IBIX does not guess: make "
                         "pixdim, the qform and the sform agree (e.g. with nibabel: img.set_qform(img.affine); "
                         "img.set_sform(img.affine); with fslorient) and read it again")


def read_volume(path: str | os.PathLike, series: str | None = None) -> tuple[np.ndarray, Geometry]:
    """Read a scalar volume.

    The header is checked before any voxel is read (:func:`check_voxel_data`: sizes, memory, and that the file
    holds all the voxel data it declares), and a NIfTI file's geometry fields against each other.

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
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _unreadable(path, exc) from None
    nifti = _check_stored_data(path, reader)
    if nifti is not None:
        _check_nifti_geometry(path, nifti, reader)
    if reader.GetNumberOfComponents() != 1:
        raise InputError(f"{path}: has {reader.GetNumberOfComponents()} components per voxel; "
                         "IBIX reads one channel per file (pass one file per channel)")
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise _unreadable(path, exc) from None
    return sitk.GetArrayFromImage(image), Geometry.from_sitk(image)


def _unreadable(path: Path, exc: RuntimeError) -> InputError:
    """The error for a file ITK cannot read, with what IBIX can tell about why."""
    detail = (str(exc).strip().splitlines() or [""])[-1].strip()
    try:
        size = path.stat().st_size
        version = headers.nifti_version(path) if size else None
    except OSError:
        size, version = None, None
    if size == 0:
        why = "the file is empty"
    elif version == 2:
        why = ("it is a NIfTI-2 file, which ITK (the reader of IBIX and 3D Slicer) does not read: convert it to "
               "NIfTI-1 (e.g. nibabel.Nifti1Image(img.dataobj, img.affine, img.header))")
    elif "Unable to determine ImageIO" in detail:
        why = "its format is not recognised: it is not a NIfTI, NRRD or MHA volume, or its header is damaged"
    else:
        why = f"its header is damaged or cut short (ITK: {detail.removeprefix('Reason: ')})"
    return InputError(f"{path}: not a readable volume (NIfTI, NRRD or MHA expected): {why}")


def write_volume(path: str | os.PathLike, array: np.ndarray, geometry: Geometry) -> Path:
    """Write a volume with the given geometry.

    The file is written under a temporary name in the same folder and renamed when complete (see
    :func:`atomic_write`), so an interrupted write never leaves a partial file under the final name.
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
    try:
        if suffix in DETACHED_SUFFIXES:
            _write_detached(image, path)
        else:
            with atomic_write(path, suffix) as temporary:
                sitk.WriteImage(image, str(temporary), True)
                _check_written(temporary)
    except (RuntimeError, OSError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise InputError(f"{path}: cannot write ({reason}); check the folder is writable and has space") from None
    return path


def _check_written(path: Path) -> None:
    """Raise OSError unless a file just written holds all its voxel data (ITK's NIfTI writer reports a full disk on
    stderr only, and leaves a short file)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        _check_stored_data(path, reader)
    except (RuntimeError, InputError) as exc:
        raise OSError(f"the file written is incomplete, is the disk full? ({exc})") from None


def _write_detached(image: "sitk.Image", path: Path) -> None:
    """A header and its data file (``.mhd``, ``.nhdr``), written in a temporary folder beside them and moved into
    place data first, so that the header is never seen without its complete data."""
    import shutil

    folder = temporary_path(path)
    folder.mkdir()
    try:
        sitk.WriteImage(image, str(folder / path.name), True)
        _check_written(folder / path.name)
        for written in sorted(folder.iterdir(), key=lambda p: p.name == path.name):  # the header last
            os.replace(written, path.with_name(written.name))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


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
