"""Validation of the public arguments of IBIX, in one place.

:func:`check_arguments` checks arguments by name (counts, numbers, flags, callbacks, choices, the geometry, paths)
for every public entry point (``load_model``, ``Model.predict``, ``forward_mapping``, ``backward_mapping``,
``measure_response_radius``, the file, geometry and block helpers); the functions below it check what needs context
(input volumes, masks, channels, block label images, coarse-to-fine levels). Each
returns the argument in the form the engine uses, or raises :class:`InputError` naming the argument, what it got
and what it takes.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .card import ModelCard
from .errors import InputError
from .geometry import Geometry

#: Largest N: 2N model evaluations per sample; closer jitters than H/10000 resolve nothing more in float32.
MAX_JITTERS = 10_000
#: Most blocks per sample (one per voxel of a 215^3 volume).
MAX_BLOCKS = 10_000_000
#: Largest value float32 (what models are fed) holds.
FLOAT32_MAX = float(np.finfo(np.float32).max)
DEVICES = ("auto", "cuda", "cpu")
BACKWARD_METHODS = ("auto", "local", "batched", "brute")
NORMALIZATIONS = ("fraction", "magnitude")
BLOCK_KINDS = ("slic", "grid")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({type(value).__name__})"


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_count(name: str, value: Any, minimum: int = 1, maximum: int | None = None) -> int:
    """An integer in [minimum, maximum]."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)) or value < minimum \
            or (maximum is not None and value > maximum):
        upper = f" and at most {maximum}" if maximum is not None else ""
        raise InputError(f"{name} must be an integer of at least {minimum}{upper}, got {_shown(value)}")
    return int(value)


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None,
                 high_open: bool = False, positive: bool = False) -> float:
    """A finite real number in [low, high] (or [low, high) with ``high_open``; above 0 with ``positive``)."""
    number = float(value) if _is_real(value) and (not isinstance(value, int) or abs(value) < 1e308) else math.nan
    if not math.isfinite(number) or (positive and number <= 0) or (low is not None and number < low) \
            or (high is not None and (number >= high if high_open else number > high)):
        if positive:
            wanted = "a positive finite number"
        else:
            wanted = f"a number in [{low}, {high}{')' if high_open else ']'}" if high is not None else \
                f"a finite number of at least {low}" if low is not None else "a finite number"
        raise InputError(f"{name} must be {wanted}, got {_shown(value)}")
    return number


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name} must be True or False, got {_shown(value)}")
    return bool(value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """One of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise InputError(f"{name} must be one of {tuple(choices)}, got {_shown(value)}")
    return value


def check_callback(name: str, value: Any) -> Callable | None:
    """None or a function (``progress(done, total, message)``, ``preview(map, N)``)."""
    if value is not None and not callable(value):
        raise InputError(f"{name} must be a function or None, got {_shown(value)}")
    return value


def check_cancel_source(name: str, value: Any) -> Any:
    """None, an Event-like object (``is_set()``) or a function that returns True to stop."""
    if value is None or callable(getattr(value, "is_set", None)) or (callable(value) and not isinstance(value, type)):
        return value
    raise InputError(f"{name} must be a threading.Event (or any object with is_set()), a function that returns "
                     f"True to stop, or None; got {_shown(value)}")


def check_geometry(name: str, value: Any) -> Geometry | None:
    if value is not None and not isinstance(value, Geometry):
        raise InputError(f"{name} must be an IBIXLogic.Geometry (e.g. from read_volume) or None, got {_shown(value)}")
    return value


def check_path(name: str, value: Any) -> Path:
    """A file path (str or os.PathLike)."""
    try:
        text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    except TypeError:  # an os.PathLike that returns something else
        text = None
    if not isinstance(text, str) or not text or "\x00" in text:
        raise InputError(f"{name} must be the path of a file (str or pathlib.Path), got {_shown(value)}")
    return Path(text)


def _optional(check: Callable[..., Any], **kw) -> Callable[[str, Any], Any]:
    return lambda name, value: None if value is None else check(name, value, **kw)


def _max_jitter(name: str, value: Any) -> float | None:
    return None if value is None else check_number(name, value, positive=True)


#: What each public argument takes, by name (the names of the keyword arguments of the public functions).
_VALIDATORS: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "n_jitters": ("n_jitters (N)", lambda n, v: check_count(n, v, 1, MAX_JITTERS)),
    "n_blocks": ("n_blocks (K)", lambda n, v: check_count(n, v, 1, MAX_BLOCKS)),
    "max_jitter": ("max_jitter (H)", _max_jitter),
    "compactness": ("compactness", lambda n, v: check_number(n, v, positive=True)),
    "locality_tolerance": ("locality_tolerance", lambda n, v: check_number(n, v, 0.0, 1.0, high_open=True)),
    "refine_threshold": ("refine_threshold", lambda n, v: check_number(n, v, 0.0, 1.0)),
    "tolerance": ("tolerance", _optional(check_number, low=0.0)),
    "progressive": ("progressive", check_flag),
    "tiles": ("tiles", check_flag),
    "progress": ("progress", check_callback),
    "preview": ("preview", check_callback),
    "cancel": ("cancel", check_cancel_source),
    "geometry": ("geometry", check_geometry),
    "normalization": ("normalization", lambda n, v: check_choice(n, v, NORMALIZATIONS)),
    "device": ("device", lambda n, v: check_choice(n, v, DEVICES)),
    "memory_budget": ("memory_budget", lambda n, v: check_count(n, v, 1, 2**50)),
    "path": ("path", check_path),
    "label": ("label", _optional(check_count, minimum=-2**63, maximum=2**64 - 1)),
}


def check_arguments(**arguments: Any) -> dict[str, Any]:
    """Check public arguments by their names; return them as the engine uses them (ints, floats, bools).

    >>> check_arguments(n_jitters=4, progressive=False)
    {'n_jitters': 4, 'progressive': False}
    """
    checked = {}
    for name, value in arguments.items():
        shown, check = _VALIDATORS[name]
        checked[name] = check(shown, value)
    return checked


# -- arguments checked against the input or the model ------------------------------------------------------------
def check_array(what: str, value: Any, kinds: str = "biuf") -> np.ndarray:
    """``value`` as a numpy array of real numbers (dtype kinds ``kinds``); object arrays of numbers are converted."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:  # ragged nested lists
        raise InputError(f"the {what} is not an array ({exc}); give a numpy array") from None
    if array.dtype.kind == "O" and all(_is_real(v) or isinstance(v, (bool, np.bool_)) for v in array.flat):
        array = array.astype(np.float64)  # an object array of numbers
    if array.dtype.kind not in kinds:
        raise InputError(f"the {what} has dtype {array.dtype} ({type(value).__name__}); give a numpy array of "
                         f"{'numbers' if 'f' in kinds else 'integers'}")
    return array


def check_volume(what: str, value: Any) -> np.ndarray:
    """One input channel as float32: real numbers, finite, within float32's range."""
    array = check_array(what, value)
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array)
        if bad.any():
            position = tuple(int(p) for p in np.argwhere(bad)[0])
            raise InputError(f"the {what} has {int(bad.sum())} NaN or infinite voxel(s), the first at array index "
                             f"{position}; replace them (e.g. with 0) before running IBIX")
        if array.dtype.itemsize > 4 and array.size and np.abs(array).max() > FLOAT32_MAX:
            raise InputError(f"the {what} holds values up to {np.abs(array).max():.3g}, beyond the float32 range "
                             f"(+-{FLOAT32_MAX:.3g}) models are fed; rescale it")
    return array.astype(np.float32, copy=False)  # integers of any size fit float32's range


