"""Response atlas: every block's response |F(D_k)| computed once, so that B of any output mask is a sum.

B_k = sum_{i in M^f} |F(D_k)_i| / sum_i |F(D_k)_i| needs each block's response, which does not depend on the output
mask M^f. :func:`block_response_atlas` evaluates every block with the backward mapping's own machinery (groups of
far-apart blocks or tiles, within the measured response radius) and keeps each block's |F(D_k)| where it is
nonzero (float32, sparse); :meth:`ResponseAtlas.backward` then answers any output mask with no model evaluation.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy import ndimage

from .backward import BackwardResult, _BlockSums, _block_labels, _label_boxes, _normalize_blocks
from .blocks import DEFAULT_COMPACTNESS
from .checks import (BLOCK_KINDS, channel_indices, check_arguments, check_block_labels, check_callback, check_choice,
                     check_mask)
from .cost import Estimate, Forecast, advice
from .errors import InputError, is_file
from .geometry import Geometry
from .model import Model, ProgressCallback, check_cancel
from .perturb import (PROBE_SHARE, Perturber, ProbeBudget, jitter_levels, jitter_schedule, resolve_max_jitter,
                      response_radius)

#: Default memory budget of an atlas's responses (bytes).
DEFAULT_ATLAS_BUDGET = 1024 * 2**20
#: What reading one block on its own costs beyond its entries, in entries read at once (about 10 us of numpy calls):
#: an answer reads the blocks near the mask one by one when that costs less than reading all entries at once.
ENTRIES_PER_CALL = 4000
#: What an atlas file says it is, and the version of its layout (2: with a checksum of its arrays).
FILE_KIND, FILE_VERSION = "ibix-response-atlas", 2
#: The arrays of an atlas file, besides its ``meta`` (JSON text).
ARRAYS = ("labels", "starts", "index", "values", "denominator", "low", "high")
#: Relative difference between a block's stored denominator and the sum of its stored responses beyond float rounding.
DENOMINATOR_TOLERANCE = 1e-6
#: Entries checked at once against their block's box when an atlas is loaded.
_CHECK_CHUNK = 1 << 22


def model_fingerprint(model: Model) -> str:
    """SHA-256 of the ONNX file's bytes and of the resolved model card (what decides the model's outputs)."""
    digest = hashlib.sha256()
    with open(model.path, "rb") as file:
        for chunk in iter(lambda: file.read(2**20), b""):
            digest.update(chunk)
    card = dataclasses.asdict(model.card)
    for ignored in ("assumptions", "extra", "description"):  # words, not computation
        card.pop(ignored, None)
    digest.update(json.dumps(card, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def input_fingerprint(model: Model, x: Any, geometry: Geometry | None = None) -> str:
    """SHA-256 of the input volumes (float32, channel by channel, with their shape) and of their geometry (to 1e-6
    mm and 1e-6 of the direction cosines, so that the same grid read or converted another way gives the same
    fingerprint)."""
    volume = model.pipeline.stack_channels(x)
    geometry = (geometry if geometry is not None else Geometry.identity(volume.shape[1:])).with_shape(volume.shape[1:])
    grid = {k: [round(v, 6) + 0.0 for v in values] for k, values in geometry.to_dict().items() if k != "shape"}
    digest = hashlib.sha256(json.dumps({"shape": list(volume.shape), "grid": grid}, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(volume).tobytes())
    return digest.hexdigest()


class _Collector:
    """The sink of :class:`_BlockSums`: each block's nonzero |F| as chunks of (flat index on the input grid, value),
    sorted by block within a chunk and kept with their runs (block, count), assembled into one range per block at
    the end."""

    def __init__(self, volume_index: np.ndarray, n_labels: int):
        self.volume_index = volume_index  # per sample: the flat input-grid index of each sample voxel
        self.n_labels = n_labels
        self.chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def __call__(self, sample: int, blocks: Any, index: np.ndarray, values: np.ndarray) -> None:
        keep = values != 0
        index, values = self.volume_index[sample].reshape(-1)[index[keep]], values[keep].astype(np.float32)
        if not len(values):
            return
        if np.ndim(blocks) == 0:  # one block
            self.chunks.append((np.array([blocks], np.int64), np.array([len(values)]), index, values))
            return
        blocks = blocks[keep]
        order = np.argsort(blocks, kind="stable")
        blocks, index, values = blocks[order], index[order], values[order]
        first = np.flatnonzero(np.concatenate([[True], blocks[1:] != blocks[:-1]]))
        self.chunks.append((blocks[first].astype(np.int64), np.diff(np.append(first, len(blocks))), index, values))

    def assemble(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(starts, index, values): block k's entries are ``starts[k]:starts[k + 1]`` (a counting sort of the
        chunks' runs; each chunk is freed once placed)."""
        counts = np.zeros(self.n_labels, np.int64)
        for blocks, run_counts, _, _ in self.chunks:
            counts[blocks] += run_counts  # a chunk's runs are of distinct blocks
        starts = np.concatenate([[0], np.cumsum(counts)])
        index = np.empty(int(starts[-1]), self.volume_index.dtype)
        values = np.empty(int(starts[-1]), np.float32)
        cursor = starts[:-1].copy()
        self.chunks.reverse()
        while self.chunks:
            blocks, run_counts, chunk_index, chunk_values = self.chunks.pop()
            run_starts = np.cumsum(run_counts) - run_counts
            at = np.repeat(cursor[blocks] - run_starts, run_counts) + np.arange(len(chunk_values))
            index[at], values[at] = chunk_index, chunk_values
            cursor[blocks] += run_counts
        return starts, index, values


