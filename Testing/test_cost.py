"""The cost said before a run (cost.py): predicted evaluations exactly, the estimate before any progress, estimates
that stop after one batch, and advice."""
import numpy as np
import pytest

import IBIXLogic as ibx
import onnx_models as om
from IBIXLogic import cost
from onnx_models import KERNEL, box_mask


def _watch(run):
    """Run ``run(estimate=..., progress=...)``; (result, the estimates, the order of calls)."""
    calls, estimates = [], []
    result = run(estimate=lambda e: calls.append("estimate") or estimates.append(e),
                 progress=lambda done, total, message: calls.append("progress"))
    return result, estimates, calls


@pytest.fixture
def cae(tmp_path):
    return ibx.load_model(om.save(om.small_autoencoder(), tmp_path, "cae", {"input": {"multiple_of": 2}}))


@pytest.mark.parametrize("kind", ["forward tiles", "forward whole", "backward local", "backward batched", "atlas",
                                  "progressive"])
def test_the_estimate_counts_the_run_exactly_and_comes_before_any_progress(cae, rng, kind):
    x = rng.normal(size=(112, 104)).astype(np.float32)
    mask = box_mask(x.shape, slice(50, 55), slice(40, 46))
    runs = {
        "forward tiles": lambda **kw: ibx.forward_mapping(cae, x, mask, n_jitters=8, method="local", **kw),
        "forward whole": lambda **kw: ibx.forward_mapping(cae, x, mask, n_jitters=3, method="whole", **kw),
        "backward local": lambda **kw: ibx.backward_mapping(cae, x, mask, n_blocks=80, n_jitters=2, **kw),
        "backward batched": lambda **kw: ibx.backward_mapping(cae, x, mask, n_blocks=30, n_jitters=1,
                                                              method="batched", **kw),
        "atlas": lambda **kw: ibx.block_response_atlas(cae, x, n_blocks=30, n_jitters=1, **kw),
        "progressive": lambda **kw: ibx.backward_mapping(cae, x, mask, n_blocks=40, n_jitters=4, progressive=True,
                                                         **kw),
    }
    result, estimates, calls = _watch(runs[kind])
    assert len(estimates) == 1 and calls[0] == "estimate" and "progress" in calls
    found = estimates[0]
    assert found.evaluations == result.evaluations and found.seconds > 0 and found.device == "cpu"
    record = found.record()
    assert record["stage"] == "estimate" and record["evaluations"] == result.evaluations
    assert isinstance(record["seconds"], float) and isinstance(record["advice"], list)


def test_the_estimate_counts_windows_of_a_sliding_window_model(tmp_path, rng):
    card = {"spatial_dims": 3, "input": {"layout": "NCDHW", "patch": {"size": [8, 12, 12], "overlap": 0.25}}}
    model = ibx.load_model(om.save(om.convolution(np.ones((3, 3, 3), np.float32) / 27, layout="NCDHW"), tmp_path,
                                   "patched", card))
    x = rng.normal(size=(12, 30, 28)).astype(np.float32)
    mask = box_mask(x.shape, slice(5, 7), slice(10, 13), slice(3, 6))
    for run in (lambda **kw: ibx.forward_mapping(model, x, mask, n_jitters=2, **kw),
                lambda **kw: ibx.backward_mapping(model, x, mask, blocks=ibx.grid_blocks(x.shape, 12), n_jitters=1,
                                                  method="batched", **kw)):
        result, estimates, _ = _watch(run)
        assert estimates[0].evaluations == result.evaluations  # windows: only those a perturbation touches


def test_an_estimate_alone_stops_after_its_first_batches(cae, rng):
    x = rng.normal(size=(64, 64)).astype(np.float32)
    mask = box_mask(x.shape, slice(30, 34), slice(30, 34))
    blocks = ibx.grid_blocks(x.shape, 100)
    before = cae.evaluations
    found = ibx.estimate(ibx.backward_mapping, cae, x, mask, blocks=blocks, n_jitters=2, method="batched")
    spent = cae.evaluations - before
    assert isinstance(found, ibx.Estimate) and found.evaluations == 1 + 100 * 4
    assert 0 < spent < found.evaluations / 2  # the unperturbed input and two batches
    assert found.brute_force == pytest.approx(1 + 100 * 4)
    result = ibx.backward_mapping(cae, x, mask, blocks=blocks, n_jitters=2, method="batched")
    assert result.evaluations == found.evaluations


def test_coarse_to_fine_estimates_its_first_level_and_says_so(cae, rng):
    x = rng.normal(size=(64, 64)).astype(np.float32)
    mask = box_mask(x.shape, slice(30, 34), slice(30, 34))
    found = ibx.estimate(ibx.backward_mapping, cae, x, mask, n_blocks=60, coarse_blocks=10, n_jitters=1)
    assert found.note == "the first of 2 coarse-to-fine levels"


def test_advice_for_long_runs_only_with_the_time_each_choice_would_take():
    assert cost.advice("backward", 5.0, "cpu", 4, 500) == []
    found = cost.advice("backward", 1200.0, "cpu", 4, 500, local=False)
    assert found[0].startswith("an NVIDIA GPU")
    assert "fewer jitters (N = 2 instead of 4): about 10.0 min" in found
    assert "fewer blocks (K = 250 instead of 500): about 10.0 min" in found
    assert any(a.startswith("coarse-to-fine") for a in found) and any("response atlas" in a for a in found)
    forward = cost.advice("forward", 60.0, "cuda", 8)
    assert forward == ["fewer jitters (N = 4 instead of 8): about 30 s"]
    assert [cost.duration(s) for s in (0.42, 12.0, 210.0, 9000.0)] == ["0.4 s", "12 s", "3.5 min", "2.5 h"]


def test_an_estimate_line_describes_the_cost_and_what_cuts_it():
    found = cost.Estimate(23000, 1140.0, ["an NVIDIA GPU", "fewer blocks"], device="cpu")
    assert found.describe() == ("estimate: 23,000 model evaluations, about 19.0 min on cpu; to cut it: an NVIDIA "
                                "GPU; fewer blocks")


def test_a_callback_that_is_not_a_function_is_refused(conv_model, image, mask):
    with pytest.raises(ibx.InputError, match="estimate must be a function"):
        ibx.forward_mapping(conv_model, image, mask, estimate="yes")


def test_the_estimate_counts_tiles_of_a_large_volume_with_their_own_unperturbed_outputs(tmp_path, rng):
    """A sample above 2^20 voxels is never evaluated whole: each tile's unperturbed output is planned too."""
    model = ibx.load_model(om.save(om.convolution(rng.normal(size=(3, 3, 3)).astype(np.float32), layout="NCDHW"),
                                   tmp_path, "conv3d"))
    x = rng.normal(size=(104, 104, 104)).astype(np.float32)
    mask = box_mask(x.shape, slice(50, 53), slice(50, 53), slice(50, 53))
    result, estimates, _ = _watch(lambda **kw: ibx.backward_mapping(
        model, x, mask, blocks=ibx.grid_blocks(x.shape, 512), n_jitters=1, method="local", **kw))
    assert result.tiling["tiles"] is True and estimates[0].evaluations == result.evaluations
