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
from .errors import InputError
from .geometry import Geometry
from .model import Model, ProgressCallback, check_cancel
from .perturb import (PROBE_SHARE, Perturber, ProbeBudget, jitter_levels, jitter_schedule, resolve_max_jitter,
                      response_radius)

#: Default memory budget of an atlas's responses (bytes).
DEFAULT_ATLAS_BUDGET = 1024 * 2**20
#: What reading one block on its own costs beyond its entries, in entries read at once (about 10 us of numpy calls):
#: an answer reads the blocks near the mask one by one when that costs less than reading all entries at once.
ENTRIES_PER_CALL = 4000
#: What an atlas file says it is, and the version of its layout.
FILE_KIND, FILE_VERSION = "ibix-response-atlas", 1


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
        """Write the atlas as one ``.npz`` file (no pickled objects), atomically; returns its path."""
        path = Path(path)
        meta = {"kind": FILE_KIND, "version": FILE_VERSION, "geometry": self.geometry.to_dict(),
                "parameters": self.parameters, "fingerprints": self.fingerprints, "evaluations": self.evaluations,
                "equivalent_evaluations": self.equivalent_evaluations, "seconds": self.seconds,
                "device": self.device, "radius": self.radius, "tiling": self.tiling}
        temporary = path.with_name(f".{path.name}.partial")
        try:
            with open(temporary, "wb") as file:
                np.savez(file, labels=self.labels, starts=self.starts, index=self.index, values=self.values,
                         denominator=self.denominator, low=self.low, high=self.high, meta=np.array(json.dumps(meta)))
            os.replace(temporary, path)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise InputError(f"{path}: cannot write the response atlas ({exc.strerror or exc})") from None
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: Model | None = None, x: Any = None,
             geometry: Geometry | None = None) -> "ResponseAtlas":
        """Read an atlas written by :meth:`save`; with ``model`` and ``x``, check that it belongs to them."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: response atlas file not found")
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                if meta.get("kind") != FILE_KIND or meta.get("version") != FILE_VERSION:
                    raise ValueError(f"kind {meta.get('kind')!r}, version {meta.get('version')!r}")
                arrays = {k: data[k] for k in ("labels", "starts", "index", "values", "denominator", "low", "high")}
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"{path}: not an IBIX response atlas (version {FILE_VERSION}) ({exc}); write one with "
                             "ibix atlas or ResponseAtlas.save") from None
        g = meta["geometry"]
        atlas = cls(**arrays, geometry=Geometry(g["origin"], g["spacing"], g["direction"], g["shape"]),
                    parameters=meta["parameters"], fingerprints=meta["fingerprints"],
                    evaluations=meta["evaluations"], equivalent_evaluations=meta["equivalent_evaluations"],
                    seconds=meta["seconds"], device=meta["device"], radius=meta["radius"], tiling=meta["tiling"])
        if model is not None and x is not None:
            atlas.check(model, x, geometry)
        return atlas


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
