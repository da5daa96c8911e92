"""The perturbation engine shared by the mappings: jitters, jittered model runs and the response radius.

F(M) = 1/(2N) * sum_{k=-N..N, k!=0} (f(x + h_k M) - f(x)) / h_k,  h_k = k H / N  (Espadoto et al., section 3.2).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np

from . import locality
from .checks import channel_indices, check_max_jitter
from .errors import InputError
from .geometry import Geometry
from .model import Model, ProgressCallback
from .pipeline import PreparedInput

#: Default maximum jitter H as a fraction of the input's robust range (1st to 99th percentile).
DEFAULT_JITTER_FRACTION = 0.15
#: Probe voxels the response radius is measured at, at least.
PROBES = 5
#: Voxels added to the measured response radius when the probes may have missed a pooling phase of the model.
RADIUS_MARGIN = 2


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


def resolve_max_jitter(prepared: PreparedInput, max_jitter: Any, channels: list[int]) -> float:
    """H in input units: ``max_jitter`` checked, or by default 15 % of the jittered channels' robust range."""
    chosen = check_max_jitter(max_jitter)
    if chosen is not None:
        return chosen
    spread = robust_range(prepared.samples[:, channels])
    if not spread > 0:
        raise InputError("the input's 1st and 99th percentiles are equal, so the default maximum jitter "
                         "(15 % of that range) is 0; give max_jitter explicitly (input units)")
    return DEFAULT_JITTER_FRACTION * spread


def report_progress(progress: ProgressCallback | None, done: int, total: int, message: str) -> None:
    """Call the engine's ``progress(done, total, message)`` callback, if any."""
    if progress is not None:
        progress(done, total, message)


class Perturber:
    """Runs jittered copies of samples (or of tiles of them) through the model and sums difference quotients."""

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

    def padded_input(self, sample: int) -> np.ndarray:
        """The sample in input units, padded as the model sees it (channels, *padded_shape)."""
        if sample not in self._padded_input:
            self._padded_input[sample] = np.pad(self.prepared.samples[sample], ((0, 0),) + self.pads, mode="edge")
        return self._padded_input[sample]

    def base_outputs(self, samples: Sequence[int]) -> None:
        """Evaluate the unperturbed samples not evaluated yet (kept padded, for tiles, and cropped)."""
        missing = [int(s) for s in samples if int(s) not in self.base]
        if not missing:
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

    def responses(self, n_items: int, input_of: Callable[[int], np.ndarray],
                  direction_of: Callable[[int], np.ndarray], base_of: Callable[[int], np.ndarray],
                  what: Callable[[int], str], subset: np.ndarray | None = None,
                  shape: tuple[int, ...] | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield (start, stop, S) for items start..stop-1, S = sum over the jitters of (f(x + h d) - f(x)) / h.

        Item i perturbs the input ``input_of(i)`` (channels, *shape; input units) along ``direction_of(i)`` (a 0/1
        map) on the selected channels, against the unperturbed output ``base_of(i)``; ``subset`` picks jitters
        (indices into ``self.jitters``, default all). Divide S by the jitter count of the grid to get F.
        """
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

    def sample_responses(self, samples: Sequence[int], direction_of: Callable[[int], np.ndarray],
                         what: Callable[[int], str], subset: np.ndarray | None = None):
        """:meth:`responses` for items that perturb whole samples: item i perturbs sample ``samples[i]``."""
        return self.responses(len(samples), lambda i: self.prepared.samples[samples[i]], direction_of,
                              lambda i: self.base[samples[i]], what, subset)


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
    prepared = model.prepare(x, geometry)
    if not 0 <= sample < len(prepared.samples):
        raise InputError(f"sample must lie in 0..{len(prepared.samples) - 1}, got {sample!r}")
    chosen = channel_indices(model.card, channels)
    jitter = resolve_max_jitter(prepared, max_jitter, chosen)
    return response_radius(Perturber(model, prepared, np.array([-jitter, jitter]), chosen, cancel), sample,
                           tolerance)


def response_radius(perturber: Perturber, sample: int, tolerance: float) -> locality.ResponseRadius:
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

