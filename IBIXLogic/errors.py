"""Exceptions raised by IBIX. Every message names the problem and, where there is one, the fix."""


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
