"""Forward mapping F(M^x) (Espadoto et al., section 3.2): which output voxels react to jittering an input region.

F(M) = 1/(2N) * sum_{k=-N..N, k!=0} (f(x + h_k M) - f(x)) / h_k,   h_k = k H / N.

On samples much larger than the model's reach, F is computed in a tile of each sample that holds the mask and
twice the measured response radius around it: f(x + h M) - f(x) is exactly 0 farther than the radius from M, and
within it the tile holds all the context the model sees, so the map equals the whole-sample one.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .checks import channel_indices, check_arguments, check_callback, check_choice, check_mask
from .cost import Estimate, Forecast, advice
from .geometry import Geometry
from .model import Model, ProgressCallback
from .perturb import (PROBE_SHARE, TILE_SAVING, Perturber, ProbeBudget, box_centre, jitter_levels,
                      jitter_schedule, mask_box, radius_source, report_progress, resolve_max_jitter, response_radius,
                      volume_box, work_summary)
from .statistics import forward_statistics

METHODS = ("auto", "local", "whole")


@dataclass
class ForwardResult:
    """A forward mapping F on the output grid.

    ``radius`` is the model's measured response radius (None when not measured) and ``tiling`` says whether
    F was computed in tiles of the samples or on whole samples, and why; ``path`` says the same in words
    (``method``, ``reason``, ``radius_source``: measured, cached, or skipped and why); ``work`` compares the model
    work with brute force's (every touched sample whole, unperturbed once and jittered 2N times);
    ``statistics``: reach95_mm, inside_fraction, peak and peak_ras_mm of F
    (:func:`IBIXLogic.statistics.forward_statistics`).
    """

    signed: np.ndarray
    geometry: Geometry
    parameters: dict
    evaluations: int
    seconds: float
    device: str
    units: str
    radius: dict | None = None
    tiling: dict | None = None
    equivalent_evaluations: float = 0.0
    statistics: dict = field(default_factory=dict)
    path: dict = field(default_factory=dict)
    work: dict = field(default_factory=dict)
    #: the model's unperturbed output of each sample the mapping evaluated whole, on the volume's axes: the volume
    #: for a 3D model (key 0), a slice along ``slice_axis`` for a 2D model on a volume (key: its index)
    outputs: dict = field(default_factory=dict, repr=False)
    #: max |F| (output units per input unit)
    peak: float = 0.0
    #: how the input was prepared for the model (intensity mapping, slicing), without its voxels: what the model's
    #: output on other slices needs, without computing the input's percentiles again
    preparation: Any = field(default=None, repr=False)

    @property
    def normalized(self) -> np.ndarray:
        """|F| / max |F| in [0, 1] on the output grid (0 everywhere for a zero map), computed when asked for: a
        result holds one full-size map, not two."""
        out = np.abs(self.signed)
        if self.peak > 0:
            out /= np.float32(self.peak)
        return out

    def to_dict(self) -> dict:
        return {"mapping": "forward", "parameters": self.parameters, "evaluations": self.evaluations,
                "equivalent_evaluations": round(self.equivalent_evaluations, 2), "path": self.path, "work": self.work,
                "seconds": round(self.seconds, 4), "device": self.device, "units": self.units,
                "max_abs": self.peak, "response_radius": self.radius,
                "tiling": self.tiling, "statistics": self.statistics, "geometry": self.geometry.to_dict()}


Item = tuple[int, "tuple[slice, ...] | None"]  # a sample, and the window of it perturbed (None: all of it)


def _items(perturber: Perturber, mask_samples: np.ndarray, touched: np.ndarray, method: str, perturbed: int
           ) -> tuple[list[Item], dict | None, dict]:
    """What to perturb: a tile of each touched sample holding the mask and its context when the model's response
    is local and tiles run fewer voxels, else the whole samples; with the radius and the decision.

    ``perturbed`` jittered inputs per item. With ``method`` "auto" the response radius is measured only where it
    can pay for itself: the probes may cost at most PROBE_SHARE of brute force's work (every touched sample whole,
    once unperturbed and ``perturbed`` times jittered), and less than the tiles could save were the radius as small
    as it can be; "local" measures it whatever it costs.
    """
    whole = [(int(s), None) for s in touched]
    if method == "whole":
        return whole, None, {"tiles": False, "reason": "method 'whole'"}
    if perturber.model.card.input.size:
        return whole, None, {"tiles": False, "reason": "the model takes a fixed input size"}
    if perturber.patched:
        return whole, None, {"tiles": False, "reason": "sliding windows: only the windows the mask touches run"}
    boxes = [mask_box(mask_samples[s]) for s in touched]
    low, high = np.array([b[0] for b in boxes]), np.array([b[1] for b in boxes])
    if perturber.tile_work(low, high, 0) is None:
        return whole, None, {"tiles": False, "reason": "no stride the model may have divides the padded sample"}
    brute_force = len(touched) * (1.0 + perturbed)

    def tile_path(radius: int) -> float:
        """Model work (whole samples) of the tile path with this radius: the jittered tiles, their unperturbed
        outputs and the check of the tiles' alignment (2 tiles)."""
        work = perturber.tile_work(low, high, radius)
        if work >= TILE_SAVING * len(touched):
            return brute_force
        return (perturbed + 1) * work + 2 * work / len(touched)

    budget = (ProbeBudget(PROBE_SHARE * brute_force, lambda r: brute_force - tile_path(r), brute_force)
              if method == "auto" else None)
    radius = response_radius(perturber, int(touched[0]), 0.0, near=box_centre(mask_samples[touched[0]]),
                             budget=budget)
    if radius.radius is None:
        reason = ("the model's response is global" if radius.is_global else
                  "the response radius is unknown: measuring it could not pay for itself")
        return whole, radius.to_dict(), {"tiles": False, "reason": reason}
    tiles, tiling = perturber.checked_tiles(int(touched[0]), low, high, [np.array([i]) for i in range(len(touched))],
                                            radius.radius, len(touched))
    if tiles is None:
        return whole, radius.to_dict(), tiling
    return [(int(touched[t.members[0]]), t.window) for t in tiles], radius.to_dict(), tiling


