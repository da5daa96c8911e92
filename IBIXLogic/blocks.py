"""Blocks D_k that a backward mapping perturbs one at a time: superpixels, supervoxels or a regular grid."""
from __future__ import annotations

from typing import Sequence

import numpy as np

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
                      channel_axis: int | None = None) -> np.ndarray:
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

    Returns
    -------
    labels : ndarray of int32
        Block labels 1..K, 0 outside ``mask``.
    """
    from skimage.segmentation import slic

    if int(n_blocks) < 1:
        raise InputError(f"the number of blocks must be at least 1, got {n_blocks}")
    if not compactness > 0:
        raise InputError(f"compactness must be positive, got {compactness}")
    image = np.asarray(image, dtype=np.float32)
    channels = image[None] if channel_axis is None else np.moveaxis(image, channel_axis, 0)
    scaled = np.empty(channels.shape[1:] + (len(channels),), np.float32)
    for c, channel in enumerate(channels):
        low, high = np.percentile(channel if mask is None else channel[mask], [1, 99])
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
    if int(n_blocks) < 1:
        raise InputError(f"the number of blocks must be at least 1, got {n_blocks}")
    shape = tuple(int(s) for s in shape)
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
