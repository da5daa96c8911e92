"""Loading and running models (model.py): hostile model files, external data, no unpickling, the session cache,
CUDA fallback, faults inside ONNX Runtime, out of memory, memory budgets, I/O binding, cancellation at any point
and long sessions."""
from __future__ import annotations

import gc
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

import IBIXLogic as ibx  # noqa: E402
import onnx_models as om  # noqa: E402
from onnx_models import KERNEL, POSITIVE_KERNEL, box_mask  # noqa: E402
from IBIXLogic import model as ibx_model, model_file  # noqa: E402

PACKAGE = Path(ibx.__file__).parent


@pytest.fixture(autouse=True)
def _fresh_cache():
    ibx.release_models()
    yield
    ibx.release_models()


def _autoencoder_bytes(tmp_path) -> bytes:
    return om.save(om.small_autoencoder(), tmp_path, "source").read_bytes()


# -- broken files ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99])
def test_truncated_model_is_refused_cleanly(tmp_path, fraction):
    data = _autoencoder_bytes(tmp_path)
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: max(1, int(len(data) * fraction))])
    with pytest.raises(ibx.ModelError, match="not a loadable ONNX model"):
        ibx.load_model(path)


def test_zero_byte_model(tmp_path):
    (tmp_path / "zero.onnx").write_bytes(b"")
    with pytest.raises(ibx.ModelError, match="empty"):
        ibx.load_model(tmp_path / "zero.onnx")


@pytest.mark.parametrize("seed", range(6))
def test_random_bytes_are_refused_cleanly(tmp_path, seed):
    rng = np.random.default_rng(seed)
    path = tmp_path / "random.onnx"
    path.write_bytes(rng.integers(0, 256, int(rng.integers(1, 20000)), dtype=np.uint8).tobytes())
    with pytest.raises(ibx.ModelError, match="not a loadable ONNX model"):
        ibx.load_model(path)


def test_flipped_bytes_never_escape_as_another_exception(tmp_path):
    data = bytearray(_autoencoder_bytes(tmp_path))
    rng = np.random.default_rng(3)
    path = tmp_path / "flipped.onnx"
    for trial in range(20):
        corrupt = bytearray(data)
        for i in rng.integers(0, len(corrupt), 5):
            corrupt[i] = int(rng.integers(0, 256))
        path.write_bytes(bytes(corrupt))
        try:
            ibx.load_model(path, device="cpu")  # a flip inside weights still loads: that is fine
        except ibx.IBIXError as exc:
            assert "Traceback" not in str(exc)


