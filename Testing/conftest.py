import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def conv_model(tmp_path):
    """The convolution with the asymmetric KERNEL, loaded."""
    import IBIXLogic as ibx
    import onnx_models as om

    return ibx.load_model(om.save(om.convolution(om.KERNEL), tmp_path, "conv"))


@pytest.fixture
def image(rng):
    """A 20 x 20 image of standard normal noise."""
    return rng.normal(size=(20, 20)).astype(np.float32)


@pytest.fixture
def mask():
    """A 3 x 3 box in a 20 x 20 image."""
    mask = np.zeros((20, 20), bool)
    mask[5:8, 5:8] = True
    return mask


@pytest.fixture
def unit_image(rng):
    """A 16 x 16 image of uniform noise in [0, 1)."""
    return rng.uniform(0, 1, (16, 16)).astype(np.float32)


@pytest.fixture
def unit_mask():
    """A 3 x 3 box in a 16 x 16 image."""
    mask = np.zeros((16, 16), bool)
    mask[6:9, 6:9] = True
    return mask