@dataclass
class ResponseAtlas:
    """Every block's response |F(D_k)| on the input grid, kept where it is nonzero.

    ``labels`` are the blocks 1..K on the input grid (0 = none); block k's responses are ``values[starts[k]:
    starts[k + 1]]`` (float32, output units per input unit) at the flat input-grid indices ``index`` of the same
    range; ``denominator[k]`` is their sum; ``low``/``high`` bound (inclusive, array index) where they can lie.
    ``evaluations`` and ``seconds`` are those of the build; ``fingerprints`` identify the model and the input.
    """

    labels: np.ndarray
    starts: np.ndarray
    index: np.ndarray
    values: np.ndarray
    denominator: np.ndarray
    low: np.ndarray
    high: np.ndarray
    geometry: Geometry
    parameters: dict
    fingerprints: dict
    evaluations: int
    equivalent_evaluations: float
    seconds: float
    device: str
    radius: dict | None = None
    tiling: dict | None = None

    def __post_init__(self) -> None:
        for array in (self.labels, self.starts, self.index, self.values, self.denominator, self.low, self.high):
            array.flags.writeable = False  # answers share the labels; nothing may change what the atlas holds

    @property
    def n_blocks(self) -> int:
        return len(self.starts) - 2

    @property
    def nbytes(self) -> int:
        """Memory the atlas holds (bytes)."""
        return sum(a.nbytes for a in (self.labels, self.starts, self.index, self.values, self.denominator,
                                      self.low, self.high))

    def to_dict(self) -> dict:
        return {"mapping": "response atlas", "parameters": self.parameters, "blocks": self.n_blocks,
                "entries": int(len(self.values)), "memory_mib": round(self.nbytes / 2**20, 1),
                "evaluations": self.evaluations, "equivalent_evaluations": round(self.equivalent_evaluations, 1),
                "seconds": round(self.seconds, 4), "device": self.device, "response_radius": self.radius,
                "tiling": self.tiling, "fingerprints": self.fingerprints, "geometry": self.geometry.to_dict()}

    # -- answers ------------------------------------------------------------------------------------------
    def numerators(self, out_mask: np.ndarray) -> np.ndarray:
        """sum_{i in M^f} |F(D_k)_i| for every block k (index 0: no block), read from the blocks whose reach meets
        the mask's bounding box (float32 pairwise sums, as the backward mapping's tiles sum them)."""
        flat = out_mask.reshape(-1)
        numerator = np.zeros(len(self.denominator))
        rows = out_mask.reshape(out_mask.shape[0], -1).any(axis=1)  # extent along the first axis
        plane = out_mask.any(axis=0)  # and along the others
        extents = [np.flatnonzero(rows)] + [
            np.flatnonzero(plane.any(axis=tuple(b for b in range(plane.ndim) if b != a))) for a in range(plane.ndim)]
        mask_low, mask_high = np.array([e[0] for e in extents]), np.array([e[-1] for e in extents])
        filled = np.flatnonzero(self.starts[1:] > self.starts[:-1])
        near = filled[np.all((self.low[filled] <= mask_high) & (self.high[filled] >= mask_low), axis=1)]
        near_entries = int((self.starts[near + 1] - self.starts[near]).sum())
        if len(near) * ENTRIES_PER_CALL + near_entries >= len(self.values):  # all entries at once is cheaper
            weighted = self.values * flat[self.index]
            numerator[filled] = np.add.reduceat(weighted, self.starts[filled])
            return numerator
        for k in near:  # block by block: each block's entries lie close together, so reading them is cache-friendly
            start, stop = self.starts[k], self.starts[k + 1]
            numerator[k] = (self.values[start:stop] * flat[self.index[start:stop]]).sum()
        return numerator

    def backward(self, out_mask: Any, normalization: str = "fraction") -> BackwardResult:
        """Backward mapping B(M^f) from the atlas: the result :func:`backward_mapping` gives on the same blocks and
        jitters (to float rounding), with no model evaluation.

        Parameters
        ----------
        out_mask : ndarray of bool
            The output voxels M^f, on the input grid.
        normalization : {"fraction", "magnitude"}
            As for :func:`backward_mapping`.

        Returns
        -------
        BackwardResult
            With ``evaluations`` 0 and ``seconds`` the time of this answer.
        """
        started = time.perf_counter()
        normalization = check_arguments(normalization=normalization)["normalization"]
        if isinstance(out_mask, np.ndarray) and out_mask.ndim >= 1 and out_mask.shape != self.labels.shape:
            raise InputError(f"the response atlas is of a grid of shape {self.labels.shape} but the output mask has "
                             f"shape {out_mask.shape}: the atlas was computed on another input than the one this mask "
                             "belongs to; compute an atlas for this input (ibix atlas / block_response_atlas)")
        out_mask = check_mask(out_mask, self.labels.shape, "output mask")
        numerator = self.numerators(out_mask)
        block_values = _normalize_blocks(numerator, self.denominator, normalization).astype(np.float32)
        block_values[0] = 0.0
        painted = np.zeros(self.labels.shape, np.float32)
        reached = np.flatnonzero(numerator)  # B is 0 elsewhere: paint the box of the blocks that reach the mask
        if len(reached):
            box = tuple(slice(a, b + 1) for a, b in zip(self.low[reached].min(axis=0), self.high[reached].max(axis=0)))
            painted[box] = block_values[self.labels[box]]
        samples = self._samples_touched(out_mask)
        parameters = dict(self.parameters, n_jitters_used=self.parameters["n_jitters"], progressive=False,
                          tolerance=None, normalization=normalization, coarse_blocks=None, refine_threshold=None,
                          output_mask_voxels=int(out_mask.sum()), samples=samples, atlas=True)
        return BackwardResult(map=painted, labels=self.labels, block_values=block_values, geometry=self.geometry,
                              parameters=parameters, evaluations=0, seconds=time.perf_counter() - started,
                              device="cpu", evaluations_per_level=[0], blocks_per_level=[self.n_blocks],
                              radius=self.radius, tiling=self.tiling, equivalent_evaluations=0.0)

    def _samples_touched(self, out_mask: np.ndarray) -> int:
        axis = self.parameters.get("slice_axis")
        if axis is None:
            return 1
        return int(out_mask.any(axis=tuple(a for a in range(out_mask.ndim) if a != axis)).sum())

    # -- identity and files -------------------------------------------------------------------------------
    def check(self, model: Model, x: Any, geometry: Geometry | None = None) -> None:
        """Raise :class:`InputError` unless the atlas was computed with this model (file and card) on this input
        (volumes and geometry)."""
        if model_fingerprint(model) != self.fingerprints["model"]:
            raise InputError(f"the response atlas was computed with another model or model card (atlas: "
                             f"{self.parameters.get('model')}, given: {model.path.name}); compute an atlas for this "
                             "model (ibix atlas / block_response_atlas)")
        if input_fingerprint(model, x, geometry) != self.fingerprints["input"]:
            raise InputError("the response atlas was computed on another input volume or geometry than the one "
                             "given; compute an atlas for this input (ibix atlas / block_response_atlas)")

    def save(self, path: str | os.PathLike) -> Path:
        """Write the atlas as one ``.npz`` file (no pickled objects, a SHA-256 checksum of its arrays in its
        metadata), atomically; returns its path."""
        from .io import atomic_write

        path = Path(path)
        arrays = {name: getattr(self, name) for name in ARRAYS}
        meta = {"kind": FILE_KIND, "version": FILE_VERSION, "geometry": self.geometry.to_dict(),
                "parameters": self.parameters, "fingerprints": self.fingerprints, "evaluations": self.evaluations,
                "equivalent_evaluations": self.equivalent_evaluations, "seconds": self.seconds,
                "device": self.device, "radius": self.radius, "tiling": self.tiling,
                "checksum": contents_checksum(arrays)}
        try:
            with atomic_write(path) as temporary, open(temporary, "wb") as file:
                np.savez(file, **arrays, meta=np.array(json.dumps(meta)))
        except OSError as exc:
            raise InputError(f"{path}: cannot write the response atlas ({exc.strerror or exc})") from None
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: Model | None = None, x: Any = None,
             geometry: Geometry | None = None) -> "ResponseAtlas":
        """Read an atlas written by :meth:`save`; with ``model`` and ``x``, check that it belongs to them.

        Everything is checked before the atlas is used: the file's arrays (names, types, shapes, declared sizes
        against the bytes stored), its metadata, the checksum of its arrays, and their values (block offsets,
        indices within the grid and each block's box, finite non-negative responses that sum to each block's
        denominator). Any damage raises :class:`InputError` naming the file and what is wrong.
        """
        path = Path(path)
        if not is_file(path, "response atlas", InputError):
            raise InputError(f"{path}: response atlas file not found")
        try:
            meta, arrays = _read_atlas_file(path)
            atlas = cls._from_file(meta, arrays)
        except _Damaged as exc:
            raise InputError(f"{path}: damaged response atlas: {exc}; compute it again (ibix atlas or "
                             "block_response_atlas)") from None
        if model is not None and x is not None:
            try:
                atlas.check(model, x, geometry)
            except InputError as exc:
                raise InputError(f"{path}: {exc}") from None
        return atlas

    @classmethod
    def _from_file(cls, meta: dict, arrays: dict) -> "ResponseAtlas":
        """An atlas from a file's metadata and arrays, each checked (raises _Damaged)."""
        if not isinstance(meta, dict):
            raise _Damaged("its metadata are not a JSON object")
        if meta.get("kind") != FILE_KIND or meta.get("version") != FILE_VERSION:
            raise _Damaged(f"it is not an IBIX response atlas of version {FILE_VERSION} (kind "
                           f"{meta.get('kind')!r}, version {meta.get('version')!r})")
        missing = [k for k in ("geometry", "parameters", "fingerprints", "evaluations", "equivalent_evaluations",
                               "seconds", "device", "radius", "tiling", "checksum") if k not in meta]
        if missing:
            raise _Damaged(f"its metadata lack {', '.join(missing)}")
        g = meta["geometry"]
        try:
            geometry = Geometry(g["origin"], g["spacing"], g["direction"], g["shape"])
        except (TypeError, KeyError, InputError) as exc:
            raise _Damaged(f"its geometry is not valid ({exc})") from None
        _check_metadata(meta)
        _check_arrays(arrays, geometry)
        if contents_checksum(arrays) != meta["checksum"]:
            raise _Damaged("its arrays do not match the checksum written with them (the file was changed or damaged "
                           "after it was written)")
        _check_values(arrays, meta["parameters"].get("slice_axis"))
        return cls(**arrays, geometry=geometry, parameters=meta["parameters"], fingerprints=meta["fingerprints"],
                   evaluations=int(meta["evaluations"]), equivalent_evaluations=float(meta["equivalent_evaluations"]),
                   seconds=float(meta["seconds"]), device=str(meta["device"]), radius=meta["radius"],
                   tiling=meta["tiling"])


