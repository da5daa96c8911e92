"""Public arguments of the mappings are checked in one place, with messages that name the argument (checks.py)."""
import numpy as np
import pytest

import IBIXLogic as ibx


def test_mask_shape_mismatch(conv_model, image):
    with pytest.raises(ibx.InputError, match="mask has shape .* resample"):
        ibx.forward_mapping(conv_model, image, np.ones((10, 10), bool))


def test_empty_mask(conv_model, image):
    with pytest.raises(ibx.InputError, match="input mask is empty"):
        ibx.forward_mapping(conv_model, image, np.zeros(image.shape, bool))
    with pytest.raises(ibx.InputError, match="output mask is empty"):
        ibx.backward_mapping(conv_model, image, np.zeros(image.shape, bool))


@pytest.mark.parametrize("kwargs, message", [
    ({"n_jitters": 0}, "n_jitters"), ({"n_jitters": 2.5}, "n_jitters"),
    ({"max_jitter": 0.0}, "max_jitter"), ({"max_jitter": -1.0}, "max_jitter"),
    ({"max_jitter": float("nan")}, "max_jitter"), ({"channels": "fat"}, "unknown channel"),
])
def test_bad_forward_parameters(conv_model, image, mask, kwargs, message):
    with pytest.raises(ibx.InputError, match=message):
        ibx.forward_mapping(conv_model, image, mask, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"n_blocks": 0}, "n_blocks"), ({"method": "fast"}, "method"), ({"normalization": "sum"}, "normalization"),
    ({"coarse_blocks": 800}, "coarse_blocks"), ({"blocks": "hexagons"}, "blocks"),
    ({"refine_threshold": 2.0}, "refine_threshold"),
])
def test_bad_backward_parameters(conv_model, image, mask, kwargs, message):
    with pytest.raises(ibx.InputError, match=message):
        ibx.backward_mapping(conv_model, image, mask, **kwargs)
