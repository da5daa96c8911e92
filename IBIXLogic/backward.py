"""Backward mapping B(M^f) (Espadoto et al., sections 3.3 and 4.1.2): which input blocks drive an output region.

B_k = sum_{i in M^f} |F(D_k)_i| / sum_i |F(D_k)_i|  ("fraction"), or the numerator scaled to a maximum of 1
("magnitude"), for blocks D_k that tile the input; coarse-to-fine refines the blocks where B is high.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from . import locality
from .blocks import DEFAULT_COMPACTNESS, chunked_supervoxels, cut_in_chunks, grid_blocks, superpixel_blocks
from .checks import (BACKWARD_METHODS, BLOCK_KINDS, channel_indices, check_arguments, check_block_labels,
                     check_block_levels, check_callback, check_choice, check_mask)
from .cost import Estimate, Forecast, advice
from .errors import InputError
from .geometry import Geometry
from .model import Model, ProgressCallback, check_cancel
from .perturb import (PROBE_SHARE, WHOLE_BASE_LARGEST, Perturber, ProbeBudget, jitter_levels, jitter_schedule, mask_box,
                      radius_source, report_progress, resolve_max_jitter, response_radius, volume_box, work_summary)
from .pipeline import PreparedInput
from .statistics import backward_statistics, bounding_box



@dataclass
class BackwardResult:
    """A backward mapping B on the input grid.

    ``evaluations`` counts inputs run through the model (whole samples, or tiles of them);
    ``equivalent_evaluations`` counts the voxels run through the model in units of one whole (padded) sample,
    the measure of work that compares with brute force; ``tiling`` says whether tiles were used;
    ``statistics``: reach95_mm, blocks90, peak and peak_ras_mm of B (:func:`IBIXLogic.statistics.backward_statistics`);
    ``path`` says how the blocks were perturbed and why (``method``, ``reason``, ``radius_source``: measured,
    cached, or skipped and why); ``work`` compares the model work with brute force's (each touched sample once,
    each of its blocks 2N times, whole).
    """

    map: np.ndarray
    labels: np.ndarray
    block_values: np.ndarray
    geometry: Geometry
    parameters: dict
    evaluations: int
    seconds: float
    device: str
    evaluations_per_level: list = field(default_factory=list)
    blocks_per_level: list = field(default_factory=list)
    radius: dict | None = None
    tiling: dict | None = None
    equivalent_evaluations: float = 0.0
    statistics: dict = field(default_factory=dict)
    path: dict = field(default_factory=dict)
    work: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"mapping": "backward", "parameters": self.parameters, "evaluations": self.evaluations,
                "path": self.path, "work": self.work,
                "evaluations_per_level": self.evaluations_per_level, "blocks_per_level": self.blocks_per_level,
                "equivalent_evaluations": round(self.equivalent_evaluations, 1),
                "blocks": int(self.labels.max()), "seconds": round(self.seconds, 4), "device": self.device,
                "response_radius": self.radius, "tiling": self.tiling, "statistics": self.statistics,
                "geometry": self.geometry.to_dict()}


@dataclass
class _Item:
    """Blocks of one sample perturbed in the same model input: the whole sample, or a window of it."""

    sample: int
    blocks: np.ndarray
    window: tuple[slice, ...] | None = None  # in padded-sample coordinates

    def shape(self, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        return sample_shape if self.window is None else tuple(w.stop - w.start for w in self.window)


class _BlockSums:
    """Per-block numerators and denominators of B, accumulated over samples.

    Without locality every block is perturbed on its own, in whole samples. With a response radius, blocks that
    cannot reach the output mask are skipped (their B is exactly 0), and the others are perturbed in groups of
    far-apart blocks, either in whole samples or in windows (tiles) of the sample that hold them and their
    context; whichever runs fewer voxels through the model. With several jitter levels (progressive refinement),
    each item's running sum is kept between levels so that no evaluation is repeated, and
    ``on_level(numerator, denominator, N)`` is called after each level; it returns True to stop early.

    A response atlas evaluates every block: ``out_samples`` None makes every block relevant, and a ``sink``
    receives each block's |F| where it is read, ``sink(sample, blocks, index, values)``: the values at the flat
    indices ``index`` of the sample, read for block ``blocks`` (one label, or one per value); zeros may be left
    out. The sums are then not kept.
    """

    def __init__(self, perturber: Perturber, out_samples: np.ndarray | None, radius: int | None,
                 schedule: list[tuple[int, np.ndarray]], progress: ProgressCallback | None, tiles: bool = True,
                 sink: Callable[[int, Any, np.ndarray, np.ndarray], None] | None = None,
                 stage: str = "backward mapping"):
        self.perturber, self.out_samples, self.sink, self.stage = perturber, out_samples, sink, stage
        self.radius, self.schedule, self.progress = radius, schedule, progress
        card_input = perturber.model.card.input
        self.tiles = tiles and radius is not None and not card_input.size and card_input.patch is None
        self.tiling: dict | None = None  # how the last compute() ran, for the result's summary

    def _groups(self, label_samples: np.ndarray, ids: np.ndarray, boxes: dict[int, tuple[slice, ...]]
                ) -> tuple[list[_Item], np.ndarray]:
        """Groups of blocks perturbed together (whole-sample items), and the blocks that need evaluating."""
        present = [np.intersect1d(np.flatnonzero(np.bincount(label_samples[s][boxes[s]].ravel())), ids)
                   if s in boxes else ids[:0] for s in range(len(label_samples))]
        if self.out_samples is None:  # every block is relevant
            wanted = present
        else:
            touched = [s for s in range(len(label_samples)) if self.out_samples[s].any()]
            if self.radius is not None:
                wanted = [locality.relevant_blocks(label_samples[s], present[s], self.out_samples[s], self.radius)
                          for s in touched]
            else:
                wanted = [present[s] for s in touched]
        wanted = np.unique(np.concatenate([np.zeros(0, np.int64)] + wanted))
        groups: list[_Item] = []
        for s, blocks in enumerate(present):
            blocks = np.intersect1d(blocks, wanted)
            if len(blocks) == 0:
                continue
            if self.radius is not None:
                groups.extend(_Item(s, g) for g in locality.disjoint_groups(label_samples[s][boxes[s]], blocks,
                                                                            self.radius))
            else:
                groups.extend(_Item(s, blocks[i:i + 1]) for i in range(len(blocks)))
        return groups, wanted

    def _tiles(self, label_samples: np.ndarray, groups: list[_Item], boxes: dict[int, tuple[slice, ...]]
               ) -> list[_Item] | None:
        """Windowed items holding the groups' blocks and their context, when they run fewer voxels than whole
        samples (see :meth:`Perturber.checked_tiles`)."""
        starts = np.cumsum([0] + [len(g.blocks) for g in groups])
        rows = [np.arange(a, b) for a, b in zip(starts[:-1], starts[1:])]  # each group's rows of low/high
        low = np.zeros((starts[-1], label_samples.ndim - 1), np.int64)
        high = low.copy()
        for s in {g.sample for g in groups}:  # one pass over each sample's labels
            members = [i for i, g in enumerate(groups) if g.sample == s]
            at = np.concatenate([rows[i] for i in members])
            low[at], high[at] = locality.block_boxes(label_samples[s][boxes[s]],
                                                     np.concatenate([groups[i].blocks for i in members]))
            start = np.array([b.start for b in boxes[s]])
            low[at] += start
            high[at] += start
        tiles, self.tiling = self.perturber.checked_tiles(groups[0].sample, low, high, rows, self.radius,
                                                          len(groups))
        if tiles is None:
            return None
        owner = np.concatenate([[i] * len(g.blocks) for i, g in enumerate(groups)])
        all_blocks = np.concatenate([g.blocks for g in groups])
        self.tiling["blocks"] = int(len(low))
        return [_Item(groups[owner[t.members[0]]].sample, all_blocks[list(t.members)], t.window) for t in tiles]

    def compute(self, label_samples: np.ndarray, ids: np.ndarray, boxes: dict[int, tuple[slice, ...]],
                on_level: Callable[[np.ndarray, np.ndarray, int], bool] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """Numerator and denominator of B for the blocks ``ids`` (labels on the samples; ``boxes``: where each
        sample that holds blocks holds them)."""
        size = int(max(label_samples[s][box].max() for s, box in boxes.items())) + 1 if boxes else 1
        numerator, denominator = np.zeros(size), np.zeros(size)
        groups, wanted = self._groups(label_samples, ids, boxes)
        if not groups:
            return numerator, denominator
        perturber = self.perturber
        # a sample's own output serves every tile of it; on a large sample, each tile's output is cheaper
        perturber.base_outputs(sorted({g.sample for g in groups if perturber.small_sample}))
        items = self._tiles(label_samples, groups, boxes) if self.tiles else None
        if items is None:
            items = groups
            if self.radius is not None:
                self.tiling = dict(self.tiling or {"tiles": False}, groups=len(groups))
        # a large sample's tiles run their own unperturbed output, unless together they run more voxels than the
        # whole sample (an atlas's tiles overlap): then the sample's, where a whole sample may be run at once
        pipeline = perturber.model.pipeline
        tiled: dict[int, float] = {}
        for item in items:
            if item.window is not None:
                tiled[item.sample] = tiled.get(item.sample, 0.0) + np.prod(pipeline.model_shape(item.shape(())))
        whole = pipeline.sample_voxels(perturber.prepared.sample_shape)
        perturber.base_outputs(sorted({i.sample for i in items if i.window is None} |
                                      {s for s, v in tiled.items() if v > whole and whole <= WHOLE_BASE_LARGEST}))
        perturber.window_bases([(i.sample, i.window) for i in items if i.window is not None])  # tiles of one shape
        sample_shape = perturber.prepared.sample_shape
        shapes: dict[tuple[int, ...], list[int]] = {}
        for i, item in enumerate(items):  # items of one shape go through the model together
            shapes.setdefault(item.shape(sample_shape), []).append(i)
        state = None
        if len(self.schedule) > 1:
            needed = sum(int(np.prod(item.shape(sample_shape))) for item in items) * 4
            if needed > perturber.model.memory_budget:
                raise InputError(f"progressive backward mapping would keep {needed / 2**20:.0f} MiB of running "
                                 "sums; raise the memory budget or turn progressive refinement off")
            state = {i: np.zeros(item.shape(sample_shape), np.float32) for i, item in enumerate(items)}
        # block labels of each tile, padded as the model pads the perturbed input
        tile_labels = {i: perturber.model.pipeline.padded_window(label_samples[item.sample][None], item.window, 0)[0]
                       for i, item in enumerate(items) if item.window is not None}
        member = np.zeros(size, bool)

        def direction(index: int) -> np.ndarray:
            item = items[index]
            member[:] = False
            member[item.blocks] = True
            return member[label_samples[item.sample] if item.window is None else tile_labels[index]]

        if perturber.forecast is not None:
            for _, subset in self.schedule:
                for shape, indices in shapes.items():
                    perturber.forecast.plan(*perturber.planned(len(indices), lambda j: direction(indices[j]), subset,
                                                               shape))

        def input_of(item: _Item) -> np.ndarray:
            if item.window is None:
                return perturber.prepared.samples[item.sample]
            return perturber.window_input(item.sample, item.window)

        def base_of(item: _Item) -> np.ndarray:
            if item.window is None:
                return perturber.base[item.sample]
            return perturber.window_base(item.sample, item.window)

        regions: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}  # per tile, reused across jitter levels

        def add_sums(index: int, magnitude: np.ndarray) -> None:
            """Each block's response, read where it can be nonzero (where it is nearer than the others)."""
            item = items[index]
            if item.window is None:
                owner = locality.owner_labels(label_samples[item.sample], item.blocks).ravel()
                weights = magnitude.ravel()
                if self.sink is not None:
                    read = np.flatnonzero(weights)
                    self.sink(item.sample, owner[read], read, weights[read])
                    return
                inside_mask = self.out_samples[item.sample].ravel()
                denominator[:] += np.bincount(owner, weights, minlength=size)[:size]
                numerator[:] += np.bincount(owner[inside_mask], weights[inside_mask], minlength=size)[:size]
                return
            if index not in regions:
                inner = perturber.inside(item.window)
                labels = tile_labels[index]
                if self.sink is None:
                    out = perturber.window_of(self.out_samples[item.sample], item.window)
                regions[index] = []
                for block in item.blocks:
                    region = locality.footprint((labels == block) & inner, self.radius) & inner
                    if self.sink is None:
                        regions[index].append((block, region, region & out))
                    else:  # where the region lies in the sample, as flat indices
                        where = np.nonzero(region)
                        at = [w + s.start - p[0] for w, s, p in zip(where, item.window, perturber.pads)]
                        regions[index].append((block, region, np.ravel_multi_index(at, sample_shape)))
            for block, region, read in regions[index]:
                if self.sink is not None:
                    self.sink(item.sample, block, read, magnitude[region])
                    continue
                denominator[block] += magnitude[region].sum()
                numerator[block] += magnitude[read].sum()

        for n_level, subset in self.schedule:
            numerator[:], denominator[:] = 0.0, 0.0
            done = 0
            for shape, indices in shapes.items():
                chosen = [items[i] for i in indices]
                runs = perturber.responses(
                    len(chosen), lambda j: input_of(chosen[j]), lambda j: direction(indices[j]),
                    lambda j: base_of(chosen[j]),
                    lambda j: f"block(s) {chosen[j].blocks[:5].tolist()} of sample {chosen[j].sample}"
                              + ("" if chosen[j].window is None else " (tile)"), subset, shape,
                    sample_of=lambda j: chosen[j].sample)
                for start, stop, sums in runs:
                    for j in range(start, stop):
                        if state is not None:
                            state[indices[j]] += sums[j - start]
                        total = state[indices[j]] if state is not None else sums[j - start]
                        add_sums(indices[j], np.abs(total) / (2 * n_level))
                    report_progress(self.progress, done + stop, len(items), f"{self.stage}, N = {n_level}")
                done += len(chosen)
            keep = np.zeros(size, bool)
            keep[wanted] = True
            numerator[~keep], denominator[~keep] = 0.0, 0.0
            if on_level is not None and on_level(numerator, denominator, n_level):
                break
        return numerator, denominator


