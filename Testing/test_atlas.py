"""Oracle tests of the response atlas: its answers equal backward_mapping's on the same blocks and jitters, with no
model evaluation; fingerprints, the memory budget and the file round trip."""
import json
from pathlib import Path

import numpy as np
import pytest

import IBIXLogic as ibx
import onnx_models as om
from onnx_models import KERNEL, box_mask

ROOT = Path(__file__).resolve().parents[1]


def assert_atlas_answers_like_backward_mapping(model, x, masks, atlas, n_jitters, **options):
    """For every mask and both normalizations: the atlas's result equals backward_mapping on the atlas's blocks,
    and answering runs the model 0 times."""
    for out_mask in masks:
        for normalization in ("fraction", "magnitude"):
            before = model.evaluations
            answer = atlas.backward(out_mask, normalization=normalization)
            assert model.evaluations == before and answer.evaluations == 0
            expected = ibx.backward_mapping(model, x, out_mask, blocks=atlas.labels, n_jitters=n_jitters,
                                            normalization=normalization, **options)
            assert isinstance(answer, ibx.BackwardResult)
            np.testing.assert_array_equal(answer.labels, expected.labels)
            np.testing.assert_allclose(answer.block_values, expected.block_values, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(answer.map, expected.map, rtol=1e-5, atol=1e-7)
            assert answer.geometry.matches(expected.geometry)
            assert answer.parameters["normalization"] == normalization
            assert answer.parameters["output_mask_voxels"] == int(out_mask.sum())


@pytest.mark.parametrize("name", ["identity", "convolution", "autoencoder"])
@pytest.mark.parametrize("entries_per_call", [0, 10**12])
def test_2d_atlas_equals_backward_mapping(tmp_path, rng, monkeypatch, name, entries_per_call):
    # both ways of answering: the blocks near the mask one by one, and all entries at once
    monkeypatch.setattr(ibx.atlas, "ENTRIES_PER_CALL", entries_per_call)
    built = {"identity": om.identity(), "convolution": om.convolution(KERNEL), "autoencoder": om.small_autoencoder()}
    model = ibx.load_model(om.save(built[name], tmp_path, name))
    x = rng.normal(size=(48, 56)).astype(np.float32)
    atlas = ibx.block_response_atlas(model, x, n_blocks=80, compactness=1.0, n_jitters=2)
    assert atlas.labels.shape == x.shape and atlas.labels.max() == atlas.n_blocks
    masks = [box_mask(x.shape, slice(20, 25), slice(30, 35)), box_mask(x.shape, slice(0, 48), slice(0, 6)),
             box_mask(x.shape, slice(5, 45), slice(8, 50)), rng.random(x.shape) < 0.05]
    assert_atlas_answers_like_backward_mapping(model, x, masks, atlas, 2)
    # the same blocks as backward_mapping cuts itself on an image
    own = ibx.backward_mapping(model, x, masks[0], n_blocks=80, compactness=1.0, n_jitters=2)
    np.testing.assert_array_equal(own.labels, atlas.labels)


def test_convolution_atlas_matches_the_closed_form(tmp_path, rng):
    """B of a known convolution, from the response of each block computed by hand."""
    model = ibx.load_model(om.save(om.convolution(KERNEL), tmp_path, "conv"))
    x = rng.normal(size=(30, 26)).astype(np.float32)
    blocks = ibx.superpixel_blocks(x, 40, compactness=1.0)
    atlas = ibx.block_response_atlas(model, x, blocks=blocks, n_jitters=3)
    np.testing.assert_array_equal(atlas.labels, blocks)  # SLIC numbers its blocks 1..K already
    responses = [np.abs(om.correlate(blocks == k, KERNEL)) for k in range(1, blocks.max() + 1)]
    for out_mask in [box_mask(x.shape, slice(12, 17), slice(10, 15)), box_mask(x.shape, slice(0, 3), slice(0, 26))]:
        expected = np.array([0.0] + [r[out_mask].sum() / r.sum() for r in responses])
        np.testing.assert_allclose(atlas.backward(out_mask).block_values, expected, rtol=1e-5, atol=1e-7)
        numerators = np.array([0.0] + [r[out_mask].sum() for r in responses])
        np.testing.assert_allclose(atlas.backward(out_mask, "magnitude").block_values,
                                   numerators / numerators.max(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(atlas.denominator[1:], [r.sum() for r in responses], rtol=1e-5)


def test_2d_model_slice_by_slice_on_a_volume(tmp_path, rng):
    model = ibx.load_model(om.save(om.small_autoencoder(), tmp_path, "cae"))
    x = rng.normal(size=(5, 32, 36)).astype(np.float32)
    atlas = ibx.block_response_atlas(model, x, n_blocks=25, compactness=1.0, n_jitters=1)
    assert all(atlas.labels[s].min() >= 1 for s in range(5))  # every slice cut into blocks
    assert atlas.parameters["slice_axis"] == 0
    one_slice = np.zeros(x.shape, bool)
    one_slice[2, 10:15, 12:18] = True
    several = np.zeros(x.shape, bool)
    several[2:5, 20:30, 3:9] = True  # the middle slice first, where the atlas measured the response radius
    assert_atlas_answers_like_backward_mapping(model, x, [one_slice, several], atlas, 1)
    answer = atlas.backward(one_slice)
    assert np.all(answer.map[[0, 1, 3, 4]] == 0) and answer.parameters["samples"] == 1


def test_3d_atlas_on_a_pooling_model_and_a_convolution(tmp_path, rng):
    model = ibx.load_model(om.save(om.small_autoencoder_3d(), tmp_path, "cae3d",
                                   {"spatial_dims": 3, "input": {"layout": "NCDHW", "multiple_of": 2}}))
    x = rng.normal(size=(24, 28, 32)).astype(np.float32)
    atlas = ibx.block_response_atlas(model, x, n_blocks=40, compactness=1.0, n_jitters=1)
    masks = [box_mask(x.shape, slice(11, 13), slice(13, 15), slice(15, 17)),
             box_mask(x.shape, slice(0, 24), slice(0, 4), slice(0, 32))]
    assert_atlas_answers_like_backward_mapping(model, x, masks, atlas, 1)
    kernel = rng.normal(size=(3, 3, 3)).astype(np.float32)
    conv = ibx.load_model(om.save(om.convolution(kernel, layout="NCDHW"), tmp_path, "conv3d"))
    atlas = ibx.block_response_atlas(conv, x, n_blocks=40, compactness=1.0, n_jitters=1)
    out_mask = masks[0]
    expected = np.array([0.0] + [np.abs(om.correlate(atlas.labels == k, kernel))[out_mask].sum()
                                 / np.abs(om.correlate(atlas.labels == k, kernel)).sum()
                                 for k in range(1, atlas.n_blocks + 1)])
    np.testing.assert_allclose(atlas.backward(out_mask).block_values, expected, rtol=1e-5, atol=1e-7)


def test_demo_model_atlas_equals_backward_mapping():
    model = ibx.load_model(ROOT / "Resources" / "Models" / "t1_to_t2_cae.onnx")
    t1, _ = ibx.read_volume(ROOT / "Resources" / "SampleData" / "IBIX-T1.nrrd")
    image = t1[93, 40:200, 20:180].astype(np.float32)  # 160x160 voxels around the ventricles
    atlas = ibx.block_response_atlas(model, image, n_blocks=100, n_jitters=1)
    assert atlas.radius["margin"] == 0 and atlas.radius["measured"] >= 16
    masks = [box_mask(image.shape, slice(77, 83), slice(77, 83)), image > np.percentile(image, 97)]
    assert_atlas_answers_like_backward_mapping(model, image, masks, atlas, 1)


def test_global_response_within_the_budget_and_beyond_it(tmp_path, rng):
    """A global response (an image mean) is kept whole for every block, which the budget bounds."""
    model = ibx.load_model(om.save(om.convolution_plus_mean(KERNEL, 1e-3), tmp_path, "global"))
    x = rng.normal(size=(40, 40)).astype(np.float32)
    blocks = ibx.grid_blocks(x.shape, 100)
    atlas = ibx.block_response_atlas(model, x, blocks=blocks, n_jitters=2)
    assert atlas.radius["is_global"] is True and atlas.parameters["method"] == "batched"
    assert len(atlas.values) == 100 * 40 * 40  # every block reaches every voxel
    assert_atlas_answers_like_backward_mapping(model, x, [box_mask(x.shape, slice(18, 22), slice(18, 22))],
                                               atlas, 2, method="batched")
    before = model.evaluations
    with pytest.raises(ibx.InputError, match="memory budget of 1 MiB") as error:
        ibx.block_response_atlas(model, x, blocks=blocks, n_jitters=2, memory_budget=2**20)
    assert "memory budget of 1 MiB" in str(error.value) and "global" in str(error.value)
    # refused before any block was evaluated; the radius is the one the first atlas measured, kept by the process
    assert atlas.radius["evaluations"] > 0 and model.evaluations - before == 0


def test_fingerprints_refuse_another_model_or_input(tmp_path, rng):
    model = ibx.load_model(om.save(om.convolution(KERNEL), tmp_path, "conv"))
    x = rng.normal(size=(20, 20)).astype(np.float32)
    geometry = ibx.Geometry((0.0, 0.0), (0.5, 0.5), np.eye(2), (20, 20))
    atlas = ibx.block_response_atlas(model, x, n_blocks=16, n_jitters=1, geometry=geometry)
    atlas.check(model, x, geometry)
    other = ibx.load_model(om.save(om.convolution(KERNEL * 2), tmp_path, "conv2"))
    with pytest.raises(ibx.InputError, match="another model"):
        atlas.check(other, x, geometry)
    with pytest.raises(ibx.InputError, match="another input"):
        atlas.check(model, x + 1, geometry)
    with pytest.raises(ibx.InputError, match="another input"):
        atlas.check(model, x, ibx.Geometry((0.0, 0.0), (1.0, 1.0), np.eye(2), (20, 20)))
    path = atlas.save(tmp_path / "atlas.npz")
    with pytest.raises(ibx.InputError, match="another model"):
        ibx.ResponseAtlas.load(path, other, x, geometry)


def test_save_and_load_round_trip(tmp_path, rng):
    model = ibx.load_model(om.save(om.small_autoencoder(), tmp_path, "cae"))
    x = rng.normal(size=(32, 40)).astype(np.float32)
    kept = x.copy()
    atlas = ibx.block_response_atlas(model, x, n_blocks=30, compactness=1.0, n_jitters=2)
    np.testing.assert_array_equal(x, kept)  # inputs are never modified
    path = atlas.save(tmp_path / "atlas.npz")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial file left
    loaded = ibx.ResponseAtlas.load(path, model, x)
    with np.load(path, allow_pickle=False) as data:  # plain arrays, no pickled objects
        assert set(data.files) >= {"labels", "index", "values", "meta"}
    out_mask = box_mask(x.shape, slice(10, 16), slice(12, 20))
    a, b = atlas.backward(out_mask), loaded.backward(out_mask)
    np.testing.assert_array_equal(a.block_values, b.block_values)
    np.testing.assert_array_equal(a.map, b.map)
    assert loaded.parameters == atlas.parameters and loaded.fingerprints == atlas.fingerprints
    assert loaded.geometry.matches(atlas.geometry) and loaded.nbytes == atlas.nbytes
    assert loaded.to_dict()["memory_mib"] == atlas.to_dict()["memory_mib"]
    (tmp_path / "not_an_atlas.npz").write_bytes(b"nonsense")
    with pytest.raises(ibx.InputError, match="not_an_atlas.npz: damaged response atlas: it is not a readable .npz"):
        ibx.ResponseAtlas.load(tmp_path / "not_an_atlas.npz")
    with pytest.raises(ibx.InputError, match="not found"):
        ibx.ResponseAtlas.load(tmp_path / "missing.npz")


def test_bad_arguments_are_named(conv_model, image, mask):
    with pytest.raises(ibx.InputError, match="n_blocks"):
        ibx.block_response_atlas(conv_model, image, n_blocks=0)
    with pytest.raises(ibx.InputError, match="memory_budget"):
        ibx.block_response_atlas(conv_model, image, memory_budget=0)
    with pytest.raises(ibx.InputError, match="blocks"):
        ibx.block_response_atlas(conv_model, image, blocks="squares")
    with pytest.raises(ibx.InputError, match="max_jitter"):
        ibx.block_response_atlas(conv_model, image, max_jitter=-1.0)
    atlas = ibx.block_response_atlas(conv_model, image, n_blocks=9, blocks="grid", n_jitters=1)
    with pytest.raises(ibx.InputError, match="normalization"):
        atlas.backward(mask, normalization="softmax")
    with pytest.raises(ibx.InputError, match="shape"):
        atlas.backward(mask[:10])
    with pytest.raises(ibx.InputError, match="empty"):
        atlas.backward(np.zeros_like(mask))


def test_answers_cannot_change_the_atlas(conv_model, image, mask):
    atlas = ibx.block_response_atlas(conv_model, image, n_blocks=9, blocks="grid", n_jitters=1)
    answer = atlas.backward(mask)
    with pytest.raises(ValueError):
        answer.labels[0, 0] = 5  # the labels are the atlas's own, read-only
    answer.map[:] = 0  # the map is the answer's own
    assert atlas.backward(mask).map.max() > 0


def test_progress_and_cancel(conv_model, image):
    import threading
    reports = []
    ibx.block_response_atlas(conv_model, image, n_blocks=16, blocks="grid", n_jitters=1,
                             progress=lambda done, total, message: reports.append((done, total, message)))
    assert reports and all(m.startswith("response atlas") and 0 < d <= t for d, t, m in reports)
    assert reports[-1][0] == reports[-1][1]
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(ibx.Cancelled):
        ibx.block_response_atlas(conv_model, image, n_blocks=16, blocks="grid", n_jitters=1, cancel=cancel)


def test_multichannel_model_and_a_chosen_channel(tmp_path, rng):
    model = ibx.load_model(om.save(om.channel_mix([0.5, -2.0, 3.0]), tmp_path, "mix"))
    x = [rng.normal(size=(24, 28)).astype(np.float32) for _ in range(3)]
    atlas = ibx.block_response_atlas(model, x, n_blocks=20, compactness=1.0, n_jitters=1, channels=[1])
    assert atlas.parameters["channels"] == [model.card.input.channels[1]]
    out_mask = box_mask((24, 28), slice(5, 12), slice(6, 20))
    expected = ibx.backward_mapping(model, x, out_mask, blocks=atlas.labels, n_jitters=1, channels=[1])
    np.testing.assert_allclose(atlas.backward(out_mask).block_values, expected.block_values, rtol=1e-5, atol=1e-7)
    atlas.check(model, x)
    with pytest.raises(ibx.InputError, match="another input"):
        atlas.check(model, [x[0], x[2], x[1]])


def test_the_same_grid_written_another_way_matches(conv_model, image):
    """A geometry that differs in the last digits (the same grid read or converted another way) is the same input."""
    geometry = ibx.Geometry((10.0, -5.0), (0.7, 0.7), np.eye(2), image.shape)
    atlas = ibx.block_response_atlas(conv_model, image, n_blocks=9, blocks="grid", n_jitters=1, geometry=geometry)
    nearly = ibx.Geometry((10.0 + 1e-9, -5.0), (0.7 * (1 + 1e-12), 0.7), np.eye(2) + 1e-13, image.shape)
    atlas.check(conv_model, image, nearly)


def test_an_atlas_whose_tiles_overlap_runs_its_large_sample_once_unperturbed(tmp_path, rng):
    """Above 2^20 voxels a tile runs its own unperturbed output, unless the tiles add up to more than the sample."""
    model = ibx.load_model(om.save(om.convolution(rng.normal(size=(3, 3, 3)).astype(np.float32), layout="NCDHW"),
                                   tmp_path, "conv3d"))
    x = rng.normal(size=(104, 104, 104)).astype(np.float32)
    atlas = ibx.block_response_atlas(model, x, blocks=ibx.grid_blocks(x.shape, 125), n_jitters=1)
    tiling = atlas.tiling
    assert tiling["tiles"] is True and tiling["voxels_per_sample"] > 1
    # the probes, the tiles' check (a tile and a wider one), the whole sample once, every tile jittered twice
    assert atlas.evaluations == atlas.radius["evaluations"] + 2 + 1 + 2 * tiling["items"]


# -- damaged atlas files ---------------------------------------------------------------------------------------------
def _damaged(tmp_path, conv_model, image, edit, checksum=True):
    """The atlas of ``image`` saved, then its arrays changed by ``edit`` (the checksum written anew when asked, as a
    faulty writer would)."""
    atlas = ibx.block_response_atlas(conv_model, image, n_blocks=9, blocks="grid", n_jitters=1)
    path = atlas.save(tmp_path / "atlas.npz")
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    edit(arrays)
    if checksum and all(name in arrays for name in ibx.atlas.ARRAYS):
        meta = json.loads(str(arrays["meta"]))
        meta["checksum"] = ibx.atlas.contents_checksum(arrays)
        arrays["meta"] = np.array(json.dumps(meta))
    with open(path, "wb") as file:
        np.savez(file, **arrays)
    return path


@pytest.mark.parametrize("edit, checksum, message", [
    (lambda a: a.__setitem__("values", np.full_like(a["values"], np.nan)), True, "values that are not finite"),
    (lambda a: a.__setitem__("values", a["values"] * np.float32(1.001)), False, "do not match the checksum"),
    (lambda a: a.__setitem__("starts", a["starts"][::-1].copy()), True, "block offsets .* are not increasing"),
    (lambda a: a.__setitem__("denominator", -a["denominator"]), True, "denominators are not the sums"),
    (lambda a: a.__setitem__("index", a["index"] + a["labels"].size), True, "outside the grid"),
    (lambda a: a.update(low=a["high"].copy(), high=a["low"].copy()), True, "does not hold the block"),
    (lambda a: a.__setitem__("values", a["values"].astype(np.float64)), True, "values is float64"),
    (lambda a: a.pop("denominator"), True, "lacks the array"),
    (lambda a: a.__setitem__("meta", np.array("{")), False, "metadata are not JSON"),
])
def test_a_damaged_atlas_is_refused_naming_the_file_and_the_damage(tmp_path, conv_model, image, edit, checksum,
                                                                   message):
    """NaN responses gave B = NaN everywhere, reversed offsets or negative denominators B = 0 ("no influence"): each
    is now refused when the atlas is read."""
    path = _damaged(tmp_path, conv_model, image, edit, checksum)
    with pytest.raises(ibx.InputError, match=rf"atlas.npz: damaged response atlas: .*{message}"):
        ibx.ResponseAtlas.load(path)


def test_a_mask_of_another_grid_blames_the_atlas(conv_model, image, mask):
    atlas = ibx.block_response_atlas(conv_model, image, n_blocks=9, blocks="grid", n_jitters=1)
    with pytest.raises(ibx.InputError, match=r"the response atlas is of a grid of shape \(20, 20\) but the output mask "
                                             r"has shape \(20, 18\): the atlas was computed on another input"):
        atlas.backward(mask[:, :18])