# -- atlas files ----------------------------------------------------------------------------------------------
class _Damaged(Exception):
    """What is wrong with an atlas file (a phrase for the message)."""


def contents_checksum(arrays: dict) -> str:
    """SHA-256 of an atlas's arrays (names, types, shapes and bytes, in :data:`ARRAYS` order)."""
    digest = hashlib.sha256()
    for name in ARRAYS:
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{array.dtype.str}:{list(array.shape)};".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def _read_atlas_file(path: Path) -> tuple[Any, dict]:
    """The metadata and arrays of an atlas file, each array's declared size checked against the bytes stored before
    it is read (raises _Damaged)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename: info for info in archive.infolist()}
            missing = [name for name in (*ARRAYS, "meta") if f"{name}.npy" not in members]
            if missing:
                raise _Damaged(f"it lacks the array(s) {', '.join(missing)}")
            arrays = {}
            for name in (*ARRAYS, "meta"):
                with archive.open(members[f"{name}.npy"]) as member:
                    arrays[name] = _read_npy(member, members[f"{name}.npy"].file_size, name)
    except _Damaged:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, zlib.error,
            NotImplementedError) as exc:
        raise _Damaged(f"it is not a readable .npz file ({type(exc).__name__}: {exc})") from None
    meta = arrays.pop("meta")
    if meta.ndim != 0 or meta.dtype.kind != "U":
        raise _Damaged("its metadata are not one text")
    try:
        return json.loads(str(meta)), arrays
    except ValueError as exc:
        raise _Damaged(f"its metadata are not JSON ({exc})") from None


def _read_npy(member: Any, stored: int, name: str) -> np.ndarray:
    """One ``.npy`` member, its header's shape and type checked against the bytes it holds before reading."""
    from numpy.lib import format as npy

    version = npy.read_magic(member)
    header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
    shape, fortran, dtype = header(member)
    if dtype.hasobject or fortran:
        raise _Damaged(f"its array {name} is not a plain array ({dtype}{', Fortran order' if fortran else ''})")
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    held = stored - member.tell()
    if declared != held:
        raise _Damaged(f"its array {name} declares {declared} bytes ({list(shape)} of {dtype}) but holds {held}")
    data = member.read(declared)
    if len(data) != declared:
        raise _Damaged(f"its array {name} is cut short ({len(data)} of {declared} bytes)")
    return np.frombuffer(data, dtype).reshape(shape)  # read-only over the bytes read: the atlas never writes it


