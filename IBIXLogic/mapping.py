"""Forward and backward mappings (IBIX, Espadoto et al., sections 3.2-3.3 and 4.1.2).

Forward:  F(M) = 1/(2N) * sum_{k=-N..N, k!=0} (f(x + h_k M) - f(x)) / h_k,   h_k = k H / N.
Backward: B_k = sum_{i in M^f} |F(D_k)_i| / sum_i |F(D_k)_i|   ("fraction"), or the numerator scaled to a
          maximum of 1 ("magnitude"), for blocks D_k that tile the input.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from . import locality, windows
from .blocks import DEFAULT_COMPACTNESS, grid_blocks, superpixel_blocks
from .errors import InputError, ModelError
from .geometry import Geometry
from .runner import Model, PreparedInput, ProgressCallback, check_cancel

#: Default maximum jitter H as a fraction of the input's robust range (1st to 99th percentile).
DEFAULT_JITTER_FRACTION = 0.15
#: Probe voxels the response radius is measured at, at least.
PROBES = 5
#: Voxels added to the measured response radius when the probes may have missed a pooling phase of the model.
RADIUS_MARGIN = 2
METHODS = ("auto", "local", "batched", "brute")
NORMALIZATIONS = ("fraction", "magnitude")


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


@dataclass
class ForwardResult:
    """A forward mapping F on the output grid."""

    signed: np.ndarray
    normalized: np.ndarray
    geometry: Geometry
    parameters: dict
    evaluations: int
    seconds: float
    device: str
    units: str

    def to_dict(self) -> dict:
        return {"mapping": "forward", "parameters": self.parameters, "evaluations": self.evaluations,
                "seconds": round(self.seconds, 4), "device": self.device, "units": self.units,
                "max_abs": float(np.abs(self.signed).max()), "geometry": self.geometry.to_dict()}


@dataclass
class BackwardResult:
    """A backward mapping B on the input grid.

    ``evaluations`` counts inputs run through the model (whole samples, or tiles of them);
    ``equivalent_evaluations`` counts the voxels run through the model in units of one whole (padded) sample,
    the measure of work that compares with brute force; ``tiling`` says whether tiles were used.
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

    def to_dict(self) -> dict:
        return {"mapping": "backward", "parameters": self.parameters, "evaluations": self.evaluations,
                "evaluations_per_level": self.evaluations_per_level, "blocks_per_level": self.blocks_per_level,
                "equivalent_evaluations": round(self.equivalent_evaluations, 1),
                "blocks": int(self.labels.max()), "seconds": round(self.seconds, 4), "device": self.device,
                "response_radius": self.radius, "tiling": self.tiling, "geometry": self.geometry.to_dict()}