def _normalize_blocks(numerator: np.ndarray, denominator: np.ndarray, normalization: str) -> np.ndarray:
    if normalization == "fraction":
        return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)
    peak = numerator.max()
    return numerator / peak if peak > 0 else np.zeros_like(numerator)


def _block_labels(prepared: PreparedInput, samples: Sequence[int], n_blocks: int, compactness: float,
                  kind: str, masks: np.ndarray | None = None,
                  near: Callable[[int], tuple[slice, ...]] | None = None) -> np.ndarray:
    """Labels (unique across samples) of ``kind`` blocks on the given samples; 0 elsewhere.

    ``n_blocks`` is a density: blocks per whole sample. Inside ``masks`` (the regions to refine) the region gets
    its share, so that its blocks have the size they would have if the whole sample were cut into n_blocks.
    Supervoxels of a 3D sample of many chunks are cut in chunks (:func:`chunked_supervoxels`), only those that meet the
    box ``near(sample)`` when given: blocks elsewhere cannot reach the output mask.
    """
    labels = np.zeros((len(prepared.samples),) + prepared.sample_shape, np.int32)
    offset = 0
    chunked = kind == "slic" and masks is None and cut_in_chunks(prepared.sample_shape, n_blocks)
    for s in samples:
        region = None if masks is None else masks[s]
        if region is not None and not region.any():
            continue
        if chunked:
            sample_labels = chunked_supervoxels(prepared.samples[s], n_blocks, compactness, prepared.sample_spacing,
                                                None if near is None else near(s), channel_axis=0)
        elif kind == "grid":
            sample_labels = grid_blocks(prepared.sample_shape, n_blocks, prepared.sample_spacing, region)
        else:
            share = n_blocks if region is None else max(1, round(n_blocks * region.mean()))
            sample_labels = superpixel_blocks(prepared.samples[s], share, compactness,
                                              prepared.sample_spacing, region, channel_axis=0)
        labels[s] = np.where(sample_labels > 0, sample_labels + offset, 0) if offset else sample_labels
        offset = int(labels[s].max(initial=offset))
    return labels


