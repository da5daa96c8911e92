"""Validation of the public arguments of the mappings, in one place.

Each function returns the argument in the form the engine uses, or raises :class:`InputError` naming the
argument, what it got and what it takes.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .card import ModelCard
from .errors import InputError


def check_count(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{name} must be an integer of at least {minimum}, got {value!r}")
    return int(value)


def check_mask(mask: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
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


def channel_indices(card: ModelCard, channels: Any) -> list[int]:
    names = list(card.input.channels)
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



def check_max_jitter(max_jitter: Any) -> float | None:
    """H in input units: a positive finite number, or None for the default."""
    if max_jitter is None:
        return None
    if isinstance(max_jitter, bool) or not isinstance(max_jitter, (int, float, np.number)) \
            or not np.isfinite(max_jitter) or max_jitter <= 0:
        raise InputError(f"max_jitter (H) must be a positive number in input units, got {max_jitter!r}")
    return float(max_jitter)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """One of ``choices``."""
    if value not in choices:
        raise InputError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value
