"""Statistics of forward and backward maps, in physical units from the map's geometry.

Definitions (the README's *Map statistics* section says the same for users):

* **Distance** d_i (mm): the exact Euclidean distance from the centre of voxel i to the nearest voxel centre of
  the mask, from :func:`scipy.ndimage.distance_transform_edt` with the voxel spacing as sampling; 0 inside the mask.
  Distances are measured along the grid's axes, which are physical distances for an orthonormal direction matrix
  (a rotation or reflection: every NIfTI, NRRD or axial DICOM volume; a sheared gantry-tilt grid is not one).
* **Mass** of a map W: voxel i carries W_i times its volume (mm^3). All voxels of a grid have the same volume, so
  shares of mass are shares of the sum of W.
* **Reach** at fraction q: the smallest voxel distance d such that the mass of the voxels at distance <= d is at
  least q of the total mass (a discrete quantile, no interpolation: always one of the grid's distances).
* **Peak location**: a position in RAS millimetres, as 3D Slicer shows it (the geometry is LPS; RAS negates its
  first two coordinates).

Comparisons with a fraction of the total allow a relative 1e-9 so that float rounding cannot move a statistic
across an exact boundary. A map that is zero everywhere has no reach, inside fraction or peak location (None).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from .errors import InputError
from .geometry import Geometry

#: Names of the statistics of each mapping, in the order of tables and the cohort CSV.
FORWARD_STATISTICS = ("reach95_mm", "inside_fraction", "peak", "peak_ras_mm")
BACKWARD_STATISTICS = ("reach95_mm", "blocks90", "peak", "peak_ras_mm")
#: Relative slack of the comparisons with a fraction of the total mass (see the module docstring).
_RELATIVE_SLACK = 1e-9


def _check_grid(what: str, array: np.ndarray, geometry: Geometry) -> None:
    if array.ndim != geometry.dimension or (geometry.shape is not None and tuple(array.shape) != geometry.shape):
        raise InputError(f"{what} has shape {array.shape} but the geometry describes a {geometry.dimension}D grid "
                         f"of shape {geometry.shape}; pass the map with the geometry of its own grid")


def _mask(mask: Any, shape: tuple[int, ...], what: str, box: tuple[slice, ...] | None = None) -> np.ndarray:
    """A mask on the map's grid (``shape``) as bool, within ``box`` of it when given; refused when it lies on
    another grid or is empty there."""
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise InputError(f"the {what} has shape {mask.shape}, the map {shape}; both must lie on one grid")
    mask = (mask if box is None else mask[box]).astype(bool, copy=False)
    if not mask.any():
        raise InputError(f"the {what} is empty; distances from it are undefined")
    return mask


def bounding_box(region: np.ndarray) -> tuple[slice, ...]:
    """The smallest box (one slice per array axis) holding every True voxel of a non-empty ``region``."""
    box = []
    for axis in range(region.ndim):
        present = np.flatnonzero(region.any(axis=tuple(a for a in range(region.ndim) if a != axis)))
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)


def distances_mm(mask: np.ndarray, geometry: Geometry, where: np.ndarray) -> np.ndarray:
    """Distance (mm) from the mask of the voxels selected by ``where``, in their array order.

    The distance transform runs on the bounding box of ``mask | where`` only: the nearest mask voxel of any
    voxel of that box lies in it, so the distances are those of the whole grid. The arrays may themselves be a
    box of the geometry's grid that holds the whole mask.

    Parameters
    ----------
    mask, where : ndarray of bool
        The mask (not empty) and the voxels whose distances are wanted.
    geometry : Geometry
        The grid (spacing in mm).
    """
    box = bounding_box(mask | where)
    distance = ndimage.distance_transform_edt(~mask[box], sampling=geometry.spacing_array_order())
    return distance[where[box]]


def reach_mm(distances: np.ndarray, masses: np.ndarray, fraction: float) -> float | None:
    """Smallest distance within which at least ``fraction`` of the mass lies (None for no mass).

    Parameters
    ----------
    distances : ndarray
        Distance (mm) of each mass element.
    masses : ndarray
        Nonnegative masses, one per distance.
    fraction : float
        The share q in (0, 1].
    """
    masses = np.asarray(masses, np.float64)
    total = float(masses.sum())
    if total <= 0:
        return None
    order = np.argsort(distances, kind="stable")
    cumulative = np.cumsum(masses[order])
    first = int(np.searchsorted(cumulative, fraction * total * (1 - _RELATIVE_SLACK), side="left"))
    return float(np.asarray(distances)[order][min(first, len(order) - 1)])


def inside_fraction(weights: np.ndarray, mask: np.ndarray) -> float | None:
    """Share of sum |W| that lies inside the mask (None when W is zero everywhere)."""
    magnitude = np.abs(np.asarray(weights, np.float64))
    total = float(magnitude.sum())
    return None if total <= 0 else float(magnitude[np.asarray(mask, bool)].sum() / total)


def fewest_holding(masses: np.ndarray, fraction: float) -> int:
    """Fewest elements (largest masses first) whose masses add up to at least ``fraction`` of the total."""
    masses = np.sort(np.asarray(masses, np.float64).ravel())[::-1]
    total = float(masses.sum())
    if total <= 0:
        return 0
    cumulative = np.cumsum(masses)
    return int(np.searchsorted(cumulative, fraction * total * (1 - _RELATIVE_SLACK), side="left")) + 1


def _point(point: np.ndarray | None) -> list[float] | None:
    return None if point is None else [round(float(v), 4) for v in point]


def forward_statistics(signed: np.ndarray, mask: np.ndarray, geometry: Geometry,
                       support: tuple[slice, ...] | None = None) -> dict:
    """Statistics of a forward map F(M^x).

    Parameters
    ----------
    signed : ndarray
        F on the output grid (output units per input unit), as ``ForwardResult.signed``.
    mask : ndarray of bool
        The input mask M^x (the output grid is the input grid).
    geometry : Geometry
        The grid of F.
    support : tuple of slice, optional
        A box of the grid known to hold every nonzero voxel of F and of the mask (a mapping knows where it
        computed F): the statistics then read that box only, not the whole grid.

    Returns
    -------
    dict
        ``reach95_mm``: the distance (mm) from M^x within which 95 % of the mass of |F| lies;
        ``inside_fraction``: the share of sum |F| inside M^x (0 to 1);
        ``peak``: max |F| (output units per input unit);
        ``peak_ras_mm``: [R, A, S] (mm) of the voxel centre holding max |F| (the first in array order on ties).
    """
    signed = np.asarray(signed)
    _check_grid("the forward map", signed, geometry)
    outer = support or tuple(slice(0, n) for n in signed.shape)
    mask = _mask(mask, signed.shape, "input mask", outer)
    responding = signed[outer] != 0
    if not responding.any():
        return {"reach95_mm": None, "inside_fraction": None, "peak": 0.0, "peak_ras_mm": None}
    # everything below on the box that holds the mask and the response (a few slices of a whole volume)
    box = bounding_box(responding | mask)
    mask, responding = mask[box], responding[box]
    start = [o.start + b.start for o, b in zip(outer, box)]
    magnitude = np.abs(signed[outer][box].astype(np.float64))
    peak_index = np.unravel_index(int(np.argmax(magnitude)), magnitude.shape)
    return {"reach95_mm": reach_mm(distances_mm(mask, geometry, responding), magnitude[responding], 0.95),
            "inside_fraction": inside_fraction(magnitude, mask),
            "peak": float(magnitude[peak_index]),
            "peak_ras_mm": _point(geometry.ras_mm([i + a for i, a in zip(peak_index, start)]))}


def backward_statistics(labels: np.ndarray, block_values: np.ndarray, out_mask: np.ndarray,
                        geometry: Geometry, support: tuple[slice, ...] | None = None) -> dict:
    """Statistics of a backward map B(M^f).

    The mass of block k is B_k times its volume (mm^3), spread evenly over its voxels: the painted map B times
    the voxel volume.

    Parameters
    ----------
    labels : ndarray of int
        Block label of each input voxel (0 = no block), as ``BackwardResult.labels``.
    block_values : ndarray
        B per label (index 0 unused), as ``BackwardResult.block_values``.
    out_mask : ndarray of bool
        The output mask M^f (the input grid is the output grid).
    geometry : Geometry
        The grid of the labels.
    support : tuple of slice, optional
        A box of the grid known to hold every block and the output mask: the statistics then read that box only.

    Returns
    -------
    dict
        ``reach95_mm``: the distance (mm) from M^f within which 95 % of the mass of B lies;
        ``blocks90``: the fewest blocks holding at least 90 % of that mass;
        ``peak``: max B (0 to 1);
        ``peak_ras_mm``: [R, A, S] (mm) of the centroid of the block's voxel centres with the largest B (the
        lowest label on ties; a non-convex block's centroid may lie outside it).
    """
    labels = np.asarray(labels)
    _check_grid("the block labels", labels, geometry)
    outer = support or tuple(slice(0, n) for n in labels.shape)
    out_mask = _mask(out_mask, labels.shape, "output mask", outer)
    labels = labels[outer]
    values = np.asarray(block_values, np.float64).copy()
    if labels.size and (labels.min() < 0 or labels.max() >= len(values)):
        raise InputError(f"block labels run from {labels.min()} to {labels.max()} but there are {len(values)} block "
                         "values; pass the labels and block values of one backward result")
    values[0] = 0.0
    if np.any(values < 0):
        raise InputError("block values B must be nonnegative")
    if not np.any(values > 0):
        return {"reach95_mm": None, "blocks90": 0, "peak": 0.0, "peak_ras_mm": None}
    # everything below on the box that holds the mask and the blocks (a few slices of a whole volume)
    box = bounding_box((labels != 0) | out_mask)
    labels, out_mask = labels[box], out_mask[box]
    painted = values[labels]
    carrying = painted > 0
    voxels = np.bincount(labels.ravel(), minlength=len(values))
    top = int(np.argmax(values))
    centroid = np.argwhere(labels == top).mean(axis=0) + [o.start + b.start for o, b in zip(outer, box)]
    return {"reach95_mm": reach_mm(distances_mm(out_mask, geometry, carrying), painted[carrying], 0.95),
            "blocks90": fewest_holding(values * voxels, 0.90),
            "peak": float(values[top]),
            "peak_ras_mm": _point(geometry.ras_mm(centroid))}


def describe(statistics: dict) -> str:
    """The statistics in a few words for a console line, e.g. ``reach95 9 mm, 54 % inside the mask, peak at RAS
    (-21, -40, 19) mm`` (forward) or ``reach95 10.6 mm, 90 % in 21 blocks, ...`` (backward)."""
    if statistics.get("reach95_mm") is None:
        return "the map is zero everywhere"
    parts = [f"reach95 {statistics['reach95_mm']:.3g} mm"]
    if statistics.get("inside_fraction") is not None:
        parts.append(f"{100 * statistics['inside_fraction']:.0f} % inside the mask")
    if "blocks90" in statistics:
        parts.append(f"90 % in {statistics['blocks90']} block{'s' if statistics['blocks90'] != 1 else ''}")
    if statistics.get("peak_ras_mm") is not None:
        parts.append("peak at RAS (" + ", ".join(f"{v:.3g}" for v in statistics["peak_ras_mm"]) + ") mm")
    return ", ".join(parts)


def flatten(statistics: dict, prefix: str = "") -> dict:
    """One column per number (``peak_ras_mm`` becomes ``peak_r_mm``, ``peak_a_mm``, ``peak_s_mm``), for tables."""
    flat = {}
    for name, value in statistics.items():
        if name == "peak_ras_mm":
            value = value if value is not None else [None] * 3
            for axis, v in zip("ras", value):
                flat[f"{prefix}peak_{axis}_mm"] = v
        else:
            flat[prefix + name] = value
    return flat