def _check_metadata(meta: dict) -> None:
    """The metadata fields an atlas uses: types and ranges (raises _Damaged)."""
    parameters, fingerprints = meta["parameters"], meta["fingerprints"]
    if not isinstance(parameters, dict):
        raise _Damaged("its parameters are not a JSON object")
    need = {"n_blocks": int, "n_jitters": int, "max_jitter": (int, float), "channels": list, "blocks": str,
            "compactness": (int, float)}
    wrong = [k for k, kind in need.items()
             if not isinstance(parameters.get(k), kind) or isinstance(parameters.get(k), bool)]
    if wrong:
        raise _Damaged(f"its parameters {', '.join(wrong)} are missing or of the wrong type")
    if not (np.isfinite(parameters["max_jitter"]) and parameters["max_jitter"] > 0 and parameters["n_jitters"] >= 1):
        raise _Damaged(f"its jitters (n_jitters {parameters['n_jitters']}, max_jitter {parameters['max_jitter']}) "
                       "are not valid")
    axis = parameters.get("slice_axis")
    if axis is not None and (not isinstance(axis, int) or isinstance(axis, bool) or not 0 <= axis <= 2):
        raise _Damaged(f"its slice axis {axis!r} is not an array axis")
    if not isinstance(fingerprints, dict) or not all(
            isinstance(fingerprints.get(k), str) and len(fingerprints[k]) == 64 for k in ("model", "input")):
        raise _Damaged("its model and input fingerprints are missing or not SHA-256 digests")
    for key in ("evaluations", "equivalent_evaluations", "seconds"):
        value = meta[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value) or value < 0:
            raise _Damaged(f"its {key} ({value!r}) is not a number of at least 0")
    if not isinstance(meta["checksum"], str) or len(meta["checksum"]) != 64:
        raise _Damaged("its checksum is missing or not a SHA-256 digest")
    for key in ("radius", "tiling"):
        if meta[key] is not None and not isinstance(meta[key], dict):
            raise _Damaged(f"its {key} is not a JSON object")


