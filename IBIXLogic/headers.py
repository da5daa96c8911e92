"""What a volume file's header declares, read before its voxels: where the data lies, how it is encoded, and (for
NIfTI) the header fields that fix the geometry.

SimpleITK reads the voxels; this module only finds out, from the header, how many bytes of voxel data the file must
hold and how many it does hold, so that :func:`IBIXLogic.io.read_volume` can refuse a short file instead of reading
zeros in place of the missing voxels (ITK's NIfTI reader does that), and compares the NIfTI geometry fields with
what ITK made of them. NIfTI-1 (single ``.nii``/``.nii.gz`` files and ``.hdr``/``.img`` pairs), NRRD
(attached or detached data; raw, gzip or bzip2 encoding) and MetaImage (``.mha``/``.mhd``; raw or compressed) are
understood (ITK reads no NIfTI-2); other encodings and formats are left to ITK's own checks.
"""
from __future__ import annotations

import bz2
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

#: Bytes read at once while counting the decompressed length of a compressed file.
_CHUNK = 1 << 20
#: Longest text header read (NRRD, MetaImage).
_TEXT_HEADER = 1 << 16


@dataclass(frozen=True)
class VoxelData:
    """Where a file's voxel data lies: in ``path`` (the file itself or a detached data file), stored from byte
    ``start`` on in ``encoding`` ("raw", "gzip", "zlib", "bzip2"; None when IBIX cannot count it), the voxels
    beginning ``skip`` bytes into the decoded stream; ``expected`` bytes when the header fixes them itself (NIfTI:
    dim and bitpix), else None."""

    path: Path
    start: int
    skip: int
    encoding: str | None
    expected: int | None = None
    at_end: bool = False  # the data are the last bytes of the file (NRRD byte skip -1, MetaImage HeaderSize -1)


class HeaderError(Exception):
    """A header field that makes the file unreadable; the message names the field."""


# -- stored length ----------------------------------------------------------------------------------------------
def _decoded_length(path: Path, start: int, encoding: str, limit: int) -> tuple[int, str | None]:
    """Bytes the compressed stream from byte ``start`` of a file decodes to, counted up to ``limit`` (no more is
    decoded, and at most a megabyte is held at once); and what stopped the decoding short, or None."""
    count = 0
    with open(path, "rb") as file:
        file.seek(start)
        try:
            if encoding == "bzip2":
                decoder = bz2.BZ2Decompressor()
                while count < limit and not decoder.eof:
                    chunk = file.read(_CHUNK) if decoder.needs_input else b""
                    if decoder.needs_input and not chunk:
                        return count, "the compressed stream ends early"
                    count += len(decoder.decompress(chunk, _CHUNK))
                return count, None
            decoder, data = zlib.decompressobj(32 + zlib.MAX_WBITS), b""  # gzip or zlib, as the stream says
            while count < limit:
                if not data:
                    data = file.read(_CHUNK)
                    if not data:
                        count += len(decoder.flush())
                        return count, None if decoder.eof else "the compressed stream ends early"
                if decoder.eof:  # one gzip member ended: another may follow; zeros after the last are padding
                    if not data.strip(b"\x00"):
                        data = b""
                        continue
                    decoder = zlib.decompressobj(32 + zlib.MAX_WBITS)
                count += len(decoder.decompress(data, _CHUNK))
                data = decoder.unused_data if decoder.eof else decoder.unconsumed_tail
        except (zlib.error, OSError, EOFError, ValueError) as exc:
            return count, f"the compressed data are damaged ({exc})"
    return count, None


def stored_bytes(data: VoxelData, needed: int) -> tuple[int, str | None]:
    """Bytes of voxel data the file holds (counted up to ``needed`` for compressed files), and what damaged the
    compressed stream, if anything."""
    if data.encoding == "raw":
        size = data.path.stat().st_size
        return (size if data.at_end else max(0, size - data.start - data.skip)), None
    decoded, damage = _decoded_length(data.path, data.start, data.encoding, data.skip + needed)
    return max(0, decoded - data.skip), damage


