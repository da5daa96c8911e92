"""Oracle tests of the forward mapping F on analytic ONNX models."""
import numpy as np
import pytest

import IBIXLogic as ibx
import onnx_models as om
from onnx_models import KERNEL, box_mask


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


def test_progressive_forward_previews_then_gives_the_same_map(tmp_path, rng):
    model = ibx.load_model(om.save(om.small_autoencoder(), tmp_path, "cae"))
    x = rng.normal(size=(32, 32)).astype(np.float32)
    mask = np.zeros(x.shape, bool)
    mask[10:14, 12:16] = True
    plain = ibx.forward_mapping(model, x, mask, n_jitters=8, max_jitter=1.5)
    previews = []
    progressive = ibx.forward_mapping(model, x, mask, n_jitters=8, max_jitter=1.5, progressive=True,
                                      preview=lambda m, n: previews.append((n, m.max())))
    assert [n for n, _ in previews] == [1, 2, 4]
    np.testing.assert_allclose(progressive.signed, plain.signed, rtol=1e-5, atol=1e-6)
    assert progressive.evaluations == plain.evaluations == 17


def test_progressive_stops_early_when_the_map_settles(tmp_path, rng):
    model = ibx.load_model(om.save(om.convolution(np.ones((3, 3), np.float32)), tmp_path, "conv"))
    x = rng.normal(size=(16, 16)).astype(np.float32)
    mask = np.zeros(x.shape, bool)
    mask[5:8, 5:8] = True
    result = ibx.forward_mapping(model, x, mask, n_jitters=8, progressive=True, tolerance=1e-4)
    assert result.parameters["n_jitters_used"] == 2  # a linear model's F does not change with the grid
    assert result.evaluations == 2 * 2 + 1


# -- local forward maps: tiles of samples much larger than the model's reach ---------------------------------
def _local_and_whole(model, x, mask, **kw):
    local = ibx.forward_mapping(model, x, mask, method="local", **kw)
    whole = ibx.forward_mapping(model, x, mask, method="whole", **kw)
    return local, whole


def test_local_forward_on_a_large_image_equals_the_kernel_and_the_whole_image_map(tmp_path, rng):
    model = ibx.load_model(om.save(om.convolution(KERNEL), tmp_path, "conv"))
    x = rng.normal(size=(160, 150)).astype(np.float32)
    mask = box_mask(x.shape, slice(70, 75), slice(60, 66))
    local, whole = _local_and_whole(model, x, mask, n_jitters=2, max_jitter=1.0)
    assert local.tiling["tiles"] is True and whole.tiling["tiles"] is False
    assert local.radius["measured"] == 1 and local.radius["window"] == [48, 48]
    np.testing.assert_allclose(local.signed, om.correlate(mask, KERNEL), atol=1e-5)
    np.testing.assert_array_equal(local.signed, whole.signed)
    np.testing.assert_array_equal(local.normalized, whole.normalized)
    assert local.equivalent_evaluations < 0.25 * whole.equivalent_evaluations


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_local_forward_of_a_strided_autoencoder_equals_the_whole_image_map(tmp_path, rng, layout):
    model = ibx.load_model(om.save(om.small_autoencoder(layout=layout), tmp_path, "cae",
                                   {"input": {"multiple_of": 2}}))
    x = rng.normal(size=(192, 176)).astype(np.float32)
    mask = box_mask(x.shape, slice(101, 106), slice(40, 47))
    local, whole = _local_and_whole(model, x, mask, n_jitters=3)
    assert local.tiling["tiles"] is True and local.tiling["alignment"] >= 2
    np.testing.assert_allclose(local.signed, whole.signed, rtol=1e-5, atol=1e-6 * np.abs(whole.signed).max())
    assert np.count_nonzero(whole.signed) and not np.any(whole.signed[np.abs(local.signed) == 0])


def test_local_forward_per_slice_of_a_volume_for_a_2d_model(tmp_path, rng):
    model = ibx.load_model(om.save(om.convolution(KERNEL), tmp_path, "conv", {"spatial_dims": 2}))
    x = rng.normal(size=(4, 140, 150)).astype(np.float32)
    mask = np.zeros(x.shape, bool)
    mask[1, 20:24, 100:110] = True
    mask[3, 120:125, 5:9] = True
    local, whole = _local_and_whole(model, x, mask, n_jitters=1, max_jitter=1.0)
    assert local.tiling["tiles"] is True and local.tiling["items"] == 2
    np.testing.assert_array_equal(local.signed, whole.signed)
    for s in range(4):
        np.testing.assert_allclose(local.signed[s], om.correlate(mask[s], KERNEL), atol=1e-5)