class _Refinement:
    """B over the coarse-to-fine levels: the current block labels and each block's sums, merged level by level.

    A level's new blocks replace the blocks they refine; blocks of samples the output mask does not touch were
    never evaluated, so their sums are 0 whether present or not.
    """

    def __init__(self, prepared: PreparedInput, touched: np.ndarray, normalization: str, n_jitters: int,
                 preview: Callable[[np.ndarray, int], None] | None, tolerance: float | None):
        self.prepared, self.touched, self.normalization = prepared, touched, normalization
        self.preview, self.tolerance = preview, tolerance
        self.numerator = self.denominator = self.values = np.zeros(1)
        self.labels: np.ndarray | None = None
        self.new_ids = np.zeros(0, np.int64)
        self.n_jitters, self.jitters_used = n_jitters, n_jitters
        self._previewed: np.ndarray | None = None

    def next_level(self, labels: np.ndarray, new_ids: np.ndarray, boxes: dict[int, tuple[slice, ...]]) -> None:
        self.labels, self.new_ids, self.boxes, self._previewed = labels, new_ids, boxes, None
        self.present = _label_counts(labels, {s: boxes[s] for s in self.touched.tolist() if s in boxes}) > 0

    def merge(self, level_numerator: np.ndarray, level_denominator: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Numerators, denominators and B of every current block."""
        size = len(level_numerator)
        numerator, denominator = np.zeros(size), np.zeros(size)
        kept = min(size, len(self.numerator))
        numerator[:kept], denominator[:kept] = self.numerator[:kept], self.denominator[:kept]
        numerator[self.new_ids] = level_numerator[self.new_ids]
        denominator[self.new_ids] = level_denominator[self.new_ids]
        present = np.zeros(size, bool)
        present[:min(size, len(self.present))] = self.present[:size]
        numerator[~present], denominator[~present] = 0.0, 0.0
        return numerator, denominator, _normalize_blocks(numerator, denominator, self.normalization)

    def on_jitter_level(self, level_numerator: np.ndarray, level_denominator: np.ndarray, n_level: int) -> bool:
        """After each jitter level of a progressive run: preview B; True to stop early (B changed < tolerance)."""
        _, _, values = self.merge(level_numerator, level_denominator)
        previous, self._previewed = self._previewed, values
        self.jitters_used = n_level
        change = None if previous is None or len(previous) != len(values) else float(np.abs(values - previous).max())
        stop = change is not None and self.tolerance is not None and change < self.tolerance
        if self.preview is not None and n_level < self.n_jitters and not stop:
            self.preview(self.prepared.from_samples(values[self.labels].astype(np.float32)), n_level)
        return stop

    def finish_level(self, level_numerator: np.ndarray, level_denominator: np.ndarray) -> None:
        self.numerator, self.denominator, self.values = self.merge(level_numerator, level_denominator)

    def painted(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Consecutive block labels 1..K (0 = no block), B per label, and B painted on the input grid."""
        # computed where the blocks are: most slices of a volume, and most of a large volume, hold none
        counts = _label_counts(self.labels, self.boxes, len(self.values))
        ids = np.flatnonzero(counts)
        ids = ids if len(ids) and ids[0] == 0 else np.concatenate([[0], ids])
        relabel = np.zeros(len(counts), np.int32)
        relabel[ids] = np.arange(len(ids), dtype=np.int32)
        block_values = self.values[ids].astype(np.float32)
        block_values[0] = 0.0
        compact = np.zeros(self.labels.shape, np.int32)
        painted = np.zeros(self.labels.shape, np.float32)
        for s, box in self.boxes.items():
            compact[s][box] = relabel[self.labels[s][box]]
            painted[s][box] = block_values[compact[s][box]]
        return self.prepared.from_samples(compact), block_values, self.prepared.from_samples(painted)


def _label_counts(labels: np.ndarray, boxes: dict[int, tuple[slice, ...]], size: int = 0) -> np.ndarray:
    """Voxels of each label, counted in the samples' boxes (at least ``size`` entries)."""
    counts = [np.bincount(labels[s][box].ravel()) for s, box in boxes.items()]
    total = np.zeros(max([len(c) for c in counts] + [size, 1]), np.int64)
    for c in counts:
        total[:len(c)] += c
    return total


def _label_boxes(labels: np.ndarray) -> dict[int, tuple[slice, ...]]:
    """For each sample that holds blocks, the bounding box of its blocks."""
    return {int(s): bounding_box(labels[s] != 0)
            for s in np.flatnonzero(labels.reshape(len(labels), -1).any(axis=1))}


def _level_labels(refinement: _Refinement, prepared: PreparedInput, touched: np.ndarray, n_blocks: int,
                  compactness: float, blocks: Any, refine_threshold: float, given: np.ndarray | None,
                  near: Callable[[int], tuple[slice, ...]] | None
                  ) -> tuple[np.ndarray, np.ndarray, dict[int, tuple[slice, ...]]]:
    """The labels of a level, its new blocks and the samples' boxes of blocks: the user's blocks, the first
    level's blocks (near the output mask where that can be told), or the previous level's blocks with those of
    B >= refine_threshold * max B cut finer."""
    if refinement.labels is not None:
        values = refinement.values
        refine = np.flatnonzero(values >= refine_threshold * values.max()) if values.max() > 0 else []
        fine = _block_labels(prepared, touched, n_blocks, compactness, blocks, np.isin(refinement.labels, refine))
        top = int(refinement.labels.max())
        current = np.where(fine > 0, fine + top, refinement.labels).astype(np.int32)
        return current, np.unique(fine[fine > 0]) + top, _label_boxes(current)
    current = (np.ascontiguousarray(prepared.to_samples(given)) if given is not None
               else _block_labels(prepared, touched, n_blocks, compactness, blocks, near=near))
    boxes = _label_boxes(current)
    return current, np.flatnonzero(_label_counts(current, boxes)[1:]) + 1, boxes


def _grown(box: tuple[np.ndarray, np.ndarray], radius: int) -> tuple[slice, ...]:
    """An inclusive index box (:func:`mask_box`) grown by ``radius`` on every side, as slices."""
    low, high = box
    return tuple(slice(max(0, int(a) - radius), int(b) + radius + 1) for a, b in zip(low, high))


def _reach(out_boxes: dict, radius: int | None) -> Callable[[int], tuple[slice, ...]] | None:
    """Where blocks can reach the output mask of a sample: the mask's bounding box grown by the radius."""
    if radius is None:
        return None
    return lambda sample: _grown(out_boxes[sample], radius)


def _probe_budget(perturber: Perturber, out_boxes: dict, touched: np.ndarray, n_jitters: int,
                  n_blocks: int) -> ProbeBudget:
    """What measuring the response radius may cost a backward mapping of ``n_blocks`` blocks: PROBE_SHARE of brute
    force's work (each touched sample once, each block 2N times, whole), and less than the local path could save
    at best: were the radius r, only the blocks within r of the mask would be perturbed, at best all in one tile
    per sample with their context (in whole samples where tiles cannot run)."""
    perturbed = 2 * n_jitters
    brute_force = float(len(touched) + perturbed * n_blocks)
    low, high = np.array([out_boxes[s][0] for s in touched]), np.array([out_boxes[s][1] for s in touched])
    whole = len(touched) * (1.0 + perturbed)

    def best_local(radius: int) -> float:
        work = perturber.tile_work(low - radius, high + radius, radius)
        if work is None:
            return whole
        return min(whole, perturbed * work + (len(touched) if perturber.small_sample else work))

    return ProbeBudget(PROBE_SHARE * brute_force, lambda r: brute_force - best_local(r), brute_force)


def _path(method: str, radius: Any, tiling: dict | None) -> dict:
    """How a backward mapping perturbed its blocks, and why, for its result."""
    if method in ("batched", "brute"):
        how = "every block, in batches" if method == "batched" else "every block, one per model evaluation"
        return {"method": how, "reason": f"method {method!r}", "radius_source": radius_source(None)}
    source = radius_source(None if radius is None else radius.to_dict())
    if radius is None or radius.radius is None:
        reason = ("the model's response is global" if radius is not None and radius.is_global
                  else "the response radius is unknown")
        return {"method": "every block, in batches", "reason": reason, "radius_source": source}
    if tiling and tiling.get("tiles"):
        how, reason = ("the blocks within the response radius of the mask, in tiles",
                       f"{tiling['items']} tile(s) holding {tiling['blocks']} blocks and their context run fewer voxels "
                       f"than whole samples")
    else:
        how = "the blocks within the response radius of the mask, far-apart blocks together in whole samples"
        reason = (tiling or {}).get("reason", "")
    return {"method": how, "reason": f"response radius {radius.radius} voxels" + (f"; {reason}" if reason else ""),
            "radius_source": source}


def _check_blocks(blocks: Any, levels: list[int]) -> None:
    if isinstance(blocks, str):
        check_choice("blocks", blocks, BLOCK_KINDS)
    elif len(levels) > 1:
        raise InputError("coarse-to-fine needs generated blocks ('slic' or 'grid'), not a label image (blocks)")


def backward_mapping(model: Model, x: Any, out_mask: Any, n_blocks: int = 500,
                     compactness: float = DEFAULT_COMPACTNESS,
                     n_jitters: int = 4, max_jitter: float | None = None, channels: Any = None,
                     blocks: Any = "slic", normalization: str = "fraction",
                     coarse_blocks: int | Sequence[int] | None = None, refine_threshold: float = 0.25,
                     method: str = "auto", locality_tolerance: float = 0.0, geometry: Geometry | None = None,
                     tiles: bool = True, progressive: bool = False,
                     preview: Callable[[np.ndarray, int], None] | None = None, tolerance: float | None = None,
                     progress: ProgressCallback | None = None, cancel: Any = None,
                     estimate: Callable[[Estimate], None] | None = None) -> BackwardResult:
    """Backward mapping B(M^f): which input blocks drive the masked output voxels.

    Parameters
    ----------
    model, x, n_jitters, max_jitter, channels, geometry
        As for :func:`forward_mapping`.
    out_mask : ndarray of bool
        The output voxels M^f, same shape as the input (output grid = input grid).
    n_blocks : int
        K, the number of blocks per sample (SLIC superpixels for 2D, supervoxels for 3D).
    compactness : float
        SLIC compactness (channels scaled to [0, 1] first; see :func:`superpixel_blocks`).
    blocks : {"slic", "grid"} or ndarray of int
        How the input is cut into blocks; an int array on the input grid gives the blocks (0 = none).
    normalization : {"fraction", "magnitude"}
        B_k as the fraction of block k's response that falls inside M^f, or that part scaled to max 1.
    coarse_blocks : int or sequence of int, optional
        Coarse-to-fine: block counts of the coarser levels (e.g. 10, or [10, 60]); after each level only the
        blocks with B >= refine_threshold * max B are cut into finer blocks, down to ``n_blocks``.
    refine_threshold : float
        Fraction of the level's largest B above which a block is refined.
    method : {"auto", "local", "batched", "brute"}
        "local" measures the model's response radius and skips blocks that cannot reach M^f and perturbs far
        apart blocks together (exact for models with a finite receptive field); "batched" evaluates every
        block; "brute" also evaluates one block at a time; "auto" is "local" unless the response is global.
    locality_tolerance : float
        0 (exact). Above 0, a global response is cut at the radius holding all but this fraction of it.
    tiles : bool
        With the local method, perturb the relevant blocks in tiles of the sample that hold their context (each
        block dilated by twice the response radius, aligned to the model's stride; far-apart blocks may share a
        tile) when that runs fewer voxels through the model than whole samples; exact for shift-equivariant
        convolutional models, which IBIX checks once per run.
    progressive, preview, tolerance
        As for :func:`forward_mapping`: nested jitter grids, ``preview(painted_B, N)`` after each but the last,
        and an optional early stop once no block's B changes by more than ``tolerance``.
    estimate : callable, optional
        As for :func:`forward_mapping`: ``estimate(Estimate)`` once, before any progress; with coarse-to-fine it
        covers the first level (its ``note`` says so).

    Returns
    -------
    BackwardResult
        B per block, B painted on the input grid, the block labels and evaluation counts per level.
        A 2D model on a volume is explained on the slices M^f touches; B is 0 elsewhere.
    """
    started = time.perf_counter()
    checked = check_arguments(n_blocks=n_blocks, compactness=compactness, n_jitters=n_jitters, max_jitter=max_jitter,
                              normalization=normalization, refine_threshold=refine_threshold,
                              locality_tolerance=locality_tolerance, geometry=geometry, tiles=tiles,
                              progressive=progressive, preview=preview, tolerance=tolerance, progress=progress,
                              cancel=cancel)
    n_blocks, compactness, n_jitters = checked["n_blocks"], checked["compactness"], checked["n_jitters"]
    refine_threshold, locality_tolerance, tolerance = (checked[k] for k in ("refine_threshold",
                                                                            "locality_tolerance", "tolerance"))
    check_choice("method", method, BACKWARD_METHODS)
    check_callback("estimate", estimate)
    levels = check_block_levels(n_blocks, coarse_blocks)
    _check_blocks(blocks, levels)
    before, voxels_before = model.evaluations, model.evaluated_voxels
    prepared = model.prepare(x, geometry)
    out_mask = check_mask(out_mask, prepared.volume_shape, "output mask")
    channel_list = channel_indices(model.card, channels)
    h_max = resolve_max_jitter(prepared, checked["max_jitter"], channel_list, n_jitters)
    out_samples = prepared.to_samples(out_mask)
    touched = np.flatnonzero(out_samples.reshape(len(out_samples), -1).any(axis=1))
    out_boxes = {int(s): mask_box(out_samples[s]) for s in touched}  # each sample's output mask box, found once
    custom = not isinstance(blocks, str)
    given = check_block_labels(blocks, prepared.volume_shape) if custom else None

    perturber = Perturber(model, prepared, jitter_levels(n_jitters, h_max), channel_list, cancel,
                          one_item_per_batch=method == "brute")
    schedule = jitter_schedule(n_jitters, progressive)
    refinement = _Refinement(prepared, touched, normalization, n_jitters, preview, tolerance)
    unit = float(model.pipeline.sample_voxels(prepared.sample_shape))
    if estimate is not None:
        perturber.forecast = Forecast(model, started, estimate, lambda seconds: advice(
            "backward", seconds, model.device, n_jitters, levels[-1], radius is not None, len(levels) > 1), unit)
        if len(levels) > 1:
            perturber.forecast.note = f"the first of {len(levels)} coarse-to-fine levels"
        progress = perturber.forecast.gate(progress)
    # the first level's blocks, unless supervoxels are cut in chunks only near the mask, where the radius says
    first = None
    if custom or blocks != "slic" or not cut_in_chunks(prepared.sample_shape, levels[0]):
        first = _level_labels(refinement, prepared, touched, levels[0], compactness, blocks, refine_threshold, given,
                              None)
    radius_info = radius = None
    if method in ("auto", "local"):
        budget = None
        if perturber.small_sample:  # on every path: the probes' windows are then cut from it
            perturber.base_outputs(touched)
        if method == "auto":
            # brute force explains the finest blocks; the first level's are known unless cut near the mask
            blocks_now = levels[-1] * len(touched)
            if first is not None and len(levels) == 1:
                blocks_now = len(first[1])  # the first level's blocks
            budget = _probe_budget(perturber, out_boxes, touched, n_jitters, blocks_now)
        low, high = out_boxes[int(touched[0])]
        radius_info = response_radius(perturber, int(touched[0]), locality_tolerance,
                                      near=tuple(int(v) for v in (low + high) // 2), budget=budget)
        if radius_info.is_global and method == "local":
            raise InputError("the model's response is global (it reaches across the whole input), so the local "
                             "method cannot be exact; use method 'batched' or a locality_tolerance above 0")
        radius = radius_info.radius
    sums = _BlockSums(perturber, out_samples, radius, schedule, progress, tiles=tiles)
    evaluations_per_level, blocks_per_level = [], []
    for level, k in enumerate(levels):
        check_cancel(cancel)
        level_start = model.evaluations
        if level == 0 and first is not None:
            current, new_ids, boxes = first
        else:
            current, new_ids, boxes = _level_labels(refinement, prepared, touched, k, compactness, blocks,
                                                    refine_threshold, given, _reach(out_boxes, radius))
        refinement.next_level(current, new_ids, boxes)
        if level == 0 and perturber.forecast is not None:  # brute force explains the blocks of the finest level
            perturber.forecast.brute_force = len(touched) + 2.0 * n_jitters * (
                len(new_ids) if len(levels) == 1 else levels[-1] * len(touched))
        level_sums = sums.compute(current, new_ids, boxes,
                                  refinement.on_jitter_level if len(schedule) > 1 else None)
        refinement.finish_level(*level_sums)
        evaluations_per_level.append(model.evaluations - level_start)
        blocks_per_level.append(int(len(new_ids)))

    if perturber.forecast is not None:
        perturber.forecast.finish()
    labels, block_values, painted = refinement.painted()
    parameters = {
        "n_blocks": n_blocks, "compactness": compactness, "n_jitters": n_jitters,
        "n_jitters_used": refinement.jitters_used, "progressive": progressive, "tolerance": tolerance,
        "max_jitter": h_max,
        "channels": [model.card.input.channels[c] for c in channel_list], "blocks": "labels" if custom else blocks,
        "normalization": normalization, "coarse_blocks": levels[:-1] if len(levels) > 1 else None,
        "refine_threshold": refine_threshold if len(levels) > 1 else None, "method": method,
        "locality_tolerance": locality_tolerance, "tiles": tiles, "output_mask_voxels": int(out_mask.sum()),
        "samples": int(len(touched)), "model": model.path.name,
        "windows": perturber.patch_summary(model.evaluations - before),
        "model_assumptions": list(model.card.assumptions),
    }
    equivalent = (model.evaluated_voxels - voxels_before) / unit
    brute_force = len(touched) + 2 * n_jitters * (len(block_values) - 1)  # the blocks B is painted on
    path = _path(method, radius_info, sums.tiling)
    return BackwardResult(
        map=painted, labels=labels, block_values=block_values, geometry=prepared.geometry, path=path,
        work=work_summary(model.evaluations - before, equivalent, brute_force),
        statistics=backward_statistics(labels, block_values, out_mask, prepared.geometry, support=volume_box(
            prepared, list(refinement.boxes.items()) + [(s, _grown(box, 0)) for s, box in out_boxes.items()])),
        parameters=parameters, evaluations=model.evaluations - before, seconds=time.perf_counter() - started,
        device=model.device, evaluations_per_level=evaluations_per_level, blocks_per_level=blocks_per_level,
        radius=None if radius_info is None else radius_info.to_dict(), tiling=sums.tiling,
        equivalent_evaluations=equivalent)
