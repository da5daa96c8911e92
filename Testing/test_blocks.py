"""Blocks (blocks.py): superpixels, grids, and supervoxels of large volumes cut chunk by chunk with a cache."""
import numpy as np
import pytest
from scipy import ndimage

import IBIXLogic as ibx
from IBIXLogic import blocks


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images cut the same voxels into the same blocks (numbering aside)."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


@pytest.fixture
def volume(rng):
    return ndimage.gaussian_filter(rng.normal(size=(40, 70, 66)), 2).astype(np.float32)


def test_chunks_near_a_box_are_cut_as_in_the_whole_volume(volume):
    edge = blocks.chunk_edge(volume.shape, 600)
    assert edge == 32
    whole = blocks.chunked_supervoxels(volume, 600, spacing=(2.0, 1.0, 1.0))
    near = blocks.chunked_supervoxels(volume, 600, spacing=(2.0, 1.0, 1.0),
                                      box=(slice(10, 12), slice(40, 45), slice(5, 9)))
    cut = (slice(0, 32), slice(32, 64), slice(0, 32))
    assert np.all(near[cut] > 0) and np.count_nonzero(near) == near[cut].size
    assert _same_partition(near[cut], whole[cut])
    assert 0.5 * 600 < whole.max() < 1.5 * 600  # every chunk got its share of K


def test_chunks_cut_once_are_reused(volume, monkeypatch):
    blocks.chunked_supervoxels(volume, 500, box=(slice(0, 5), slice(0, 5), slice(0, 5)))
    calls = []
    real = blocks.superpixel_blocks
    monkeypatch.setattr(blocks, "superpixel_blocks", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = blocks.chunked_supervoxels(volume, 500, box=(slice(0, 5), slice(0, 5), slice(0, 5)))
    assert calls == [] and again.max() > 0
    other = volume.copy()
    other[0, 0, 0] += 1.0  # another volume: cut afresh
    blocks.chunked_supervoxels(other, 500, box=(slice(0, 5), slice(0, 5), slice(0, 5)))
    assert calls == [1]


def test_backward_on_a_large_volume_cuts_blocks_only_near_the_mask_and_is_exact(tmp_path, rng, volume,
                                                                              monkeypatch):
    import onnx_models as om
    from IBIXLogic import backward

    monkeypatch.setattr(blocks, "CHUNKS_AT_LEAST", 2)  # the test volume counts as large
    kernel = rng.normal(size=(3, 3, 3)).astype(np.float32)
    model = ibx.load_model(om.save(om.convolution(kernel, layout="NCDHW"), tmp_path, "conv3d"))
    out_mask = om.box_mask(volume.shape, slice(18, 21), slice(10, 13), slice(40, 43))
    result = ibx.backward_mapping(model, volume, out_mask, n_blocks=600, n_jitters=1, max_jitter=1.0)
    labels = result.labels
    assert result.tiling["tiles"] is True
    assert np.all(labels[:32, :32, 32:64] > 0) and np.count_nonzero(labels) == 32 * 32 * 32  # one chunk cut
    expected = np.zeros(labels.max() + 1)
    for k in range(1, labels.max() + 1):
        response = np.abs(om.correlate((labels == k).astype(np.float32), kernel))
        expected[k] = response[out_mask].sum() / response.sum()
    np.testing.assert_allclose(result.block_values, expected, rtol=1e-5, atol=1e-7)
    assert np.count_nonzero(expected) > 1


@pytest.mark.parametrize("shape, n_blocks, chunked", [
    ((128, 128, 128), 2000, True), ((160, 192, 192), 2000, True), ((64, 64, 64), 500, False),
    ((28, 128, 128), 40, False), ((96, 96, 96), 2000, True), ((233, 197), 500, False)])
def test_supervoxels_are_cut_in_chunks_by_the_image_size_and_k_alone(shape, n_blocks, chunked):
    """Chunks from 27 of them on: a mid-size volume (128^3) cuts only the chunks near its mask, as large ones do."""
    assert blocks.cut_in_chunks(shape, n_blocks) is chunked