def _check_arrays(arrays: dict, geometry: Geometry) -> None:
    """Types and shapes of an atlas's arrays, against each other and its geometry (raises _Damaged)."""
    labels = arrays["labels"]
    if labels.dtype.kind not in "iu" or labels.ndim not in (2, 3):
        raise _Damaged(f"its block labels are {labels.ndim}D {labels.dtype}, not a 2D or 3D integer image")
    if labels.shape != geometry.shape:
        raise _Damaged(f"its block labels have shape {labels.shape} but its geometry describes a grid of "
                       f"{geometry.shape}")
    if labels.size == 0 or labels.min() < 0:
        raise _Damaged("its block labels are empty or negative")
    n_labels = int(labels.max()) + 1
    kinds = {"starts": (("int64",), (n_labels + 1,)), "index": (("int32", "int64"), None),
             "values": (("float32",), None), "denominator": (("float64",), (n_labels,)),
             "low": (("int64",), (n_labels, labels.ndim)), "high": (("int64",), (n_labels, labels.ndim))}
    for name, (types, shape) in kinds.items():  # the types and shapes save() writes
        array = arrays[name]
        if array.dtype.name not in types or (shape is not None and array.shape != shape) or \
                (shape is None and array.ndim != 1):
            raise _Damaged(f"its array {name} is {array.dtype} of shape {array.shape}, expected "
                           f"{' or '.join(types)} of shape {shape if shape is not None else '(entries,)'} for "
                           f"{n_labels - 1} blocks")
    if arrays["index"].shape != arrays["values"].shape:
        raise _Damaged(f"its {len(arrays['index'])} indices do not match its {len(arrays['values'])} responses")


