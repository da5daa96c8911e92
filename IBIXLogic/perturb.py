"""The perturbation engine shared by the mappings: jitters, jittered model runs and the response radius.

F(M) = 1/(2N) * sum_{k=-N..N, k!=0} (f(x + h_k M) - f(x)) / h_k,  h_k = k H / N  (Espadoto et al., section 3.2).
"""
from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from . import locality, windows
from .checks import channel_indices, check_arguments, check_count, check_number
from .errors import InputError, ModelError
from .geometry import Geometry
from .model import Model, ProgressCallback, check_cancel
from .pipeline import PreparedInput

#: Default maximum jitter H as a fraction of the input's robust range (1st to 99th percentile).
DEFAULT_JITTER_FRACTION = 0.15
#: float32 steps (ulps of the largest model input) the smallest jitter H/N must move an input by: difference
#: quotients then carry about three significant digits of the input step, not rounding noise.
JITTER_RESOLUTION = 2**10
#: Fraction of float32's range jittered model inputs may reach.
JITTER_HEADROOM = 2.0**-20
#: Probe voxels the response radius is measured at, at least.
PROBES = 5
#: Voxels added to the measured response radius when the probes may have missed a pooling phase of the model.
RADIUS_MARGIN = 2
#: Sides (voxels) of the windows the response radius is measured in, in turn, on samples larger than twice that;
#: a response that reaches across a window is measured in the next, and last on the whole sample.
PROBE_WINDOWS = (48, 96)
#: Largest model stride tile and probe windows are aligned to (their origins are multiples of it, at most).
LARGEST_ALIGNMENT = 32
#: Samples of at most this many voxels are evaluated whole for the unperturbed output of their tiles.
WHOLE_BASE_VOXELS = 2**20
#: Larger samples, up to this many voxels, are evaluated whole for it when their tiles add up to more voxels.
WHOLE_BASE_LARGEST = 2**23
#: Tiles are used when they run fewer than this share of the voxels of the whole samples they replace.
TILE_SAVING = 0.8
#: Model work that measuring the response radius may add to a mapping, as a share of brute force's work for the
#: same map (every jittered input run whole): with tiles used only where they run fewer voxels, no map then costs
#: more than 1 + PROBE_SHARE times brute force's work.
PROBE_SHARE = 0.08


def jitter_levels(n_jitters: int, max_jitter: float) -> np.ndarray:
    """The 2N jitters h_k = k H / N, k = -N..N, k != 0 (input units)."""
    k = np.concatenate([np.arange(-n_jitters, 0), np.arange(1, n_jitters + 1)])
    return k * (float(max_jitter) / n_jitters)