# -- checks -----------------------------------------------------------------------------------------------
def _check_count(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{name} must be an integer of at least {minimum}, got {value!r}")
    return int(value)


def _check_mask(mask: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise InputError(f"the {what} has shape {mask.shape} but the volume has shape {tuple(shape)}; "
                         "resample the mask onto the volume's grid (IBIXLogic.read_mask(..., reference=...))")
    if mask.dtype != bool:
        if not np.all(np.isfinite(mask)):
            raise InputError(f"the {what} contains NaN or infinite values")
        mask = mask != 0
    if not mask.any():
        raise InputError(f"the {what} is empty: paint at least one voxel")
    return mask


def _channel_indices(model: Model, channels: Any) -> list[int]:
    names = list(model.card.input.channels)
    if channels is None:
        return list(range(len(names)))
    chosen = [channels] if isinstance(channels, (str, int, np.integer)) else list(channels)
    indices = []
    for c in chosen:
        if isinstance(c, str):
            if c not in names:
                raise InputError(f"unknown channel {c!r}; the model's channels are {names}")
            indices.append(names.index(c))
        elif isinstance(c, (int, np.integer)) and 0 <= c < len(names):
            indices.append(int(c))
        else:
            raise InputError(f"channel {c!r} does not exist; the model's channels are {names} (0..{len(names) - 1})")
    if not indices:
        raise InputError(f"no channel selected; choose among {names}")
    return sorted(set(indices))


def _max_jitter(prepared: PreparedInput, max_jitter: Any, channels: list[int]) -> float:
    if max_jitter is None:
        spread = robust_range(prepared.samples[:, channels])
        if not spread > 0:
            raise InputError("the input's 1st and 99th percentiles are equal, so the default maximum jitter "
                             "(15 % of that range) is 0; give max_jitter explicitly (input units)")
        return DEFAULT_JITTER_FRACTION * spread
    if isinstance(max_jitter, bool) or not isinstance(max_jitter, (int, float, np.number)) \
            or not np.isfinite(max_jitter) or max_jitter <= 0:
        raise InputError(f"max_jitter (H) must be a positive number in input units, got {max_jitter!r}")
    return float(max_jitter)


# -- perturbation engine ----------------------------------------------------------------------------------
class _Perturber:
    """Runs jittered copies of samples (or of tiles of them) through the model and sums difference quotients."""

    def __init__(self, model: Model, prepared: PreparedInput, jitters: np.ndarray, channels: list[int],
                 cancel: Any, one_item_per_batch: bool = False):
        self.model, self.prepared, self.cancel = model, prepared, cancel
        self.one_item_per_batch = one_item_per_batch
        self.jitters = jitters.astype(np.float32)
        self.channel_mask = np.zeros(prepared.samples.shape[1], np.float32)
        self.channel_mask[channels] = 1.0
        #: where the sample lies inside the padded sample the model sees
        self.pads = model.padding(prepared.sample_shape)
        self.crop = tuple(slice(before, before + n) for (before, _), n in zip(self.pads, prepared.sample_shape))
        self.base: dict[int, np.ndarray] = {}
        self.padded_base: dict[int, np.ndarray] = {}
        self._padded_input: dict[int, np.ndarray] = {}
        #: sliding windows (``input.patch``): the windows of a padded sample, their blending weights and sum, and
        #: each evaluated sample's unperturbed window outputs, reused for the windows a perturbation leaves alone
        self.windowed = model.card.input.patch is not None
        if self.windowed:
            padded_shape = model._padded_shape(prepared.sample_shape)
            self.plan = model.windows(prepared.sample_shape)
            self.weights = model.importance_map()
            self.weight_sum = windows.weight_sum(self.plan, padded_shape, self.weights)
            self.window_base: dict[int, np.ndarray] = {}
            #: window evaluations a brute-force run of the whole windowed pipeline would have made
            self.brute_force_windows = 0

    def padded_input(self, sample: int) -> np.ndarray:
        """The sample in input units, padded as the model sees it (channels, *padded_shape)."""
        if sample not in self._padded_input:
            self._padded_input[sample] = pad_input_units(self.model, self.prepared, self.prepared.samples[sample],
                                                         self.pads)
        return self._padded_input[sample]

    def base_outputs(self, samples: Sequence[int]) -> None:
        """Evaluate the unperturbed samples not evaluated yet (kept padded, for tiles, and cropped)."""
        missing = [int(s) for s in samples if int(s) not in self.base]
        if not missing:
            return
        if self.windowed:
            for s in missing:
                check_cancel(self.cancel)
                padded = self.model_input(s)
                self.window_base[s] = self.model.run_windows(
                    np.stack([padded[(slice(None),) + w] for w in self.plan]),
                    lambda j, s=s: f"the unperturbed input (sample {s}, window {j + 1})")
                self.padded_base[s] = windows.blend(self.window_base[s], self.plan, padded.shape[1:], self.weights)
                self.base[s] = self.padded_base[s][self.crop]
                self.brute_force_windows += len(self.plan)
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

    def model_input(self, sample: int, direction: np.ndarray | None = None, jitter: float = 0.0) -> np.ndarray:
        """Sample ``sample`` jittered by ``jitter`` along ``direction`` on the selected channels, as the model sees
        it: in model units, padded as the card says (channels, *padded_shape)."""
        x = self.prepared.samples[sample][None].copy()
        if direction is not None:
            x += (jitter * self.channel_mask).reshape((1, -1) + (1,) * direction.ndim) * direction
        return self.model.pad(self.prepared.normalize(x), self.pads)[0]

    def responses(self, n_items: int, input_of: Callable[[int], np.ndarray],
                  direction_of: Callable[[int], np.ndarray], base_of: Callable[[int], np.ndarray],
                  what: Callable[[int], str], subset: np.ndarray | None = None,
                  shape: tuple[int, ...] | None = None, sample_of: Callable[[int], int] | None = None
                  ) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield (start, stop, S) for items start..stop-1, S = sum over the jitters of (f(x + h d) - f(x)) / h.

        Item i perturbs the input ``input_of(i)`` (channels, *shape; input units) along ``direction_of(i)`` (a 0/1
        map) on the selected channels, against the unperturbed output ``base_of(i)``; ``subset`` picks jitters
        (indices into ``self.jitters``, default all). Divide S by the jitter count of the grid to get F.
        With sliding windows, items perturb whole samples (``sample_of(i)``) and only the windows a perturbation
        touches are evaluated again (see :meth:`window_responses`).
        """
        if self.windowed:
            yield from self.window_responses(n_items, sample_of, direction_of, what, subset)
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

        for start, stop, out in self.model.run_chunked(make_batch, n_items, self.prepared, describe,
                                                       per_item=n_jitters, cancel=self.cancel,
                                                       max_items=1 if self.one_item_per_batch else None,
                                                       sample_shape=shape):
            out = out.reshape((stop - start, n_jitters, -1))
            for j, item in enumerate(range(start, stop)):
                out[j] -= base_of(item).reshape(1, -1)
            sums = np.einsum("mkp,k->mp", out, weights)
            yield start, stop, sums.reshape((stop - start,) + shape)

    def window_responses(self, n_items: int, sample_of: Callable[[int], int],
                         direction_of: Callable[[int], np.ndarray], what: Callable[[int], str],
                         subset: np.ndarray | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """:meth:`responses` of a model run in sliding windows, one item at a time.

        The blended output is sum_w g o_w / sum_w g (g: the importance map), so a perturbation changes it by
        sum_{w in T} g (o_w(x + h d) - o_w(x)) / sum_w g, T the windows that hold a perturbed voxel of the padded
        sample: only those are evaluated, against the unperturbed window outputs evaluated once per sample.
        """
        jitters = self.jitters if subset is None else self.jitters[subset]
        for i in range(n_items):
            check_cancel(self.cancel)
            sample = sample_of(i)
            self.base_outputs([sample])
            direction = direction_of(i).astype(np.float32)
            touched = windows.touched_windows(self.plan, self.model.pad(direction, self.pads, direction=True) != 0)
            total = np.zeros(self.weight_sum.shape, np.float64)
            for h in jitters:
                padded = self.model_input(sample, direction, h)
                out = self.model.run_windows(
                    np.stack([padded[(slice(None),) + self.plan[t]] for t in touched]),
                    lambda j, h=h: f"{what(i)} with jitter h = {h:.6g} (window {touched[j] + 1})")
                for t, window_out in zip(touched, out):
                    total[self.plan[t]] += self.weights * (window_out - self.window_base[sample][t]) / float(h)
            self.brute_force_windows += len(jitters) * len(self.plan)
            yield i, i + 1, (total / self.weight_sum)[self.crop][None].astype(np.float32)

    def window_summary(self, evaluations: int) -> dict | None:
        """Window evaluations made (``evaluations``) against a brute-force run; None without sliding windows."""
        if not self.windowed:
            return None
        return {"windows_per_sample": len(self.plan), "window_evaluations": int(evaluations),
                "brute_force_window_evaluations": int(self.brute_force_windows)}

    def sample_responses(self, samples: Sequence[int], direction_of: Callable[[int], np.ndarray],
                         what: Callable[[int], str], subset: np.ndarray | None = None):
        """:meth:`responses` for items that perturb whole samples: item i perturbs sample ``samples[i]``."""
        return self.responses(len(samples), lambda i: self.prepared.samples[samples[i]], direction_of,
                              lambda i: self.base[samples[i]], what, subset, sample_of=lambda i: int(samples[i]))


def pad_input_units(model: Model, prepared: PreparedInput, sample: np.ndarray,
                    widths: Sequence[tuple[int, int]]) -> np.ndarray:
    """A sample (channels, *shape) in input units padded as the model pads it in model units: a constant padding
    value is taken back to input units per channel (exact unless the card's clipping would change it)."""
    padding = model.card.input.padding
    if padding.mode != "constant":
        return model.pad(sample, widths)
    padded = np.empty((sample.shape[0],) + tuple(n + a + b for n, (a, b) in zip(sample.shape[1:], widths)),
                      sample.dtype)
    for c in range(sample.shape[0]):
        value = (padding.value - prepared.offset[c]) / prepared.scale[c]
        padded[c] = np.pad(sample[c], widths, mode="constant", constant_values=value)
    return padded


def _report(progress: ProgressCallback | None, done: int, total: int, message: str) -> None:
    if progress is not None:
        progress(done, total, message)


# -- forward ----------------------------------------------------------------------------------------------
def forward_mapping(model: Model, x: Any, mask: Any, n_jitters: int = 8, max_jitter: float | None = None,
                    channels: Any = None, geometry: Geometry | None = None, progressive: bool = False,
                    preview: Callable[[np.ndarray, int], None] | None = None, tolerance: float | None = None,
                    progress: ProgressCallback | None = None, cancel: Any = None) -> ForwardResult:
    """Forward mapping F(M^x): how the output reacts to jittering the masked input voxels.

    Parameters
    ----------
    model : Model
        From :func:`IBIXLogic.load_model`.
    x : ndarray or sequence of ndarray
        The input (input units): one array for a single-channel model, else one per card channel.
    mask : ndarray of bool
        The input voxels M^x to jitter, same shape as the input.
    n_jitters : int
        N: the jitters are h_k = k H / N for k = -N..N, k != 0 (2N model evaluations per sample).
    max_jitter : float, optional
        H in input units; default 15 % of the input's 1st-99th percentile range.
    channels : str, int or sequence, optional
        Input channels the mask jitters (names or indices); default all.
    geometry : Geometry, optional
        Geometry of the input volume; resolves a 2D model's slice axis and is carried by the result.
    progressive : bool
        Evaluate nested jitter grids (N = 1, 2, 4, ... up to n_jitters, each reusing every earlier evaluation)
        and call ``preview(normalized_map, N)`` after each level but the last.
    tolerance : float, optional
        With ``progressive``, stop once a level changes F by less than this fraction of max |F|.

    Returns
    -------
    ForwardResult
        ``signed`` F (output units per input unit) and ``normalized`` |F| / max |F| on the output grid.
        A 2D model on a volume is run only on the slices the mask touches; F is 0 elsewhere.
    """
    started = time.perf_counter()
    n_jitters = _check_count("n_jitters (N)", n_jitters)
    evaluations_before = model.evaluations
    prepared = model.prepare(x, geometry)
    mask = _check_mask(mask, prepared.volume_shape, "input mask")
    channel_list = _channel_indices(model, channels)
    h_max = _max_jitter(prepared, max_jitter, channel_list)
    perturber = _Perturber(model, prepared, jitter_levels(n_jitters, h_max), channel_list, cancel)
    mask_samples = prepared.to_samples(mask)
    touched = np.flatnonzero(mask_samples.reshape(len(mask_samples), -1).any(axis=1))
    perturber.base_outputs(touched)

    def on_output_grid(touched_values: np.ndarray) -> np.ndarray:
        """A map on the touched samples, placed on the whole output grid (0 on the other samples)."""
        values = np.zeros((len(mask_samples),) + prepared.sample_shape, np.float32)
        values[touched] = touched_values
        return prepared.from_samples(values)

    # F is 0 on samples the mask does not touch, so it is computed on the touched ones only
    sums = np.zeros((len(touched),) + prepared.sample_shape, np.float32)
    schedule = jitter_schedule(n_jitters, progressive)
    previous, used = None, 0
    for level, (n_level, subset) in enumerate(schedule):
        for start, stop, chunk in perturber.sample_responses(
                touched, lambda i: mask_samples[touched[i]],
                lambda i: f"the input mask perturbed in sample {touched[i]}", subset):
            sums[start:stop] += chunk
            _report(progress, stop, len(touched), f"forward mapping, N = {n_level}")
        used = n_level
        level_map = sums / (2 * n_level)
        magnitude = np.abs(level_map)
        peak = float(magnitude.max())
        last = level == len(schedule) - 1
        change = None if previous is None else float(np.abs(level_map - previous).max()) / max(peak, 1e-30)
        stop_early = change is not None and tolerance is not None and change < tolerance
        if preview is not None and not (last or stop_early):
            preview(on_output_grid(magnitude / peak if peak > 0 else 0.0), n_level)
        if stop_early:
            break
        previous = level_map
    signed = on_output_grid(level_map)
    normalized = on_output_grid(magnitude / peak if peak > 0 else 0.0)
    units = model.card.output.units
    return ForwardResult(
        signed=signed, normalized=normalized, geometry=prepared.geometry,
        parameters={"n_jitters": n_jitters, "n_jitters_used": used, "max_jitter": h_max,
                    "progressive": progressive, "tolerance": tolerance,
                    "channels": [model.card.input.channels[c] for c in channel_list],
                    "mask_voxels": int(mask.sum()), "samples": int(len(touched)), "model": model.path.name,
                    "windows": perturber.window_summary(model.evaluations - evaluations_before)},
        evaluations=model.evaluations - evaluations_before, seconds=time.perf_counter() - started,
        device=model.device, units=f"{units or 'output units'} per input unit")


# -- backward ---------------------------------------------------------------------------------------------
def measure_response_radius(model: Model, prepared: PreparedInput, sample: int, jitter: float,
                            channels: list[int], tolerance: float = 0.0, cancel: Any = None
                            ) -> locality.ResponseRadius:
    """Response radius of the model around probe voxels of one sample, jittered by +-``jitter``: the probes are
    perturbed together, far apart (2 evaluations), or one by one (2 each) where their responses could meet."""
    perturber = _Perturber(model, prepared, np.array([-jitter, jitter]), channels, cancel)
    return _measure_radius(perturber, sample, tolerance)


def _measure_radius(perturber: _Perturber, sample: int, tolerance: float) -> locality.ResponseRadius:
    """Response radius from single-voxel perturbations by the largest jitters +-H of ``perturber``.

    The probes are first perturbed together, far apart on a grid (2 evaluations), each voxel's response credited
    to the nearest probe. That is the single-probe answer unless some response reaches half-way to the next probe,
    where two responses could meet; then each probe is perturbed on its own (2 evaluations each).
    """
    model, shape = perturber.model, perturber.prepared.sample_shape
    before = model.evaluations
    # A convolutional model's reach depends on a voxel's position modulo its stride. When the card's stride
    # divides 8, the probes meet every such position and the largest reach is measured, not guessed.
    stride = model.card.input.multiple_of
    every_phase = stride in (2, 4, 8)
    if perturber.windowed:  # windows that start off the stride's grid see the probes at other phases
        every_phase = every_phase and all(w.start % stride == 0 for window in perturber.plan for w in window)
    count = max(PROBES, stride) if every_phase else PROBES
    perturber.base_outputs([sample])
    largest = np.array([0, len(perturber.jitters) - 1])

    def responses_to(directions: list[np.ndarray], what: Callable[[int], str]) -> np.ndarray:
        out = np.empty((len(directions),) + shape, np.float32)
        for start, stop, response in perturber.sample_responses([sample] * len(directions), lambda i: directions[i],
                                                                what, largest):
            out[start:stop] = response
        return out

    def probes(points: np.ndarray) -> np.ndarray:
        marked = np.zeros(shape, np.float32)
        marked[tuple(points.T)] = 1.0
        return marked

    spacing = locality.probe_spacing(shape, count)
    measured = None
    if spacing >= 16:
        points = locality.probe_points(shape, count, spacing)
        together = responses_to([probes(points)], lambda i: f"{len(points)} probe voxels {spacing} apart")[0]
        measured, is_global = locality.radius_from_responses(locality.split_by_nearest_probe(together, points),
                                                             points, tolerance)
        if 2 * (measured + 1) >= spacing:  # responses may meet: measure each probe on its own
            measured = None
    if measured is None:
        points = locality.probe_points(shape, count)
        separate = responses_to([probes(points[i:i + 1]) for i in range(len(points))],
                                lambda i: f"probe voxel {tuple(points[i])}")
        measured, is_global = locality.radius_from_responses(separate, points, tolerance)
    return locality.ResponseRadius(measured, 0 if every_phase else RADIUS_MARGIN, is_global, tolerance,
                                   len(points), model.evaluations - before)


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
    """

    def __init__(self, perturber: _Perturber, out_samples: np.ndarray, radius: int | None,
                 schedule: list[tuple[int, np.ndarray]], progress: ProgressCallback | None, tiles: bool = True):
        self.perturber, self.out_samples = perturber, out_samples
        self.radius, self.schedule, self.progress = radius, schedule, progress
        card_input = perturber.model.card.input
        self.tiles = tiles and radius is not None and not card_input.size and card_input.patch is None
        self.tiling: dict | None = None  # how the last compute() ran, for the result's summary

    def _groups(self, label_samples: np.ndarray, ids: np.ndarray) -> tuple[list[_Item], np.ndarray]:
        """Groups of blocks perturbed together (whole-sample items), and the blocks that need evaluating."""
        occupied = label_samples.reshape(len(label_samples), -1).any(axis=1)  # most slices of a volume hold none
        present = [np.intersect1d(np.unique(label_samples[s]), ids) if occupied[s] else ids[:0]
                   for s in range(len(label_samples))]
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
                groups.extend(_Item(s, g) for g in locality.disjoint_groups(label_samples[s], blocks, self.radius))
            else:
                groups.extend(_Item(s, blocks[i:i + 1]) for i in range(len(blocks)))
        return groups, wanted

    def _tiles(self, label_samples: np.ndarray, groups: list[_Item]) -> list[_Item] | None:
        """Windowed items holding the groups' blocks, when they run fewer voxels than whole samples.

        Tiles start at multiples of the model's stride, which a black box does not state: the candidates are the
        card's ``multiple_of`` and its doublings that divide the padded sample; the smallest one at which tiles
        reproduce the whole-sample output is used (checked on the unperturbed input, 2 tile evaluations each).
        """
        perturber = self.perturber
        padded_shape = perturber.padded_input(groups[0].sample).shape[1:]
        offset = tuple(p[0] for p in perturber.pads)
        starts = np.cumsum([0] + [len(g.blocks) for g in groups])
        rows = [np.arange(a, b) for a, b in zip(starts[:-1], starts[1:])]  # each group's rows of low/high
        low = np.zeros((starts[-1], label_samples.ndim - 1), np.int64)
        high = low.copy()
        for s in {g.sample for g in groups}:  # one pass over each sample's labels
            members = [i for i, g in enumerate(groups) if g.sample == s]
            at = np.concatenate([rows[i] for i in members])
            low[at], high[at] = locality.block_boxes(label_samples[s],
                                                     np.concatenate([groups[i].blocks for i in members]))
        owner = np.concatenate([[i] * len(g.blocks) for i, g in enumerate(groups)])
        all_blocks = np.concatenate([g.blocks for g in groups])
        for align in locality.tile_alignments(padded_shape, perturber.model.card.input.multiple_of):
            tiles = locality.plan_tiles(low, high, rows, self.radius, padded_shape, offset, align)
            voxels = sum(int(np.prod(t.shape)) for t in tiles)
            if voxels >= 0.8 * len(groups) * np.prod(padded_shape):
                self.tiling = {"tiles": False, "reason": "tiles would not run fewer voxels"}
                return None
            if self._tiles_reproduce_the_model(groups[0].sample, tiles[0].shape, align):
                items = [_Item(groups[owner[t.members[0]]].sample, all_blocks[list(t.members)], t.window)
                         for t in tiles]
                self.tiling = {"tiles": True, "alignment": align, "items": len(items), "blocks": int(len(low)),
                               "voxels_per_sample": round(float(voxels / np.prod(padded_shape)), 2)}
                return items
        self.tiling = {"tiles": False, "reason": "tiles do not reproduce the model's output at any alignment"}
        return None

    def _tiles_reproduce_the_model(self, sample: int, shape: tuple[int, ...], align: int) -> bool:
        """Whether tiles of ``shape`` starting at multiples of ``align`` reproduce the whole sample's output.

        Checked at the tile origins (align, align, ...) and at the far corner, away from tile borders that are
        not the sample's (within the response radius of such a border the tile lacks context).
        """
        perturber = self.perturber
        padded = perturber.padded_input(sample)
        base = perturber.padded_base[sample]
        spatial = padded.shape[1:]
        origins = {tuple(min(align, p - n) for p, n in zip(spatial, shape)),
                   tuple(p - n for p, n in zip(spatial, shape))}
        for origin in sorted(origins):
            window = tuple(slice(o, o + n) for o, n in zip(origin, shape))
            try:
                out = perturber.model.run(padded[(slice(None),) + window][None].copy(), perturber.prepared)[0]
            except ModelError:
                return False
            interior = tuple(slice(0 if o == 0 else self.radius, n if o + n == p else n - self.radius)
                             for o, n, p in zip(origin, shape, spatial))
            expected = base[window][interior]
            if expected.size == 0:
                continue
            if np.abs(out[interior] - expected).max() > 1e-4 * (np.abs(expected).max() + 1e-12) + 1e-7:
                return False
        return True

    def compute(self, label_samples: np.ndarray, ids: np.ndarray,
                on_level: Callable[[np.ndarray, np.ndarray, int], bool] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """Numerator and denominator of B for the blocks ``ids`` (labels on the samples)."""
        size = int(label_samples.max()) + 1
        numerator, denominator = np.zeros(size), np.zeros(size)
        groups, wanted = self._groups(label_samples, ids)
        if not groups:
            return numerator, denominator
        perturber = self.perturber
        perturber.base_outputs(sorted({g.sample for g in groups}))
        items = self._tiles(label_samples, groups) if self.tiles else None
        if items is None:
            items = groups
            if self.radius is not None:
                self.tiling = dict(self.tiling or {"tiles": False}, groups=len(groups))
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
        padded_labels = {s: perturber.model.pad(label_samples[s], perturber.pads, direction=True)
                         for s in {i.sample for i in items}}
        inside = np.zeros(perturber.padded_input(items[0].sample).shape[1:], bool)
        inside[perturber.crop] = True
        padded_out = {s: np.pad(self.out_samples[s], perturber.pads) for s in padded_labels}
        member = np.zeros(size, bool)

        def direction(item: _Item) -> np.ndarray:
            member[:] = False
            member[item.blocks] = True
            if item.window is None:
                return member[label_samples[item.sample]]
            return member[padded_labels[item.sample][item.window]]

        def input_of(item: _Item) -> np.ndarray:
            if item.window is None:
                return perturber.prepared.samples[item.sample]
            return perturber.padded_input(item.sample)[(slice(None),) + item.window]

        def base_of(item: _Item) -> np.ndarray:
            if item.window is None:
                return perturber.base[item.sample]
            return perturber.padded_base[item.sample][item.window]

        regions: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}  # per tile, reused across jitter levels

        def add_sums(index: int, magnitude: np.ndarray) -> None:
            """Each block's response, read where it can be nonzero (where it is nearer than the others)."""
            item = items[index]
            if item.window is None:
                owner = locality.owner_labels(label_samples[item.sample], item.blocks).ravel()
                weights = magnitude.ravel()
                inside_mask = self.out_samples[item.sample].ravel()
                denominator[:] += np.bincount(owner, weights, minlength=size)[:size]
                numerator[:] += np.bincount(owner[inside_mask], weights[inside_mask], minlength=size)[:size]
                return
            if index not in regions:
                inner = inside[item.window]
                labels = padded_labels[item.sample][item.window]
                out = padded_out[item.sample][item.window]
                regions[index] = []
                for block in item.blocks:
                    region = locality.footprint((labels == block) & inner, self.radius) & inner
                    regions[index].append((block, region, region & out))
            for block, region, region_in_mask in regions[index]:
                denominator[block] += magnitude[region].sum()
                numerator[block] += magnitude[region_in_mask].sum()

        for n_level, subset in self.schedule:
            numerator[:], denominator[:] = 0.0, 0.0
            done = 0
            for shape, indices in shapes.items():
                chosen = [items[i] for i in indices]
                runs = perturber.responses(
                    len(chosen), lambda j: input_of(chosen[j]), lambda j: direction(chosen[j]),
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
                    _report(self.progress, done + stop, len(items), f"backward mapping, N = {n_level}")
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
                  kind: str, masks: np.ndarray | None = None) -> np.ndarray:
    """Labels (unique across samples) of ``kind`` blocks on the given samples; 0 elsewhere.

    ``n_blocks`` is a density: blocks per whole sample. Inside ``masks`` (the regions to refine) the region gets
    its share, so that its blocks have the size they would have if the whole sample were cut into n_blocks.
    """
    labels = np.zeros((len(prepared.samples),) + prepared.sample_shape, np.int32)
    offset = 0
    for s in samples:
        region = None if masks is None else masks[s]
        if region is not None and not region.any():
            continue
        if kind == "grid":
            sample_labels = grid_blocks(prepared.sample_shape, n_blocks, prepared.sample_spacing, region)
        else:
            share = n_blocks if region is None else max(1, round(n_blocks * region.mean()))
            sample_labels = superpixel_blocks(prepared.samples[s], share, compactness,
                                              prepared.sample_spacing, region, channel_axis=0)
        labels[s] = np.where(sample_labels > 0, sample_labels + offset, 0)
        offset = int(labels[s].max(initial=offset))
    return labels


def backward_mapping(model: Model, x: Any, out_mask: Any, n_blocks: int = 500,
                     compactness: float = DEFAULT_COMPACTNESS,
                     n_jitters: int = 4, max_jitter: float | None = None, channels: Any = None,
                     blocks: Any = "slic", normalization: str = "fraction",
                     coarse_blocks: int | Sequence[int] | None = None, refine_threshold: float = 0.25,
                     method: str = "auto", locality_tolerance: float = 0.0, geometry: Geometry | None = None,
                     tiles: bool = True, progressive: bool = False,
                     preview: Callable[[np.ndarray, int], None] | None = None, tolerance: float | None = None,
                     progress: ProgressCallback | None = None, cancel: Any = None) -> BackwardResult:
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

    Returns
    -------
    BackwardResult
        B per block, B painted on the input grid, the block labels and evaluation counts per level.
        A 2D model on a volume is explained on the slices M^f touches; B is 0 elsewhere.
    """
    started = time.perf_counter()
    n_blocks = _check_count("n_blocks (K)", n_blocks)
    n_jitters = _check_count("n_jitters (N)", n_jitters)
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    if normalization not in NORMALIZATIONS:
        raise InputError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if not 0 <= refine_threshold <= 1:
        raise InputError(f"refine_threshold must lie in [0, 1], got {refine_threshold!r}")
    if not 0 <= locality_tolerance < 1:
        raise InputError(f"locality_tolerance must lie in [0, 1), got {locality_tolerance!r}")
    levels = [] if coarse_blocks is None else [coarse_blocks] if np.isscalar(coarse_blocks) else list(coarse_blocks)
    levels = [_check_count("coarse_blocks", k) for k in levels] + [n_blocks]
    if any(b >= a for a, b in zip(levels[1:], levels)):
        raise InputError(f"coarse_blocks must increase and stay below n_blocks: {levels}")
    before, voxels_before = model.evaluations, model.evaluated_voxels
    prepared = model.prepare(x, geometry)
    out_mask = _check_mask(out_mask, prepared.volume_shape, "output mask")
    channel_list = _channel_indices(model, channels)
    h_max = _max_jitter(prepared, max_jitter, channel_list)
    out_samples = prepared.to_samples(out_mask)
    touched = np.flatnonzero(out_samples.reshape(len(out_samples), -1).any(axis=1))
    custom = not isinstance(blocks, str)
    if custom:
        if len(levels) > 1:
            raise InputError("coarse-to-fine needs generated blocks ('slic' or 'grid'), not a label image")
        given = np.asarray(blocks)
        if given.shape != prepared.volume_shape or not np.issubdtype(given.dtype, np.integer):
            raise InputError(f"a block label image must be integer with the input's shape {prepared.volume_shape}, "
                             f"got {given.dtype} {given.shape}")
        if given.min() < 0 or given.max() < 1:
            raise InputError("block labels must be >= 0 with at least one block (label >= 1)")
    elif blocks not in ("slic", "grid"):
        raise InputError(f"blocks must be 'slic', 'grid' or a label image, got {blocks!r}")

    radius_info = None
    radius = None
    perturber = _Perturber(model, prepared, jitter_levels(n_jitters, h_max), channel_list, cancel,
                           one_item_per_batch=method == "brute")
    if method in ("auto", "local"):
        radius_info = _measure_radius(perturber, int(touched[0]), locality_tolerance)
        if radius_info.is_global and method == "local":
            raise InputError("the model's response is global (it reaches across the whole input), so the local "
                             "method cannot be exact; use method 'batched' or a locality_tolerance above 0")
        radius = radius_info.radius
    schedule = jitter_schedule(n_jitters, progressive)
    sums = _BlockSums(perturber, out_samples, radius, schedule, progress, tiles=tiles)
    evaluations_per_level, blocks_per_level = [], []
    if custom:
        levels = [n_blocks]
    state = {"numerator": np.zeros(1), "denominator": np.zeros(1), "values": np.zeros(1), "labels": None,
             "jitters_used": n_jitters}

    def merge(level_numerator: np.ndarray, level_denominator: np.ndarray,
              new_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """B for every current block, with the new blocks' sums replacing those of the blocks they refine."""
        size = len(level_numerator)
        numerator = np.zeros(size)
        denominator = np.zeros(size)
        kept = min(size, len(state["numerator"]))
        numerator[:kept], denominator[:kept] = state["numerator"][:kept], state["denominator"][:kept]
        numerator[new_ids], denominator[new_ids] = level_numerator[new_ids], level_denominator[new_ids]
        # blocks of untouched samples were never evaluated, so their sums are 0 whether present or not
        present = np.bincount(state["labels"][touched].ravel(), minlength=size)[:size] > 0
        numerator[~present], denominator[~present] = 0.0, 0.0
        return numerator, denominator, _normalize_blocks(numerator, denominator, normalization)

    for level, k in enumerate(levels):
        check_cancel(cancel)
        level_start = model.evaluations
        current = state["labels"]
        if custom:
            current = np.ascontiguousarray(prepared.to_samples(np.asarray(blocks).astype(np.int32)))
            new_ids = np.flatnonzero(np.bincount(current.ravel())[1:]) + 1
        elif level == 0:
            current = _block_labels(prepared, touched, k, compactness, blocks)
            new_ids = np.flatnonzero(np.bincount(current.ravel())[1:]) + 1
        else:
            values = state["values"]
            refine = np.flatnonzero(values >= refine_threshold * values.max()) if values.max() > 0 else []
            fine = _block_labels(prepared, touched, k, compactness, blocks, np.isin(current, refine))
            top = int(current.max())
            current = np.where(fine > 0, fine + top, current).astype(np.int32)
            new_ids = np.unique(fine[fine > 0]) + top
        state["labels"] = current

        def on_jitter_level(level_numerator, level_denominator, n_level, new_ids=new_ids):
            _, _, values = merge(level_numerator, level_denominator, new_ids)
            previous = state.get("preview_values")
            change = None if previous is None or len(previous) != len(values) else float(
                np.abs(values - previous).max())
            state["preview_values"] = values
            state["jitters_used"] = n_level
            stop = change is not None and tolerance is not None and change < tolerance
            if preview is not None and n_level < n_jitters and not stop:
                preview(prepared.from_samples(values[state["labels"]].astype(np.float32)), n_level)
            return stop

        level_numerator, level_denominator = sums.compute(current, new_ids,
                                                          on_jitter_level if len(schedule) > 1 else None)
        state["numerator"], state["denominator"], state["values"] = merge(level_numerator, level_denominator,
                                                                          new_ids)
        state.pop("preview_values", None)
        evaluations_per_level.append(model.evaluations - level_start)
        blocks_per_level.append(int(len(new_ids)))

    values = state["values"]
    # consecutive labels 1..K (0 = no block), computed on the samples that hold blocks: most slices of a
    # volume hold none
    all_labels = state["labels"]
    occupied = np.flatnonzero(all_labels.reshape(len(all_labels), -1).any(axis=1))
    labels = all_labels[occupied]
    ids = np.flatnonzero(np.bincount(labels.ravel()))
    ids = ids if len(ids) and ids[0] == 0 else np.concatenate([[0], ids])
    relabel = np.zeros(int(labels.max(initial=0)) + 1, np.int32)
    relabel[ids] = np.arange(len(ids), dtype=np.int32)
    block_values = values[ids].astype(np.float32)
    block_values[0] = 0.0
    compact = np.zeros(all_labels.shape, np.int32)
    compact[occupied] = relabel[labels]
    painted = np.zeros(all_labels.shape, np.float32)
    painted[occupied] = block_values[compact[occupied]]
    compact, painted = prepared.from_samples(compact), prepared.from_samples(painted)
    parameters = {
        "n_blocks": n_blocks, "compactness": compactness, "n_jitters": n_jitters,
        "n_jitters_used": state["jitters_used"], "progressive": progressive, "tolerance": tolerance,
        "max_jitter": h_max,
        "channels": [model.card.input.channels[c] for c in channel_list], "blocks": "labels" if custom else blocks,
        "normalization": normalization, "coarse_blocks": levels[:-1] if len(levels) > 1 else None,
        "refine_threshold": refine_threshold if len(levels) > 1 else None, "method": method,
        "locality_tolerance": locality_tolerance, "tiles": tiles, "output_mask_voxels": int(out_mask.sum()),
        "samples": int(len(touched)), "model": model.path.name,
        "windows": perturber.window_summary(model.evaluations - before),
    }
    return BackwardResult(
        map=painted, labels=compact, block_values=block_values, geometry=prepared.geometry,
        parameters=parameters, evaluations=model.evaluations - before, seconds=time.perf_counter() - started,
        device=model.device, evaluations_per_level=evaluations_per_level, blocks_per_level=blocks_per_level,
        radius=None if radius_info is None else radius_info.to_dict(), tiling=sums.tiling,
        equivalent_evaluations=(model.evaluated_voxels - voxels_before) / float(model.sample_voxels(
            prepared.sample_shape)))