def _check_values(arrays: dict, slice_axis: int | None) -> None:
    """The values of an atlas's arrays (raises _Damaged): block offsets, indices within the grid and each block's
    box, finite non-negative responses that sum to each block's denominator, boxes that hold each block."""
    labels, starts, index, values = arrays["labels"], arrays["starts"], arrays["index"], arrays["values"]
    denominator, low, high = arrays["denominator"], arrays["low"], arrays["high"]
    if starts[0] != 0 or np.any(np.diff(starts) < 0) or starts[-1] != len(values):
        raise _Damaged(f"its block offsets (starts) are not increasing from 0 to its {len(values)} entries")
    if len(index) and (index.min() < 0 or index.max() >= labels.size):
        raise _Damaged(f"its responses lie at indices {int(index.min())}..{int(index.max())}, outside the grid's "
                       f"{labels.size} voxels")
    if not np.all(np.isfinite(values)) or (len(values) and values.min() < 0):
        raise _Damaged(f"its responses hold {int((~np.isfinite(values)).sum())} values that are not finite and "
                       f"{int((values < 0).sum())} negative ones (responses |F| are finite and at least 0)")
    filled = np.flatnonzero(starts[1:] > starts[:-1])
    sums = np.zeros(len(denominator))
    if len(filled):
        sums[filled] = np.add.reduceat(values, starts[filled], dtype=np.float64)
    if not np.all(np.isfinite(denominator)) or not np.allclose(denominator, sums, rtol=DENOMINATOR_TOLERANCE,
                                                                 atol=0):
        bad = int(np.flatnonzero(~np.isclose(denominator, sums, rtol=DENOMINATOR_TOLERANCE, atol=0))[0]) \
            if np.all(np.isfinite(denominator)) else int(np.flatnonzero(~np.isfinite(denominator))[0])
        raise _Damaged(f"its denominators are not the sums of the responses (block {bad}: {denominator[bad]!r} "
                       f"stored, {sums[bad]!r} summed)")
    boxes = ndimage.find_objects(labels)
    for k in filled:  # every block with responses has a box that holds it, within the grid
        box = boxes[k - 1] if 0 < k <= len(boxes) else None
        if box is None or np.any(low[k] < 0) or np.any(high[k] >= labels.shape) or np.any(
                low[k] > [s.start for s in box]) or np.any(high[k] < [s.stop - 1 for s in box]):
            raise _Damaged(f"the box of block {k} ({low[k].tolist()}..{high[k].tolist()}) does not hold the block "
                           "within the grid")
    if slice_axis is not None and np.any(low[filled, slice_axis] != high[filled, slice_axis]):
        raise _Damaged("a block's box spans several samples of a 2D model")
    for first in range(0, len(values), _CHECK_CHUNK):
        part = slice(first, first + _CHECK_CHUNK)
        owner = np.searchsorted(starts, np.arange(first, min(first + _CHECK_CHUNK, len(values))), side="right") - 1
        where = np.stack(np.unravel_index(index[part], labels.shape), axis=1)
        if np.any(where < low[owner]) or np.any(where > high[owner]):
            raise _Damaged("responses lie outside their block's box (the boxes or the block offsets are wrong)")


