"""Progressive jitters: nested grids reuse every evaluation, previews arrive first, the final map is unchanged."""
import numpy as np

import IBIXLogic as ibx
import onnx_models as om
from IBIXLogic.perturb import jitter_levels, jitter_schedule


def test_schedule_levels_are_nested_and_cover_the_grid_once():
    for n in (1, 4, 6, 8, 12):
        schedule = jitter_schedule(n, progressive=True)
        assert schedule[-1][0] == n
        indices = np.concatenate([subset for _, subset in schedule])
        assert sorted(indices.tolist()) == list(range(2 * n))
        grid = jitter_levels(n, 1.0)
        seen = []
        for level, subset in schedule:
            seen.extend(grid[subset])
            np.testing.assert_allclose(sorted(seen), jitter_levels(level, 1.0))


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
    assert progressive.evaluations == plain.evaluations
