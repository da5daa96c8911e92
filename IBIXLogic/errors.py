"""Exceptions raised by IBIX. Every message names the problem and, where there is one, the fix."""
from __future__ import annotations

from pathlib import Path


class IBIXError(ValueError):
    """Base class of every error IBIX raises on purpose."""


class ModelCardError(IBIXError):
    """The model card is missing, invalid, or does not match the ONNX model."""


class ModelError(IBIXError):
    """The ONNX model cannot be loaded or run, or it produced invalid values."""


class InputError(IBIXError):
    """An input volume, mask or parameter is invalid."""


class Cancelled(IBIXError):
    """The run was cancelled by the caller; nothing was written."""


def short_path(path: Path, limit: int = 120) -> str:
    """A path for a message, shortened in the middle when absurdly long."""
    text = str(path)
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 2:]} ({len(text)} characters)"


def is_file(path: Path, what: str, error: type[IBIXError], hint: str = "") -> bool:
    """Whether ``path`` is a file; a path the file system cannot even look up (a name too long, say) raises
    ``error`` naming ``what`` and the path."""
    try:
        return path.is_file()
    except OSError as exc:
        raise error(f"{what} {short_path(path)} cannot be opened ({exc.strerror or exc}){hint}") from None


def is_folder(path: Path) -> bool:
    """Whether ``path`` is a folder (False for a path the file system cannot look up: the reader names it)."""
    try:
        return Path(path).is_dir()
    except OSError:
        return False