def _support(prepared: Any, perturber: Perturber, items: list[Item]) -> tuple[slice, ...]:
    """The box of the volume grid that holds every item (so every voxel where F may be nonzero, and the mask)."""
    whole = tuple(slice(0, n) for n in prepared.sample_shape)
    return volume_box(prepared, [(s, whole if window is None else perturber.overlap(window)[0])
                                 for s, window in items])


def _on_volume_axes(prepared: Any, values: np.ndarray) -> np.ndarray:
    """One sample's array (sample axes) on the volume's axes: a slice of a 2D model's volume, or the volume."""
    out = prepared.from_samples(values[None])
    return out if prepared.slice_axis is None else np.take(out, 0, axis=prepared.slice_axis)


def forward_mapping(model: Model, x: Any, mask: Any, n_jitters: int = 8, max_jitter: float | None = None,
                    channels: Any = None, geometry: Geometry | None = None, method: str = "auto",
                    progressive: bool = False, preview: Callable[[np.ndarray, int], None] | None = None,
                    tolerance: float | None = None, progress: ProgressCallback | None = None,
                    cancel: Any = None, estimate: Callable[[Estimate], None] | None = None) -> ForwardResult:
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
        N (1 to 10000): the jitters are h_k = k H / N for k = -N..N, k != 0 (2N model evaluations per sample).
    max_jitter : float, optional
        H in input units; default 15 % of the input's 1st-99th percentile range. An H whose smallest jitter H/N
        float32 cannot resolve on this input is refused with the smallest usable value.
    channels : str, int or sequence, optional
        Input channels the mask jitters (names or indices); default all.
    geometry : Geometry, optional
        Geometry of the input volume; resolves a 2D model's slice axis and is carried by the result.
    method : {"auto", "local", "whole"}
        "auto": measure the model's response radius R where that can pay for itself (its probes cost at most
        PROBE_SHARE of brute force's model work and less than tiles could save; a radius measured earlier in the
        process for the same model, card, channels, jitter and sample shape is reused at no cost), and perturb a
        tile of each sample holding the mask dilated by 2R (aligned to the model's stride, checked once per run),
        which gives the whole-sample map exactly; whole samples otherwise (a global response, a fixed input size,
        tiles no smaller, a radius not worth measuring). The result's ``path`` says which and why. "local": measure
        R whatever it costs, then as "auto". "whole": always whole samples.
    progressive : bool
        Evaluate nested jitter grids (N = 1, 2, 4, ... up to n_jitters, each reusing every earlier evaluation)
        and call ``preview(normalized_map, N)`` after each level but the last.
    tolerance : float, optional
        With ``progressive``, stop once a level changes F by less than this fraction of max |F|.
    estimate : callable, optional
        ``estimate(Estimate)`` is called once, before any progress is reported: the predicted model evaluations
        and time of the run and what would cut them (:mod:`IBIXLogic.cost`), from its plan and its first
        timed batch. :func:`IBIXLogic.estimate` stops there.

    Returns
    -------
    ForwardResult
        ``signed`` F (output units per input unit) and ``normalized`` |F| / max |F| on the output grid.
        A 2D model on a volume is run only on the slices the mask touches; F is 0 elsewhere.
    """
    started = time.perf_counter()
    checked = check_arguments(n_jitters=n_jitters, max_jitter=max_jitter, geometry=geometry, progressive=progressive,
                              preview=preview, tolerance=tolerance, progress=progress, cancel=cancel)
    n_jitters, tolerance = checked["n_jitters"], checked["tolerance"]
    check_choice("method", method, METHODS)
    check_callback("estimate", estimate)
    before, voxels_before = model.evaluations, model.evaluated_voxels
    prepared = model.prepare(x, geometry)
    mask = check_mask(mask, prepared.volume_shape, "input mask")
    channel_list = channel_indices(model.card, channels)
    h_max = resolve_max_jitter(prepared, checked["max_jitter"], channel_list, n_jitters)
    perturber = Perturber(model, prepared, jitter_levels(n_jitters, h_max), channel_list, cancel)
    mask_samples = prepared.to_samples(mask)
    unit = float(model.pipeline.sample_voxels(prepared.sample_shape))
    # F is 0 on samples the mask does not touch, so it is computed on the touched ones only
    touched = np.flatnonzero(mask_samples.reshape(len(mask_samples), -1).any(axis=1))
    schedule = jitter_schedule(n_jitters, progressive)
    brute_force = len(touched) * (1.0 + 2 * n_jitters)
    if estimate is not None:
        perturber.forecast = Forecast(model, started, estimate,
                                      lambda seconds: advice("forward", seconds, model.device, n_jitters), unit,
                                      brute_force)
        progress = perturber.forecast.gate(progress)
    items, radius, tiling = _items(perturber, mask_samples, touched, method, 2 * n_jitters)
    sample_shape = prepared.sample_shape
    perturber.base_outputs([s for s, window in items if window is None])
    # a tile's own unperturbed output: run in the tile's shape like its jittered copies, so that F is exactly 0
    # wherever they agree (not rounding noise)
    perturber.window_bases([(s, window) for s, window in items if window is not None], own=True)

    def on_output_grid(values: list[np.ndarray]) -> np.ndarray:
        """Per-item maps placed on the whole output grid (0 elsewhere)."""
        grid = np.zeros((len(mask_samples),) + sample_shape, np.float32)
        for (s, window), item_values in zip(items, values):
            if window is None:
                grid[s] = item_values
            else:
                source, target = perturber.overlap(window)
                grid[s][source] = item_values[target]
        return prepared.from_samples(grid)

    shapes: dict[tuple[int, ...], list[int]] = {}
    for i, (s, window) in enumerate(items):  # items of one shape go through the model together
        shapes.setdefault(sample_shape if window is None else tuple(w.stop - w.start for w in window), []).append(i)
    inputs = [prepared.samples[s] if window is None else perturber.window_input(s, window) for s, window in items]
    bases = [perturber.base[s] if window is None else perturber.window_base(s, window, own=True) for s, window in items]
    directions = [mask_samples[s] if window is None else
                  model.pipeline.padded_window(mask_samples[s][None], window, 0)[0] for s, window in items]
    sums = [np.zeros(d.shape, np.float32) for d in directions]
    if perturber.forecast is not None:
        for _, subset in schedule:
            for shape, indices in shapes.items():
                perturber.forecast.plan(*perturber.planned(len(indices), lambda j: directions[indices[j]], subset,
                                                           shape))
    previous, used = None, 0
    for level, (n_level, subset) in enumerate(schedule):
        done = 0
        for shape, indices in shapes.items():
            for start, stop, chunk in perturber.responses(
                    len(indices), lambda j: inputs[indices[j]], lambda j: directions[indices[j]],
                    lambda j: bases[indices[j]], lambda j: f"the input mask perturbed in sample {items[indices[j]][0]}",
                    subset, shape, sample_of=lambda j: items[indices[j]][0]):
                for j in range(start, stop):
                    sums[indices[j]] += chunk[j - start]
                report_progress(progress, done + stop, len(items), f"forward mapping, N = {n_level}")
            done += len(indices)
        used = n_level
        level_map = [values / (2 * n_level) for values in sums]
        peak = max(float(np.abs(values).max()) for values in level_map)
        last = level == len(schedule) - 1
        change = None if previous is None else max(
            float(np.abs(a - b).max()) for a, b in zip(level_map, previous)) / max(peak, 1e-30)
        stop_early = change is not None and tolerance is not None and change < tolerance
        if preview is not None and not (last or stop_early):
            preview(on_output_grid([np.abs(v) / peak if peak > 0 else 0 * v for v in level_map]), n_level)
        if stop_early:
            break
        previous = level_map
    if perturber.forecast is not None:
        perturber.forecast.finish()
    signed = on_output_grid(level_map)
    units = model.card.output.units
    equivalent = (model.evaluated_voxels - voxels_before) / unit
    if tiling.get("tiles"):
        reason = (f"the response stays within {radius['radius']} voxels of the mask: {tiling['items']} tile(s) run "
                  f"{100 * tiling['voxels_per_sample'] / len(touched):.0f} % of the voxels of the whole samples")
    else:
        reason = tiling["reason"]
    path = {"method": "tiles around the mask" if tiling.get("tiles") else "whole samples", "reason": reason,
            "radius_source": radius_source(radius)}
    return ForwardResult(
        outputs={s: _on_volume_axes(prepared, perturber.base[s]) for s in perturber.base}, peak=peak,
        preparation=dataclasses.replace(prepared, samples=np.empty((0,) + prepared.samples.shape[1:], np.float32)),
        signed=signed, geometry=prepared.geometry,
        statistics=forward_statistics(signed, mask, prepared.geometry, support=_support(prepared, perturber, items)),
        parameters={"n_jitters": n_jitters, "n_jitters_used": used, "max_jitter": h_max, "method": method,
                    "progressive": progressive, "tolerance": tolerance,
                    "channels": [model.card.input.channels[c] for c in channel_list],
                    "mask_voxels": int(mask.sum()), "samples": int(len(touched)), "model": model.path.name,
                    "windows": perturber.patch_summary(model.evaluations - before),
                    "model_assumptions": list(model.card.assumptions)},
        evaluations=model.evaluations - before, seconds=time.perf_counter() - started,
        device=model.device, units=f"{units or 'output units'} per input unit", radius=radius, tiling=tiling,
        equivalent_evaluations=equivalent, path=path,
        work=work_summary(model.evaluations - before, equivalent, brute_force))
