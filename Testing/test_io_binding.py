"""ONNX Runtime I/O binding (the CUDA path) gives the same maps as plain runs; exercised here on the CPU device."""
import numpy as np
import pytest

import IBIXLogic as ibx
import onnx_models as om
from test_forward import KERNEL, box_mask


def bound(model: ibx.Model) -> ibx.Model:
    model.io_binding = True
    return model


def test_io_binding_is_off_by_default_on_the_cpu(tmp_path):
    model = ibx.load_model(om.save(om.identity(), tmp_path, "identity"), device="cpu")
    assert model.device == "cpu" and model.io_binding is False


@pytest.mark.parametrize("batch", ["N", 2])
def test_bound_runs_equal_plain_runs_and_do_not_share_outputs(tmp_path, rng, batch):
    path = om.save(om.convolution(KERNEL, batch=batch), tmp_path, "conv")
    plain, model = ibx.load_model(path), bound(ibx.load_model(path))
    prepared = model.prepare(rng.normal(size=(20, 24)).astype(np.float32))
    first = rng.normal(size=(2, 1, 20, 24)).astype(np.float32)
    second = rng.normal(size=(2, 1, 20, 24)).astype(np.float32)
    out_first = model.run(first.copy(), prepared)
    kept = out_first.copy()
    out_second = model.run(second.copy(), prepared)  # same shape: the same device buffers
    np.testing.assert_array_equal(out_first, kept)
    np.testing.assert_array_equal(out_first, plain.run(first.copy(), prepared))
    np.testing.assert_array_equal(out_second, plain.run(second.copy(), prepared))
    assert not np.array_equal(out_first, out_second)


def test_bound_forward_and_backward_equal_plain_ones(tmp_path, rng):
    path = om.save(om.small_autoencoder(), tmp_path, "cae")
    plain, model = ibx.load_model(path), bound(ibx.load_model(path))
    x = rng.normal(size=(64, 72)).astype(np.float32)
    mask = box_mask(x.shape, slice(20, 26), slice(30, 36))
    np.testing.assert_array_equal(ibx.forward_mapping(model, x, mask, n_jitters=4).signed,
                                  ibx.forward_mapping(plain, x, mask, n_jitters=4).signed)
    out_mask = box_mask(x.shape, slice(30, 35), slice(40, 45))
    expected = ibx.backward_mapping(plain, x, out_mask, n_blocks=150, compactness=1.0, n_jitters=2)
    result = ibx.backward_mapping(model, x, out_mask, blocks=expected.labels, n_jitters=2)
    assert result.tiling["tiles"] is True  # tiles of several shapes: more shapes than buffers are kept
    np.testing.assert_array_equal(result.block_values, expected.block_values)


def test_a_failing_binding_falls_back_to_plain_runs_with_a_warning(tmp_path, rng, caplog):
    path = om.save(om.convolution(KERNEL), tmp_path, "conv")
    plain, model = ibx.load_model(path), bound(ibx.load_model(path))
    model._bound.device = "no-such-device"  # ONNX Runtime refuses to place buffers there
    x = rng.normal(size=(20, 24)).astype(np.float32)
    mask = box_mask(x.shape, slice(8, 12), slice(6, 10))
    with caplog.at_level("WARNING", logger="IBIX"):
        result = ibx.forward_mapping(model, x, mask, n_jitters=2)
    np.testing.assert_array_equal(result.signed, ibx.forward_mapping(plain, x, mask, n_jitters=2).signed)
    assert model.io_binding is False
    assert "I/O binding failed on cpu" in caplog.text and "running without it" in caplog.text