def jitter_schedule(n_jitters: int, progressive: bool) -> list[tuple[int, np.ndarray]]:
    """Nested jitter grids for progressive refinement: [(N_l, indices into jitter_levels(n_jitters, H)), ...].

    Each level's grid h = k H / N_l is contained in the next one (N_l divides N_(l+1)), so a level evaluates
    only the jitters that are new; the last level is N itself. Without ``progressive``: one level.
    """
    chain = [n_jitters]
    while progressive and chain[0] > 1:
        n = chain[0]
        smallest = next(p for p in range(2, n + 1) if n % p == 0)
        chain.insert(0, n // smallest)
    k = np.concatenate([np.arange(-n_jitters, 0), np.arange(1, n_jitters + 1)])
    done = np.zeros(len(k), bool)
    schedule = []
    for level in chain:
        in_grid = k % (n_jitters // level) == 0
        schedule.append((level, np.flatnonzero(in_grid & ~done)))
        done |= in_grid
    return schedule


def robust_range(values: np.ndarray) -> float:
    """Spread between the 1st and 99th percentile (a strided subsample of at most ~1M values)."""
    flat = np.asarray(values).ravel()
    step = max(1, flat.size // 1_000_000)
    low, high = np.percentile(flat[::step], [1, 99])
    return float(high - low)


def usable_jitter_range(prepared: PreparedInput, channels: list[int], n_jitters: int) -> tuple[float, float]:
    """The smallest and largest H (input units) whose jitters h_k = k H / N float32 can carry on this input.

    The smallest jitter H / N must move the model's inputs by :data:`JITTER_RESOLUTION` float32 steps (ulps) of
    the largest input value, or the difference quotients are rounding noise (or, for tiny H, infinite); the
    largest input plus H must stay far inside float32's range.
    """
    eps, tiny, largest = (float(v) for v in (np.finfo(np.float32).eps, np.finfo(np.float32).tiny,
                                            np.finfo(np.float32).max))
    low, high = 0.0, math.inf
    for c in channels:
        values = prepared.samples[:, c]
        scale, offset = abs(float(prepared.scale[c])), float(prepared.offset[c])
        peak = max(abs(float(values.min()) * float(prepared.scale[c]) + offset),
                   abs(float(values.max()) * float(prepared.scale[c]) + offset))
        step = max(JITTER_RESOLUTION * eps * peak, math.sqrt(tiny))  # model units
        low = max(low, n_jitters * step / scale, n_jitters * math.sqrt(tiny))
        high = min(high, (largest * JITTER_HEADROOM - peak) / scale)
    return low, high


def resolve_max_jitter(prepared: PreparedInput, max_jitter: float | None, channels: list[int],
                       n_jitters: int) -> float:
    """H in input units: ``max_jitter`` (checked by :func:`check_arguments`) if it is usable on this input with
    N = ``n_jitters``, or by default 15 % of the jittered channels' robust range."""
    if max_jitter is None:
        every = list(channels) == list(range(prepared.samples.shape[1]))
        spread = robust_range(prepared.samples if every else prepared.samples[:, channels])  # no copy when it can
        if not spread > 0:
            raise InputError("the input's 1st and 99th percentiles are equal, so the default maximum jitter "
                             "(15 % of that range) is 0; give max_jitter explicitly (input units)")
        max_jitter = DEFAULT_JITTER_FRACTION * spread
    low, high = usable_jitter_range(prepared, channels, n_jitters)
    if max_jitter < low:
        raise InputError(f"max_jitter (H) = {max_jitter:.3g} is too small for this input: with N = {n_jitters} the "
                         f"smallest jitter H/N would be lost to float32 rounding of the model's inputs; use "
                         f"max_jitter >= {low:.3g} (input units)")
    if max_jitter > high:
        raise InputError(f"max_jitter (H) = {max_jitter:.3g} is too large for this input: jittered values would "
                         f"leave the float32 range; use max_jitter <= {high:.3g} (input units)")
    return float(max_jitter)


def mask_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive lower and upper index corners of a non-empty mask's bounding box."""
    where = [np.flatnonzero(np.asarray(mask).any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
             for axis in range(mask.ndim)]
    return np.array([w[0] for w in where]), np.array([w[-1] for w in where])


def box_centre(mask: np.ndarray) -> tuple[int, ...]:
    """The centre voxel of the bounding box of a non-empty mask."""
    low, high = mask_box(mask)
    return tuple(int(v) for v in (low + high) // 2)


def report_progress(progress: ProgressCallback | None, done: int, total: int, message: str) -> None:
    """Call the engine's ``progress(done, total, message)`` callback, if any."""
    if progress is not None:
        progress(done, total, message)


class Perturber:
    """Runs jittered copies of samples (or of tiles of them) through the model and sums difference quotients.

    With sliding windows (card ``input.patch``) only the windows a perturbation touches are run again: the
    unperturbed outputs of every window are evaluated once per sample and reused (see :meth:`patch_responses`).
    """

    def __init__(self, model: Model, prepared: PreparedInput, jitters: np.ndarray, channels: list[int],
                 cancel: Any, one_item_per_batch: bool = False):
        self.model, self.prepared, self.cancel = model, prepared, cancel
        self.one_item_per_batch = one_item_per_batch
        self.jitters = jitters.astype(np.float32)
        self.channel_mask = np.zeros(prepared.samples.shape[1], np.float32)
        self.channel_mask[channels] = 1.0
        #: where the sample lies inside the padded sample the model sees
        self.pads = model.pipeline.padding(prepared.sample_shape)
        self.crop = tuple(slice(before, before + n) for (before, _), n in zip(self.pads, prepared.sample_shape))
        self.base: dict[int, np.ndarray] = {}
        self.padded_base: dict[int, np.ndarray] = {}
        self._padded_input: dict[int, np.ndarray] = {}
        self._window_base: dict[tuple, np.ndarray] = {}
        #: small samples (slices) are evaluated whole once, so that their tiles need no output of their own
        self.small_sample = int(np.prod(prepared.sample_shape)) <= WHOLE_BASE_VOXELS
        #: told of every batch of jittered inputs (:class:`IBIXLogic.cost.Forecast`), if any
        self.forecast: Any = None
        self.patched = model.card.input.patch is not None
        if self.patched:
            pipeline = model.pipeline
            self.patches = pipeline.windows(prepared.sample_shape)
            self.patch_weights = pipeline.importance_map()
            self.patch_weight_sum = windows.weight_sum(self.patches, pipeline.padded_shape(prepared.sample_shape),
                                                       self.patch_weights)
            self.patch_base: dict[int, np.ndarray] = {}  # each sample's unperturbed window outputs
            #: window evaluations a brute-force run of the whole windowed pipeline would have made
            self.brute_force_windows = 0

    def padded_input(self, sample: int) -> np.ndarray:
        """The sample in input units, padded as the model sees it (channels, *padded_shape).

        A constant padding value (model units) is taken back to input units per channel: exact unless the card's
        clipping changes it, which the tiles' check of the model's output then finds.
        """
        if sample not in self._padded_input:
            padded_shape = self.model.pipeline.padded_shape(self.prepared.sample_shape)
            self._padded_input[sample] = self.window_input(sample, tuple(slice(0, n) for n in padded_shape))
        return self._padded_input[sample]

    def model_input(self, sample: int, direction: np.ndarray | None = None, jitter: float = 0.0) -> np.ndarray:
        """Sample ``sample`` jittered by ``jitter`` along ``direction`` on the selected channels, as the model sees
        it: in model units, padded as the card says (channels, *padded_shape)."""
        x = self.prepared.samples[sample][None].copy()
        if direction is not None:
            x += (jitter * self.channel_mask).reshape((1, -1) + (1,) * direction.ndim) * direction
        return self.model.pipeline.pad(self.prepared.normalize(x), self.pads)[0]

    def base_outputs(self, samples: Sequence[int]) -> None:
        """Evaluate the unperturbed samples not evaluated yet (kept padded, for tiles, and cropped)."""
        missing = [int(s) for s in samples if int(s) not in self.base]
        if not missing:
            return
        if self.patched:
            for s in missing:
                check_cancel(self.cancel)
                padded = self.model_input(s)
                self.patch_base[s] = self.model.run_windows(
                    np.stack([padded[(slice(None),) + w] for w in self.patches]),
                    lambda j, s=s: f"the unperturbed input (sample {s}, window {j + 1})")
                self.padded_base[s] = windows.blend(self.patch_base[s], self.patches, padded.shape[1:],
                                                    self.patch_weights)
                self.base[s] = self.padded_base[s][self.crop]
                self.brute_force_windows += len(self.patches)
            return
        padded_shape = self.padded_input(missing[0]).shape[1:]
        runs = self.model.run_chunked(lambda a, b: np.stack([self.padded_input(s) for s in missing[a:b]]),
                                      len(missing), self.prepared,
                                      lambda i: f"the unperturbed input (sample {missing[i]})",
                                      cancel=self.cancel, sample_shape=padded_shape)
        for start, stop, out in runs:
            for s, padded in zip(missing[start:stop], out):
                self.padded_base[s] = padded
                self.base[s] = padded[self.crop]

    # -- windows of the padded sample (tiles), without padding or evaluating the whole sample ---------------
    def window_input(self, sample: int, window: tuple[slice, ...]) -> np.ndarray:
        """The padded sample's ``window`` in input units, (channels, *window shape)."""
        if sample in self._padded_input:
            return self._padded_input[sample][(slice(None),) + window]
        # a constant padding value (model units) in input units, per channel: exact unless the card's clipping
        # changes it, which the tiles' check of the model's output then finds
        fill = (self.model.card.input.padding.value - self.prepared.offset) / self.prepared.scale
        return self.model.pipeline.padded_window(self.prepared.samples[sample], window, fill)

    def overlap(self, window: tuple[slice, ...]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        """Where ``window`` (padded-sample coordinates) meets the sample: (slices of the sample, of the window)."""
        source, target = [], []
        for w, (before, _), n in zip(window, self.pads, self.prepared.sample_shape):
            low, high = max(w.start - before, 0), max(min(w.stop - before, n), max(w.start - before, 0))
            source.append(slice(low, high))
            target.append(slice(low + before - w.start, high + before - w.start))
        return tuple(source), tuple(target)

    def window_of(self, values: np.ndarray, window: tuple[slice, ...]) -> np.ndarray:
        """``window`` of an array on the sample grid placed in the padded sample, 0 (False) in the padding."""
        out = np.zeros(tuple(w.stop - w.start for w in window), values.dtype)
        source, target = self.overlap(window)
        out[target] = values[source]
        return out

    def inside(self, window: tuple[slice, ...]) -> np.ndarray:
        """Which voxels of ``window`` lie in the sample rather than in its padding."""
        out = np.zeros(tuple(w.stop - w.start for w in window), bool)
        out[self.overlap(window)[1]] = True
        return out

    def window_base(self, sample: int, window: tuple[slice, ...], own: bool = False) -> np.ndarray:
        """The unperturbed output on ``window``: cut from the whole sample's if that was evaluated (unless ``own``),
        else the window's own output (which equals it wherever the window holds the context of a voxel, and to the
        last bit where the window's perturbed outputs, run in the same shape, are unchanged)."""
        if sample in self.padded_base and not own:
            return self.padded_base[sample][window]
        return self._window_output(sample, window)

    def _window_output(self, sample: int, window: tuple[slice, ...]) -> np.ndarray:
        """The model's output on ``window`` alone (unperturbed), evaluated once."""
        key = (sample, tuple((w.start, w.stop) for w in window))
        if key not in self._window_base:
            self._window_base[key] = self.model.run(self.window_input(sample, window)[None].copy(),
                                                    self.prepared, lambda i: f"a tile of sample {sample}")[0]
        return self._window_base[key]

    def window_bases(self, windows: Sequence[tuple[int, tuple[slice, ...]]], own: bool = False) -> None:
        """Evaluate the unperturbed output of the (sample, window) pairs not known yet (see :meth:`window_base`),
        windows of one shape together."""
        missing: dict[tuple, list] = {}
        for sample, window in windows:
            key = (sample, tuple((w.start, w.stop) for w in window))
            if (own or sample not in self.padded_base) and key not in self._window_base:
                missing.setdefault(tuple(w.stop - w.start for w in window), []).append((key, sample, window))
        for shape, entries in missing.items():
            entries = list({key: (key, s, w) for key, s, w in entries}.values())
            runs = self.model.run_chunked(
                lambda a, b: np.stack([self.window_input(s, w) for _, s, w in entries[a:b]]), len(entries),
                self.prepared, lambda i: f"the unperturbed input (a tile of sample {entries[i][1]})",
                cancel=self.cancel, sample_shape=shape)
            for start, stop, out in runs:
                for (key, _, _), values in zip(entries[start:stop], out):
                    self._window_base[key] = values

    def tiles_reproduce(self, sample: int, shape: tuple[int, ...], align: int, radius: int,
                        at: tuple[int, ...] | None = None) -> bool:
        """Whether windows of ``shape`` starting at multiples of ``align`` reproduce the model's output.

        Compared away from the window's borders that are not the sample's (within ``radius`` of such a border a
        window lacks context). Against the whole sample's output, if that was evaluated, at the origin (align,
        align, ...), an odd multiple of ``align``, and at the far corner. Otherwise against a window ``align``
        voxels wider on each side, at the origin ``at`` (a tile about to be used, whose output is then known) when
        it lies at least ``align`` from the start of every axis, else at the same two origins: a model whose stride
        does not divide ``align`` then sees another pooling phase and fails the check.
        """
        padded = self.model.pipeline.padded_shape(self.prepared.sample_shape)
        whole = sample in self.padded_base
        origins = {tuple(min(align, p - n) for p, n in zip(padded, shape)),
                   tuple(p - n for p, n in zip(padded, shape))}
        if not whole and at is not None and all(o >= align for o in at):
            origins = {tuple(at)}
        for origin in sorted(origins):
            window = tuple(slice(o, o + n) for o, n in zip(origin, shape))
            try:
                out = self._window_output(sample, window)
                if whole:
                    reference = self.padded_base[sample][window]
                else:
                    wider = tuple(slice(max(0, w.start - align), min(p, w.stop + align))
                                  for w, p in zip(window, padded))
                    reference = self._window_output(sample, wider)[
                        tuple(slice(w.start - o.start, w.stop - o.start) for w, o in zip(window, wider))]
            except ModelError:
                return False
            interior = tuple(slice(0 if o == 0 else radius, n if o + n == p else n - radius)
                             for o, n, p in zip(origin, shape, padded))
            expected = reference[interior]
            tolerance = 1e-4 * (np.abs(expected).max(initial=0.0) + 1e-12) + 1e-7
            if expected.size and np.abs(out[interior] - expected).max() > tolerance:
                return False
        return True

    def tile_work(self, low: np.ndarray, high: np.ndarray, radius: int) -> float | None:
        """Model work (whole samples) of one tile per box ``low``..``high`` (rows; inclusive, sample coordinates)
        holding it and twice ``radius`` of context, at the smallest stride tiles may start at; None where tiles
        cannot run (a fixed input size, sliding windows, no stride that divides the padded sample)."""
        card_input, pipeline = self.model.card.input, self.model.pipeline
        padded = pipeline.padded_shape(self.prepared.sample_shape)
        alignments = locality.tile_alignments(padded, card_input.multiple_of, LARGEST_ALIGNMENT)
        if card_input.size or self.patched or not alignments:
            return None
        tiles = locality.plan_tiles(low, high, [np.array([i]) for i in range(len(low))], radius, padded,
                                    tuple(before for before, _ in self.pads), alignments[0])
        unit = float(pipeline.sample_voxels(self.prepared.sample_shape))
        return sum(float(np.prod(pipeline.model_shape(t.shape))) for t in tiles) / unit

    def checked_tiles(self, sample: int, low: np.ndarray, high: np.ndarray, members: list[np.ndarray],
                      radius: int, whole_items: int) -> tuple[list[locality.Tile] | None, dict]:
        """Tiles holding the boxes ``low``..``high`` (sample coordinates; rows grouped by ``members``) and their
        context, when they run fewer voxels than ``whole_items`` whole samples; (tiles or None, what was decided).

        Tiles start at multiples of the model's stride, which a black box does not state: the candidates are the
        card's ``multiple_of`` and its doublings that divide the padded sample; the smallest one at which tiles
        reproduce the model's output (:meth:`tiles_reproduce`, on ``sample``) is used.
        """
        padded_shape = self.model.pipeline.padded_shape(self.prepared.sample_shape)
        offset = tuple(before for before, _ in self.pads)
        for align in locality.tile_alignments(padded_shape, self.model.card.input.multiple_of, LARGEST_ALIGNMENT):
            tiles = locality.plan_tiles(low, high, members, radius, padded_shape, offset, align)
            voxels = sum(int(np.prod(t.shape)) for t in tiles)
            if voxels >= TILE_SAVING * whole_items * np.prod(padded_shape):
                return None, {"tiles": False, "reason": "tiles would not run fewer voxels"}
            if self.tiles_reproduce(sample, tiles[0].shape, align, radius, tiles[0].origin):
                return tiles, {"tiles": True, "alignment": align, "items": len(tiles),
                               "voxels_per_sample": round(float(voxels / np.prod(padded_shape)), 4)}
        return None, {"tiles": False, "reason": "tiles do not reproduce the model's output at any alignment"}

    def responses(self, n_items: int, input_of: Callable[[int], np.ndarray],
                  direction_of: Callable[[int], np.ndarray], base_of: Callable[[int], np.ndarray],
                  what: Callable[[int], str], subset: np.ndarray | None = None,
                  shape: tuple[int, ...] | None = None, sample_of: Callable[[int], int] | None = None
                  ) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield (start, stop, S) for items start..stop-1, S = sum over the jitters of (f(x + h d) - f(x)) / h.

        Item i perturbs the input ``input_of(i)`` (channels, *shape; input units) along ``direction_of(i)`` (a 0/1
        map) on the selected channels, against the unperturbed output ``base_of(i)``; ``subset`` picks jitters
        (indices into ``self.jitters``, default all). Divide S by the jitter count of the grid to get F.
        With sliding windows, items perturb whole samples, ``sample_of(i)``: see :meth:`patch_responses`.
        """
        if self.patched:
            yield from self.patch_responses(n_items, sample_of, direction_of, what, subset)
            return
        shape = tuple(shape or self.prepared.sample_shape)
        channels = self.prepared.samples.shape[1]
        jitters = self.jitters if subset is None else self.jitters[subset]
        n_jitters = len(jitters)
        weights = (1.0 / jitters).astype(np.float32)
        scales = jitters.reshape((-1, 1) + (1,) * len(shape)) * self.channel_mask.reshape((1, -1) + (1,) * len(shape))

        def make_batch(start: int, stop: int) -> np.ndarray:
            batch = np.empty((stop - start, n_jitters, channels) + shape, np.float32)
            for j, item in enumerate(range(start, stop)):
                np.multiply(scales, direction_of(item).astype(np.float32), out=batch[j])
                batch[j] += input_of(item)
            return batch.reshape((-1, channels) + shape)

        def describe(i: int) -> str:
            return f"{what(i // n_jitters)} with jitter h = {jitters[i % n_jitters]:.6g}"

        clock = _BatchClock(self)
        for start, stop, out in self.model.run_chunked(make_batch, n_items, self.prepared, describe,
                                                       per_item=n_jitters, cancel=self.cancel,
                                                       max_items=1 if self.one_item_per_batch else None,
                                                       sample_shape=shape):
            out = out.reshape((stop - start, n_jitters, -1))
            for j, item in enumerate(range(start, stop)):
                out[j] -= base_of(item).reshape(1, -1)
            sums = np.einsum("mkp,k->mp", out, weights)
            clock.tick()
            yield start, stop, sums.reshape((stop - start,) + shape)

    def patch_responses(self, n_items: int, sample_of: Callable[[int], int],
                        direction_of: Callable[[int], np.ndarray], what: Callable[[int], str],
                        subset: np.ndarray | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """:meth:`responses` of a model run in sliding windows, one item at a time.

        The blended output is sum_w g o_w / sum_w g (g: the importance map), so a perturbation changes it by
        sum_{w in T} g (o_w(x + h d) - o_w(x)) / sum_w g, T the windows that hold a perturbed voxel of the padded
        sample: only those are evaluated, against the unperturbed window outputs evaluated once per sample. The
        (jitter, window) pairs of an item go through the model as many at a time as the batch size allows.
        """
        jitters = self.jitters if subset is None else self.jitters[subset]
        step = self.model.capacity(self.patch_weights.shape)
        clock = _BatchClock(self)
        for i in range(n_items):
            sample = sample_of(i)
            self.base_outputs([sample])
            direction = direction_of(i).astype(np.float32)
            touched = self.touched_windows(direction)
            pairs = [(float(h), int(t)) for h in jitters for t in touched]
            total = np.zeros(self.patch_weight_sum.shape, np.float64)
            jittered: tuple[float, np.ndarray] | None = None  # the padded input of the current jitter
            for start in range(0, len(pairs), step):
                check_cancel(self.cancel)
                chunk, parts = pairs[start:start + step], []
                for h, t in chunk:
                    if jittered is None or jittered[0] != h:
                        jittered = (h, self.model_input(sample, direction, h))
                    parts.append(jittered[1][(slice(None),) + self.patches[t]])
                out = self.model.run_windows(np.stack(parts), lambda j: f"{what(i)} with jitter h = "
                                             f"{chunk[j][0]:.6g} (window {chunk[j][1] + 1})")
                for (h, t), window_out in zip(chunk, out):
                    total[self.patches[t]] += self.patch_weights * (window_out - self.patch_base[sample][t]) / h
            self.brute_force_windows += len(jitters) * len(self.patches)
            response = (total / self.patch_weight_sum)[self.crop][None].astype(np.float32)
            clock.tick()
            yield i, i + 1, response

    def touched_windows(self, direction: np.ndarray) -> list[int]:
        """The sliding windows that hold a voxel of ``direction`` (a sample-grid array) once padded."""
        padded = self.model.pipeline.pad(direction.astype(np.float32), self.pads, direction=True)
        return windows.touched_windows(self.patches, padded != 0)

    def planned(self, n_items: int, direction_of: Callable[[int], np.ndarray], subset: np.ndarray | None,
                shape: tuple[int, ...]) -> tuple[int, float]:
        """Model evaluations and voxels :meth:`responses` will run for these items (with sliding windows: the
        windows each item's direction touches)."""
        jitters = len(self.jitters if subset is None else self.jitters[subset])
        pipeline = self.model.pipeline
        if not self.patched:
            return n_items * jitters, float(n_items * jitters * np.prod(pipeline.model_shape(shape)))
        count = sum(len(self.touched_windows(direction_of(i))) for i in range(n_items)) * jitters
        return count, float(count * np.prod(pipeline.model_shape(pipeline.card.input.patch.size)))

    def patch_summary(self, evaluations: int) -> dict | None:
        """Window evaluations made (``evaluations``) against a brute-force run; None without sliding windows."""
        if not self.patched:
            return None
        return {"windows_per_sample": len(self.patches), "window_evaluations": int(evaluations),
                "brute_force_window_evaluations": int(self.brute_force_windows)}


class _BatchClock:
    """Times batches of jittered inputs for the perturber's forecast: :meth:`tick` when a batch is done reports
    the time since the previous tick (building the batch, the model, summing its responses, and what the caller did
    with the previous batch)."""

    def __init__(self, perturber: Perturber):
        self.perturber, self.model = perturber, perturber.model
        self._mark()

    def _mark(self) -> None:
        self.started = time.perf_counter()
        self.evaluations, self.voxels = self.model.evaluations, self.model.evaluated_voxels

    def tick(self) -> None:
        if self.perturber.forecast is not None:
            self.perturber.forecast.timed(self.model.evaluations - self.evaluations,
                                          self.model.evaluated_voxels - self.voxels,
                                          time.perf_counter() - self.started)
        self._mark()


def volume_box(prepared: PreparedInput, boxes: Sequence[tuple[int, tuple[slice, ...]]]) -> tuple[slice, ...]:
    """The box of the volume grid that holds the given boxes of samples ((sample, box in sample coordinates) pairs):
    the sample axes back on the volume's, the flips and transpose of a 2D model's in-plane transform undone."""
    shape = prepared.sample_shape
    low = [min(b[a].start for _, b in boxes) for a in range(len(shape))]
    high = [max(b[a].stop for _, b in boxes) for a in range(len(shape))]
    for flipped, axis in ((prepared.flip_cols, -1), (prepared.flip_rows, -2)):
        if flipped:
            low[axis], high[axis] = shape[axis] - high[axis], shape[axis] - low[axis]
    if prepared.transpose:
        low[-2:], high[-2:] = low[-2:][::-1], high[-2:][::-1]
    box = [slice(a, b) for a, b in zip(low, high)]
    if prepared.slice_axis is not None:
        samples = [s for s, _ in boxes]
        box.insert(prepared.slice_axis, slice(min(samples), max(samples) + 1))
    return tuple(box)


def radius_source(radius: dict | None) -> str:
    """Where a result's response radius came from, in words: measured, cached, or skipped and why."""
    if radius is None:
        return "not needed"
    return radius["source"] + (f" ({radius['reason']})" if radius.get("reason") else "")


def work_summary(evaluations: int, equivalent: float, brute_force: float) -> dict:
    """A result's model work against brute force's (both in whole samples: voxels run / voxels of one sample)."""
    return {"evaluations": int(evaluations), "equivalent_evaluations": round(float(equivalent), 2),
            "brute_force_equivalent_evaluations": round(float(brute_force), 2),
            "vs_brute_force": round(float(equivalent) / brute_force, 4) if brute_force > 0 else None}


def measure_response_radius(model: Model, x: Any, max_jitter: float | None = None, channels: Any = None,
                            geometry: Geometry | None = None, sample: int = 0, tolerance: float = 0.0,
                            cancel: Any = None) -> locality.ResponseRadius:
    """Response radius of ``model`` around probe voxels of one sample of input ``x``.

    Parameters
    ----------
    model, x, channels, geometry
        As for :func:`IBIXLogic.forward_mapping`.
    max_jitter : float, optional
        The probes are jittered by +-H (input units); default 15 % of the input's robust range.
    sample : int
        Which sample (slice, for a 2D model on a volume) holds the probes.
    tolerance : float
        0: the largest distance at which the output changed; above 0, the radius holding all but this
        fraction of the response.

    Returns
    -------
    ResponseRadius
        In voxels (L-infinity distance); ``is_global`` when the response reaches across the sample.
    """
    checked = check_arguments(max_jitter=max_jitter, geometry=geometry, cancel=cancel)
    tolerance = check_number("tolerance", tolerance, 0.0, 1.0, high_open=True)
    prepared = model.prepare(x, geometry)
    sample = check_count("sample", sample, 0, len(prepared.samples) - 1)
    chosen = channel_indices(model.card, channels)
    jitter = resolve_max_jitter(prepared, checked["max_jitter"], chosen, 1)
    return response_radius(Perturber(model, prepared, np.array([-jitter, jitter]), chosen, cancel), sample,
                           tolerance)


def _probe_windows(perturber: Perturber, near: Sequence[int]) -> list[tuple[slice, ...]]:
    """Windows of PROBE_WINDOWS voxels a side around ``near`` (sample coordinates), for those at most half the
    size of the sample. Their origins are multiples of the card's stride and of 8 where possible, so that the
    probes meet the pooling phases they would meet in the whole sample. None for a model run in sliding windows
    (``input.patch``): a part of the sample is not run as the whole sample's windows are; none for a model of
    fixed input size, which would see a window padded to its size rather than the sample around it."""
    if perturber.patched or perturber.model.card.input.size:
        return []
    padded = np.asarray(perturber.model.pipeline.padded_shape(perturber.prepared.sample_shape))
    stride = perturber.model.card.input.multiple_of
    align = max(locality.tile_alignments(tuple(padded), stride, 8) or [stride])
    centre = np.asarray(near) + np.array([before for before, _ in perturber.pads])
    found = []
    for size in PROBE_WINDOWS:
        side = np.minimum(padded, -(-size // align) * align)
        if np.prod(side) * 2 > np.prod(padded):
            break
        origin = np.clip((centre - side // 2) // align * align, 0, (padded - side) // align * align)
        found.append(tuple(slice(int(o), int(o + n)) for o, n in zip(origin, side)))
    return found


def _probe(perturber: Perturber, sample: int, tolerance: float, window: tuple[slice, ...] | None, count: int,
           stages: dict, allow: Callable[[float, int], bool], at_least: int = 0) -> tuple[int, bool, int] | None:
    """(measured radius, global?, probes) from probes in ``window`` of the padded sample (None: the sample).

    Far-apart probes are perturbed together first where they fit (2 evaluations) and the radius, at least
    ``at_least`` voxels, cannot make their responses meet. Otherwise, or when their responses may meet, the first
    probe is perturbed alone (2 evaluations): a response that reaches across the window already says the response
    is global; only a local one needs the other probes, each on its own. ``stages`` holds what earlier calls
    measured in this window (stage -> (radius, global?)), is used instead of evaluating again, and receives what
    this call measures. Before each stage still to evaluate, ``allow(cost, at_least)`` is asked (cost in whole
    samples of model work; the radius is at least ``at_least`` voxels); None when it refused one.
    """
    pipeline, prepared = perturber.model.pipeline, perturber.prepared
    shape = prepared.sample_shape if window is None else tuple(w.stop - w.start for w in window)
    unit = pipeline.sample_voxels(prepared.sample_shape)
    if window is None:
        base_known = sample in perturber.base
        each = 1.0 if not perturber.patched else min(len(perturber.patches), 2 ** len(shape)) * count * int(
            np.prod(pipeline.model_shape(pipeline.card.input.patch.size))) / unit
    else:
        base_known = sample in perturber.padded_base or (sample, tuple((w.start, w.stop) for w in window)) \
            in perturber._window_base
        each = int(np.prod(pipeline.model_shape(shape))) / unit
    inputs: list = []

    def stage(name: str, cost: float, within: int, points: np.ndarray, together: bool) -> tuple[int, bool] | None:
        """The radius and globality of a stage: known, or measured now if allowed."""
        if name in stages:
            return stages[name]
        if not allow(cost + (0 if base_known or inputs else each), within):
            return None
        if not inputs:
            if window is None:
                perturber.base_outputs([sample])
                inputs.extend([prepared.samples[sample], perturber.base[sample]])
            else:
                inputs.extend([perturber.window_input(sample, window), perturber.window_base(sample, window)])
        directions = [np.zeros(shape, np.float32) for _ in range(1 if together else len(points))]
        for i, point in enumerate(points):
            directions[0 if together else i][tuple(point)] = 1.0
        responses = np.empty((len(directions),) + shape, np.float32)
        what = ((lambda i: f"{len(points)} probe voxels {spacing} apart") if together else
                (lambda i: f"probe voxel {tuple(int(p) for p in points[i])}"))
        for start, stop, response in perturber.responses(
                len(directions), lambda i: inputs[0], lambda i: directions[i], lambda i: inputs[1], what,
                np.array([0, len(perturber.jitters) - 1]), shape, sample_of=lambda i: sample):
            responses[start:stop] = response
        if together:
            responses = locality.split_by_nearest_probe(responses[0], points)
        stages[name] = locality.radius_from_responses(responses, points, tolerance)
        return stages[name]

    spacing = locality.probe_spacing(shape, count)
    if spacing >= 16 and (2 * (at_least + 1) < spacing or "together" in stages):
        points = locality.probe_points(shape, count, spacing)
        found = stage("together", 2 * each, at_least, points, True)
        if found is None:
            return None
        if 2 * (found[0] + 1) < spacing:  # no two responses can have met
            return found[0], found[1], len(points)
    points = locality.probe_points(shape, count)
    found = stage("first", 2 * each, at_least, points[:1], False)
    if found is None:
        return None
    measured, is_global = found
    if not is_global and len(points) > 1:
        rest = None
        if spacing >= 8 and (2 * (max(at_least, measured) + 1) < spacing or "rest together" in stages):
            # the first probe's response is small enough for the others to stand together on a grid
            rest = stage("rest together", 2 * each, max(at_least, measured),
                         locality.probe_points(shape, count, spacing)[1:], True)
            if rest is None:
                return None
            rest = rest if 2 * (rest[0] + 1) < spacing else None
        if rest is None:
            rest = stage("rest", 2 * (len(points) - 1) * each, max(at_least, measured), points[1:], False)
            if rest is None:
                return None
        measured = max(measured, rest[0])
        is_global = 2 * measured + 1 >= min(shape)
    return measured, is_global, len(points)


@dataclass
class ProbeBudget:
    """What measuring the response radius may cost a mapping, in model work (whole padded samples).

    A stage of probes (see :func:`_probe`) runs only when its cost keeps the probes within ``limit`` and is smaller
    than ``saving(r)``: the most the mapping could save with a radius of r voxels, r being what the probes so far
    showed the radius to be at least (0 before any). ``brute_force`` is the mapping's brute-force work, for the
    reasons given.
    """

    limit: float
    saving: Callable[[int], float]
    brute_force: float


#: Radius measurements made in this process: key (model file, card, channels, jitter, sample shape, tolerance) ->
#: {window shape or None (the sample): {stage: (measured, global?)}} (see :func:`_probe`). Most recent last.
_RADII: "OrderedDict[tuple, dict]" = OrderedDict()
_RADII_LOCK = threading.Lock()
#: Keys kept in the radius cache.
RADIUS_CACHE_SIZE = 64


def _radius_key(perturber: Perturber, tolerance: float) -> tuple | None:
    """What a measured radius belongs to: the model file, its resolved card, the jittered channels, the probe
    jitter as the model sees it (3 significant digits per channel) and the sample's shape; None when the model file
    cannot be read any more (nothing is then kept)."""
    model, prepared = perturber.model, perturber.prepared
    try:
        stat = model.path.stat()
    except OSError:
        return None
    card = dataclasses.asdict(model.card)
    for words in ("assumptions", "extra", "description", "name"):
        card.pop(words, None)
    jitter = float(np.abs(perturber.jitters).max())
    seen = tuple(float(f"{jitter * abs(float(s)):.3g}") if m else 0.0
                 for s, m in zip(prepared.scale, perturber.channel_mask))
    return (str(model.path.resolve()), stat.st_size, stat.st_mtime_ns, json.dumps(card, sort_keys=True, default=str),
            model.one_sample_per_call, seen, tuple(prepared.sample_shape), float(tolerance))


def forget_radii() -> int:
    """Empty the cache of measured response radii; return how many entries it held."""
    with _RADII_LOCK:
        count = len(_RADII)
        _RADII.clear()
    return count


def response_radius(perturber: Perturber, sample: int, tolerance: float, near: Sequence[int] | None = None,
                    budget: ProbeBudget | None = None) -> locality.ResponseRadius:
    """Response radius from single-voxel perturbations by the largest jitters +-H of ``perturber``.

    The probes are first perturbed together, far apart on a grid (2 evaluations), each voxel's response credited
    to the nearest probe. That is the single-probe answer unless some response reaches half-way to the next probe,
    where two responses could meet; then each probe is perturbed on its own (2 evaluations each), the first one
    first, whose response alone can show that the response is global.
    With ``near`` (a voxel of the sample) on a sample much larger than the PROBE_WINDOWS, the probes stand in
    a window around it, so that the whole sample is not evaluated; a response that reaches across a window is
    measured again in the next larger one, and last on the whole sample.
    Each step measured is kept for the process (see :func:`forget_radii`) and reused, at no cost, by the next
    mapping of the same model, card, channels, jitter and sample shape. With a ``budget``, a step that is not
    known yet is taken only when it can pay for itself; otherwise the radius is ``"skipped"`` (unknown) and says why.
    """
    model = perturber.model
    before = model.evaluations
    # A convolutional model's reach depends on a voxel's position modulo its stride. When the card's stride
    # divides 8, the probes meet every such position (windows start at multiples of it) and the largest reach
    # is measured, not guessed.
    stride = model.card.input.multiple_of
    every_phase = stride in (2, 4, 8)
    if perturber.patched:  # sliding windows that start off the stride's grid see the probes at other phases
        every_phase = every_phase and all(w.start % stride == 0 for patch in perturber.patches for w in patch)
    count = max(PROBES, stride) if every_phase else PROBES
    margin = 0 if every_phase else RADIUS_MARGIN
    key = _radius_key(perturber, tolerance)
    with _RADII_LOCK:
        known = {shape: dict(stages) for shape, stages in _RADII.get(key, {}).items()} if key else {}
    unit = model.pipeline.sample_voxels(perturber.prepared.sample_shape)
    start, at_least, used, refused = model.evaluated_voxels, 0, set(), []
    for window in ([] if near is None else _probe_windows(perturber, near)) + [None]:
        shape = None if window is None else tuple(w.stop - w.start for w in window)

        def allow(cost: float, within: int) -> bool:
            """Whether the next probes may run: within the budget, and cheaper than what they could save."""
            if budget is None:
                return True
            lower = max(at_least, within)
            saving, spent = budget.saving(lower), (model.evaluated_voxels - start) / unit
            if spent + cost <= budget.limit and cost < saving:
                return True
            where = "the whole sample" if shape is None else f"a {'x'.join(map(str, shape))}-voxel window"
            after = "" if not lower else f" (the radius is at least {lower} voxels)"
            if cost >= saving:
                why = f"more than it could save (at most {max(saving, 0.0):.2f})"
            else:
                why = (f"above the {budget.limit:.2f} allowed ({100 * PROBE_SHARE:.0f} % of brute force's "
                       f"{budget.brute_force:.4g}) with the {spent:.2f} spent")
            refused.append((lower, f"probes in {where}{after} would cost {cost:.2f} samples of model work, {why}"))
            return False

        stages = known.setdefault(shape, {})
        evaluated = model.evaluated_voxels
        probed = _probe(perturber, sample, tolerance, window, count, stages, allow, at_least)
        used.add("measured" if model.evaluated_voxels > evaluated else "cached")
        if key is not None:
            with _RADII_LOCK:
                _RADII.setdefault(key, {})[shape] = stages
                _RADII.move_to_end(key)
                while len(_RADII) > RADIUS_CACHE_SIZE:
                    _RADII.popitem(last=False)
        if probed is None:
            lower, why = refused[-1]
            return locality.ResponseRadius(lower, margin, False, tolerance, 0, model.evaluations - before, shape,
                                           "skipped", why)
        measured, is_global, probes = probed
        if not is_global:
            break
        at_least = max(at_least, measured)
    source = "measured, partly cached" if len(used) > 1 else used.pop()
    return locality.ResponseRadius(measured, margin, is_global, tolerance, probes, model.evaluations - before,
                                   shape, source)
