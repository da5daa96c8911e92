"""Reliability: faults while running (ONNX Runtime errors, NaN/Inf for some perturbations, out of memory) and
interrupted writes. IBIX retries with smaller batches where that can help, otherwise stops with a message, and
never leaves a half-made result behind."""
from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

import IBIXLogic as ibx  # noqa: E402
import onnx_models as om  # noqa: E402
from IBIXLogic import io as ibx_io  # noqa: E402

KERNEL = np.array([[0.0, 1.0, 0.0], [1.0, 4.0, 2.0], [0.0, 0.5, 0.0]], np.float32)


@pytest.fixture
def image(rng):
    return rng.uniform(0, 1, (16, 16)).astype(np.float32)


@pytest.fixture
def mask():
    mask = np.zeros((16, 16), bool)
    mask[6:9, 6:9] = True
    return mask


def gather_fails_above(limit: int, **kw):
    """Identity, but ONNX Runtime raises (Gather index out of bounds) wherever an input value is >= ``limit``."""
    nodes = [helper.make_node("Cast", ["core_in"], ["idx"], to=TensorProto.INT64),
             helper.make_node("Gather", ["table", "idx"], ["g"], axis=0),
             helper.make_node("Mul", ["g", "zero"], ["gz"]),
             helper.make_node("Add", ["core_in", "gz"], ["core_out"])]
    return om.build(nodes, {"table": np.zeros(limit, np.float32), "zero": np.float32(0)}, **kw)


def inf_above(threshold: float, **kw):
    """Identity plus exp(1000 (x - t)): exactly x below the threshold, +Inf (float32 overflow) above it."""
    nodes = [helper.make_node("Sub", ["core_in", "t"], ["d"]),
             helper.make_node("Mul", ["d", "k"], ["kd"]),
             helper.make_node("Exp", ["kd"], ["e"]),
             helper.make_node("Add", ["core_in", "e"], ["core_out"])]
    return om.build(nodes, {"t": np.float32(threshold), "k": np.float32(1000.0)}, **kw)


# -- the model fails inside ONNX Runtime on some perturbed inputs -------------------------------------------------

def test_onnxruntime_error_mid_run_is_a_model_error_and_the_model_stays_usable(tmp_path, image, mask):
    model = ibx.load_model(om.save(gather_fails_above(4), tmp_path, "gather"), device="cpu")
    np.testing.assert_array_equal(model.predict(image), image)  # the unperturbed input runs
    before = image.copy()
    with pytest.raises(ibx.ModelError, match="ONNX Runtime failed on an input of shape"):
        ibx.forward_mapping(model, image, mask, n_jitters=2, max_jitter=10.0)  # h = 10 -> index 10 >= 4
    with pytest.raises(ibx.ModelError, match="ONNX Runtime failed"):
        ibx.backward_mapping(model, image, mask, n_blocks=6, blocks="grid", n_jitters=1, max_jitter=10.0,
                             method="batched")
    np.testing.assert_array_equal(image, before)
    result = ibx.forward_mapping(model, image, mask, n_jitters=2, max_jitter=1.0)  # h <= 1 stays below 4
    np.testing.assert_allclose(result.signed, mask.astype(np.float32), atol=1e-4)


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_nan_or_inf_only_for_large_perturbations(tmp_path, image, mask, kind):
    model_proto = om.nan_above(3.0) if kind == "nan" else inf_above(3.0)
    model = ibx.load_model(om.save(model_proto, tmp_path, kind), device="cpu")
    with pytest.raises(ibx.ModelError, match=r"NaN or infinite values for the input mask perturbed .* jitter "
                                             r"h = 4\b.*lower the maximum jitter H"):
        ibx.forward_mapping(model, image, mask, n_jitters=2, max_jitter=4.0)
    with pytest.raises(ibx.ModelError, match="NaN or infinite values"):
        ibx.backward_mapping(model, image, mask, n_blocks=6, blocks="grid", n_jitters=2, max_jitter=4.0,
                             method="batched")
    ok = ibx.forward_mapping(model, image, mask, n_jitters=2, max_jitter=1.0)
    np.testing.assert_allclose(ok.signed, mask.astype(np.float32), atol=1e-4)


# -- out of memory: a session that fails to allocate for batches above a size --------------------------------------

class AllocationLimitedSession:
    """Wraps a real ONNX Runtime session; ``run`` raises ONNX Runtime's own allocation error for batches larger
    than ``limit`` samples (what a small GPU does), and counts what it was asked to run."""

    def __init__(self, session, limit: int):
        from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

        self._session, self.limit, self.error = session, limit, RuntimeException
        self.batches: list[int] = []
        self.failures = 0

    def __getattr__(self, name):
        return getattr(self._session, name)

    def run(self, output_names, feeds, *args, **kwargs):
        n = next(iter(feeds.values())).shape[0]
        self.batches.append(n)
        if n > self.limit:
            self.failures += 1
            raise self.error("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while "
                             "running Conv node. Name:'' Status Message: Failed to allocate memory for requested "
                             f"buffer of size {n * 2**28}")
        return self._session.run(output_names, feeds, *args, **kwargs)


