"""Forward mapping F(M^x) (Espadoto et al., section 3.2): which output voxels react to jittering an input region.

F(M) = 1/(2N) * sum_{k=-N..N, k!=0} (f(x + h_k M) - f(x)) / h_k,   h_k = k H / N.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .checks import channel_indices, check_count, check_mask
from .geometry import Geometry
from .model import Model, ProgressCallback
from .perturb import Perturber, jitter_levels, jitter_schedule, report_progress, resolve_max_jitter
from .statistics import forward_statistics


@dataclass
class ForwardResult:
    """A forward mapping F on the output grid.

    ``statistics``: reach95_mm, inside_fraction, peak and peak_ras_mm of F
    (:func:`IBIXLogic.statistics.forward_statistics`).
    """

    signed: np.ndarray
    normalized: np.ndarray
    geometry: Geometry
    parameters: dict
    evaluations: int
    seconds: float
    device: str
    units: str
    statistics: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"mapping": "forward", "parameters": self.parameters, "evaluations": self.evaluations,
                "seconds": round(self.seconds, 4), "device": self.device, "units": self.units,
                "max_abs": float(np.abs(self.signed).max()), "statistics": self.statistics,
                "geometry": self.geometry.to_dict()}



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
    n_jitters = check_count("n_jitters (N)", n_jitters)
    evaluations_before = model.evaluations
    prepared = model.prepare(x, geometry)
    mask = check_mask(mask, prepared.volume_shape, "input mask")
    channel_list = channel_indices(model.card, channels)
    h_max = resolve_max_jitter(prepared, max_jitter, channel_list)
    perturber = Perturber(model, prepared, jitter_levels(n_jitters, h_max), channel_list, cancel)
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
            report_progress(progress, stop, len(touched), f"forward mapping, N = {n_level}")
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
        statistics=forward_statistics(signed, mask, prepared.geometry),
        parameters={"n_jitters": n_jitters, "n_jitters_used": used, "max_jitter": h_max,
                    "progressive": progressive, "tolerance": tolerance,
                    "channels": [model.card.input.channels[c] for c in channel_list],
                    "mask_voxels": int(mask.sum()), "samples": int(len(touched)), "model": model.path.name},
        evaluations=model.evaluations - evaluations_before, seconds=time.perf_counter() - started,
        device=model.device, units=f"{units or 'output units'} per input unit")

