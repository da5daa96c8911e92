"""IBIXLogic: Instance-Based Inference Explainers for ONNX image-to-image generators.

The engine of the IBIX 3D Slicer extension; it imports neither Slicer nor Qt. ``import IBIXLogic`` is light: the
public names below are attributes loaded on first use (PEP 562), so that SimpleITK, SciPy, scikit-image, Dask,
Matplotlib and ONNX Runtime are imported only by what uses them (ONNX Runtime only when a model is loaded), and a
3D Slicer start that merely loads the module pays for none of them. Submodules (``IBIXLogic.atlas``, ...) are
reachable as attributes too.
"""
from __future__ import annotations

import importlib

from .errors import Cancelled, IBIXError, InputError, ModelCardError, ModelError

__version__ = "0.1.0"

#: Public name -> the submodule that defines it (imported when the name is first used).
_LAZY = {
    "grid_blocks": "blocks", "superpixel_blocks": "blocks",
    "ModelCard": "card", "card_schema": "card", "validate_card": "card",
    "Geometry": "geometry", "slice_array_axis": "geometry",
    "read_mask": "io", "read_volume": "io", "resample_mask": "io", "write_volume": "io",
    "BackwardResult": "backward", "backward_mapping": "backward",
    "ResponseAtlas": "atlas", "block_response_atlas": "atlas",
    "ForwardResult": "forward", "forward_mapping": "forward",
    "Model": "model", "load_model": "model", "release_models": "model",
    "jitter_levels": "perturb", "measure_response_radius": "perturb",
}

__all__ = sorted(["Cancelled", "IBIXError", "InputError", "ModelCardError", "ModelError", *_LAZY])


def __getattr__(name: str):
    """A public name or a submodule, imported on first use."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups do not come here
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise  # a dependency of that submodule is missing: say so
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
