"""IBIXLogic: Instance-Based Inference Explainers for ONNX image-to-image generators.

The engine of the IBIX 3D Slicer extension; it imports neither Slicer nor Qt, and imports ONNX Runtime only
when a model is loaded.
"""
from .blocks import grid_blocks, superpixel_blocks
from .card import ModelCard, card_schema, validate_card
from .errors import Cancelled, IBIXError, InputError, ModelCardError, ModelError
from .geometry import Geometry, slice_array_axis
from .io import read_mask, read_volume, resample_mask, write_volume
from .backward import BackwardResult, backward_mapping
from .cost import Estimate, estimate
from .atlas import ResponseAtlas, block_response_atlas
from .forward import ForwardResult, forward_mapping
from .model import Model, load_model, release_models
from .perturb import jitter_levels, measure_response_radius

__version__ = "0.1.0"

__all__ = [
    "BackwardResult", "Cancelled", "Estimate", "ForwardResult", "Geometry", "IBIXError", "InputError", "Model",
    "ModelCard", "ModelCardError", "ModelError", "ResponseAtlas", "backward_mapping", "block_response_atlas",
    "card_schema", "estimate", "forward_mapping", "grid_blocks", "jitter_levels", "load_model",
    "measure_response_radius", "read_mask", "read_volume", "release_models", "resample_mask", "slice_array_axis",
    "superpixel_blocks", "validate_card", "write_volume",
]
