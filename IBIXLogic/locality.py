"""Locality of a model's response: response radius, relevant blocks and disjoint block groups.

A convolutional generator's output at a voxel depends only on inputs within its receptive field, so the
response to perturbing a block D is exactly zero farther than the response radius R from D (L-infinity
distance, in voxels). Two blocks farther than 2R apart can then be perturbed in the same model evaluation
and each block's response read from the voxels nearer to it than to any other block of the group
(the column grouping of sparse Jacobian estimation: Curtis, Powell & Reid 1974; Coleman & Moré 1983).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class ResponseRadius:
    """Measured response radius of a model around probe voxels.

    ``measured`` is the largest L-infinity distance (voxels) at which a single-voxel perturbation changed the
    output (with ``tolerance`` > 0: the radius holding all but that fraction of the response); ``radius`` adds
    the safety ``margin``; ``is_global`` is True when the response reaches across the sample, in which case
    locality cannot be used. ``source`` says where the answer came from: ``"measured"``, ``"cached"`` (measured
    earlier in this process for the same model, card, channels, jitter and sample shape), ``"measured, partly
    cached"``, or ``"skipped"``: not measured (on, or further) because it could not pay for itself, ``reason``
    says why; the radius is then unknown (at least ``measured``) and locality is not used.
    """

    measured: int
    margin: int
    is_global: bool
    tolerance: float
    probes: int
    evaluations: int
    window: tuple[int, ...] | None = None  # where the probes stood, if not in the whole sample
    source: str = "measured"
    reason: str | None = None

    @property
    def radius(self) -> int | None:
        return None if self.is_global or self.source == "skipped" else self.measured + self.margin

    def to_dict(self) -> dict:
        return {"measured": self.measured, "margin": self.margin, "radius": self.radius,
                "is_global": self.is_global, "tolerance": self.tolerance, "probes": self.probes,
                "evaluations": self.evaluations, "window": None if self.window is None else list(self.window),
                "source": self.source, "reason": self.reason}


def probe_points(shape: tuple[int, ...], count: int = 5, spacing: int = 0) -> np.ndarray:
    """Probe voxels near the centre, probe i at offset (i, 3i, 5i) modulo 8 along the axes.

    The probes fall on ``count`` different positions modulo 8 along every axis (1, 3 and 5 are coprime with 8), so
    8 probes meet every pooling phase of a model whose stride divides 8. With ``spacing`` (a multiple of 8), they
    stand on a grid that many voxels apart around the centre, so that one evaluation can perturb them all.
    """
    ndim = len(shape)
    offsets = ((np.arange(count)[:, None] * np.array([1, 3, 5])) % 8)[:, -ndim:]
    if spacing:
        side = grid_side(count, ndim)
        grid = np.array(np.unravel_index(np.arange(count), (side,) * ndim)).T
        offsets = offsets + grid * spacing - (side - 1) * spacing // 2 // 8 * 8
    points = np.asarray(shape) // 2 + offsets - 4
    return np.clip(points, 0, np.asarray(shape) - 1)


def grid_side(count: int, ndim: int) -> int:
    """Probes per axis of the smallest grid that holds ``count`` probes."""
    side = 1
    while side ** ndim < count:
        side += 1
    return side


def probe_spacing(shape: tuple[int, ...], count: int) -> int:
    """Grid spacing (a multiple of 8) that keeps ``count`` probes a spacing away from each other and the borders."""
    return int(min(shape) // (grid_side(count, len(shape)) + 1) // 8 * 8)


def split_by_nearest_probe(response: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The response to perturbing all probes at once, split into one response per probe: each voxel goes to the
    nearest probe (L-infinity), shape (n_probes, *response.shape)."""
    where = np.nonzero(response)
    coordinates = np.stack(where).astype(np.int32)
    nearest = np.full(len(where[0]), np.iinfo(np.int32).max, np.int32)
    owner = np.zeros(len(where[0]), np.intp)
    for i, point in enumerate(points):  # one probe at a time: a global response may cover the whole sample
        distance = np.abs(coordinates - point[:, None].astype(np.int32)).max(axis=0)
        closer = distance < nearest
        nearest[closer], owner[closer] = distance[closer], i
    split = np.zeros((len(points),) + response.shape, response.dtype)
    split[(owner,) + where] = response[where]
    return split


