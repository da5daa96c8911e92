"""Public arguments of the mappings are checked in one place, with messages that name the argument (checks.py)."""
import numpy as np
import pytest

import IBIXLogic as ibx
import onnx_models as om


def test_mask_shape_mismatch(conv_model, image):
    with pytest.raises(ibx.InputError, match="mask has shape .* resample"):
        ibx.forward_mapping(conv_model, image, np.ones((10, 10), bool))


def test_empty_mask(conv_model, image):
    with pytest.raises(ibx.InputError, match="input mask is empty"):
        ibx.forward_mapping(conv_model, image, np.zeros(image.shape, bool))
    with pytest.raises(ibx.InputError, match="output mask is empty"):
        ibx.backward_mapping(conv_model, image, np.zeros(image.shape, bool))


@pytest.mark.parametrize("kwargs, message", [
    ({"n_jitters": 0}, "n_jitters"), ({"n_jitters": 2.5}, "n_jitters"),
    ({"max_jitter": 0.0}, "max_jitter"), ({"max_jitter": -1.0}, "max_jitter"),
    ({"max_jitter": float("nan")}, "max_jitter"), ({"channels": "fat"}, "unknown channel"),
])
def test_bad_forward_parameters(conv_model, image, mask, kwargs, message):
    with pytest.raises(ibx.InputError, match=message):
        ibx.forward_mapping(conv_model, image, mask, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"n_blocks": 0}, "n_blocks"), ({"method": "fast"}, "method"), ({"normalization": "sum"}, "normalization"),
    ({"coarse_blocks": 800}, "coarse_blocks"), ({"blocks": "hexagons"}, "blocks"),
    ({"refine_threshold": 2.0}, "refine_threshold"),
])
def test_bad_backward_parameters(conv_model, image, mask, kwargs, message):
    with pytest.raises(ibx.InputError, match=message):
        ibx.backward_mapping(conv_model, image, mask, **kwargs)


# -- arguments the hostile generator (Testing/hostile.py) got through to numpy or Python -----------------------------

@pytest.mark.parametrize("function, kwargs, message", [
    ("forward", {"n_jitters": 1e12}, r"n_jitters \(N\) must be an integer of at least 1 and at most 10000"),
    ("forward", {"n_jitters": 2**63}, r"n_jitters \(N\) must be .* got 9223372036854775808"),
    ("backward", {"n_blocks": 2**63}, r"n_blocks \(K\) must be an integer .* at most 10000000"),
    ("forward", {"channels": 1.0}, "channels must be a channel name, an index or a list of them"),
    ("forward", {"channels": True}, "channels must be"),
    ("backward", {"compactness": "x"}, "compactness must be a positive finite number, got 'x'"),
    ("backward", {"locality_tolerance": "0"}, r"locality_tolerance must be a number in \[0.0, 1.0\), got '0'"),
    ("backward", {"refine_threshold": None}, "refine_threshold must be a number"),
    ("forward", {"cancel": True}, "cancel must be a threading.Event .* got True"),
    ("forward", {"cancel": "x"}, "cancel must be"),
    ("backward", {"cancel": 0}, "cancel must be"),
    ("forward", {"progress": 5}, "progress must be a function or None, got 5"),
    ("forward", {"progressive": True, "preview": "x"}, "preview must be a function"),
    ("forward", {"progressive": "yes"}, "progressive must be True or False"),
    ("backward", {"tiles": None}, "tiles must be True or False"),
    ("forward", {"tolerance": "x"}, "tolerance must be a finite number"),
    ("forward", {"geometry": "x"}, r"geometry must be an IBIXLogic.Geometry .* got 'x'"),
    ("backward", {"geometry": 5}, "geometry must be"),
    ("backward", {"coarse_blocks": [2**63]}, "coarse_blocks must be an integer"),
    ("backward", {"blocks": None}, r"block label image \(blocks\) has dtype object"),
    ("forward", {"max_jitter": 10**400}, r"max_jitter \(H\) must be a positive finite number"),
])
def test_wrong_arguments_are_named(conv_model, image, mask, function, kwargs, message):
    mapping = ibx.forward_mapping if function == "forward" else ibx.backward_mapping
    with pytest.raises(ibx.InputError, match=message):
        mapping(conv_model, image, mask, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"geometry": "x"}, "geometry must be"), ({"progress": 5}, "progress must be"), ({"cancel": 1}, "cancel must be"),
])
def test_predict_checks_its_arguments_too(conv_model, image, kwargs, message):
    with pytest.raises(ibx.InputError, match=message):
        conv_model.predict(image, **kwargs)


