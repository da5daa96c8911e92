"""Padding and sliding-window (patch) inference, as models are deployed.

Padding: how a sample is grown to the shape the model takes (``input.padding`` of the card): where the added
voxels go (``"center"``: split, the odd voxel at the end; ``"end"``: all after the image along every axis) and what
they hold (``"constant"`` value in model units, ``"edge"`` repeats the border voxel, ``"reflect"`` mirrors the
image without repeating the border voxel).

Windows: the placement and blending of MONAI's ``sliding_window_inference`` (``dense_patch_slices``,
``compute_importance_map``). Along each axis the windows start at 0, s, 2s, ... with
s = max(1, int(size * (1 - overlap))) (s = size where the axis equals the window), as few as cover the axis, the
last one moved back to end flush with the volume. Overlapping outputs are averaged with weights: 1 everywhere
(``"constant"``) or a Gaussian importance map, sigma = sigma_scale * size per axis (``"gaussian"``).
"""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

PADDING_MODES = ("constant", "edge", "reflect")
PADDING_POSITIONS = ("center", "end")
BLEND_MODES = ("constant", "gaussian")
#: Smallest Gaussian importance weight (MONAI's floor: no voxel of a window is ignored).
MIN_IMPORTANCE = 1e-3


def pad_widths(shape: Sequence[int], padded_shape: Sequence[int], position: str = "center"
               ) -> tuple[tuple[int, int], ...]:
    """Voxels added (before, after) along each axis to grow ``shape`` to ``padded_shape``.

    ``"center"`` splits them, the odd voxel at the end; ``"end"`` puts them all after the image.
    """
    if position not in PADDING_POSITIONS:
        raise ValueError(f"padding position must be one of {PADDING_POSITIONS}, got {position!r}")
    widths = []
    for n, p in zip(shape, padded_shape):
        extra = int(p) - int(n)
        before = extra // 2 if position == "center" else 0
        widths.append((before, extra - before))
    return tuple(widths)


def pad(array: np.ndarray, widths: Sequence[tuple[int, int]], mode: str = "edge", value: float = 0.0
        ) -> np.ndarray:
    """``array`` padded along its trailing ``len(widths)`` axes (a new array; unchanged when nothing is added).

    Padding is linear in the image for ``"edge"`` and ``"reflect"``, and for ``"constant"`` up to the constant, so
    a perturbation direction is padded with the same mode and ``value`` 0.
    """
    if mode not in PADDING_MODES:
        raise ValueError(f"padding mode must be one of {PADDING_MODES}, got {mode!r}")
    if not any(before or after for before, after in widths):
        return array
    full = ((0, 0),) * (array.ndim - len(widths)) + tuple(widths)
    if mode == "constant":
        return np.pad(array, full, mode="constant", constant_values=value)
    return np.pad(array, full, mode=mode)


