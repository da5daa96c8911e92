"""Oracle tests of the backward mapping B, its fast paths and coarse-to-fine refinement."""
import numpy as np
import pytest

import IBIXLogic as ibx
import onnx_models as om
from onnx_models import KERNEL, box_mask


def expected_fraction(labels, out_mask, response_of_block):
    values = np.zeros(labels.max() + 1)
    for k in range(1, labels.max() + 1):
        response = np.abs(response_of_block(labels == k))
        values[k] = response[out_mask].sum() / response.sum()
    return values


@pytest.mark.parametrize("method", ["brute", "batched", "local"])
def test_identity_backward_is_one_inside_and_zero_far_away(tmp_path, rng, method):
    model = ibx.load_model(om.save(om.identity(), tmp_path, "identity"))
    x = rng.normal(size=(24, 24)).astype(np.float32)
    blocks = ibx.grid_blocks(x.shape, 36)  # 4x4 voxel blocks
    out_mask = np.isin(blocks, [8, 9, 15])
    result = ibx.backward_mapping(model, x, out_mask, blocks=blocks, n_jitters=2, method=method)
    np.testing.assert_allclose(result.block_values[[8, 9, 15]], 1.0)
    others = np.setdiff1d(np.arange(1, 37), [8, 9, 15])
    np.testing.assert_array_equal(result.block_values[others], 0.0)
    np.testing.assert_array_equal(result.map, out_mask.astype(np.float32))
    np.testing.assert_array_equal(result.labels, blocks)


@pytest.mark.parametrize("method", ["brute", "batched", "local"])
def test_convolution_backward_matches_closed_form(tmp_path, rng, method):
    model = ibx.load_model(om.save(om.convolution(KERNEL), tmp_path, "conv"))
    x = rng.normal(size=(30, 26)).astype(np.float32)
    blocks = ibx.superpixel_blocks(x, 40, compactness=1.0)
    out_mask = np.zeros(x.shape, bool)
    out_mask[12:17, 10:15] = True
    result = ibx.backward_mapping(model, x, out_mask, blocks=blocks, n_jitters=3, method=method)
    expected = expected_fraction(blocks, out_mask, lambda block: om.correlate(block, KERNEL))
    np.testing.assert_allclose(result.block_values, expected, rtol=1e-5, atol=1e-7)
    magnitude = ibx.backward_mapping(model, x, out_mask, blocks=blocks, n_jitters=3, method=method,
                                     normalization="magnitude")
    numerators = np.array([0.0] + [np.abs(om.correlate(blocks == k, KERNEL))[out_mask].sum()
                                   for k in range(1, blocks.max() + 1)])
    np.testing.assert_allclose(magnitude.block_values, numerators / numerators.max(), rtol=1e-5, atol=1e-7)


def test_local_method_is_exact_and_cheaper_on_a_nonlinear_model(tmp_path, rng):
    model = ibx.load_model(om.save(om.small_autoencoder(), tmp_path, "cae"))
    x = rng.normal(size=(64, 72)).astype(np.float32)
    out_mask = np.zeros(x.shape, bool)
    out_mask[30:35, 40:45] = True
    brute = ibx.backward_mapping(model, x, out_mask, n_blocks=150, compactness=1.0, n_jitters=2,
                                 method="brute")
    local = ibx.backward_mapping(model, x, out_mask, blocks=brute.labels, n_jitters=2, method="local")
    np.testing.assert_allclose(local.block_values, brute.block_values, rtol=1e-6, atol=1e-9)
    assert local.radius["is_global"] is False and local.radius["measured"] >= 3
    assert local.tiling["tiles"] is True
    assert local.tiling["alignment"] == 2  # the model's max-pooling stride, found without a card
    import json
    assert json.loads(json.dumps(local.to_dict()))["tiling"] == local.tiling
    assert local.equivalent_evaluations * 4 < brute.equivalent_evaluations == brute.evaluations
    grouped = ibx.backward_mapping(model, x, out_mask, blocks=brute.labels, n_jitters=2, method="local",
                                   tiles=False)
    np.testing.assert_allclose(grouped.block_values, brute.block_values, rtol=1e-6, atol=1e-9)
    assert grouped.tiling["tiles"] is False
    assert grouped.evaluations * 4 < brute.evaluations


