"""Blocks D_k that a backward mapping perturbs one at a time: superpixels, supervoxels or a regular grid.

Supervoxels of a large volume are cut chunk by chunk (:func:`chunked_supervoxels`): a backward mapping then cuts
only the chunks near its output mask, and the chunks cut once are kept for the next mapping of the same volume.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Sequence

import numpy as np

from .checks import check_arguments, check_array, check_count
from .errors import InputError

#: Gaussian smoothing (voxels) SLIC applies first, so that noise does not fragment the blocks.
SMOOTHING_VOXELS = 1.0
#: Default SLIC compactness, for channels scaled to [0, 1]: blocks follow strong edges and stay compact.
DEFAULT_COMPACTNESS = 0.5


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Consecutive labels 1..K (0 stays 0)."""
    ids, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape).astype(np.int32)
    return inverse if ids[0] == 0 else inverse + 1


def superpixel_blocks(image: np.ndarray, n_blocks: int, compactness: float = DEFAULT_COMPACTNESS,
                      spacing: Sequence[float] | None = None, mask: np.ndarray | None = None,
                      channel_axis: int | None = None,
                      ranges: Sequence[tuple[float, float]] | None = None) -> np.ndarray:
    """SLIC superpixels (2D) or supervoxels (3D) of an image, after a light smoothing (1 voxel).

    Parameters
    ----------
    image : ndarray
        Spatial array, or several channels stacked along ``channel_axis``. Each channel is scaled to [0, 1]
        by its 1st and 99th percentiles first, so ``compactness`` means the same for any intensity units.
    n_blocks : int
        Approximate number of blocks (SLIC ``n_segments``).
    compactness : float
        Balance of intensity and space (SLIC ``compactness``; channels are in [0, 1], so 1 weighs one block step
        like the whole intensity range): higher values give more regular blocks.
    spacing : sequence of float, optional
        Voxel size (mm) per spatial axis, so blocks are compact in millimetres.
    mask : ndarray of bool, optional
        Only voxels inside the mask get blocks; the rest are 0.
    ranges : sequence of (low, high), optional
        Per channel, the intensities scaled to 0 and 1 (default: the 1st and 99th percentiles of the image).

    Returns
    -------
    labels : ndarray of int32
        Block labels 1..K, 0 outside ``mask``.
    """
    from skimage.segmentation import slic

    checked = check_arguments(n_blocks=n_blocks, compactness=compactness)
    n_blocks, compactness = checked["n_blocks"], checked["compactness"]
    image = check_array("image", image).astype(np.float32, copy=False)
    channels = image[None] if channel_axis is None else np.moveaxis(image, channel_axis, 0)
    scaled = np.empty(channels.shape[1:] + (len(channels),), np.float32)
    if ranges is None:
        ranges = [np.percentile(channel if mask is None else channel[mask], [1, 99]) for channel in channels]
    for c, (channel, (low, high)) in enumerate(zip(channels, ranges)):
        scaled[..., c] = np.clip((channel - low) / (high - low), 0, 1) if high > low else 0.0
    if mask is not None and not np.any(mask):
        raise InputError("the region to cut into blocks is empty")
    # spacing relative to the finest axis: blocks are compact in millimetres, while compactness keeps one
    # meaning (intensity range per block step) whatever the voxel size
    relative = None if spacing is None else np.asarray(spacing, float) / min(spacing)
    labels = slic(scaled, n_segments=int(n_blocks), compactness=float(compactness), spacing=relative,
                  sigma=SMOOTHING_VOXELS, mask=mask, start_label=1, channel_axis=-1, enforce_connectivity=True)
    return _relabel(labels)