def source_index(positions: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Index into an axis of ``n`` voxels that padding ``mode`` copies to each of ``positions`` (which may lie
    outside 0..n-1): the nearest voxel for ``"edge"`` (and ``"constant"``, whose padded voxels are overwritten),
    the mirror image without repeating the border voxel for ``"reflect"`` (numpy's ``reflect``)."""
    if mode != "reflect" or n == 1:
        return np.clip(positions, 0, n - 1)
    period = 2 * (n - 1)
    folded = np.mod(positions, period)
    return np.where(folded >= n, period - folded, folded)


def scan_interval(image_shape: Sequence[int], patch_size: Sequence[int], overlap: float) -> tuple[int, ...]:
    """Step between window starts along each axis: max(1, int(size * (1 - overlap))), or size where the axis
    equals the window."""
    return tuple(int(p) if int(n) == int(p) else max(1, int(p * (1.0 - overlap)))
                 for n, p in zip(image_shape, patch_size))


def window_starts(n: int, size: int, step: int) -> list[int]:
    """Starts of the windows of ``size`` along an axis of ``n`` voxels (n >= size): 0, step, 2 step, ... up to the
    first window that reaches the end, that one moved back to end flush."""
    starts = []
    start = 0
    while True:
        starts.append(min(start, n - size))
        if start + size >= n:
            return starts
        start += step


def plan_windows(image_shape: Sequence[int], patch_size: Sequence[int], overlap: float
                 ) -> list[tuple[slice, ...]]:
    """The windows covering an image of ``image_shape`` (at least ``patch_size`` along every axis), in C order of
    their starts (the first axis slowest)."""
    if any(int(n) < int(p) for n, p in zip(image_shape, patch_size)):
        raise ValueError(f"the image {list(image_shape)} is smaller than the window {list(patch_size)}; pad it first")
    steps = scan_interval(image_shape, patch_size, overlap)
    per_axis = [window_starts(int(n), int(p), s) for n, p, s in zip(image_shape, patch_size, steps)]
    return [tuple(slice(a, a + int(p)) for a, p in zip(starts, patch_size))
            for starts in itertools.product(*per_axis)]


def importance_map(patch_size: Sequence[int], blend: str = "constant", sigma_scale: float | Sequence[float] = 0.125
                   ) -> np.ndarray:
    """Weight of each voxel of a window's output when overlapping windows are blended (float32, ``patch_size``).

    ``"gaussian"``: the product over the axes of exp(-x^2 / (2 sigma^2)), x measured from the window's centre
    ((size - 1) / 2), sigma = sigma_scale * size; floored at its minimum or ``MIN_IMPORTANCE``, whichever is
    larger (MONAI's ``compute_importance_map``).
    """
    if blend not in BLEND_MODES:
        raise ValueError(f"blend must be one of {BLEND_MODES}, got {blend!r}")
    if blend == "constant":
        return np.ones(tuple(int(p) for p in patch_size), np.float32)
    scales = np.broadcast_to(np.asarray(sigma_scale, np.float64), (len(patch_size),))
    weights = np.ones((), np.float32)
    for size, scale in zip(patch_size, scales):
        x = np.arange(int(size), dtype=np.float32) - np.float32((int(size) - 1) / 2.0)
        sigma = np.float32(size * scale)
        axis = np.exp(x ** 2 / (np.float32(-2.0) * sigma ** 2)).astype(np.float32)
        weights = weights[..., None] * axis
    floor = max(float(weights.min()), MIN_IMPORTANCE)
    return np.maximum(weights, np.float32(floor)).astype(np.float32)


def blend(outputs: np.ndarray, windows: Sequence[tuple[slice, ...]], shape: Sequence[int], weights: np.ndarray
          ) -> np.ndarray:
    """Weighted average of overlapping window outputs: sum_w weights * outputs_w / sum_w weights.

    ``outputs`` has shape (n_windows, *patch_size); the result has ``shape`` (float32, summed in float64).
    """
    total = np.zeros(tuple(shape), np.float64)
    for out, window in zip(outputs, windows):
        total[window] += weights * out.astype(np.float64)
    return (total / weight_sum(windows, shape, weights)).astype(np.float32)


def weight_sum(windows: Sequence[tuple[slice, ...]], shape: Sequence[int], weights: np.ndarray) -> np.ndarray:
    """Sum of the windows' blending weights at each voxel of an image of ``shape`` (float64)."""
    count = np.zeros(tuple(shape), np.float64)
    for window in windows:
        count[window] += weights
    return count


def touched_windows(windows: Sequence[tuple[slice, ...]], region: np.ndarray) -> np.ndarray:
    """Indices of the windows that hold at least one voxel of ``region`` (a boolean array on the padded grid):
    only their outputs change when the region is perturbed."""
    if not region.any():
        return np.zeros(0, np.intp)
    low, high = (np.array(v) for v in _bounds(region))
    hits = [i for i, window in enumerate(windows)
            if all(w.start <= h and w.stop > lo for w, lo, h in zip(window, low, high)) and region[window].any()]
    return np.asarray(hits, np.intp)


def _bounds(region: np.ndarray) -> tuple[list[int], list[int]]:
    """Lowest and highest index of ``region``'s voxels along each axis."""
    low, high = [], []
    for axis in range(region.ndim):
        other = tuple(a for a in range(region.ndim) if a != axis)
        along = np.flatnonzero(region.any(axis=other))
        low.append(int(along[0]))
        high.append(int(along[-1]))
    return low, high
