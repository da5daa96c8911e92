"""How volumes become model inputs and back: layouts, fixed batches, slice axes, in-plane transforms,
intensity mapping, padding and channel checks (pipeline.py)."""
import numpy as np
import pytest

import IBIXLogic as ibx
import onnx_models as om
from onnx_models import KERNEL, box_mask


def test_wrong_number_of_input_volumes(conv_model, image, mask):
    with pytest.raises(ibx.InputError, match="takes 1 input channel"):
        ibx.forward_mapping(conv_model, [image, image], mask)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_in_input(conv_model, image, mask, bad):
    image[3, 4] = bad
    with pytest.raises(ibx.InputError, match=r"NaN or infinite voxel\(s\), the first at array index \(3, 4\)"):
        ibx.forward_mapping(conv_model, image, mask)


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


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("batch", ["N", 1])
def test_layouts_and_fixed_batch_give_identical_maps(tmp_path, rng, layout, batch):
    reference = ibx.load_model(om.save(om.convolution(KERNEL), tmp_path, "reference"))
    model = ibx.load_model(om.save(om.convolution(KERNEL, layout=layout, batch=batch), tmp_path, "variant"))
    assert model.card.input.layout == layout
    assert model.card.fixed_batch == (None if batch == "N" else 1)
    x = rng.normal(size=(24, 20)).astype(np.float32)
    mask = box_mask(x.shape, slice(8, 12), slice(6, 10))
    expected = ibx.forward_mapping(reference, x, mask, n_jitters=3).signed
    np.testing.assert_array_equal(ibx.forward_mapping(model, x, mask, n_jitters=3).signed, expected)
    out = box_mask(x.shape, slice(10, 13), slice(8, 11))
    blocks = ibx.grid_blocks(x.shape, 30)
    b_ref = ibx.backward_mapping(reference, x, out, blocks=blocks, n_jitters=2, method="batched")
    b_var = ibx.backward_mapping(model, x, out, blocks=blocks, n_jitters=2, method="batched")
    np.testing.assert_allclose(b_var.block_values, b_ref.block_values, rtol=1e-6, atol=1e-12)


def test_2d_model_follows_the_declared_slice_axis(tmp_path, rng):
    """A volume stored with its axial (S) direction along the last array axis is sliced along that axis."""
    card = {"spatial_dims": 2, "slice_axis": "axial"}
    model = ibx.load_model(om.save(om.convolution(KERNEL), tmp_path, "conv", card))
    x = rng.normal(size=(18, 16, 5)).astype(np.float32)
    # columns of the direction matrix: i -> S, j -> A/P, k -> L/R ; array axes are (k, j, i)
    direction = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], float)
    geometry = ibx.Geometry((0, 0, 0), (2.0, 1.0, 1.5), direction)
    assert ibx.slice_array_axis(geometry, "axial") == 2
    mask = box_mask(x.shape, slice(4, 8), slice(6, 9), slice(3, 4))
    result = ibx.forward_mapping(model, x, mask, n_jitters=2, geometry=geometry)
    assert np.all(result.signed[..., [0, 1, 2, 4]] == 0)
    np.testing.assert_allclose(result.signed[..., 3], om.correlate(mask[..., 3], KERNEL), atol=1e-5)
    assert result.geometry.matches(geometry.with_shape(x.shape))


def test_in_plane_transpose_is_applied_and_undone(tmp_path, rng):
    kernel = np.zeros((3, 3), np.float32)
    kernel[1, 2] = 1.0  # y[r, c] = x[r, c + 1]: not symmetric under transposition
    plain = ibx.load_model(om.save(om.convolution(kernel), tmp_path, "shift"))
    card = {"in_plane": {"transpose": True}}
    transposed = ibx.load_model(om.save(om.convolution(kernel), tmp_path, "shift_t", card))
    x = rng.normal(size=(12, 14)).astype(np.float32)
    mask = box_mask(x.shape, slice(5, 6), slice(7, 8))
    f_plain = ibx.forward_mapping(plain, x, mask, n_jitters=1).signed
    f_transposed = ibx.forward_mapping(transposed, x, mask, n_jitters=1).signed
    assert f_plain[5, 6] == pytest.approx(1.0)  # the shift acts along columns
    assert f_transposed[4, 7] == pytest.approx(1.0)  # ...or along rows once transposed
    assert f_transposed[5, 6] == 0


def test_card_intensity_equals_scaling_built_into_the_model(tmp_path, rng):
    kernel_nodes = [om.helper.make_node("Conv", ["z_in", "w"], ["z_out"], pads=[1, 1, 1, 1])]
    weights = {"w": KERNEL[None, None]}
    scale, offset = 1 / 255, 0.0
    out_scale, out_offset = 1000.0, -24.0
    built_in = ibx.load_model(om.save(om.affine_then(kernel_nodes, weights, scale, offset, out_scale, out_offset),
                                      tmp_path, "built_in"))
    card = {"input": {"intensity": {"from": [0, 255], "to": [0, 1]}},
            "output": {"intensity": {"from": [0, 1], "to": [-24, 976]}, "units": "HU"}}
    carded = ibx.load_model(om.save(om.convolution(KERNEL), tmp_path, "carded", card))
    x = rng.uniform(0, 255, (20, 24)).astype(np.float32)
    mask = box_mask(x.shape, slice(5, 10), slice(5, 10))
    expected = ibx.forward_mapping(built_in, x, mask, n_jitters=3, max_jitter=20.0)
    got = ibx.forward_mapping(carded, x, mask, n_jitters=3, max_jitter=20.0)
    np.testing.assert_allclose(got.signed, expected.signed, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(carded.predict(x), built_in.predict(x), rtol=1e-5, atol=1e-3)
    assert got.units == "HU per input unit"


def test_percentile_normalisation_is_computed_once(tmp_path, rng):
    card = {"input": {"intensity": {"percentiles": [1, 99], "to": [-1, 1], "clip": False}}}
    model = ibx.load_model(om.save(om.identity(), tmp_path, "identity", card))
    x = rng.uniform(0, 500, (30, 30)).astype(np.float32)
    mask = box_mask(x.shape, slice(0, 15), slice(0, 30))  # half the image: would move the percentiles a lot
    low, high = np.percentile(x, [1, 99])
    result = ibx.forward_mapping(model, x, mask, n_jitters=4, max_jitter=200.0)
    np.testing.assert_allclose(result.signed[mask], 2.0 / (high - low), rtol=1e-4)
    assert np.all(result.signed[~mask] == 0)
