"""Reliability: hostile model files, external data outside the model folder, no unpickling, the session cache."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

import IBIXLogic as ibx  # noqa: E402
import onnx_models as om  # noqa: E402
from IBIXLogic import model_file, runner  # noqa: E402

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
    """Without IBIX's own scan, ONNX Runtime (>= 1.20) refuses too; the refusal must read as a ModelError."""
    path = _external(model_folder, "../secret.bin")
    monkeypatch.setattr(runner, "check_external_data", lambda p: None)
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
    pattern = re.compile(r"\bimport pickle\b|\bpickle\.|cPickle|dill\b|joblib|torch\.load|allow_pickle\s*=\s*True"
                         r"|np\.load\(|numpy\.load\(|marshal\.loads|shelve")
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
    assert runner.cached_sessions() == 1


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
    assert runner.cached_sessions() == 1  # the stale session of the same file was dropped
    assert first.predict(x)[3, 3] == 9.0  # a Model still in use keeps its own session


def test_cache_is_bounded_and_release_models_empties_it(tmp_path):
    paths = [om.save(om.convolution(np.full((3, 3), float(i))), tmp_path, f"m{i}") for i in range(4)]
    for path in paths:
        ibx.load_model(path, device="cpu")
    assert runner.cached_sessions() == runner.SESSION_CACHE_SIZE
    assert ibx.release_models() == runner.SESSION_CACHE_SIZE
    assert runner.cached_sessions() == 0


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
    """A reduction over the batch axis: one output image for a batch of several."""
    model = om.build([helper.make_node("ReduceMean", ["core_in"], ["core_out"], axes=[0], keepdims=1)], {})
    loaded = ibx.load_model(om.save(model, tmp_path, "batch_of_one"), device="cpu")
    x = np.linspace(0, 1, 120, dtype=np.float32).reshape(12, 10)
    mask = np.zeros(x.shape, bool)
    mask[4:6, 4:6] = True
    with pytest.raises(ibx.ModelError, match=r"returned 1 output image\(s\) .* for a batch of \d+ input\(s\)"):
        ibx.forward_mapping(loaded, x, mask, n_jitters=2)
