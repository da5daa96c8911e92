"""Volume geometry (origin, spacing, direction) in the ITK/SimpleITK convention.

Physical space is LPS, origin and spacing are in x, y, z order (millimetres), and the direction matrix's
columns are the physical directions of the index axes i, j, k. Numpy arrays are in the reverse order
(slices, rows, cols) = (k, j, i), as ``SimpleITK.GetArrayFromImage`` returns them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .errors import InputError

#: Index of the LPS physical axis that each anatomical slice orientation is normal to.
SLICE_NORMALS = {"sagittal": 0, "coronal": 1, "axial": 2}


def _whole(value) -> int:
    """An array size: an integer, or a float with an integral value."""
    if isinstance(value, (bool, np.bool_)) or float(value) != int(value):
        raise ValueError(f"{value!r} is not a whole number")
    return int(value)


@dataclass(frozen=True)
class Geometry:
    """Position of a voxel grid in physical (LPS) space.

    Parameters
    ----------
    origin : sequence of float
        Physical position (mm) of the first voxel's centre, x, y, z order.
    spacing : sequence of float
        Voxel size (mm) along i, j, k.
    direction : array_like
        D x D matrix whose columns are the physical directions of the index axes.
    shape : tuple of int, optional
        Numpy array shape of the grid (slices, rows, cols), when known.
    """

    origin: tuple[float, ...] = (0.0, 0.0, 0.0)
    spacing: tuple[float, ...] = (1.0, 1.0, 1.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        try:
            origin = tuple(float(v) for v in self.origin)
            spacing = tuple(float(v) for v in self.spacing)
            direction = np.asarray(self.direction, dtype=float)
            shape = None if self.shape is None else tuple(_whole(s) for s in self.shape)
        except (TypeError, ValueError, OverflowError):
            raise InputError(f"geometry takes numbers: origin and spacing (sequences of float), direction (a matrix) "
                             f"and shape (integers or None); got origin {self.origin!r}, spacing {self.spacing!r}, "
                             f"direction {self.direction!r}, shape {self.shape!r}") from None
        dim = len(origin)
        if direction.size == dim * dim:
            direction = direction.reshape(dim, dim)
        if len(spacing) != dim or direction.shape != (dim, dim):
            raise InputError(
                f"geometry dimensions disagree: origin {origin}, spacing {spacing}, direction {direction.shape}"
            )
        if not all(np.isfinite(origin)) or not all(s > 0 and np.isfinite(s) for s in spacing):
            raise InputError(f"geometry needs finite origin and positive spacing, got {origin}, {spacing}")
        if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction)) < 1e-6:
            raise InputError(f"geometry direction matrix is singular or not finite: {direction.tolist()}")
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "direction", direction)
        if shape is not None:
            if len(shape) != dim or min(shape) < 0:
                raise InputError(f"geometry shape {shape} must hold {dim} sizes of at least 0")
            object.__setattr__(self, "shape", shape)

    @property
    def dimension(self) -> int:
        return len(self.origin)

    @classmethod
    def identity(cls, shape: Sequence[int]) -> "Geometry":
        """Unit spacing, zero origin and identity direction for an array of this shape."""
        if not isinstance(shape, (tuple, list, np.ndarray)):
            raise InputError(f"geometry shape must be a sequence of integers, got {shape!r}")
        dim = len(shape)
        return cls((0.0,) * dim, (1.0,) * dim, np.eye(dim), tuple(shape))

    @classmethod
    def from_sitk(cls, image) -> "Geometry":
        """Geometry of a SimpleITK image."""
        dim = image.GetDimension()
        return cls(image.GetOrigin(), image.GetSpacing(), np.reshape(image.GetDirection(), (dim, dim)),
                   tuple(reversed(image.GetSize())))

    def to_sitk(self, image) -> None:
        """Copy this geometry onto a SimpleITK image (in place on that image)."""
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(tuple(self.direction.ravel()))

    def with_shape(self, shape: Sequence[int]) -> "Geometry":
        return Geometry(self.origin, self.spacing, self.direction, tuple(shape))

    def matches(self, other: "Geometry", tolerance: float = 1e-4) -> bool:
        """True when both describe the same grid (shape, origin, spacing and direction)."""
        if self.shape is not None and other.shape is not None and self.shape != other.shape:
            return False
        return (self.dimension == other.dimension
                and np.allclose(self.origin, other.origin, atol=tolerance * max(1.0, max(self.spacing)))
                and np.allclose(self.spacing, other.spacing, rtol=tolerance)
                and np.allclose(self.direction, other.direction, atol=tolerance))

    def array_axis_directions(self) -> np.ndarray:
        """Physical direction (LPS unit vector) of each numpy array axis, in array order."""
        return self.direction[:, ::-1].T

    def spacing_array_order(self) -> tuple[float, ...]:
        """Voxel size (mm) along each numpy array axis."""
        return tuple(reversed(self.spacing))

    def to_dict(self) -> dict:
        return {"origin": list(self.origin), "spacing": list(self.spacing),
                "direction": self.direction.ravel().tolist(),
                "shape": list(self.shape) if self.shape is not None else None}


def slice_array_axis(geometry: Geometry, slice_axis: str) -> int:
    """Numpy array axis that a 2D model's slices are stacked along.

    The axis whose physical direction is most aligned with the normal of the requested anatomical plane
    (S/I for axial, A/P for coronal, L/R for sagittal).
    """
    if geometry.dimension != 3:
        raise InputError("a slice axis needs a 3D volume")
    try:
        normal = SLICE_NORMALS[slice_axis]
    except KeyError:
        raise InputError(f"slice_axis must be one of {sorted(SLICE_NORMALS)}, got {slice_axis!r}") from None
    alignment = np.abs(geometry.array_axis_directions()[:, normal])
    best = int(np.argmax(alignment))
    if np.sum(alignment >= alignment[best] - 1e-6) > 1:
        raise InputError(
            f"the volume's direction matrix is too oblique to pick its {slice_axis} axis: two array axes are "
            f"equally aligned with it; resample the volume or use a 3D model"
        )
    return best