def test_local_forward_of_a_3d_model_equals_the_kernel(tmp_path, rng):
    kernel = rng.normal(size=(3, 3, 3)).astype(np.float32)
    model = ibx.load_model(om.save(om.convolution(kernel, layout="NCDHW"), tmp_path, "conv3d"))
    x = rng.normal(size=(72, 96, 100)).astype(np.float32)
    mask = box_mask(x.shape, slice(30, 35), slice(50, 55), slice(70, 75))
    local = ibx.forward_mapping(model, x, mask, n_jitters=2, max_jitter=1.0, method="local")
    assert local.tiling["tiles"] is True and local.radius["window"] == [48, 48, 48]
    np.testing.assert_allclose(local.signed, om.correlate(mask, kernel), atol=1e-5)
    assert local.equivalent_evaluations < 2  # whole samples: 2N = 4


def test_global_response_keeps_the_whole_sample_path_and_says_so(tmp_path, rng):
    model = ibx.load_model(om.save(om.convolution_plus_mean(KERNEL, 0.5), tmp_path, "global"))
    x = rng.normal(size=(160, 150)).astype(np.float32)
    mask = box_mask(x.shape, slice(70, 75), slice(60, 66))
    local, whole = _local_and_whole(model, x, mask, n_jitters=2, max_jitter=1.0)
    assert local.tiling == {"tiles": False, "reason": "the model's response is global"}
    assert local.radius["is_global"] is True
    np.testing.assert_allclose(local.signed, whole.signed, atol=1e-6)
    assert np.all(local.signed != 0)  # the mean reaches every voxel


# -- never more model work than brute force ---------------------------------------------------------------------
def _smooth_image(rng, channels=1, size=256):
    from scipy import ndimage
    images = [ndimage.gaussian_filter(rng.normal(size=(size, size)), 4).astype(np.float32) * 40 + 100
              for _ in range(channels)]
    return images[0] if channels == 1 else images


@pytest.mark.parametrize("name", ["bn_unet", "in_unet", "gn_unet", "se_unet", "pix2pix_unet256", "resnet_in"])
def test_forward_on_common_generators_costs_at_most_brute_force_and_says_why(tmp_path, rng, name):
    """Generators whose reach is near the image size, or global: IBIX measures the radius only while it can pay."""
    model = ibx.load_model(om.save_generator(name, tmp_path))
    x = _smooth_image(rng, len(model.card.input.channels))
    mask = box_mask((256, 256), slice(116, 121), slice(138, 143))
    for n_jitters in (4, 8):
        result = ibx.forward_mapping(model, x, mask, n_jitters=n_jitters)
        work = result.work
        assert work["brute_force_equivalent_evaluations"] == 1 + 2 * n_jitters
        assert work["vs_brute_force"] <= 1.1, (name, result.path)
        assert result.path["method"] == "whole samples" and result.path["reason"]
    # the radius measured so far is kept: the same map again costs brute force's work exactly
    assert ibx.forward_mapping(model, x, mask, n_jitters=4).work["vs_brute_force"] == 1.0


def test_forward_path_and_work_say_tiles_and_where_the_radius_came_from(tmp_path, rng):
    model = ibx.load_model(om.save(om.convolution(KERNEL), tmp_path, "conv"))
    x = rng.normal(size=(160, 150)).astype(np.float32)
    mask = box_mask(x.shape, slice(70, 75), slice(60, 66))
    first = ibx.forward_mapping(model, x, mask, n_jitters=8, max_jitter=1.0)
    assert first.path["method"] == "tiles around the mask" and first.path["radius_source"] == "measured"
    assert "within 3 voxels of the mask" in first.path["reason"]  # 1, and a 2-voxel margin (stride 1)
    again = ibx.forward_mapping(model, x, mask, n_jitters=8, max_jitter=1.0)
    assert again.path["radius_source"] == "cached" and again.evaluations < first.evaluations
    assert again.work["vs_brute_force"] < 0.1 and again.to_dict()["path"] == again.path
    np.testing.assert_array_equal(again.signed, first.signed)


def test_unperturbed_outputs_of_whole_samples_come_with_the_result(tmp_path, rng):
    model = ibx.load_model(om.save(om.convolution(KERNEL), tmp_path, "conv", {"spatial_dims": 2}))
    x = rng.normal(size=(4, 20, 24)).astype(np.float32)
    mask = np.zeros(x.shape, bool)
    mask[1, 5:8, 5:8] = mask[3, 10:12, 4:6] = True
    result = ibx.forward_mapping(model, x, mask, n_jitters=2, max_jitter=1.0, method="whole")
    assert sorted(result.outputs) == [1, 3]
    for s in (1, 3):
        np.testing.assert_allclose(result.outputs[s], om.correlate(x[s], KERNEL), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(result.normalized, np.abs(result.signed) / np.abs(result.signed).max())
    assert result.peak == float(np.abs(result.signed).max()) == result.to_dict()["max_abs"]