# -- NIfTI --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NiftiHeader:
    """The NIfTI-1 header fields that fix the size and the geometry."""

    dim: tuple[int, ...]          # dim[0] = number of dimensions, dim[1..7] sizes
    bitpix: int
    pixdim: tuple[float, ...]     # pixdim[0] = qfac, pixdim[1..7] voxel sizes
    vox_offset: float
    qform_code: int
    sform_code: int
    quatern: tuple[float, ...]    # b, c, d
    qoffset: tuple[float, ...]
    srow: np.ndarray              # 3 x 4

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(self.dim[1:1 + self.dim[0]])

    def qform(self) -> np.ndarray:
        """The qform affine (RAS, 4 x 4) as the NIfTI standard (and nibabel) computes it."""
        b, c, d = self.quatern
        a = np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
        rotation = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                             [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                             [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]])
        qfac = -1.0 if self.pixdim[0] < 0 else 1.0
        zooms = np.array([self.pixdim[1], self.pixdim[2], self.pixdim[3] * qfac])
        affine = np.eye(4)
        affine[:3, :3] = rotation * zooms
        affine[:3, 3] = self.qoffset
        return affine

    def sform(self) -> np.ndarray:
        affine = np.eye(4)
        affine[:3] = self.srow
        return affine


def _gz(path: Path) -> bool:
    with open(path, "rb") as file:
        return file.read(2) == b"\x1f\x8b"


def _head(path: Path, size: int) -> bytes:
    """The first ``size`` bytes of a file, decompressed if it is gzip-compressed (as many as there are, for a file
    cut short or damaged further on)."""
    with open(path, "rb") as file:
        if not _gz(path):
            return file.read(size)
        decoder, head = zlib.decompressobj(32 + zlib.MAX_WBITS), b""
        try:
            while len(head) < size and not decoder.eof:
                chunk = decoder.unconsumed_tail or file.read(4096)
                if not chunk:
                    break
                head += decoder.decompress(chunk, size - len(head))
        except zlib.error:
            pass
        return head[:size]


def nifti_version(path: Path) -> int | None:
    """1 or 2 for a NIfTI-1 or NIfTI-2 file (by its header size, either byte order), else None."""
    raw = _head(path, 4)
    if len(raw) < 4:
        return None
    sizes = {struct.unpack("<i", raw)[0], struct.unpack(">i", raw)[0]}
    return 1 if 348 in sizes else 2 if 540 in sizes else None


def read_nifti_header(path: Path) -> NiftiHeader:
    """The NIfTI-1 header of ``path`` (gzip-compressed or not)."""
    raw = _head(path, 348)
    if len(raw) < 348:
        raise HeaderError(f"the NIfTI header is cut short ({len(raw)} of 348 bytes)")
    endian = "<" if struct.unpack_from("<i", raw, 0)[0] == 348 else ">"
    if struct.unpack_from(endian + "i", raw, 0)[0] != 348:
        raise HeaderError("not a NIfTI-1 header (sizeof_hdr is not 348)")

    def get(fmt: str, offset: int) -> tuple:
        return struct.unpack_from(endian + fmt, raw, offset)

    return NiftiHeader(get("8h", 40), get("h", 72)[0], get("8f", 76), get("f", 108)[0], get("h", 252)[0],
                       get("h", 254)[0], get("3f", 256), get("3f", 268), np.array(get("12f", 280), float).reshape(3, 4))