def check_mask(mask: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    """A boolean mask on the volume's grid (nonzero = inside), with at least one voxel."""
    mask = check_array(what, mask)
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


def check_block_labels(blocks: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A user's block label image on the input grid, relabelled 1..K in the order of the given labels (0 = no
    block), so that no label is lost whatever its integer type or size."""
    given = check_array("block label image (blocks)", blocks, kinds="iu")
    if given.shape != tuple(shape):
        raise InputError(f"the block label image (blocks) has shape {given.shape} but the input has shape "
                         f"{tuple(shape)}; give one integer label per input voxel")
    if given.size == 0 or given.min() < 0 or given.max() < 1:
        raise InputError("block labels (blocks) must be >= 0 with at least one block (label >= 1); 0 = no block")
    values, inverse = np.unique(given, return_inverse=True)
    offset = 0 if values[0] == 0 else 1  # label 0 (no block) stays 0; the others become 1..K
    return (inverse.reshape(given.shape) + offset).astype(np.int32)


def check_block_levels(n_blocks: int, coarse_blocks: Any) -> list[int]:
    """Block counts of the coarse-to-fine levels (``coarse_blocks``: None, a count or a sequence of counts),
    ending with ``n_blocks``."""
    if coarse_blocks is None:
        levels = []
    elif isinstance(coarse_blocks, (list, tuple, np.ndarray)):
        levels = list(np.asarray(coarse_blocks, dtype=object).ravel())
    else:
        levels = [coarse_blocks]
    levels = [check_count("coarse_blocks", k, 1, MAX_BLOCKS) for k in levels] + [n_blocks]
    if any(b >= a for a, b in zip(levels[1:], levels)):
        raise InputError(f"coarse_blocks must increase and stay below n_blocks: {levels}")
    return levels


def channel_indices(card: ModelCard, channels: Any) -> list[int]:
    """Indices of the chosen input channels (names or indices; None = all)."""
    names = list(card.input.channels)
    if channels is None:
        return list(range(len(names)))
    if isinstance(channels, (str, int, np.integer)) and not isinstance(channels, (bool, np.bool_)):
        chosen = [channels]
    elif isinstance(channels, (list, tuple, np.ndarray)):
        chosen = list(np.asarray(channels, dtype=object).ravel())
    else:
        raise InputError(f"channels must be a channel name, an index or a list of them; the model's channels are "
                         f"{names}; got {_shown(channels)}")
    indices = []
    for c in chosen:
        if isinstance(c, str):
            if c not in names:
                raise InputError(f"unknown channel {c!r}; the model's channels are {names}")
            indices.append(names.index(c))
        elif isinstance(c, (int, np.integer)) and not isinstance(c, (bool, np.bool_)) and 0 <= c < len(names):
            indices.append(int(c))
        else:
            raise InputError(f"channel {_shown(c)} does not exist; the model's channels are {names} "
                             f"(0..{len(names) - 1})")
    if not indices:
        raise InputError(f"no channel selected; choose among {names}")
    return sorted(set(indices))