def grid_blocks(shape: Sequence[int], n_blocks: int, spacing: Sequence[float] | None = None,
                mask: np.ndarray | None = None) -> np.ndarray:
    """A regular grid of about ``n_blocks`` near-cubic blocks (in millimetres when ``spacing`` is given)."""
    n_blocks = check_arguments(n_blocks=n_blocks)["n_blocks"]
    shape = tuple(check_count("shape", s, 1) for s in np.atleast_1d(np.asarray(shape, dtype=object)))
    spacing = np.ones(len(shape)) if spacing is None else np.asarray(spacing, float)
    extent = np.asarray(shape) * spacing
    edge = (np.prod(extent) / int(n_blocks)) ** (1.0 / len(shape))
    counts = np.clip(np.round(extent / edge), 1, shape).astype(int)
    index = np.zeros(shape, np.int64)
    for axis, (n, count) in enumerate(zip(shape, counts)):
        cell = (np.arange(n) * count // n).reshape([-1 if a == axis else 1 for a in range(len(shape))])
        index = index * count + cell
    labels = index.astype(np.int32) + 1
    if mask is not None:
        labels = _relabel(np.where(mask, labels, 0))
    return labels


#: 3D images that hold at least this many chunks get their supervoxels chunk by chunk (with 3 chunks along each
#: axis, the chunks near a small region are fewer than all of them).
CHUNKS_AT_LEAST = 27
#: Bytes of chunk labels kept for later mappings of the same volume.
CACHE_BYTES = 256 * 2**20
_CACHE: "OrderedDict[tuple, np.ndarray]" = OrderedDict()
_CACHE_LOCK = threading.Lock()


def chunk_edge(shape: Sequence[int], n_blocks: int) -> int:
    """Edge (voxels) of the chunks :func:`chunked_supervoxels` cuts: two block edges, a multiple of 8, >= 32."""
    block_edge = (float(np.prod(shape)) / max(int(n_blocks), 1)) ** (1.0 / len(shape))
    return int(max(32, round(2 * block_edge / 8) * 8))


def cut_in_chunks(shape: Sequence[int], n_blocks: int) -> bool:
    """Whether a 3D image of ``shape`` gets its ``n_blocks`` supervoxels chunk by chunk (:func:`chunked_supervoxels`):
    when it holds at least CHUNKS_AT_LEAST chunks. Decided by the image's size and K alone, so that every mapping
    of an image gets the same blocks whatever its mask."""
    if len(shape) != 3:
        return False
    edge = chunk_edge(shape, n_blocks)
    return int(np.prod([-(-int(n) // edge) for n in shape])) >= CHUNKS_AT_LEAST


def chunked_supervoxels(image: np.ndarray, n_blocks: int, compactness: float = DEFAULT_COMPACTNESS,
                        spacing: Sequence[float] | None = None, box: tuple[slice, ...] | None = None,
                        channel_axis: int | None = None) -> np.ndarray:
    """SLIC supervoxels of a large volume, cut independently in cubic chunks that tile it from its first voxel.

    Every chunk gets its share of ``n_blocks`` (so blocks have the size ``n_blocks`` gives the whole volume), and
    intensities are scaled by the whole volume's 1st and 99th percentiles, so a chunk's blocks are the same
    whichever chunks are cut with it. Only the chunks that meet ``box`` (index slices; default the whole volume)
    are cut; their labels are kept (up to CACHE_BYTES) and reused by later calls on the same volume with the
    same parameters.

    Returns
    -------
    labels : ndarray of int32
        Block labels 1..K on the volume's grid, 0 outside the chunks cut.
    """
    image = np.asarray(image, dtype=np.float32)
    channels = image[None] if channel_axis is None else np.moveaxis(image, channel_axis, 0)
    shape = channels.shape[1:]
    edge = chunk_edge(shape, n_blocks)
    step = max(1, channels[0].size // 1_000_000)
    ranges = [tuple(float(v) for v in np.percentile(c.ravel()[::step], [1, 99])) for c in channels]
    fingerprint = hashlib.blake2b(np.ascontiguousarray(channels).data, digest_size=16).hexdigest()
    box = box or tuple(slice(0, n) for n in shape)
    labels = np.zeros(shape, np.int32)
    offset = 0
    starts = [range(max(0, b.start) // edge * edge, min(n, b.stop), edge) for b, n in zip(box, shape)]
    for origin in np.array(np.meshgrid(*starts, indexing="ij")).reshape(len(shape), -1).T:
        chunk = tuple(slice(int(o), int(min(o + edge, n))) for o, n in zip(origin, shape))
        key = (fingerprint, shape, tuple(spacing or ()), int(n_blocks), float(compactness), tuple(origin))
        with _CACHE_LOCK:
            cut = _CACHE.get(key)
            if cut is not None:
                _CACHE.move_to_end(key)
        if cut is None:
            share = max(1, round(int(n_blocks) * np.prod([c.stop - c.start for c in chunk]) / np.prod(shape)))
            cut = superpixel_blocks(channels[(slice(None),) + chunk], share, compactness, spacing,
                                    channel_axis=0, ranges=ranges)
            with _CACHE_LOCK:
                _CACHE[key] = cut
                while sum(v.nbytes for v in _CACHE.values()) > CACHE_BYTES and len(_CACHE) > 1:
                    _CACHE.popitem(last=False)
        labels[chunk] = np.where(cut > 0, cut + offset, 0)
        offset += int(cut.max())
    return labels