def batched_and_local_3d(model, rng, shape, n_blocks):
    """(output mask, batched B, local B) for a random volume and a 2x2x2 output mask at its centre."""
    x = rng.normal(size=shape).astype(np.float32)
    out_mask = np.zeros(shape, bool)
    out_mask[tuple(slice(c - 1, c + 1) for c in np.asarray(shape) // 2)] = True
    batched = ibx.backward_mapping(model, x, out_mask, n_blocks=n_blocks, compactness=1.0, n_jitters=1,
                                   method="batched")
    local = ibx.backward_mapping(model, x, out_mask, blocks=batched.labels, n_jitters=1, method="local")
    return out_mask, batched, local


def test_3d_supervoxels_local_equals_batched(tmp_path, rng):
    kernel = rng.normal(size=(3, 3, 3)).astype(np.float32)
    model = ibx.load_model(om.save(om.convolution(kernel, layout="NCDHW"), tmp_path, "conv3d"))
    out_mask, batched, local = batched_and_local_3d(model, rng, (30, 34, 38), 150)
    expected = expected_fraction(batched.labels, out_mask, lambda block: om.correlate(block, kernel))
    np.testing.assert_allclose(batched.block_values, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(local.block_values, expected, rtol=1e-5, atol=1e-7)
    assert local.tiling["tiles"] is True
    assert local.equivalent_evaluations < batched.evaluations / 4


def test_2d_model_backward_on_volume_uses_only_touched_slices(tmp_path, rng):
    model = ibx.load_model(om.save(om.convolution(KERNEL), tmp_path, "conv"))
    x = rng.normal(size=(5, 20, 20)).astype(np.float32)
    out_mask = np.zeros(x.shape, bool)
    out_mask[3, 8:11, 8:11] = True
    result = ibx.backward_mapping(model, x, out_mask, n_blocks=20, compactness=1.0, n_jitters=1)
    assert np.all(result.labels[[0, 1, 2, 4]] == 0) and result.labels[3].min() >= 1
    expected = expected_fraction(result.labels[3], out_mask[3], lambda block: om.correlate(block, KERNEL))
    np.testing.assert_allclose(result.block_values, expected, rtol=1e-5, atol=1e-7)


def test_coarse_to_fine_refines_high_blocks_and_reports_levels(tmp_path, rng):
    model = ibx.load_model(om.save(om.small_autoencoder(), tmp_path, "cae"))
    x = rng.normal(size=(64, 64)).astype(np.float32)
    out_mask = np.zeros(x.shape, bool)
    out_mask[28:34, 28:34] = True
    result = ibx.backward_mapping(model, x, out_mask, n_blocks=200, coarse_blocks=[8, 40], compactness=1.0,
                                  n_jitters=2, refine_threshold=0.2)
    assert len(result.evaluations_per_level) == 3 == len(result.blocks_per_level)
    assert sum(result.evaluations_per_level) <= result.evaluations
    # every block's B is that of an exact run on the final blocks: refinement changes blocks, not values
    exact = ibx.backward_mapping(model, x, out_mask, blocks=result.labels, n_jitters=2, method="batched")
    np.testing.assert_allclose(result.block_values, exact.block_values, rtol=1e-6, atol=1e-9)
    sizes = np.bincount(result.labels.ravel())[1:]
    assert sizes.min() < 64 * 64 / 100 < sizes.max()  # fine blocks near the mask, coarse ones elsewhere
    # the refined region gets its share of the 200-block density: fine blocks have the size of 1/200 of the image
    finest = sizes[-result.blocks_per_level[-1]:]  # the last level's blocks have the highest labels
    expected = 200 * finest.sum() / (64 * 64)
    assert 0.5 * expected <= len(finest) <= 1.5 * expected + 1


def test_backward_result_summary_is_json_serialisable(tmp_path, rng):
    import json
    model = ibx.load_model(om.save(om.identity(), tmp_path, "identity"))
    x = rng.normal(size=(16, 16)).astype(np.float32)
    out_mask = np.zeros(x.shape, bool)
    out_mask[4:8, 4:8] = True
    result = ibx.backward_mapping(model, x, out_mask, n_blocks=16, blocks="grid", n_jitters=1)
    summary = json.loads(json.dumps(result.to_dict()))
    assert summary["evaluations"] == result.evaluations and summary["blocks"] == 16


def test_global_response_is_detected_and_handled(tmp_path, rng):
    """A response that reaches everywhere (here an image mean) cannot be cut exactly: auto falls back to the
    batched path, local refuses, and a locality tolerance gives an approximation that says what it cut."""
    model = ibx.load_model(om.save(om.convolution_plus_mean(KERNEL, 1e-3), tmp_path, "global"))
    x = rng.normal(size=(40, 40)).astype(np.float32)
    out_mask = np.zeros(x.shape, bool)
    out_mask[18:22, 18:22] = True
    blocks = ibx.grid_blocks(x.shape, 100)
    batched = ibx.backward_mapping(model, x, out_mask, blocks=blocks, n_jitters=2, method="batched")
    auto = ibx.backward_mapping(model, x, out_mask, blocks=blocks, n_jitters=2)
    assert auto.radius["is_global"] is True and auto.tiling is None
    np.testing.assert_allclose(auto.block_values, batched.block_values, rtol=1e-6, atol=1e-9)
    with pytest.raises(ibx.InputError, match="global"):
        ibx.backward_mapping(model, x, out_mask, blocks=blocks, n_jitters=2, method="local")
    cut = ibx.backward_mapping(model, x, out_mask, blocks=blocks, n_jitters=2, locality_tolerance=0.05)
    assert cut.radius["is_global"] is False and cut.radius["measured"] == 1 and cut.radius["tolerance"] == 0.05
    assert cut.equivalent_evaluations < batched.evaluations / 4
    far = cut.block_values == 0
    assert far.sum() > 50 and np.all(batched.block_values[far] < 0.02)  # what was cut is what barely mattered
    near = ~far
    np.testing.assert_allclose(cut.block_values[near], batched.block_values[near], atol=0.05)


def test_stride_8_demo_model_is_exact_with_the_radius_as_measured(rng):
    """The T1->T2 demo autoencoder pools to 1/8: with its stride declared, all 8 phases are probed and the
    radius is used without a margin; B still equals brute force."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    model = ibx.load_model(root / "Resources" / "Models" / "t1_to_t2_cae.onnx")
    t1, _ = ibx.read_volume(root / "Resources" / "SampleData" / "IBIX-T1.nrrd")
    image = t1[93, 40:200, 20:180].astype(np.float32)  # 160x160 voxels around the ventricles
    out_mask = box_mask(image.shape, slice(77, 83), slice(77, 83))
    brute = ibx.backward_mapping(model, image, out_mask, n_blocks=150, n_jitters=1, method="brute")
    local = ibx.backward_mapping(model, image, out_mask, blocks=brute.labels, n_jitters=1, method="local")
    assert local.radius["probes"] == 8 and local.radius["margin"] == 0 and local.radius["measured"] >= 16
    assert local.tiling["tiles"] is True and local.tiling["alignment"] == 8
    np.testing.assert_allclose(local.block_values, brute.block_values, rtol=1e-6, atol=1e-9)
    assert (local.block_values == 0).sum() > 0  # some blocks are out of reach: B exactly 0, never evaluated


def test_3d_pooling_model_with_declared_stride_is_exact_without_margin(tmp_path, rng):
    model = ibx.load_model(om.save(om.small_autoencoder_3d(), tmp_path, "cae3d",
                                   {"spatial_dims": 3, "input": {"layout": "NCDHW", "multiple_of": 2}}))
    _, batched, local = batched_and_local_3d(model, rng, (32, 36, 40), 120)
    assert local.radius["margin"] == 0 and local.radius["probes"] == 5 and local.radius["measured"] >= 5
    assert local.tiling["tiles"] is True
    np.testing.assert_allclose(local.block_values, batched.block_values, rtol=1e-6, atol=1e-9)


def test_progressive_backward_previews_then_gives_the_same_blocks(tmp_path, rng):
    model = ibx.load_model(om.save(om.small_autoencoder(), tmp_path, "cae"))
    x = rng.normal(size=(48, 48)).astype(np.float32)
    out_mask = np.zeros(x.shape, bool)
    out_mask[20:25, 20:25] = True
    plain = ibx.backward_mapping(model, x, out_mask, n_blocks=60, compactness=1.0, n_jitters=4)
    previews = []
    progressive = ibx.backward_mapping(model, x, out_mask, blocks=plain.labels, n_jitters=4, progressive=True,
                                       preview=lambda m, n: previews.append((n, m.shape)))
    assert previews == [(1, x.shape), (2, x.shape)]
    np.testing.assert_allclose(progressive.block_values, plain.block_values, rtol=1e-5, atol=1e-7)
    assert progressive.radius["source"] == "cached" and progressive.radius["evaluations"] == 0  # measured by plain
    assert progressive.evaluations == plain.evaluations - plain.radius["evaluations"]


@pytest.mark.parametrize("name", ["in_unet", "pix2pix_unet256", "resnet_in"])
def test_backward_on_global_generators_costs_at_most_brute_force(tmp_path, rng, name):
    """A global response: every block is evaluated, and the probes that found it global stay within the budget."""
    from scipy import ndimage
    model = ibx.load_model(om.save_generator(name, tmp_path))
    channels = len(model.card.input.channels)
    images = [ndimage.gaussian_filter(rng.normal(size=(256, 256)), 4).astype(np.float32) for _ in range(channels)]
    x = images[0] if channels == 1 else images
    out_mask = box_mask((256, 256), slice(116, 121), slice(138, 143))
    result = ibx.backward_mapping(model, x, out_mask, blocks=ibx.grid_blocks((256, 256), 36), n_jitters=1)
    assert result.work["brute_force_equivalent_evaluations"] == 1 + 2 * 36
    assert result.work["vs_brute_force"] <= 1.1, result.path
    assert result.path["method"] == "every block, in batches"
    assert result.path["reason"] in ("the model's response is global", "the response radius is unknown")