def radius_from_responses(responses: np.ndarray, points: np.ndarray, tolerance: float = 0.0) -> tuple[int, bool]:
    """Response radius (L-infinity voxels) from single-voxel responses, and whether the response is global.

    ``responses`` has shape (n_probes, *sample_shape); ``points`` the probed voxel of each.
    """
    shape = responses.shape[1:]
    radius = 0
    for response, point in zip(responses, points):
        where = np.nonzero(response)
        if not where[0].size:
            continue
        distance = np.max(np.abs(np.stack(where) - point[:, None]), axis=0)
        if tolerance > 0:
            mass = np.bincount(distance, weights=np.abs(response[where]))
            reach = int(np.searchsorted(np.cumsum(mass) / mass.sum(), 1.0 - tolerance))
        else:
            reach = int(distance.max())
        radius = max(radius, reach)
    is_global = 2 * radius + 1 >= min(shape)
    return radius, is_global


def relevant_blocks(labels: np.ndarray, ids: np.ndarray, out_mask: np.ndarray, radius: int) -> np.ndarray:
    """Blocks among ``ids`` within ``radius`` (L-infinity voxels) of the output mask.

    Any other block's response is exactly zero on the output mask, so its B is exactly 0. Only the mask's bounding
    box grown by ``radius`` is searched: every voxel that near the mask lies in it.
    """
    where = np.nonzero(out_mask)
    if not where[0].size or len(ids) == 0:
        return ids[:0]
    box = tuple(slice(max(0, int(w.min()) - radius), int(w.max()) + radius + 1) for w in where)
    distance = ndimage.distance_transform_cdt(~out_mask[box], metric="chessboard")
    near = np.unique(labels[box][distance <= radius])
    return ids[np.isin(ids, near)]


