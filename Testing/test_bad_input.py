"""Bad input gets a clear error that names the problem, and nothing is changed or written."""
import numpy as np
import pytest

import IBIXLogic as ibx
import onnx_models as om
from test_forward import KERNEL


@pytest.fixture
def conv_model(tmp_path):
    return ibx.load_model(om.save(om.convolution(KERNEL), tmp_path, "conv"))


@pytest.fixture
def image(rng):
    return rng.normal(size=(20, 20)).astype(np.float32)


@pytest.fixture
def mask():
    mask = np.zeros((20, 20), bool)
    mask[5:8, 5:8] = True
    return mask


def test_missing_model_file(tmp_path):
    with pytest.raises(ibx.ModelError, match="model file not found"):
        ibx.load_model(tmp_path / "nothing.onnx")


def test_empty_model_file(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ibx.ModelError, match="empty"):
        ibx.load_model(tmp_path / "empty.onnx")


@pytest.mark.parametrize("content", [b"not an onnx model at all", bytes(range(256)) * 40])
def test_corrupt_or_non_onnx_file(tmp_path, content):
    (tmp_path / "bad.onnx").write_bytes(content)
    with pytest.raises(ibx.ModelError, match="not a loadable ONNX model"):
        ibx.load_model(tmp_path / "bad.onnx")


def test_truncated_model_file(tmp_path):
    path = om.save(om.small_autoencoder(), tmp_path, "cae")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ibx.ModelError, match="not a loadable ONNX model"):
        ibx.load_model(path)


def test_card_rank_mismatch(tmp_path):
    path = om.save(om.identity(), tmp_path, "identity", {"spatial_dims": 3})
    with pytest.raises(ibx.ModelCardError, match="spatial_dims 3 .* rank 4"):
        ibx.load_model(path)


def test_card_channel_count_mismatch(tmp_path):
    path = om.save(om.identity(), tmp_path, "identity", {"input": {"channels": ["water", "fat"]}})
    with pytest.raises(ibx.ModelCardError, match="2 input channels .* has 1 channels"):
        ibx.load_model(path)


def test_card_layout_mismatch_is_caught(tmp_path):
    # NHWC model with 3 channels declared NCHW: the card's channel count no longer matches
    path = om.save(om.channel_mix([1, 2, 3], layout="NHWC"), tmp_path, "mix",
                   {"input": {"layout": "NCHW", "channels": ["a", "b", "c"]}})
    with pytest.raises(ibx.ModelError, match="does not run as its card describes.*'input.layout'"):
        ibx.load_model(path)


def test_ambiguous_layout_without_card_asks_for_the_field(tmp_path):
    model = om.build([om.helper.make_node("Identity", ["core_in"], ["core_out"])], {}, "NCHW",
                     in_channels="C", out_channels="C")
    path = om.save(model, tmp_path, "dynamic")
    with pytest.raises(ibx.ModelCardError, match="write 'input.layout'"):
        ibx.load_model(path)


def test_invalid_card_field_is_named(tmp_path):
    path = om.save(om.identity(), tmp_path, "identity", {"input": {"layout": "NCWH"}})
    with pytest.raises(ibx.ModelCardError, match="'input.layout' is 'NCWH'; accepted values"):
        ibx.load_model(path)


def test_wrong_number_of_input_volumes(conv_model, image, mask):
    with pytest.raises(ibx.InputError, match="takes 1 input channel"):
        ibx.forward_mapping(conv_model, [image, image], mask)


def test_mask_shape_mismatch(conv_model, image):
    with pytest.raises(ibx.InputError, match="mask has shape .* resample"):
        ibx.forward_mapping(conv_model, image, np.ones((10, 10), bool))


def test_empty_mask(conv_model, image):
    with pytest.raises(ibx.InputError, match="input mask is empty"):
        ibx.forward_mapping(conv_model, image, np.zeros(image.shape, bool))
    with pytest.raises(ibx.InputError, match="output mask is empty"):
        ibx.backward_mapping(conv_model, image, np.zeros(image.shape, bool))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_in_input(conv_model, image, mask, bad):
    image[3, 4] = bad
    with pytest.raises(ibx.InputError, match=r"NaN or infinite voxel\(s\), the first at array index \(3, 4\)"):
        ibx.forward_mapping(conv_model, image, mask)


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


def test_model_that_outputs_nan_names_the_evaluation(tmp_path, image, mask):
    model = ibx.load_model(om.save(om.nan_above(10.0), tmp_path, "nan"))
    image = np.clip(image, -2, 2)
    with pytest.raises(ibx.ModelError, match=r"NaN or infinite values for the input mask perturbed in sample 0 "
                                             r"with jitter h = 10"):
        ibx.forward_mapping(model, image, mask, n_jitters=2, max_jitter=20.0)


def test_inputs_are_never_modified(conv_model, image, mask):
    image_before, mask_before = image.copy(), mask.copy()
    ibx.forward_mapping(conv_model, image, mask, n_jitters=2)
    ibx.backward_mapping(conv_model, image, mask, n_blocks=10, n_jitters=1)
    conv_model.predict(image)
    np.testing.assert_array_equal(image, image_before)
    np.testing.assert_array_equal(mask, mask_before)


def test_fixed_size_model_pads_and_crops_and_refuses_larger_inputs(tmp_path, rng):
    model = ibx.load_model(om.save(om.convolution(KERNEL, spatial=[24, 20]), tmp_path, "fixed"))
    assert model.card.input.size == (24, 20)
    x = rng.normal(size=(17, 20)).astype(np.float32)
    mask = np.zeros(x.shape, bool)
    mask[8, 10] = True
    result = ibx.forward_mapping(model, x, mask, n_jitters=1)
    np.testing.assert_allclose(result.signed, om.correlate(mask, KERNEL), atol=1e-5)
    with pytest.raises(ibx.InputError, match="at most \\[24, 20\\]"):
        model.predict(rng.normal(size=(30, 20)).astype(np.float32))


def test_cancel_stops_a_run(conv_model, image, mask):
    import threading
    event = threading.Event()
    event.set()
    with pytest.raises(ibx.Cancelled):
        ibx.backward_mapping(conv_model, image, mask, n_blocks=20, n_jitters=1, cancel=event)


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_cuda_that_cannot_start_falls_back_to_the_cpu_with_a_warning(tmp_path, monkeypatch, caplog):
    """ONNX Runtime claims a CUDA provider that cannot start here: auto runs on the CPU and says so."""
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    path = om.save(om.convolution(KERNEL), tmp_path, "conv")
    with caplog.at_level("WARNING", logger="IBIX"):
        model = ibx.load_model(path, device="auto")
    assert model.device == "cpu" and model.provider == "CPUExecutionProvider"
    assert "CUDA could not start" in caplog.text
    with pytest.raises(ibx.ModelError, match="device 'cuda' was asked for but CUDA could not start"):
        ibx.load_model(path, device="cuda")