@pytest.mark.parametrize("path", [None, 5, b"conv.onnx", ["conv.onnx"], ""])
def test_load_model_names_a_path_of_the_wrong_type(path):
    with pytest.raises(ibx.InputError, match="path must be the path of a file"):
        ibx.load_model(path)


def test_a_model_path_the_file_system_refuses_is_named(tmp_path):
    with pytest.raises(ibx.ModelError, match=r"model path .* \(5000 characters\) cannot be opened"):
        ibx.load_model("x" * 5000)


@pytest.mark.parametrize("what, value, message", [
    ("x", np.full((20, 20), "0.5"), r"input has dtype <U3"),
    ("x", np.array([["a", 1.0]] * 20, dtype=object), "input has dtype object"),
    ("x", [[1.0, 2.0], [3.0]], "input channel|not an array"),
    ("x", np.full((20, 20), 1e300), r"values up to 1e\+300, beyond the float32 range"),
    ("x", np.zeros((20, 20), np.complex64), "input has dtype complex64"),
    ("mask", np.full((20, 20), "1"), r"input mask has dtype <U1"),
    ("mask", np.full((20, 20), "1", dtype=object), "input mask has dtype object"),
    ("mask", np.full((20, 20), None), "input mask has dtype object"),
])
def test_string_and_object_inputs_and_masks_are_named(conv_model, image, mask, what, value, message):
    arguments = {"x": image, "mask": mask, what: value}
    with pytest.raises(ibx.InputError, match=message):
        ibx.forward_mapping(conv_model, arguments["x"], arguments["mask"])


def test_object_arrays_of_numbers_are_read_as_numbers(conv_model, image, mask):
    expected = ibx.forward_mapping(conv_model, image, mask, n_jitters=1).signed
    result = ibx.forward_mapping(conv_model, image.astype(object), mask.astype(object), n_jitters=1).signed
    np.testing.assert_array_equal(result, expected)


@pytest.mark.parametrize("offset", [2**31 - 1, 2**40, 2**62])
def test_block_labels_of_any_size_keep_their_blocks(conv_model, image, mask, offset):
    """Labels of 2**31 or more were cast to int32 and lost (0 blocks, B = 0 everywhere, no error)."""
    labels = np.arange(400).reshape(20, 20) // 40 + 1  # ten bands of two rows
    reference = ibx.backward_mapping(conv_model, image, mask, blocks=labels, n_jitters=1, method="batched")
    big = ibx.backward_mapping(conv_model, image, mask, blocks=labels.astype(np.int64) + offset, n_jitters=1,
                               method="batched")
    assert big.labels.max() == 10
    np.testing.assert_array_equal(big.labels, reference.labels)
    np.testing.assert_array_equal(big.map, reference.map)
    assert big.map.max() > 0
    unsigned = ibx.backward_mapping(conv_model, image, mask, blocks=labels.astype(np.uint64) + np.uint64(2**63),
                                    n_jitters=1, method="batched")
    np.testing.assert_array_equal(unsigned.map, reference.map)


@pytest.mark.parametrize("max_jitter", [1e-40, 1e-45, 1e-12, 1e-7])
def test_a_max_jitter_too_small_for_float32_is_refused_with_the_smallest_usable_value(conv_model, image, mask,
                                                                                       max_jitter):
    """max_jitter=1e-40 used to give a signed map of NaN; 1e-7 one of rounding noise."""
    with pytest.raises(ibx.InputError, match=r"max_jitter \(H\) = .* is too small for this input") as info:
        ibx.forward_mapping(conv_model, image, mask, n_jitters=2, max_jitter=max_jitter)
    smallest = float(str(info.value).split("max_jitter >= ")[1].split()[0])
    result = ibx.forward_mapping(conv_model, image, mask, n_jitters=2, max_jitter=smallest * 1.01)
    expected = om.correlate(mask, om.KERNEL)
    np.testing.assert_allclose(result.signed, expected, atol=2e-3 * np.abs(expected).max())
    with pytest.raises(ibx.InputError, match="too small"):
        ibx.forward_mapping(conv_model, image, mask, n_jitters=2, max_jitter=smallest * 0.99)


def test_a_max_jitter_beyond_float32_is_refused(conv_model, image, mask):
    with pytest.raises(ibx.InputError, match=r"max_jitter \(H\) = 1e\+38 is too large .* max_jitter <= "):
        ibx.forward_mapping(conv_model, image, mask, max_jitter=1e38)
