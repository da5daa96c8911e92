"""Oracle tests of the forward mapping F on analytic ONNX models."""
import numpy as np
import pytest

import IBIXLogic as ibx
import onnx_models as om

KERNEL = np.array([[0.0, 1.0, 0.5], [2.0, -1.0, 0.0], [0.25, 0.0, 3.0]], np.float32)


def box_mask(shape, *slices):
    mask = np.zeros(shape, bool)
    mask[slices] = True
    return mask


def test_identity_forward_equals_mask(tmp_path, rng):
    model = ibx.load_model(om.save(om.identity(), tmp_path, "identity"))
    x = rng.normal(100, 20, (30, 40)).astype(np.float32)
    mask = box_mask(x.shape, slice(5, 9), slice(10, 30))
    result = ibx.forward_mapping(model, x, mask, n_jitters=4, max_jitter=10.0)
    np.testing.assert_allclose(result.signed, mask.astype(np.float32), atol=1e-5)
    np.testing.assert_allclose(result.normalized, mask.astype(np.float32), atol=1e-5)
    assert result.evaluations == 2 * 4 + 1
    assert result.parameters["max_jitter"] == 10.0


def test_convolution_forward_is_kernel_applied_to_mask(tmp_path, rng):
    model = ibx.load_model(om.save(om.convolution(KERNEL), tmp_path, "conv"))
    x = rng.normal(size=(32, 28)).astype(np.float32)
    mask = box_mask(x.shape, slice(10, 13), slice(4, 9))
    mask[20, 20] = True
    result = ibx.forward_mapping(model, x, mask, n_jitters=3)
    np.testing.assert_allclose(result.signed, om.correlate(mask, KERNEL), atol=1e-5)


def test_polynomial_forward_is_derivative_inside_mask(tmp_path, rng):
    a, b = 0.5, -2.0
    model = ibx.load_model(om.save(om.polynomial(a, b), tmp_path, "poly"))
    x = rng.uniform(-3, 3, (20, 20)).astype(np.float32)
    mask = box_mask(x.shape, slice(2, 12), slice(5, 15))
    result = ibx.forward_mapping(model, x, mask, n_jitters=5, max_jitter=1.0)
    # the symmetric jitters cancel the curvature term a*h exactly
    np.testing.assert_allclose(result.signed[mask], 2 * a * x[mask] + b, atol=1e-4)
    assert np.all(result.signed[~mask] == 0)


def test_channel_mixing_and_channel_selection(tmp_path, rng):
    weights = [0.5, -2.0, 3.0]
    card = {"input": {"channels": ["water", "fat", "in_phase"]}}
    model = ibx.load_model(om.save(om.channel_mix(weights), tmp_path, "mix", card))
    x = [rng.normal(size=(16, 18)).astype(np.float32) for _ in range(3)]
    mask = box_mask((16, 18), slice(3, 7), slice(3, 7))
    every = ibx.forward_mapping(model, x, mask, n_jitters=2, max_jitter=0.5)
    np.testing.assert_allclose(every.signed, sum(weights) * mask, atol=1e-5)
    fat = ibx.forward_mapping(model, x, mask, n_jitters=2, max_jitter=0.5, channels="fat")
    np.testing.assert_allclose(fat.signed, weights[1] * mask, atol=1e-5)
    both = ibx.forward_mapping(model, x, mask, n_jitters=2, max_jitter=0.5, channels=[0, 2])
    np.testing.assert_allclose(both.signed, (weights[0] + weights[2]) * mask, atol=1e-5)
    assert fat.parameters["channels"] == ["fat"]


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


def test_3d_convolution_model(tmp_path, rng):
    kernel = rng.normal(size=(3, 3, 3)).astype(np.float32)
    model = ibx.load_model(om.save(om.convolution(kernel, layout="NCDHW"), tmp_path, "conv3d"))
    assert model.card.spatial_dims == 3
    x = rng.normal(size=(10, 12, 14)).astype(np.float32)
    mask = box_mask(x.shape, slice(3, 5), slice(4, 8), slice(5, 7))
    result = ibx.forward_mapping(model, x, mask, n_jitters=2)
    np.testing.assert_allclose(result.signed, om.correlate(mask, kernel), atol=1e-5)
    assert result.evaluations == 5


def test_2d_model_slicewise_on_volume_changes_only_masked_slice(tmp_path, rng):
    model = ibx.load_model(om.save(om.convolution(KERNEL), tmp_path, "conv"))
    x = rng.normal(size=(6, 20, 22)).astype(np.float32)
    mask = box_mask(x.shape, slice(2, 3), slice(5, 9), slice(5, 9))
    result = ibx.forward_mapping(model, x, mask, n_jitters=2)
    assert np.all(result.signed[[0, 1, 3, 4, 5]] == 0)
    np.testing.assert_allclose(result.signed[2], om.correlate(mask[2], KERNEL), atol=1e-5)
    assert result.evaluations == 5  # one slice: 2N jitters + the unperturbed slice


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


def test_default_max_jitter_is_15_percent_of_robust_range(tmp_path, rng):
    model = ibx.load_model(om.save(om.identity(), tmp_path, "identity"))
    x = rng.uniform(0, 1000, (40, 40)).astype(np.float32)
    mask = box_mask(x.shape, slice(1, 3), slice(1, 3))
    low, high = np.percentile(x, [1, 99])
    result = ibx.forward_mapping(model, x, mask, n_jitters=1)
    assert result.parameters["max_jitter"] == pytest.approx(0.15 * (high - low), rel=1e-6)


def test_jitter_levels_are_symmetric():
    np.testing.assert_allclose(ibx.jitter_levels(2, 10.0), [-10, -5, 5, 10])


def test_tiny_memory_budget_runs_one_sample_at_a_time_with_the_same_map(tmp_path, rng):
    path = om.save(om.small_autoencoder(), tmp_path, "cae")
    roomy, tight = ibx.load_model(path), ibx.load_model(path, memory_budget=1)
    assert tight.batch_size((32, 32)) == 1
    calls = []
    run = tight._session_run
    tight._session_run = lambda batch: calls.append(len(batch)) or run(batch)
    x = rng.normal(size=(32, 32)).astype(np.float32)
    mask = box_mask(x.shape, slice(10, 14), slice(12, 16))
    expected = ibx.forward_mapping(roomy, x, mask, n_jitters=4)
    result = ibx.forward_mapping(tight, x, mask, n_jitters=4)
    np.testing.assert_array_equal(result.signed, expected.signed)
    assert result.evaluations == expected.evaluations == 9 and set(calls) == {1}
