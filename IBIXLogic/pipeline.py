"""How volumes become model inputs and model outputs become volumes, as the model card says.

Intensity mapping (fixed once from the unperturbed input), slicing a volume along a 2D model's slice axis, the
in-plane transform, padding to the sizes the model takes, tensor layout and the output's intensity mapping. No
ONNX Runtime here: :mod:`IBIXLogic.model` runs what this module prepares.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .card import Intensity, ModelCard
from .errors import InputError, ModelError
from .geometry import Geometry, slice_array_axis


def _affine(intensity: Intensity, values: np.ndarray | None = None) -> tuple[float, float]:
    """Scale and offset of ``intensity`` (percentiles resolved on ``values``)."""
    if intensity.kind == "identity":
        return 1.0, 0.0
    low, high = intensity.source
    if intensity.kind == "percentile":
        low, high = (float(v) for v in np.percentile(values, intensity.source))
        if not high > low:
            raise InputError(
                f"percentile normalisation is undefined: the {intensity.source} percentiles of a channel are "
                f"both {low}; the channel is (nearly) constant, check the input volume")
    scale = (intensity.target[1] - intensity.target[0]) / (high - low)
    return scale, intensity.target[0] - low * scale



@dataclass
class PreparedInput:
    """An input volume cut into model samples, with its intensity mapping fixed once.

    ``samples`` has shape (n_samples, channels, *sample_shape) in input units: one sample for a 3D model or
    a 2D image, one per slice (after the card's in-plane transform) for a 2D model on a volume.
    """

    samples: np.ndarray
    volume_shape: tuple[int, ...]
    geometry: Geometry
    scale: np.ndarray
    offset: np.ndarray
    clip: tuple[float, float] | None
    slice_axis: int | None
    transpose: bool
    flip_rows: bool
    flip_cols: bool

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.samples.shape[2:]

    @property
    def sample_spacing(self) -> tuple[float, ...]:
        """Voxel size (mm) along each sample axis."""
        spacing = list(self.geometry.spacing_array_order())
        if self.slice_axis is not None:
            del spacing[self.slice_axis]
        if self.transpose:
            spacing[-2:] = spacing[-2:][::-1]
        return tuple(spacing)

    def to_samples(self, volume: np.ndarray) -> np.ndarray:
        """Cut an array on the volume grid into samples: (n_samples, *sample_shape)."""
        out = np.asarray(volume)
        out = out[None] if self.slice_axis is None else np.moveaxis(out, self.slice_axis, 0)
        if self.transpose:
            out = np.swapaxes(out, -1, -2)
        if self.flip_rows:
            out = out[..., ::-1, :]
        if self.flip_cols:
            out = out[..., ::-1]
        return out

    def from_samples(self, samples: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_samples`: put per-sample arrays back on the volume grid."""
        out = samples
        if self.flip_cols:
            out = out[..., ::-1]
        if self.flip_rows:
            out = out[..., ::-1, :]
        if self.transpose:
            out = np.swapaxes(out, -1, -2)
        out = out[0] if self.slice_axis is None else np.moveaxis(out, 0, self.slice_axis)
        return np.ascontiguousarray(out)

    def normalize(self, batch: np.ndarray) -> np.ndarray:
        """Input units to model units, (batch, channels, *sample_shape), float32, in place on ``batch``."""
        shape = (1, -1) + (1,) * (batch.ndim - 2)
        batch *= self.scale.reshape(shape)
        batch += self.offset.reshape(shape)
        if self.clip is not None:
            np.clip(batch, *self.clip, out=batch)
        return batch


class Pipeline:
    """The card's recipe for turning samples into model inputs and model outputs back into samples.

    Parameters
    ----------
    card : ModelCard
        The resolved model card.
    dtype : numpy dtype
        The element type of the model's input tensor.
    """

    def __init__(self, card: ModelCard, dtype: Any = np.float32):
        self.card = card
        self.dtype = np.dtype(dtype)

    @property
    def n_channels(self) -> int:
        return len(self.card.input.channels)

    def stack_channels(self, x: Any) -> np.ndarray:
        """The input as one float32 array (channels, *shape), checked against the card's channels."""
        if isinstance(x, np.ndarray) and self.n_channels == 1 and x.ndim in (2, 3):
            arrays = [x]
        elif isinstance(x, (list, tuple)):
            arrays = [np.asarray(a) for a in x]
        else:
            arrays = [np.asarray(x)]
        if len(arrays) != self.n_channels:
            raise InputError(f"the model takes {self.n_channels} input channel(s) {list(self.card.input.channels)} "
                             f"but {len(arrays)} volume(s) were given; pass one volume per channel, in that order")
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise InputError(f"input channels have different shapes {sorted(shapes)}; resample them onto one grid")
        shape = arrays[0].shape
        if len(shape) not in (2, 3):
            raise InputError(f"input has shape {shape}; IBIX takes 2D (rows, cols) or 3D (slices, rows, cols) arrays")
        if self.card.spatial_dims == 3 and len(shape) != 3:
            raise InputError(f"the model is 3D but the input is {len(shape)}D {shape}; give a volume")
        if min(shape) < 1:
            raise InputError(f"input has an empty dimension: shape {shape}")
        stacked = np.stack([np.asarray(a, dtype=np.float32) for a in arrays])
        bad = ~np.isfinite(stacked)
        if bad.any():
            channel, *position = np.argwhere(bad)[0]
            raise InputError(f"input channel {self.card.input.channels[channel]!r} has {int(bad.sum())} NaN or "
                             f"infinite voxel(s), the first at array index {tuple(int(p) for p in position)}; "
                             "replace them (e.g. with 0) before running IBIX")
        return stacked

    def prepare(self, x: Any, geometry: Geometry | None = None) -> PreparedInput:
        """Cut ``x`` into model samples and fix the intensity mapping from the unperturbed input."""
        volume = self.stack_channels(x)
        shape = volume.shape[1:]
        geometry = geometry if geometry is not None else Geometry.identity(shape)
        if geometry.dimension != len(shape):
            raise InputError(f"the geometry is {geometry.dimension}D but the input is {len(shape)}D {shape}")
        if geometry.shape is not None and tuple(geometry.shape) != tuple(shape):
            raise InputError(f"the geometry describes a {geometry.shape} grid but the input has shape {shape}")
        geometry = geometry.with_shape(shape)
        card = self.card
        intensity = card.input.intensity
        affines = [_affine(intensity, volume[c]) for c in range(volume.shape[0])]
        clip = None
        if intensity.clip:
            clip = (min(intensity.target), max(intensity.target))
        slice_axis = None
        if card.spatial_dims == 2 and len(shape) == 3:
            slice_axis = slice_array_axis(geometry, card.slice_axis or "axial")
        in_plane = card.spatial_dims == 2
        prepared = PreparedInput(np.empty(0), tuple(shape), geometry,
                                 np.array([a[0] for a in affines], np.float32),
                                 np.array([a[1] for a in affines], np.float32), clip, slice_axis,
                                 in_plane and card.transpose, in_plane and card.flip_rows,
                                 in_plane and card.flip_cols)
        if slice_axis is None and not (prepared.transpose or prepared.flip_rows or prepared.flip_cols):
            prepared.samples = volume[None]  # one sample, as it is: no copy of a large volume
        else:
            samples = np.stack([prepared.to_samples(c) for c in volume], axis=1)
            prepared.samples = np.ascontiguousarray(samples, dtype=np.float32)
        self.padded_shape(prepared.sample_shape)  # fail early on sizes the model cannot take
        return prepared

    # -- padding and layout --------------------------------------------------------------------------------
    def padded_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The sample shape the model sees: the card's fixed ``size``, or ``shape`` rounded up to ``multiple_of``."""
        spec = self.card.input
        out = []
        for axis, n in enumerate(shape):
            fixed = spec.size[axis] if spec.size else None
            if fixed is not None:
                if n > fixed:
                    raise InputError(f"the model takes at most {list(spec.size)} voxels per sample but the input "
                                     f"sample is {list(shape)}; crop or resample the input to fit")
                out.append(fixed)
            else:
                m = spec.multiple_of
                out.append(-(-n // m) * m)
        return tuple(out)

    def padding(self, shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
        """Voxels IBIX adds before and after each axis of a sample of ``shape`` (centred, edge values)."""
        return tuple(((p - n) // 2, p - n - (p - n) // 2) for n, p in zip(shape, self.padded_shape(shape)))

    def padded_window(self, sample: np.ndarray, window: tuple[slice, ...]) -> np.ndarray:
        """``window`` (padded-sample coordinates) of ``sample`` (channels, *shape) padded as the model sees it,
        without padding the whole sample: edge padding repeats the nearest voxel inside."""
        pads = self.padding(sample.shape[1:])
        index = [np.clip(np.arange(w.start, w.stop) - before, 0, n - 1)
                 for w, (before, _), n in zip(window, pads, sample.shape[1:])]
        return sample[(slice(None),) + np.ix_(*index)]

    def to_model(self, batch: np.ndarray, prepared: PreparedInput) -> np.ndarray:
        """A batch of samples in input units (overwritten) as the model's input tensor."""
        batch = prepared.normalize(batch)
        pads = self.padding(batch.shape[2:])
        if any(before or after for before, after in pads):
            batch = np.pad(batch, ((0, 0), (0, 0)) + pads, mode="edge")
        if self.card.input.channels_last:
            batch = np.moveaxis(batch, 1, -1)
        return np.ascontiguousarray(batch, dtype=self.dtype)

    def from_model(self, raw: np.ndarray, sample_shape: Sequence[int]) -> np.ndarray:
        """The model's output tensor as samples of ``sample_shape`` in output units (padding cropped away)."""
        channels_last = self.card.output.channels_last
        if raw.ndim != len(sample_shape) + 2:
            raise ModelError(f"the model returned shape {raw.shape}; expected a batch of "
                             f"{len(sample_shape)}D images with one channel")
        n_out = raw.shape[-1] if channels_last else raw.shape[1]
        if n_out != 1:
            raise ModelError(f"the model returned {n_out} output channels (shape {raw.shape}); IBIX explains one")
        out = raw[..., 0] if channels_last else raw[:, 0]
        padded = self.padded_shape(sample_shape)
        if tuple(out.shape[1:]) != padded:
            raise ModelError(f"the model returned images of shape {list(out.shape[1:])} for inputs of shape "
                             f"{list(padded)}; IBIX needs the output on the input's grid")
        crop = tuple(slice(before, before + n) for (before, _), n in zip(self.padding(sample_shape), sample_shape))
        out = out[(slice(None),) + crop].astype(np.float32)
        scale, offset = _affine(self.card.output.intensity)
        if (scale, offset) != (1.0, 0.0):
            out *= scale
            out += offset
        return out

