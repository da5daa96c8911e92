"""Reliability: cancelling at any point raises Cancelled, leaves the inputs untouched, returns nothing, and the
next run gives the same result as an uncancelled one. Long sessions keep memory flat."""
from __future__ import annotations

import gc
import os

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

import IBIXLogic as ibx  # noqa: E402
import onnx_models as om  # noqa: E402


class CancelAfter:
    """A cancel callable that says "stop" from its (k+1)-th call on; counts its calls."""

    def __init__(self, k: float = float("inf")):
        self.k, self.calls = k, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls > self.k


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # A small memory budget: few samples per batch, so a run has many chunks (many cancellation points).
    path = om.save(om.small_autoencoder(seed=3), tmp_path_factory.mktemp("cancel"), "cae")
    return ibx.load_model(path, device="cpu", memory_budget=200_000)


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 24, 24)).astype(np.float32)  # three slices for the 2D model
    mask = np.zeros(x.shape, bool)
    mask[1, 10:14, 9:13] = True
    mask[2, 4:6, 4:6] = True
    return x, mask


RUNS = {
    "predict": lambda m, x, mask, cancel: m.predict(x, cancel=cancel),
    "forward": lambda m, x, mask, cancel: ibx.forward_mapping(m, x, mask, n_jitters=3, cancel=cancel),
    "backward": lambda m, x, mask, cancel: ibx.backward_mapping(m, x, mask, n_blocks=24, blocks="grid",
                                                               n_jitters=1, method="batched", cancel=cancel),
    "backward_local": lambda m, x, mask, cancel: ibx.backward_mapping(m, x, mask, n_blocks=24, n_jitters=1,
                                                                     method="local", cancel=cancel),
    "coarse_to_fine": lambda m, x, mask, cancel: ibx.backward_mapping(m, x, mask, n_blocks=40, coarse_blocks=[6, 15],
                                                                     n_jitters=1, cancel=cancel),
}


def _result_arrays(result):
    if isinstance(result, np.ndarray):
        return [result]
    if isinstance(result, ibx.ForwardResult):
        return [result.signed, result.normalized]
    return [result.map, result.labels, result.block_values]


def _points(total: int) -> list[int]:
    """Cancellation points: every cancellation check of the run (0 = before the first model call)."""
    return list(range(total))


TESTED_POINTS = {}


@pytest.mark.parametrize("kind", list(RUNS))
def test_cancel_at_every_point_then_the_next_run_matches(model, case, kind):
    x, mask = case
    x_before, mask_before = x.copy(), mask.copy()
    run = RUNS[kind]
    counter = CancelAfter()
    reference = _result_arrays(run(model, x, mask, counter))
    total = counter.calls
    assert total >= 3, f"{kind}: only {total} cancellation checks"
    points = _points(total)
    TESTED_POINTS[kind] = (len(points), total)
    for k in points:
        with pytest.raises(ibx.Cancelled, match="cancelled; nothing was written"):
            run(model, x, mask, CancelAfter(k))
        np.testing.assert_array_equal(x, x_before)
        np.testing.assert_array_equal(mask, mask_before)
    again = _result_arrays(run(model, x, mask, None))
    for a, b in zip(again, reference):
        np.testing.assert_array_equal(a, b)


def test_cancel_event_already_set_before_start(model, case):
    import threading

    x, mask = case
    event = threading.Event()
    event.set()
    for run in RUNS.values():
        with pytest.raises(ibx.Cancelled):
            run(model, x, mask, event)


def test_coarse_to_fine_is_cancelled_between_levels(model, case, monkeypatch):
    """A cancel that fires while the second level's blocks are being made stops before that level runs."""
    from IBIXLogic import backward

    x, mask = case
    event = __import__("threading").Event()
    real = backward._block_labels
    calls = []

    def labels_then_cancel(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # level 1 is being cut into finer blocks
            event.set()
        return real(*args, **kwargs)
    monkeypatch.setattr(backward, "_block_labels", labels_then_cancel)
    before = model.evaluations
    with pytest.raises(ibx.Cancelled):
        ibx.backward_mapping(model, x, mask, n_blocks=40, coarse_blocks=[6, 15], n_jitters=1, cancel=event)
    assert model.evaluations > before  # level 0 ran
    assert len(calls) == 2  # the third level was never prepared


# -- long sessions ------------------------------------------------------------------------------------------------

def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


LONG_RUNS = 200
#: Generous bound on the growth of resident memory between run 20 and run 200 (MiB).
DRIFT_BOUND_MIB = 50


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_200_forward_mappings_keep_memory_flat(tmp_path, capsys):
    model_path = om.save(om.small_autoencoder(seed=1), tmp_path, "cae")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 64, 64)).astype(np.float32)
    mask = np.zeros(x.shape, bool)
    mask[1:5, 24:34, 24:34] = True
    rss = []
    reference = None
    for i in range(LONG_RUNS):
        model = ibx.load_model(model_path, device="cpu")  # the session comes from the cache
        result = ibx.forward_mapping(model, x, mask, n_jitters=2)
        if reference is None:
            reference = result.signed.copy()
        elif i % 50 == 0:
            np.testing.assert_array_equal(result.signed, reference)
        del result, model
        if i % 20 == 19:
            gc.collect()
        rss.append(_rss_mib())
    drift = rss[-1] - rss[19]
    with capsys.disabled():
        print(f"\n[reliability] {LONG_RUNS} forward mappings: RSS peak {max(rss):.1f} MiB, run 20 {rss[19]:.1f} MiB, "
              f"run {LONG_RUNS} {rss[-1]:.1f} MiB, drift {drift:+.1f} MiB")
    assert drift < DRIFT_BOUND_MIB
    assert ibx.model.cached_sessions() <= ibx.model.SESSION_CACHE_SIZE
