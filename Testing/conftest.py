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


@pytest.fixture(scope="session")
def t1_dicom(tmp_path_factory):
    """The T1 demo volume as a DICOM MR series (folder MR/), with an RT structure set traced from the two demo masks
    (RS.dcm), a DICOM SEG (SEG.dcm) and a Slicer segmentation (T1.seg.nrrd) of the same masks, which overlap, plus
    their union as a third segment. Shared by the tests: never modify it."""
    from types import SimpleNamespace

    import clinical_data as cd
    import IBIXLogic as ibx

    root = tmp_path_factory.mktemp("t1-dicom")
    x, geometry = ibx.read_volume(cd.T1)
    masks = {"Left ventricle": ibx.read_mask(cd.T1_INPUT_MASK), "Ventricle (output)": ibx.read_mask(cd.T1_OUTPUT_MASK)}
    series = cd.write_series(root / "MR", x, geometry)
    segments = dict(masks, Ventricles=masks["Left ventricle"] | masks["Ventricle (output)"])
    return SimpleNamespace(root=root, x=x, geometry=geometry, masks=masks, segments=segments, series=series,
                           folder=series.folder, rtstruct=cd.write_rtstruct(root / "RS.dcm", series, masks, geometry),
                           seg=cd.write_seg(root / "SEG.dcm", series, segments, geometry),
                           seg_nrrd=cd.write_seg_nrrd(root / "T1.seg.nrrd", segments, geometry))