def block_boxes(labels: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive lower and upper index corners of the given labels, shape (len(ids), ndim)."""
    objects = ndimage.find_objects(labels)
    low = np.array([[s.start for s in objects[i - 1]] for i in ids], np.int64).reshape(len(ids), labels.ndim)
    high = np.array([[s.stop - 1 for s in objects[i - 1]] for i in ids], np.int64).reshape(len(ids), labels.ndim)
    return low, high


def disjoint_groups(labels: np.ndarray, ids: np.ndarray, radius: int) -> list[np.ndarray]:
    """Split blocks into groups whose members are more than 2*radius apart (graph colouring, DSATUR).

    Two blocks conflict when their bounding boxes are within 2*radius (L-infinity); bounding boxes are never
    farther apart than the blocks, so members of a group are always far enough apart. DSATUR (Brélaz 1979) colours
    next the block whose conflicts already use the most colours (ties: most conflicts), with the smallest free
    colour; on the demo slice it needs 39 groups where colouring by degree alone needed 45.
    """
    n = len(ids)
    if n == 0:
        return []
    low, high = block_boxes(labels, ids)
    gap = np.maximum(0, np.maximum(low[None] - high[:, None], low[:, None] - high[None])).max(axis=2)
    conflict = gap <= 2 * radius
    np.fill_diagonal(conflict, False)
    degree = conflict.sum(axis=1)
    colour = np.full(n, -1)
    seen = np.zeros((int(degree.max()) + 2, n), bool)  # seen[c, b]: a block that conflicts with b has colour c
    key = degree.astype(np.int64)  # saturation * (n + 1) + degree; -1 once coloured
    for _ in range(n):
        block = int(np.argmax(key))
        colour[block] = chosen = int(np.argmin(seen[:, block]))
        fresh = conflict[block] & ~seen[chosen] & (colour < 0)
        seen[chosen] |= fresh
        key[fresh] += n + 1
        key[block] = -1
    return [ids[colour == c] for c in range(colour.max() + 1)]


def owner_labels(labels: np.ndarray, group: np.ndarray) -> np.ndarray:
    """For every voxel, the block of ``group`` nearest to it (L-infinity): where its response is read."""
    if len(group) == 1:
        return np.full(labels.shape, group[0], labels.dtype)
    member = np.zeros(int(labels.max()) + 1, bool)
    member[group] = True
    perturbed = member[labels]
    _, nearest = ndimage.distance_transform_cdt(~perturbed, metric="chessboard", return_distances=True,
                                                return_indices=True)
    return labels[tuple(nearest)]


def tile_alignments(padded_shape: tuple[int, ...], multiple_of: int, largest: int = 32) -> list[int]:
    """Candidate strides for tile origins, smallest first: the card's ``multiple_of`` and its doublings up to
    ``largest`` that divide every padded dimension (a model that accepted the whole sample has a stride that
    divides its size)."""
    candidates, align = [], max(1, int(multiple_of))
    while align <= max(largest, multiple_of):
        if all(n % align == 0 for n in padded_shape):
            candidates.append(align)
        align *= 2
    return candidates


@dataclass(frozen=True)
class Tile:
    """A window of the padded sample that holds some blocks of one group and their context.

    A block's response lies within ``radius`` of it, and the model's output there depends on inputs within
    another ``radius``; a window that holds the block dilated by 2*radius therefore reproduces the block's response
    exactly, provided the window starts at a multiple of the model's stride, so that pooling windows fall where
    they fall in the whole sample. Blocks of one group are more than 2*radius apart, so several of them can share
    a window without seeing each other. ``origin`` is in padded-sample coordinates.
    """

    members: tuple[int, ...]
    origin: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def window(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + n) for o, n in zip(self.origin, self.shape))


def _window(low: np.ndarray, high: np.ndarray, padded: np.ndarray, align: int) -> tuple[np.ndarray, np.ndarray]:
    """Origin and shape of the smallest aligned window holding the inclusive box low..high."""
    start = low // align * align
    shape = np.minimum(padded, -(-(high + 1 - start) // align) * align)
    origin = np.clip(start, 0, padded - shape)
    return origin, shape


def plan_tiles(low: np.ndarray, high: np.ndarray, members: list[np.ndarray], radius: int,
               padded_shape: tuple[int, ...], offset: tuple[int, ...], align: int) -> list[Tile]:
    """Windows for blocks with inclusive index boxes ``low``..``high`` (sample coordinates).

    ``members`` lists the rows of ``low``/``high`` that may share a window (one group of far-apart blocks each);
    within a group, windows are merged greedily while one window costs fewer voxels than the two it replaces.
    ``offset`` is where the sample starts in the padded sample; ``align`` the stride windows start at.
    """
    padded = np.asarray(padded_shape)
    need_low = np.clip(low + np.asarray(offset) - 2 * radius, 0, padded - 1)
    need_high = np.clip(high + np.asarray(offset) + 2 * radius, 0, padded - 1)
    tiles = []

    def cost(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:  # voxels of the windows of boxes, any leading axes
        return np.prod(_window(lo, hi, padded, align)[1], axis=-1)

    for group in members:
        clusters = [[int(i)] for i in group]
        lo, hi = need_low[group], need_high[group]
        costs = cost(lo, hi)
        merged = cost(np.minimum(lo[:, None], lo[None]), np.maximum(hi[:, None], hi[None]))  # every pair's window
        while len(clusters) > 1:  # merge the pair that saves the most (the first such pair a < b)
            saving = costs[:, None] + costs[None] - merged
            saving[np.tril_indices(len(clusters))] = 0
            a, b = (int(i) for i in np.unravel_index(np.argmax(saving), saving.shape))
            if saving[a, b] <= 0:
                break
            clusters[a] = clusters[a] + clusters.pop(b)
            lo[a], hi[a], costs[a] = np.minimum(lo[a], lo[b]), np.maximum(hi[a], hi[b]), merged[a, b]
            lo, hi, costs = np.delete(lo, b, 0), np.delete(hi, b, 0), np.delete(costs, b)
            merged = np.delete(np.delete(merged, b, 0), b, 1)
            merged[a, :] = merged[:, a] = cost(np.minimum(lo[a], lo), np.maximum(hi[a], hi))
        for rows in clusters:
            origin, shape = _window(need_low[rows].min(0), need_high[rows].max(0), padded, align)
            assert np.all(origin <= need_low[rows]) and np.all(origin + shape > need_high[rows])
            tiles.append(Tile(tuple(rows), tuple(int(o) for o in origin), tuple(int(n) for n in shape)))
    return tiles


def footprint(block: np.ndarray, radius: int) -> np.ndarray:
    """Voxels within ``radius`` (L-infinity) of a block mask: where its response can be nonzero."""
    return ndimage.maximum_filter(block, size=2 * radius + 1, mode="constant", cval=0)