@pytest.fixture
def conv_path(tmp_path):
    return om.save(om.convolution(KERNEL), tmp_path, "conv")


@pytest.mark.parametrize("limit", [1, 3, 7])
def test_out_of_memory_retries_with_smaller_batches_and_gives_the_same_result(conv_path, image, mask, limit):
    reference = ibx.forward_mapping(ibx.load_model(conv_path, device="cpu"), image, mask, n_jitters=4)
    reference_b = ibx.backward_mapping(ibx.load_model(conv_path, device="cpu"), image, mask, n_blocks=12,
                                       blocks="grid", n_jitters=1, method="batched")
    model = ibx.load_model(conv_path, device="cpu")
    session = AllocationLimitedSession(model.session, limit)
    model.session = session
    result = ibx.forward_mapping(model, image, mask, n_jitters=4)  # 8 samples per item: batches of 8 fail
    np.testing.assert_array_equal(result.signed, reference.signed)
    backward = ibx.backward_mapping(model, image, mask, n_blocks=12, blocks="grid", n_jitters=1, method="batched")
    np.testing.assert_array_equal(backward.map, reference_b.map)
    assert 1 <= session.failures <= 20  # halving, not retrying forever
    last_failure = max(i for i, n in enumerate(session.batches) if n > limit)
    assert all(n <= limit for n in session.batches[last_failure + 1:])
    assert result.evaluations == reference.evaluations  # failed tries are not counted as evaluations


def test_out_of_memory_on_a_single_sample_stops_with_a_message(conv_path, image, mask):
    model = ibx.load_model(conv_path, device="cpu")
    model.session = AllocationLimitedSession(model.session, 0)
    with pytest.raises(ibx.ModelError, match="out of memory running one sample of \\[16, 16\\] voxels .* smaller "
                                             "volume, a smaller model, or the CPU"):
        ibx.forward_mapping(model, image, mask, n_jitters=2)


def test_a_tiny_memory_budget_still_runs_one_sample_at_a_time(conv_path, image, mask):
    small = ibx.load_model(conv_path, device="cpu", memory_budget=1)
    assert small.batch_size((16, 16)) == 1
    big = ibx.load_model(conv_path, device="cpu")
    np.testing.assert_array_equal(ibx.forward_mapping(small, image, mask, n_jitters=2).signed,
                                  ibx.forward_mapping(big, image, mask, n_jitters=2).signed)


# -- interrupted writes leave no file --------------------------------------------------------------------------

def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_interrupted_rename_leaves_no_file(tmp_path, monkeypatch, suffix):
    geometry = ibx.Geometry.identity((4, 5, 6))
    target = tmp_path / f"result{suffix}"

    def fail(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(ibx.InputError, match="cannot write .*No space left"):
        ibx.write_volume(target, np.ones((4, 5, 6), np.float32), geometry)
    assert _listing(tmp_path) == []


def test_failed_write_keeps_the_previous_file_intact(tmp_path, monkeypatch):
    geometry = ibx.Geometry.identity((4, 5, 6))
    target = tmp_path / "result.nrrd"
    ibx.write_volume(target, np.full((4, 5, 6), 3.0, np.float32), geometry)
    real_write = ibx_io.sitk.WriteImage

    def write_half_then_fail(image, name, *args):
        real_write(image, name, *args)
        with open(name, "r+b") as handle:
            handle.truncate(10)
        raise RuntimeError("disk went away")
    monkeypatch.setattr(ibx_io.sitk, "WriteImage", write_half_then_fail)
    with pytest.raises(ibx.InputError, match="cannot write"):
        ibx.write_volume(target, np.zeros((4, 5, 6), np.float32), geometry)
    assert _listing(tmp_path) == ["result.nrrd"]
    np.testing.assert_array_equal(ibx.read_volume(target)[0], 3.0)


def test_keyboard_interrupt_during_a_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def interrupted(image, name, *args):
        with open(name, "wb") as handle:
            handle.write(b"NRRD0004\n")
        raise KeyboardInterrupt
    monkeypatch.setattr(ibx_io.sitk, "WriteImage", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ibx.write_volume(tmp_path / "result.nrrd", np.zeros((2, 3, 4), np.float32), ibx.Geometry.identity((2, 3, 4)))
    assert _listing(tmp_path) == []