def nifti_data(path: Path, header: NiftiHeader) -> VoxelData:
    """Where a NIfTI file's voxels lie: after ``vox_offset`` in the file itself, or in the ``.img`` of a pair."""
    sizes = header.sizes
    if header.bitpix <= 0 or header.bitpix % 8:
        raise HeaderError(f"bitpix = {header.bitpix} is not a whole number of bytes per voxel")
    expected = int(np.prod([max(0, s) for s in sizes], dtype=object)) * (header.bitpix // 8)
    name = path.name.lower()
    data_path, offset = path, header.vox_offset
    if name.endswith((".hdr", ".hdr.gz")):  # a header/image pair: the voxels are in the .img
        data_path = path.with_name(path.name[: -len(".hdr.gz" if name.endswith(".gz") else ".hdr")]
                                   + (".img.gz" if name.endswith(".gz") else ".img"))
        if not data_path.is_file():
            raise HeaderError(f"its image file {data_path.name} (the voxel data of this header) is missing")
    if not np.isfinite(offset) or offset < 0:
        raise HeaderError(f"vox_offset = {offset} is not a valid data offset")
    if _gz(data_path):  # vox_offset counts in the decompressed stream
        return VoxelData(data_path, 0, int(offset), "gzip", expected)
    return VoxelData(data_path, int(offset), 0, "raw", expected)


def _header_lines(path: Path) -> Iterator[tuple[bytes, int]]:
    """Each whole line of a text header (the file's first _TEXT_HEADER bytes), without its newline, and the byte
    offset after it."""
    with open(path, "rb") as file:
        head = file.read(_TEXT_HEADER)
    offset = 0
    while (end := head.find(b"\n", offset)) >= 0:
        yield head[offset:end], end + 1
        offset = end + 1


# -- NRRD ---------------------------------------------------------------------------------------------------------
def _text_header(path: Path) -> tuple[list[str], int]:
    """The lines of a text header up to its end (an empty line) and the byte offset after it."""
    lines, offset = [], 0
    for line, after in _header_lines(path):
        line = line.rstrip(b"\r")
        if not line:
            return lines, after
        lines.append(line.decode("latin-1"))
        offset = after
    return lines, offset


def nrrd_data(path: Path) -> VoxelData:
    """Where an NRRD file's voxels lie (after the header, or in its detached data file) and their encoding."""
    lines, offset = _text_header(path)
    fields = {}
    for line in lines[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.lstrip("=").strip()
    encoding = {"raw": "raw", "gz": "gzip", "gzip": "gzip", "bz2": "bzip2", "bzip2": "bzip2"}.get(
        fields.get("encoding", "").lower())
    data_path = path
    detached = fields.get("data file") or fields.get("datafile")
    if detached is not None:
        if detached.startswith("LIST") or "%" in detached or " " in detached.strip():
            encoding = None  # several data files: ITK checks them
        else:
            data_path = (path.parent / detached) if not Path(detached).is_absolute() else Path(detached)
            offset = 0
            if not data_path.is_file():
                raise HeaderError(f"its data file {detached} is missing")
    if fields.get("line skip", fields.get("lineskip", "0")).strip() not in ("", "0"):
        encoding = None  # lines of text before the data: ITK counts them
    skip = fields.get("byte skip", fields.get("byteskip", "0")).strip() or "0"
    try:
        skip_bytes = int(skip)
    except ValueError:
        raise HeaderError(f"byte skip {skip!r} is not a number") from None
    if skip_bytes == -1:
        return VoxelData(data_path, 0, 0, encoding if encoding == "raw" else None, at_end=True)
    return VoxelData(data_path, offset, max(0, skip_bytes), encoding)


# -- MetaImage ----------------------------------------------------------------------------------------------------
def meta_data(path: Path) -> VoxelData:
    """Where a MetaImage file's voxels lie (after ``ElementDataFile = LOCAL``, or in the named file)."""
    fields, offset = {}, 0
    for line, offset in _header_lines(path):
        key, _, value = line.decode("latin-1").strip().partition("=")
        fields[key.strip().lower()] = value.strip()
        if key.strip().lower() == "elementdatafile":
            break
    if "elementdatafile" not in fields:
        raise HeaderError("the MetaImage header has no ElementDataFile line (it is cut short)")
    compressed = fields.get("compresseddata", "false").lower() in ("true", "1")
    encoding = "zlib" if compressed else "raw"
    target = fields["elementdatafile"]
    try:
        header_size = int(fields.get("headersize", "0") or 0)
    except ValueError:
        raise HeaderError(f"HeaderSize {fields.get('headersize')!r} is not a number") from None
    if target.upper() == "LOCAL":
        data_path = path
    elif target.upper().startswith("LIST") or "%" in target or " " in target:
        return VoxelData(path, 0, 0, None)  # one file per slice: ITK checks them
    else:
        data_path = path.parent / target if not Path(target).is_absolute() else Path(target)
        offset = 0
        if not data_path.is_file():
            raise HeaderError(f"its data file {target} is missing")
    if header_size == -1:
        return VoxelData(data_path, 0, 0, None if compressed else "raw", at_end=True)
    return VoxelData(data_path, offset + max(0, header_size), 0, encoding)