def _reach_boxes(labels: np.ndarray, n_labels: int, radius: int | None, slice_axis: int | None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive index boxes (input grid) where each block's response can be nonzero: its box grown by the
    response radius on the sample's axes (the whole sample when the response is global)."""
    low = np.zeros((n_labels, labels.ndim), np.int64)
    high = np.full((n_labels, labels.ndim), -1, np.int64)
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is not None:
            low[k] = [s.start for s in box]
            high[k] = [s.stop - 1 for s in box]
    grow = np.full(labels.ndim, np.iinfo(np.int32).max if radius is None else radius, np.int64)
    if slice_axis is not None:
        grow[slice_axis] = 0
    present = high[:, 0] >= 0
    low[present] = np.maximum(low[present] - grow, 0)
    high[present] = np.minimum(high[present] + grow, np.asarray(labels.shape) - 1)
    return low, high


def block_response_atlas(model: Model, x: Any, n_blocks: int = 500, compactness: float = DEFAULT_COMPACTNESS,
                         blocks: Any = "slic", n_jitters: int = 4, max_jitter: float | None = None,
                         channels: Any = None, geometry: Geometry | None = None,
                         progress: ProgressCallback | None = None, cancel: Any = None,
                         memory_budget: int = DEFAULT_ATLAS_BUDGET,
                         estimate: Callable[[Estimate], None] | None = None) -> ResponseAtlas:
    """Every block's response |F(D_k)|, for backward maps of any output mask without new model evaluations.

    Parameters
    ----------
    model, x, n_jitters, max_jitter, channels, geometry, progress, cancel
        As for :func:`backward_mapping`.
    n_blocks, compactness, blocks
        The blocks, as for :func:`backward_mapping`; generated blocks cover every sample (every slice of a volume
        under a 2D model).
    memory_budget : int
        Bytes the atlas's responses may take (8 per stored voxel: a float32 value and its index). Checked before
        any block is evaluated against an upper bound (each block's box grown by the response radius; the whole
        sample per block when the response is global).
    estimate : callable, optional
        As for :func:`forward_mapping`: ``estimate(Estimate)`` once, before any progress.

    Returns
    -------
    ResponseAtlas
        Answers :meth:`ResponseAtlas.backward` for any output mask; ``nbytes`` is its memory.
    """
    started = time.perf_counter()
    checked = check_arguments(n_blocks=n_blocks, compactness=compactness, n_jitters=n_jitters, max_jitter=max_jitter,
                              geometry=geometry, progress=progress, cancel=cancel, memory_budget=memory_budget)
    n_blocks, compactness, n_jitters = checked["n_blocks"], checked["compactness"], checked["n_jitters"]
    memory_budget = checked["memory_budget"]
    if isinstance(blocks, str):
        check_choice("blocks", blocks, BLOCK_KINDS)
    before, voxels_before = model.evaluations, model.evaluated_voxels
    prepared = model.prepare(x, geometry)
    channel_list = channel_indices(model.card, channels)
    h_max = resolve_max_jitter(prepared, checked["max_jitter"], channel_list, n_jitters)
    fingerprints = {"model": model_fingerprint(model), "input": input_fingerprint(model, x, geometry)}
    n_samples = len(prepared.samples)
    if isinstance(blocks, str):
        label_samples = _block_labels(prepared, range(n_samples), n_blocks, compactness, blocks)
    else:  # the given labels, numbered 1..K in their order
        label_samples = np.ascontiguousarray(prepared.to_samples(check_block_labels(blocks, prepared.volume_shape)))
    labels = prepared.from_samples(label_samples)
    n_labels = int(labels.max()) + 1

    perturber = Perturber(model, prepared, jitter_levels(n_jitters, h_max), channel_list, cancel)
    check_callback("estimate", estimate)
    if estimate is not None:
        perturber.forecast = Forecast(model, started, estimate, lambda seconds: advice(
            "atlas", seconds, model.device, n_jitters, n_blocks), model.pipeline.sample_voxels(prepared.sample_shape))
        progress = perturber.forecast.gate(progress)
    occupied = np.flatnonzero(label_samples.reshape(n_samples, -1).any(axis=1))
    # probes near the middle sample's centre (in windows of a large sample), within PROBE_SHARE of brute force's work
    middle = int(occupied[len(occupied) // 2])
    brute_force = float(len(occupied) + 2 * n_jitters * (n_labels - 1))
    if perturber.forecast is not None:
        perturber.forecast.brute_force = brute_force
    radius_info = response_radius(perturber, middle, 0.0, near=tuple(n // 2 for n in prepared.sample_shape),
                                  budget=ProbeBudget(PROBE_SHARE * brute_force, lambda r: brute_force, brute_force))
    radius = radius_info.radius
    low, high = _reach_boxes(labels, n_labels, radius, prepared.slice_axis)
    index_type = np.int32 if labels.size < 2**31 else np.int64
    bound = int(np.prod(high - low + 1, axis=1).sum()) * (4 + np.dtype(index_type).itemsize)
    if bound > memory_budget:
        reach = ("the model's response is global (it reaches across the whole sample), so every block's response "
                 "covers its whole sample" if radius is None else f"with a response radius of {radius} voxels")
        raise InputError(f"the response atlas of {n_labels - 1} blocks would take up to {bound / 2**20:.0f} MiB, "
                         f"above its memory budget of {memory_budget / 2**20:g} MiB: {reach}; use fewer blocks "
                         "(n_blocks), raise the atlas's memory_budget (ibix atlas --atlas-budget), or compute "
                         "backward maps one by one")
    check_cancel(cancel)
    volume_index = prepared.to_samples(np.arange(labels.size, dtype=index_type).reshape(labels.shape))
    collector = _Collector(volume_index, n_labels)
    sums = _BlockSums(perturber, None, radius, jitter_schedule(n_jitters, False), progress, sink=collector,
                      stage="response atlas")
    sums.compute(label_samples, np.arange(1, n_labels), _label_boxes(label_samples))
    if perturber.forecast is not None:
        perturber.forecast.finish()
    starts, index, values = collector.assemble()
    filled = np.flatnonzero(starts[1:] > starts[:-1])
    denominator = np.zeros(n_labels)
    if len(filled):
        denominator[filled] = np.add.reduceat(values, starts[filled], dtype=np.float64)
    parameters = {
        "n_blocks": n_blocks, "compactness": compactness, "n_jitters": n_jitters, "max_jitter": h_max,
        "channels": [model.card.input.channels[c] for c in channel_list],
        "blocks": blocks if isinstance(blocks, str) else "labels",
        "method": "batched" if radius is None else "local", "locality_tolerance": 0.0, "tiles": True,
        "model": model.path.name, "slice_axis": prepared.slice_axis, "samples_with_blocks": int(len(occupied)),
    }
    return ResponseAtlas(
        labels=labels, starts=starts, index=index, values=values, denominator=denominator, low=low, high=high,
        geometry=prepared.geometry, parameters=parameters, fingerprints=fingerprints,
        evaluations=model.evaluations - before, seconds=time.perf_counter() - started, device=model.device,
        equivalent_evaluations=(model.evaluated_voxels - voxels_before) / float(np.prod(
            model.pipeline.padded_shape(prepared.sample_shape))),
        radius=radius_info.to_dict(), tiling=sums.tiling)
