"""How volumes become model inputs and model outputs become volumes, as the model card says.

Intensity mapping (fixed once from the unperturbed input), slicing a volume along a 2D model's slice axis, the
in-plane transform, padding to the sizes the model takes (the card's ``input.padding``: the one padding rule of
the model and the perturber), sliding windows (``input.patch``), tensor layout and the output's intensity mapping.
No ONNX Runtime here: :mod:`IBIXLogic.model` runs what this module prepares.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from . import windows
from .card import Intensity, ModelCard
from .checks import check_volume
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
                f"both {low}; the channel is (nearly) constant between them: check the input volume, or the "
                "model card field 'input.intensity.percentiles'")
    scale = (intensity.target[1] - intensity.target[0]) / (high - low)
    offset = intensity.target[0] - low * scale
    if values is not None:  # the model is fed float32: the mapped input must stay finite and distinct there
        extremes = np.array([values.min(), values.max()], np.float64) * scale + offset
        limit = float(np.finfo(np.float32).max)
        if not (np.all(np.abs(extremes) < limit) and limit > abs(scale) >= float(np.finfo(np.float32).tiny)):
            key = "percentiles" if intensity.kind == "percentile" else "from"
            raise InputError(
                f"the card's input intensity mapping ({key} {list(intensity.source)} -> {list(intensity.target)}, "
                f"a scale factor of {scale:.3g}) takes this input's values [{values.min():.6g}, {values.max():.6g}] "
                f"beyond what float32 holds; check the input's units or fix 'input.intensity' in the model card")
    return scale, offset



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
        names = list(self.card.input.channels)
        if isinstance(x, np.ndarray) and self.n_channels == 1 and x.ndim in (2, 3):
            given = [x]
        elif isinstance(x, (list, tuple)):
            given = list(x)
        else:
            given = [x]
        if len(given) != self.n_channels:
            raise InputError(f"the model takes {self.n_channels} input channel(s) {list(self.card.input.channels)} "
                             f"but {len(given)} volume(s) were given; pass one volume per channel, in that order")
        arrays = [check_volume(f"input channel {names[i]!r}" if len(names) > 1 else "input", a)
                  for i, a in enumerate(given)]
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
        if len(arrays) == 1:  # a view, not a copy of a large volume; read-only, so that nothing can change the input
            view = arrays[0][None]
            view.flags.writeable = False
            return view
        return np.stack(arrays)

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

    # -- padding, windows and layout ------------------------------------------------------------------------
    def padded_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of a sample of ``shape`` once padded: what the model takes, or with sliding windows
        (``input.patch``) at least one window along every axis."""
        patch = self.card.input.patch
        if patch is not None:
            return tuple(max(int(n), p) for n, p in zip(shape, patch.size))
        return self.model_shape(shape)

    def model_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape the model is fed for an image (a sample, or a window) of ``shape``: the card's fixed
        ``size``, or ``shape`` rounded up to ``multiple_of``."""
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
        """Voxels IBIX adds before and after each axis of a sample of ``shape`` (the card's ``input.padding``
        position; by default centred, the odd voxel after the image)."""
        return windows.pad_widths(shape, self.padded_shape(shape), self.card.input.padding.position)

    def pad(self, batch: np.ndarray, widths: Sequence[tuple[int, int]], direction: bool = False) -> np.ndarray:
        """``batch`` (..., *spatial; model units) padded by ``widths`` as the card says. A perturbation
        ``direction`` (or a label image) is padded with the same mode and the constant 0: padding is linear in the
        image, so pad(x + h d) = pad(x) + h pad_direction(d)."""
        padding = self.card.input.padding
        return windows.pad(batch, widths, padding.mode, 0.0 if direction else padding.value)

    def windows(self, sample_shape: Sequence[int]) -> list[tuple[slice, ...]]:
        """The sliding windows (``input.patch``) over a padded sample of ``sample_shape``."""
        patch = self.card.input.patch
        return windows.plan_windows(self.padded_shape(sample_shape), patch.size, patch.overlap)

    def importance_map(self) -> np.ndarray:
        """Blending weights of one window's output (``input.patch``)."""
        patch = self.card.input.patch
        return windows.importance_map(patch.size, patch.blend, patch.sigma_scale)

    def sample_voxels(self, sample_shape: Sequence[int]) -> int:
        """Voxels the model runs for one whole sample of ``sample_shape`` (all its windows, with ``input.patch``)."""
        patch = self.card.input.patch
        if patch is None:
            return int(np.prod(self.model_shape(sample_shape)))
        return len(self.windows(sample_shape)) * int(np.prod(self.model_shape(patch.size)))

    def padded_window(self, sample: np.ndarray, window: tuple[slice, ...], fill: Any = None) -> np.ndarray:
        """``window`` (padded-sample coordinates) of ``sample`` (channels, *shape) padded as the card says,
        without padding the whole sample. ``fill``: the constant of ``"constant"`` padding, per channel or one for
        all, in the units of ``sample`` (default the card's value, model units); 0 for a perturbation direction
        or block labels."""
        pads = self.padding(sample.shape[1:])
        mode = self.card.input.padding.mode
        positions = [np.arange(w.start, w.stop) - before for w, (before, _) in zip(window, pads)]
        index = [windows.source_index(p, n, mode) for p, n in zip(positions, sample.shape[1:])]
        out = sample[(slice(None),) + np.ix_(*index)]
        if mode == "constant":
            outside = np.zeros(out.shape[1:], bool)
            for axis, (p, n) in enumerate(zip(positions, sample.shape[1:])):
                outside |= ((p < 0) | (p >= n)).reshape((-1,) + (1,) * (len(positions) - axis - 1))
            if outside.any():
                value = self.card.input.padding.value if fill is None else fill
                values = np.broadcast_to(np.asarray(value, out.dtype), (out.shape[0],))
                for channel, v in enumerate(values):
                    out[channel][outside] = v
        return out

    def to_model(self, batch: np.ndarray, prepared: PreparedInput) -> np.ndarray:
        """A batch of samples in input units (overwritten) as the model's input tensor (no sliding windows)."""
        return self.layout(prepared.normalize(batch))

    def layout(self, batch: np.ndarray) -> np.ndarray:
        """Images in model units (samples, or windows of padded samples) padded to the shape the model takes,
        in the model's layout and element type."""
        shape = batch.shape[2:]
        batch = self.pad(batch, windows.pad_widths(shape, self.model_shape(shape), self.card.input.padding.position))
        if self.card.input.channels_last:
            batch = np.moveaxis(batch, 1, -1)
        return np.ascontiguousarray(batch, dtype=self.dtype)

    def from_model(self, raw: np.ndarray, sample_shape: Sequence[int], n_samples: int) -> np.ndarray:
        """The model's output tensor for ``n_samples`` inputs as images of ``sample_shape`` in output units
        (padding cropped away)."""
        channels_last = self.card.output.channels_last
        if raw.ndim != len(sample_shape) + 2:
            raise ModelError(f"the model returned shape {raw.shape}; expected a batch of "
                             f"{len(sample_shape)}D images with one channel")
        if raw.shape[0] != n_samples:
            raise ModelError(f"the model returned {raw.shape[0]} output image(s) (shape {list(raw.shape)}) for a "
                             f"batch of {n_samples} input(s); IBIX needs one output per input along the batch axis")
        n_out = raw.shape[-1] if channels_last else raw.shape[1]
        if n_out != 1:
            raise ModelError(f"the model returned {n_out} output channels (shape {raw.shape}); IBIX explains one")
        out = raw[..., 0] if channels_last else raw[:, 0]
        padded = self.model_shape(sample_shape)
        if tuple(out.shape[1:]) != padded:
            raise ModelError(f"the model returned images of shape {list(out.shape[1:])} for inputs of shape "
                             f"{list(padded)}; IBIX needs the output on the input's grid")
        widths = windows.pad_widths(sample_shape, padded, self.card.input.padding.position)
        crop = tuple(slice(before, before + n) for (before, _), n in zip(widths, sample_shape))
        out = out[(slice(None),) + crop].astype(np.float32)
        scale, offset = _affine(self.card.output.intensity)
        if (scale, offset) != (1.0, 0.0):
            out *= scale
            out += offset
        return out