def _classifier() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["g"]), helper.make_node("Flatten", ["g"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "classifier", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_classifier_with_vector_output_is_refused(tmp_path):
    path = om.save(_classifier(), tmp_path, "classifier")
    with pytest.raises(ibx.ModelCardError, match="output 'y' has rank 2 .* image-to-image"):
        ibx.load_model(path)


def _two_inputs() -> onnx.ModelProto:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 1, "H", "W"])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 1, "H", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, "H", "W"])
    model = helper.make_model(helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "two", [a, b], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_model_with_several_inputs_and_no_card(tmp_path):
    path = om.save(_two_inputs(), tmp_path, "two_inputs")
    with pytest.raises(ibx.ModelCardError, match=r"2 inputs \['a', 'b'\]; write 'input.name'"):
        ibx.load_model(path)
    with pytest.raises(ibx.ModelCardError, match="IBIX feeds one input tensor"):
        ibx.load_model(path, card={"input": {"name": "a"}})


def test_integer_image_model_is_refused(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.INT64, ["N", 1, "H", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, ["N", 1, "H", "W"])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "int", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with pytest.raises(ibx.ModelCardError, match="type tensor\\(int64\\); IBIX needs a floating point"):
        ibx.load_model(om.save(model, tmp_path, "int"))


# -- external data -----------------------------------------------------------------------------------------------

def _external(folder: Path, location: str, name: str = "external") -> Path:
    """A 3x3 convolution whose kernel lives in external data at ``location`` (relative to ``folder``)."""
    model = om.convolution(np.ones((3, 3)))
    tensor = model.graph.initializer[0]
    weights = np.full((1, 1, 3, 3), 1.0, np.float32)
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(weights.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    target = Path(location) if os.path.isabs(location) else folder / location
    if target.parent.is_dir() and not target.exists():
        weights.tofile(target)
    path = folder / f"{name}.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    np.full(9, 7.0, np.float32).tofile(tmp_path / "secret.bin")
    return folder


def _forbid_onnxruntime(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("ONNX Runtime was asked to open a model IBIX should have refused")
    monkeypatch.setattr(ort, "InferenceSession", refuse)


def test_external_data_beside_the_model_loads(model_folder):
    model = ibx.load_model(_external(model_folder, "weights.bin"), device="cpu")
    np.testing.assert_allclose(model.predict(np.ones((5, 5), np.float32))[2, 2], 9.0)


@pytest.mark.parametrize("location", ["../secret.bin", "sub/../../secret.bin", "ABSOLUTE", "link.bin"])
def test_external_data_outside_the_model_folder_is_refused_before_onnxruntime(model_folder, monkeypatch,
                                                                              location):
    if location == "ABSOLUTE":
        location = str(model_folder.parent / "secret.bin")
    if location == "link.bin":  # a symbolic link in the folder that leads out of it
        (model_folder / "link.bin").symlink_to(model_folder.parent / "secret.bin")
    path = _external(model_folder, location)
    _forbid_onnxruntime(monkeypatch)
    with pytest.raises(ibx.ModelError, match="external data location .* points outside the model's folder"):
        ibx.load_model(path)


def test_external_data_in_a_subgraph_is_found(model_folder):
    """Tensors inside node attributes (e.g. a Constant's value or an If branch) are scanned too."""
    tensor = onnx.numpy_helper.from_array(np.ones(3, np.float32), "c")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../secret.bin"
    const = helper.make_node("Constant", [], ["c"], value=tensor)
    branch = helper.make_graph([const], "branch", [], [helper.make_tensor_value_info("c", TensorProto.FLOAT, [3])])
    node = helper.make_node("If", ["cond"], ["out"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [3])])
    path = model_folder / "subgraph.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    assert model_file.external_data_locations(path) == ["../secret.bin", "../secret.bin"]
    with pytest.raises(ibx.ModelError, match="points outside"):
        ibx.load_model(path)


def test_missing_external_data_file_is_named(model_folder):
    path = _external(model_folder, "missing/weights.bin")
    with pytest.raises(ibx.ModelError, match="external data file 'missing/weights.bin' is missing"):
        ibx.load_model(path)


def test_onnxruntime_refusal_also_surfaces_as_a_model_error(model_folder, monkeypatch):
    """Without IBIX's own scan, ONNX Runtime (>= 1.24.1) refuses too; the refusal must read as a ModelError."""
    path = _external(model_folder, "../secret.bin")
    monkeypatch.setattr(ibx_model, "check_external_data", lambda p: None)
    with pytest.raises(ibx.ModelError, match=r"(?i)external data|not a loadable"):
        ibx.load_model(path)


def test_the_scan_agrees_with_onnx_on_real_models(tmp_path):
    for name in ("t1_to_t2_cae", "mri_to_pct_unet"):
        path = PACKAGE.parent / "Resources" / "Models" / f"{name}.onnx"
        if path.is_file():
            assert model_file.external_data_locations(path) == []
    path = om.save(om.small_autoencoder(), tmp_path, "cae")
    onnx.save(onnx.load(str(path)), str(tmp_path / "split.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="split.data", size_threshold=64)
    locations = model_file.external_data_locations(tmp_path / "split.onnx")
    assert locations and set(locations) == {"split.data"}
    model = ibx.load_model(tmp_path / "split.onnx", device="cpu")
    x = np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32)
    np.testing.assert_allclose(model.predict(x), ibx.load_model(path, device="cpu").predict(x), atol=1e-6)


# -- nothing is ever unpickled -----------------------------------------------------------------------------------

def test_the_package_never_unpickles():
    # numpy files are read only with allow_pickle=False, said on the same line (the response atlas's .npz)
    pattern = re.compile(r"\bimport pickle\b|\bpickle\.|cPickle|dill\b|joblib|torch\.load|allow_pickle\s*=\s*True"
                         r"|(np|numpy)\.load\((?![^)]*allow_pickle=False\))|marshal\.loads|shelve")
    offenders = []
    for source in sorted(PACKAGE.rglob("*.py")) + sorted((PACKAGE.parent / "IBIX").rglob("*.py")):
        for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line) and not line.lstrip().startswith("#"):
                offenders.append(f"{source.name}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_models_are_loaded_only_through_onnxruntime():
    text = "\n".join(p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py"))
    assert "onnx.load" not in text and "import onnx\n" not in text


# -- session cache -----------------------------------------------------------------------------------------------

def test_loading_the_same_file_twice_reuses_the_session(tmp_path):
    path = om.save(om.convolution(np.ones((3, 3))), tmp_path, "conv")
    first = ibx.load_model(path, device="cpu")
    second = ibx.load_model(path, card={"input": {"channels": ["T1"]}}, device="cpu")
    assert second.session is first.session
    assert second.card.input.channels == ("T1",) and first.card.input.channels == ("input",)
    assert ibx_model.cached_sessions() == 1


def test_a_modified_file_gets_a_new_session_and_the_old_one_is_released(tmp_path):
    path = om.save(om.convolution(np.ones((3, 3))), tmp_path, "conv")
    first = ibx.load_model(path, device="cpu")
    x = np.ones((6, 6), np.float32)
    assert first.predict(x)[3, 3] == 9.0
    time.sleep(0.01)
    om.save(om.convolution(np.full((3, 3), 2.0)), tmp_path, "conv")  # same size, new mtime and weights
    second = ibx.load_model(path, device="cpu")
    assert second.session is not first.session
    assert second.predict(x)[3, 3] == 18.0
    assert ibx_model.cached_sessions() == 1  # the stale session of the same file was dropped
    assert first.predict(x)[3, 3] == 9.0  # a Model still in use keeps its own session


def test_cache_is_bounded_and_release_models_empties_it(tmp_path):
    paths = [om.save(om.convolution(np.full((3, 3), float(i))), tmp_path, f"m{i}") for i in range(4)]
    for path in paths:
        ibx.load_model(path, device="cpu")
    assert ibx_model.cached_sessions() == ibx_model.SESSION_CACHE_SIZE
    assert ibx.release_models() == ibx_model.SESSION_CACHE_SIZE
    assert ibx_model.cached_sessions() == 0


def test_missing_model_file(tmp_path):
    with pytest.raises(ibx.ModelError, match="model file not found"):
        ibx.load_model(tmp_path / "nothing.onnx")


def test_empty_model_file(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ibx.ModelError, match="empty"):
        ibx.load_model(tmp_path / "empty.onnx")


@pytest.mark.parametrize("content", [b"not an onnx model at all", bytes(range(256)) * 40])
def test_corrupt_or_non_onnx_file(tmp_path, content):
    (tmp_path / "bad.onnx").write_bytes(content)
    with pytest.raises(ibx.ModelError, match="not a loadable ONNX model"):
        ibx.load_model(tmp_path / "bad.onnx")


def test_truncated_model_file(tmp_path):
    path = om.save(om.small_autoencoder(), tmp_path, "cae")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ibx.ModelError, match="not a loadable ONNX model"):
        ibx.load_model(path)


def test_model_that_outputs_nan_names_the_evaluation(tmp_path, image, mask):
    model = ibx.load_model(om.save(om.nan_above(10.0), tmp_path, "nan"))
    image = np.clip(image, -2, 2)
    with pytest.raises(ibx.ModelError, match=r"NaN or infinite values for the input mask perturbed in sample 0 "
                                             r"with jitter h = 10"):
        ibx.forward_mapping(model, image, mask, n_jitters=2, max_jitter=20.0)


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_cuda_that_cannot_start_falls_back_to_the_cpu_with_a_warning(tmp_path, monkeypatch, caplog):
    """ONNX Runtime claims a CUDA provider that cannot start here: auto runs on the CPU and says so."""
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    path = om.save(om.convolution(KERNEL), tmp_path, "conv")
    with caplog.at_level("WARNING", logger="IBIX"):
        model = ibx.load_model(path, device="auto")
    assert model.device == "cpu" and model.provider == "CPUExecutionProvider"
    assert "CUDA could not start" in caplog.text
    with pytest.raises(ibx.ModelError, match="device 'cuda' was asked for but CUDA could not start"):
        ibx.load_model(path, device="cuda")


def gather_fails_above(limit: int, **kw):
    """Identity, but ONNX Runtime raises (Gather index out of bounds) wherever an input value is >= ``limit``."""
    nodes = [helper.make_node("Cast", ["core_in"], ["idx"], to=TensorProto.INT64),
             helper.make_node("Gather", ["table", "idx"], ["g"], axis=0),
             helper.make_node("Mul", ["g", "zero"], ["gz"]),
             helper.make_node("Add", ["core_in", "gz"], ["core_out"])]
    return om.build(nodes, {"table": np.zeros(limit, np.float32), "zero": np.float32(0)}, **kw)


def test_onnxruntime_error_mid_run_is_a_model_error_and_the_model_stays_usable(tmp_path, unit_image, unit_mask):
    model = ibx.load_model(om.save(gather_fails_above(4), tmp_path, "gather"), device="cpu")
    np.testing.assert_array_equal(model.predict(unit_image), unit_image)  # the unperturbed input runs
    before = unit_image.copy()
    with pytest.raises(ibx.ModelError, match="ONNX Runtime failed on an input of shape"):
        ibx.forward_mapping(model, unit_image, unit_mask, n_jitters=2, max_jitter=10.0)  # h = 10 -> index 10 >= 4
    with pytest.raises(ibx.ModelError, match="ONNX Runtime failed"):
        ibx.backward_mapping(model, unit_image, unit_mask, n_blocks=6, blocks="grid", n_jitters=1, max_jitter=10.0,
                             method="batched")
    np.testing.assert_array_equal(unit_image, before)
    result = ibx.forward_mapping(model, unit_image, unit_mask, n_jitters=2, max_jitter=1.0)  # h <= 1 stays below 4
    np.testing.assert_allclose(result.signed, unit_mask.astype(np.float32), atol=1e-4)


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
    return om.save(om.convolution(POSITIVE_KERNEL), tmp_path, "conv")


@pytest.mark.parametrize("limit", [1, 3, 7])
def test_out_of_memory_retries_with_smaller_batches_and_gives_the_same_result(conv_path, unit_image, unit_mask, limit):
    plain = ibx.load_model(conv_path, device="cpu")
    reference = ibx.forward_mapping(plain, unit_image, unit_mask, n_jitters=4)
    reference_b = ibx.backward_mapping(plain, unit_image, unit_mask, n_blocks=12,
                                       blocks="grid", n_jitters=1, method="batched")
    model = ibx.load_model(conv_path, device="cpu")
    session = AllocationLimitedSession(model.session, limit)
    model.session = session
    result = ibx.forward_mapping(model, unit_image, unit_mask, n_jitters=4)  # 8 samples per item: batches of 8 fail
    np.testing.assert_array_equal(result.signed, reference.signed)
    backward = ibx.backward_mapping(model, unit_image, unit_mask, n_blocks=12, blocks="grid", n_jitters=1,
                                    method="batched")
    np.testing.assert_array_equal(backward.map, reference_b.map)
    assert 1 <= session.failures <= 20  # halving, not retrying forever
    last_failure = max(i for i, n in enumerate(session.batches) if n > limit)
    assert all(n <= limit for n in session.batches[last_failure + 1:])
    assert result.evaluations == reference.evaluations  # failed tries are not counted as evaluations


def test_out_of_memory_on_a_single_sample_stops_with_a_message(conv_path, unit_image, unit_mask):
    model = ibx.load_model(conv_path, device="cpu")
    model.session = AllocationLimitedSession(model.session, 0)
    with pytest.raises(ibx.ModelError, match="out of memory running one sample of \\[16, 16\\] voxels .* smaller "
                                             "volume, a smaller model, or the CPU"):
        ibx.forward_mapping(model, unit_image, unit_mask, n_jitters=2)


def test_a_tiny_memory_budget_still_runs_one_sample_at_a_time(conv_path, unit_image, unit_mask):
    small = ibx.load_model(conv_path, device="cpu", memory_budget=1)
    assert small.batch_size((16, 16)) == 1
    big = ibx.load_model(conv_path, device="cpu")
    np.testing.assert_array_equal(ibx.forward_mapping(small, unit_image, unit_mask, n_jitters=2).signed,
                                  ibx.forward_mapping(big, unit_image, unit_mask, n_jitters=2).signed)


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


# -- ONNX Runtime I/O binding (the CUDA path), exercised on the CPU device -------------------------------------
def bound(model: ibx.Model) -> ibx.Model:
    model.io_binding = True
    return model


def test_io_binding_is_off_by_default_on_the_cpu(tmp_path):
    model = ibx.load_model(om.save(om.identity(), tmp_path, "identity"), device="cpu")
    assert model.device == "cpu" and model.io_binding is False


@pytest.mark.parametrize("batch", ["N", 2])
def test_bound_runs_equal_plain_runs_and_do_not_share_outputs(tmp_path, rng, batch):
    path = om.save(om.convolution(KERNEL, batch=batch), tmp_path, "conv")
    plain, model = ibx.load_model(path), bound(ibx.load_model(path))
    prepared = model.prepare(rng.normal(size=(20, 24)).astype(np.float32))
    first = rng.normal(size=(2, 1, 20, 24)).astype(np.float32)
    second = rng.normal(size=(2, 1, 20, 24)).astype(np.float32)
    out_first = model.run(first.copy(), prepared)
    kept = out_first.copy()
    out_second = model.run(second.copy(), prepared)  # same shape: the same device buffers
    np.testing.assert_array_equal(out_first, kept)
    np.testing.assert_array_equal(out_first, plain.run(first.copy(), prepared))
    np.testing.assert_array_equal(out_second, plain.run(second.copy(), prepared))
    assert not np.array_equal(out_first, out_second)


def test_bound_forward_and_backward_equal_plain_ones(tmp_path, rng):
    path = om.save(om.small_autoencoder(), tmp_path, "cae")
    plain, model = ibx.load_model(path), bound(ibx.load_model(path))
    x = rng.normal(size=(64, 72)).astype(np.float32)
    mask = box_mask(x.shape, slice(20, 26), slice(30, 36))
    np.testing.assert_array_equal(ibx.forward_mapping(model, x, mask, n_jitters=4).signed,
                                  ibx.forward_mapping(plain, x, mask, n_jitters=4).signed)
    out_mask = box_mask(x.shape, slice(30, 35), slice(40, 45))
    expected = ibx.backward_mapping(plain, x, out_mask, n_blocks=150, compactness=1.0, n_jitters=2)
    result = ibx.backward_mapping(model, x, out_mask, blocks=expected.labels, n_jitters=2)
    assert result.tiling["tiles"] is True  # tiles of several shapes: more shapes than buffers are kept
    np.testing.assert_array_equal(result.block_values, expected.block_values)


def test_a_failing_binding_falls_back_to_plain_runs_with_a_warning(tmp_path, rng, caplog):
    path = om.save(om.convolution(KERNEL), tmp_path, "conv")
    plain, model = ibx.load_model(path), bound(ibx.load_model(path))
    model._bound.device = "no-such-device"  # ONNX Runtime refuses to place buffers there
    x = rng.normal(size=(20, 24)).astype(np.float32)
    mask = box_mask(x.shape, slice(8, 12), slice(6, 10))
    with caplog.at_level("WARNING", logger="IBIX"):
        result = ibx.forward_mapping(model, x, mask, n_jitters=2)
    np.testing.assert_array_equal(result.signed, ibx.forward_mapping(plain, x, mask, n_jitters=2).signed)
    assert model.io_binding is False
    assert "I/O binding failed on cpu" in caplog.text and "running without it" in caplog.text


# -- cancellation at any point, and long sessions ------------------------------------------------------------
class CancelAfter:
    """A cancel callable that says "stop" from its (k+1)-th call on; counts its calls."""

    def __init__(self, k: float = float("inf")):
        self.k, self.calls = k, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls > self.k


@pytest.fixture(scope="module")
def cancel_model(tmp_path_factory):
    # A small memory budget: few samples per batch, so a run has many chunks (many cancellation points).
    path = om.save(om.small_autoencoder(seed=3), tmp_path_factory.mktemp("cancel"), "cae")
    return ibx.load_model(path, device="cpu", memory_budget=200_000)


@pytest.fixture(scope="module")
def cancel_case():
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
def test_cancel_at_every_point_then_the_next_run_matches(cancel_model, cancel_case, kind):
    from IBIXLogic.perturb import forget_radii

    x, mask = cancel_case
    x_before, mask_before = x.copy(), mask.copy()

    def run(*args):  # each run measures the response radius afresh, so that every run makes the same checks
        forget_radii()
        return RUNS[kind](*args)

    counter = CancelAfter()
    reference = _result_arrays(run(cancel_model, x, mask, counter))
    total = counter.calls
    assert total >= 3, f"{kind}: only {total} cancellation checks"
    points = _points(total)
    TESTED_POINTS[kind] = (len(points), total)
    for k in points:
        with pytest.raises(ibx.Cancelled, match="cancelled; nothing was written"):
            run(cancel_model, x, mask, CancelAfter(k))
        np.testing.assert_array_equal(x, x_before)
        np.testing.assert_array_equal(mask, mask_before)
    again = _result_arrays(run(cancel_model, x, mask, None))
    for a, b in zip(again, reference):
        np.testing.assert_array_equal(a, b)


def test_cancel_event_already_set_before_start(cancel_model, cancel_case):
    import threading

    x, mask = cancel_case
    event = threading.Event()
    event.set()
    for run in RUNS.values():
        with pytest.raises(ibx.Cancelled):
            run(cancel_model, x, mask, event)


def test_coarse_to_fine_is_cancelled_between_levels(cancel_model, cancel_case, monkeypatch):
    """A cancel that fires while the second level's blocks are being made stops before that level runs."""
    from IBIXLogic import backward

    x, mask = cancel_case
    event = __import__("threading").Event()
    real = backward._block_labels
    calls = []

    def labels_then_cancel(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # level 1 is being cut into finer blocks
            event.set()
        return real(*args, **kwargs)
    monkeypatch.setattr(backward, "_block_labels", labels_then_cancel)
    before = cancel_model.evaluations
    with pytest.raises(ibx.Cancelled):
        ibx.backward_mapping(cancel_model, x, mask, n_blocks=40, coarse_blocks=[6, 15], n_jitters=1, cancel=event)
    assert cancel_model.evaluations > before  # level 0 ran
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
    assert ibx_model.cached_sessions() <= ibx_model.SESSION_CACHE_SIZE


# -- declared shapes and outputs that do not fit (found by the hostile generator) ---------------------------------

@pytest.mark.parametrize("shape", [[1, 1, 100000, 100000], [1, 1, 4096, 4096, 4096], [2**40, 1, 8, 8],
                                   ["N", 1, 2**62, 2**62]])
def test_huge_declared_input_shapes_are_refused_at_load_time(tmp_path, shape):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "huge", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    layout = "NCHW" if len(shape) == 4 else "NCDHW"
    with pytest.raises(ibx.ModelCardError, match=r"declares the fixed shape .* values per model call, more than"):
        ibx.load_model(om.save(model, tmp_path, "huge"), card={"input": {"layout": layout, "channels": ["a"]}})


def test_a_model_that_returns_fewer_outputs_than_inputs_is_named(tmp_path):
    """A reduction over the batch axis: one output image for a batch of several (refused at load time)."""
    model = om.build([helper.make_node("ReduceMean", ["core_in"], ["core_out"], axes=[0], keepdims=1)], {})
    with pytest.raises(ibx.ModelError, match=r"runs on one sample but not on a batch of three .*returned 1 output "
                                             r"image\(s\) .* for a batch of 3 input\(s\)"):
        ibx.load_model(om.save(model, tmp_path, "batch_of_one"), device="cpu")


# -- models that mix the samples of a batch, and the load-time check ---------------------------------------------

def _brute_forward(model, x, mask, n_jitters, max_jitter):
    """F from one model call per perturbed input."""
    base = model.predict(x).astype(np.float64)
    total = np.zeros(base.shape)
    for k in [*range(-n_jitters, 0), *range(1, n_jitters + 1)]:
        h = np.float32(k * max_jitter / n_jitters)
        total += (model.predict(x + h * mask).astype(np.float64) - base) / h
    return total / (2 * n_jitters)


@pytest.mark.parametrize("reduce, weight", [("ReduceMean", 1.0), ("ReduceMean", -1.0), ("ReduceMax", 0.5)])
def test_a_batch_mixing_model_is_detected_and_run_one_sample_per_call(tmp_path, unit_image, unit_mask, reduce,
                                                                      weight, caplog):
    """y = x + w * reduce(x over the batch): IBIX batches jittered copies, so without the check every map would be
    silently wrong. Detected at load time, recorded in the card, and the maps equal brute force."""
    with caplog.at_level("WARNING", logger="IBIX"):
        model = ibx.load_model(om.save(om.batch_mixing(reduce, weight), tmp_path, "mixing"), device="cpu")
    assert model.one_sample_per_call
    note = [a for a in model.card.assumptions if "mixes the samples of a batch" in a]
    assert note and "one sample per model call" in note[0] and note[0] in caplog.text
    assert model.card.summary()["assumptions"] == list(model.card.assumptions)
    result = ibx.forward_mapping(model, unit_image, unit_mask, n_jitters=2, max_jitter=0.3)
    np.testing.assert_allclose(result.signed, _brute_forward(model, unit_image, unit_mask, 2, 0.3), atol=1e-4)
    np.testing.assert_allclose(result.signed, (1 + weight) * unit_mask, atol=1e-4)  # alone: reduce(x) = x
    assert "mixes the samples" in " ".join(result.parameters["model_assumptions"])
    backward = ibx.backward_mapping(model, unit_image, unit_mask, blocks="grid", n_blocks=16, n_jitters=1,
                                    max_jitter=0.3)
    for label, value in enumerate(backward.block_values[1:], start=1):
        block = backward.labels == label
        response = np.abs(_brute_forward(model, unit_image, block, 1, 0.3))
        expected = response[unit_mask].sum() / response.sum() if response.sum() > 0 else 0.0
        assert value == pytest.approx(expected, abs=1e-4)


def test_a_batch_mixing_2d_model_on_a_volume_predicts_each_slice_alone(tmp_path, rng):
    model = ibx.load_model(om.save(om.batch_mixing("ReduceMean", 1.0), tmp_path, "mixing"), device="cpu")
    volume = rng.uniform(0, 1, (6, 10, 12)).astype(np.float32)
    np.testing.assert_allclose(model.predict(volume), 2 * volume, atol=1e-6)


@pytest.mark.parametrize("build", [lambda: om.convolution(KERNEL), lambda: om.small_autoencoder(),
                                   lambda: om.convolution(KERNEL, batch=3)])
def test_ordinary_models_keep_batching(tmp_path, build):
    model = ibx.load_model(om.save(build(), tmp_path, "ordinary"), card={"input": {"multiple_of": 2}}, device="cpu")
    assert not model.one_sample_per_call
    assert not any("mixes" in a for a in model.card.assumptions)


def _unary(op: str, constant: float | None = None):
    nodes = [helper.make_node(op, ["core_in"] + (["c"] if constant is not None else []), ["core_out"])]
    return om.build(nodes, {} if constant is None else {"c": np.float32(constant)})


@pytest.mark.parametrize("op", ["Log", "Reciprocal", "Sqrt"])
def test_models_undefined_at_zero_load(tmp_path, op):
    """The load-time check used to run the model on zeros, so log(x) or 1/x was refused with a hint about
    'input.layout'; it now runs on moderate positive values and these models load and run."""
    model = ibx.load_model(om.save(_unary(op), tmp_path, op), device="cpu")
    x = np.linspace(1, 2, 80, dtype=np.float32).reshape(8, 10)
    assert np.isfinite(model.predict(x)).all()


def test_a_model_undefined_on_the_check_input_is_refused_naming_the_input(tmp_path):
    """log(x - 5) is NaN on [0.25, 0.75]: the error says what was checked and points at the intensity mapping,
    not at the layout."""
    model = om.build([helper.make_node("Sub", ["core_in", "c"], ["d"]), helper.make_node("Log", ["d"], ["core_out"])],
                     {"c": np.float32(5.0)})
    with pytest.raises(ibx.ModelError) as info:
        ibx.load_model(om.save(model, tmp_path, "log_shifted"), device="cpu")
    message = str(info.value)
    assert "load-time check input (1 channel(s) of [32, 32] voxels, smooth values in [0.25, 0.75]" in message
    assert "'input.intensity'" in message and "input.layout" not in message
    card = {"input": {"intensity": {"from": [0, 1], "to": [10, 20]}}}  # maps the input where the model works
    loaded = ibx.load_model(om.save(model, tmp_path, "log_shifted_card", card), device="cpu")
    assert np.isfinite(loaded.predict(np.full((4, 4), 0.5, np.float32))).all()


def test_a_model_too_large_to_check_at_load_time_says_so(tmp_path):
    model = ibx.load_model(om.save(om.identity(spatial=[2048, 2048]), tmp_path, "large"), device="cpu")
    assert any("no load-time check" in a and "deterministic and the samples of a batch independent" in a
               for a in model.card.assumptions)
    assert not model.one_sample_per_call


# -- batch sizes: for speed on the CPU, by free memory on a GPU -----------------------------------------------------
def test_cpu_batches_hold_what_full_speed_needs_and_no_more(conv_path):
    from IBIXLogic.model import CPU_BATCH_VOXELS, DEFAULT_MEMORY_BUDGET
    model = ibx.load_model(conv_path, device="cpu")
    assert model.memory_budget == DEFAULT_MEMORY_BUDGET
    assert CPU_BATCH_VOXELS == 2**15
    assert model.capacity((16, 16)) == 64  # 256 voxels each: the largest batch (MAX_BATCH), 16,384 voxels
    assert model.capacity((32, 32)) == 32 and model.capacity((64, 64)) == 8 and model.capacity((128, 128)) == 2
    assert model.capacity((232, 200)) == model.capacity((256, 256)) == 1  # one slice already runs at full speed
    assert ibx.load_model(conv_path, device="cpu", memory_budget=1).capacity((16, 16)) == 1  # memory still rules


def test_a_gpu_budget_follows_the_free_device_memory():
    from IBIXLogic.model import DEFAULT_MEMORY_BUDGET, default_memory_budget
    assert default_memory_budget("cuda", lambda: 10 * 2**30) == 5 * 2**30  # half the free memory
    assert default_memory_budget("cuda", lambda: None) == DEFAULT_MEMORY_BUDGET  # unknown: the CPU's default
    assert default_memory_budget("cpu", lambda: 10 * 2**30) == DEFAULT_MEMORY_BUDGET


# -- deterministic models only ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, scale, operators", [
    ("dropout", 1.0, "Dropout"), ("normal", 1.0, "RandomNormalLike"), ("normal", 1e-3, "RandomNormalLike"),
    ("normal-seeded", 1.0, "RandomNormalLike"), ("uniform", 1e-2, "RandomUniformLike"),
    ("bernoulli", 1.0, "Bernoulli"), ("scalar", 1e-3, "RandomNormal")])
def test_a_model_with_noise_inside_is_refused_naming_the_difference_and_the_cause(tmp_path, kind, scale, operators):
    """Dropout left in training mode, random nodes: two runs of one input differ, so every map would be noise
    (the issue's test map: 519 of 1024 voxels off by more than 0.05)."""
    with pytest.raises(ibx.ModelError) as info:
        ibx.load_model(om.save(om.noisy(kind, scale), tmp_path, "noisy"), device="cpu")
    message = str(info.value)
    assert message.startswith("noisy.onnx: the model is not deterministic: two runs of the same input at load time "
                              "gave outputs that differ by up to ")
    assert f"this graph has {operators} nodes" in message and "model.eval()" in message
    difference = float(re.search(r"differ by up to ([0-9.e+-]+)", message).group(1))
    assert difference > 10 * scale * 1e-3  # the noise, named


@pytest.mark.parametrize("kind, scale", [("dropout-eval", 1.0), ("dropout-no-flag", 1.0), ("normal", 1e-9)])
def test_deterministic_models_and_noise_below_float_rounding_load(tmp_path, unit_image, unit_mask, kind, scale):
    """Dropout in evaluation mode is the identity; noise below float32 rounding changes nothing a map shows."""
    model = ibx.load_model(om.save(om.noisy(kind, scale), tmp_path, "quiet"), device="cpu")
    assert model.evaluations == 0 and not model.one_sample_per_call
    result = ibx.forward_mapping(model, unit_image, unit_mask, n_jitters=2, max_jitter=0.3)
    np.testing.assert_allclose(result.signed, unit_mask.astype(np.float32), atol=1e-4)


def test_the_load_check_runs_three_model_calls(tmp_path, monkeypatch):
    """The determinism check reuses the batch-independence check's calls: alone, alone again, one batch of three."""
    calls = []
    real = ibx_model.Model._call
    monkeypatch.setattr(ibx_model.Model, "_call", lambda self, chunk: calls.append(len(chunk)) or real(self, chunk))
    ibx.load_model(om.save(om.convolution(KERNEL), tmp_path, "conv"), device="cpu")
    assert calls == [1, 1, 3]


@pytest.mark.parametrize("error, message", [
    (ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime"), "ONNX Runtime is not installed"),
    (ImportError("libonnxruntime.so: failed to map segment from shared object"), "for lack of memory"),
    (MemoryError(), "for lack of memory"),
    (ModuleNotFoundError("No module named 'sympy'", name="sympy"), "installed but cannot be imported"),
    (ImportError("undefined symbol: OrtGetApiBase"), "installed but cannot be loaded: undefined symbol"),
])
def test_an_onnx_runtime_that_does_not_import_is_told_apart(monkeypatch, error, message):
    class Failing:
        def find_spec(self, name, path=None, target=None):
            if name == "onnxruntime":
                raise error
    monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Failing()] + sys.meta_path)
    with pytest.raises(ibx.ModelError, match=message):
        ibx_model._onnxruntime()
