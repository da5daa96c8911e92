"""Oracle tests of padding (``input.padding``) and sliding-window inference (``input.patch``)."""
import math

import numpy as np
import onnxruntime as ort
import pytest

import IBIXLogic as ibx
import onnx_models as om
from IBIXLogic import windows

BOX = np.ones((5, 5), np.float32)  # a sum over a 5x5 window: near the border it sums padded voxels


def reference_pad(x, padded_shape, mode, value, position):
    """The padding a card describes, written out independently: numpy's pad per axis."""
    widths = []
    for n, p in zip(x.shape, padded_shape):
        extra = p - n
        before = extra // 2 if position == "center" else 0
        widths.append((before, extra - before))
    if mode == "constant":
        return np.pad(x, widths, mode="constant", constant_values=value), widths
    return np.pad(x, widths, mode={"edge": "edge", "reflect": "reflect"}[mode]), widths


@pytest.mark.parametrize("position", ["center", "end"])
@pytest.mark.parametrize("mode", ["constant", "edge", "reflect"])
@pytest.mark.parametrize("grow", ["size", "multiple_of"])
def test_padding_modes_and_positions(tmp_path, rng, mode, position, grow):
    padding = {"mode": mode, "position": position}
    if mode == "constant":
        padding["value"] = 0.7  # model units: after the intensity mapping
    card = {"input": {"intensity": {"from": [0.0, 10.0], "to": [0.0, 1.0]}, "padding": padding}}
    card["input"].update({"size": [12, 13]} if grow == "size" else {"multiple_of": 4})
    model = ibx.load_model(om.save(om.convolution(BOX), tmp_path, "box", card))
    x = rng.uniform(0, 10, (7, 9)).astype(np.float32)
    original = x.copy()
    padded_shape = (12, 13) if grow == "size" else (8, 12)
    padded, widths = reference_pad(x / 10.0, padded_shape, mode, 0.7, position)
    full = om.correlate(padded, BOX)
    expected = full[widths[0][0]:widths[0][0] + 7, widths[1][0]:widths[1][0] + 9]
    np.testing.assert_allclose(model.predict(x), expected, atol=1e-5)
    np.testing.assert_array_equal(x, original)
    assert model.card.summary()["padding"]["mode"] == mode
    # the padding matters: edge, centred (the default) gives another answer at the border
    default_padded, default_widths = reference_pad(x / 10.0, padded_shape, "edge", 0.0, "center")
    if (mode, position) != ("edge", "center"):
        default = om.correlate(default_padded, BOX)[default_widths[0][0]:default_widths[0][0] + 7,
                                                    default_widths[1][0]:default_widths[1][0] + 9]
        assert np.abs(default - expected).max() > 1e-2


def test_default_padding_is_centred_edge(tmp_path):
    model = ibx.load_model(om.save(om.identity(), tmp_path, "id", {"input": {"multiple_of": 8}}))
    assert model.card.input.padding == ibx.card.Padding("edge", 0.0, "center")
    assert model.pipeline.padding((5, 8)) == ((1, 2), (0, 0))


# -- window placement and weights -------------------------------------------------------------------------
def reference_starts(n, size, overlap):
    """Window starts along one axis as MONAI's dense_patch_slices places them (written from its description)."""
    step = size if n == size else max(1, int(size * (1 - overlap)))
    count = next(d for d in range(math.ceil(n / step)) if d * step + size >= n) + 1
    return [min(d * step, n - size) for d in range(count)]


@pytest.mark.parametrize("n, size, overlap, starts", [
    (128, 64, 0.25, [0, 48, 64]), (28, 16, 0.25, [0, 12]), (100, 64, 0.25, [0, 36]), (64, 64, 0.5, [0]),
    (10, 3, 0.9, list(range(8))), (20, 8, 0.0, [0, 8, 12]), (9, 8, 0.5, [0, 1])])
def test_window_starts_as_dense_patch_slices(n, size, overlap, starts):
    assert reference_starts(n, size, overlap) == starts
    plan = windows.plan_windows((n, 5), (size, 5), overlap)
    assert [w[0].start for w in plan] == starts
    assert all(w[1] == slice(0, 5) for w in plan)


def test_windows_cover_and_order():
    plan = windows.plan_windows((10, 20, 30), (8, 12, 12), 0.25)
    assert len(plan) == 2 * 2 * 3
    assert plan[0] == (slice(0, 8), slice(0, 12), slice(0, 12))
    assert plan[1] == (slice(0, 8), slice(0, 12), slice(9, 21))  # last axis fastest
    cover = np.zeros((10, 20, 30), int)
    for w in plan:
        cover[w] += 1
    assert cover.min() >= 1


def test_gaussian_importance_map():
    size, scale = (7, 10), 0.125
    weights = windows.importance_map(size, "gaussian", scale)
    axes = [np.exp(-((np.arange(n) - (n - 1) / 2) ** 2) / (2 * (scale * n) ** 2)) for n in size]
    expected = np.outer(*axes)
    expected = np.maximum(expected, max(expected.min(), 1e-3))
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    assert weights.min() == pytest.approx(1e-3)  # MONAI's floor
    np.testing.assert_array_equal(windows.importance_map(size, "constant"), np.ones(size))


def test_touched_windows():
    plan = windows.plan_windows((20,), (8,), 0.5)  # starts 0, 4, 8, 12
    region = np.zeros(20, bool)
    region[9] = True
    assert windows.touched_windows(plan, region).tolist() == [1, 2]
    assert windows.touched_windows(plan, np.zeros(20, bool)).tolist() == []


# -- windowed predict against an independent sliding-window evaluation ------------------------------------
def reference_sliding_window(path, volume, patch, overlap, blend, sigma_scale, dims):
    """Sliding-window inference written out for the test: pad (centred, edge) to hold a window, place windows,
    run each one on its own with ONNX Runtime, blend, crop. ``volume``: (slices, rows, cols) or (rows, cols)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    fixed = session.get_inputs()[0].shape[0]

    def infer(image):
        padded, widths = reference_pad(image, [max(n, p) for n, p in zip(image.shape, patch)], "edge", 0.0,
                                       "center")
        starts = [reference_starts(n, p, overlap) for n, p in zip(padded.shape, patch)]
        if blend == "gaussian":
            weight = np.ones(())
            for p in patch:
                weight = weight[..., None] * np.exp(-((np.arange(p) - (p - 1) / 2) ** 2) / (2 * (sigma_scale * p) ** 2))
            weight = np.maximum(weight, max(weight.min(), 1e-3))
        else:
            weight = np.ones(patch)
        total, count = np.zeros(padded.shape), np.zeros(padded.shape)
        for corner in np.stack(np.meshgrid(*starts, indexing="ij"), -1).reshape(-1, len(patch)):
            window = tuple(slice(c, c + p) for c, p in zip(corner, patch))
            batch = np.repeat(padded[window][None, None].astype(np.float32), fixed if isinstance(fixed, int) else 1, 0)
            out = session.run(None, {session.get_inputs()[0].name: batch})[0][0, 0]
            total[window] += weight * out
            count[window] += weight
        blended = total / count
        return blended[tuple(slice(b, b + n) for (b, _), n in zip(widths, image.shape))]

    if dims == 2 and volume.ndim == 3:
        return np.stack([infer(s) for s in volume])
    return infer(volume)


CASES_2D = [((40, 37), [16, 16], 0.25, "gaussian", None), ((3, 40, 37), [16, 20], 0.5, "constant", None),
            ((2, 12, 50), [16, 16], 0.25, "gaussian", 3), ((30, 30), [8, 8], 0.0, "constant", 2)]


@pytest.mark.parametrize("shape, patch, overlap, blend, batch", CASES_2D)
def test_windowed_predict_2d_equals_independent_sliding_window(tmp_path, rng, shape, patch, overlap, blend, batch):
    card = {"input": {"patch": {"size": patch, "overlap": overlap, "blend": blend, "sigma_scale": 0.2},
                      "multiple_of": 2}}
    net = om.small_autoencoder(seed=3, **({} if batch is None else {"batch": batch}))
    path = om.save(net, tmp_path, "ae", card)
    model = ibx.load_model(path)
    x = rng.normal(size=shape).astype(np.float32)
    got = model.predict(x)
    expected = reference_sliding_window(path, x.astype(np.float64), patch, overlap, blend, 0.2, 2)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    n_windows = len(windows.plan_windows([max(n, p) for n, p in zip(shape[-2:], patch)], patch, overlap))
    assert model.evaluations == n_windows * (shape[0] if len(shape) == 3 else 1)


@pytest.mark.parametrize("shape, overlap, blend", [((10, 20, 30), 0.25, "gaussian"), ((6, 20, 26), 0.5, "constant")])
def test_windowed_predict_3d_equals_independent_sliding_window(tmp_path, rng, shape, overlap, blend):
    patch = [8, 12, 12]
    card = {"input": {"patch": {"size": patch, "overlap": overlap, "blend": blend}, "multiple_of": 2}}
    path = om.save(om.small_autoencoder_3d(), tmp_path, "ae3", card)
    model = ibx.load_model(path)
    x = rng.normal(0, 0.05, size=shape).astype(np.float32)  # outputs of order 1 (the network has no biases)
    expected = reference_sliding_window(path, x.astype(np.float64), patch, overlap, blend, 0.125, 3)
    np.testing.assert_allclose(model.predict(x), expected, atol=1e-5)


def test_window_smaller_than_fixed_size_is_padded_to_it(tmp_path, rng):
    """A fixed-size model run on windows smaller than its size: each window is padded as the card says."""
    card = {"input": {"layout": "NCHW", "size": [12, 12], "patch": {"size": [8, 8], "overlap": 0.5},
                      "padding": {"mode": "constant", "value": 0.0, "position": "end"}}}
    model = ibx.load_model(om.save(om.convolution(BOX, spatial=[12, 12]), tmp_path, "fixed", card))
    x = rng.normal(size=(14, 11)).astype(np.float32)
    # zero padding at the end of a window = the window's own zero-padded convolution
    plan = windows.plan_windows(x.shape, (8, 8), 0.5)
    total, count = np.zeros(x.shape), np.zeros(x.shape)
    for w in plan:
        total[w] += om.correlate(x[w], BOX)
        count[w] += 1
    np.testing.assert_allclose(model.predict(x), total / count, atol=1e-5)


# -- bad cards --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, words", [
    ({"size": [16, 16], "patch": {"size": [32, 16]}}, ["input.patch.size", "larger", "[16, 16]"]),
    ({"patch": {"size": [16, 16], "overlap": 1.0}}, ["input.patch.overlap", "[0, 1)"]),
    ({"patch": {"size": [16, 16], "overlap": -0.1}}, ["input.patch.overlap", "[0, 1)"]),
    ({"patch": {"size": [16, 16], "blend": "cosine"}}, ["input.patch.blend", "gaussian"]),
    ({"padding": {"mode": "wrap"}}, ["input.padding.mode", "reflect"]),
    ({"padding": {"position": "start"}}, ["input.padding.position", "end"]),
    ({"padding": {"mode": "edge", "value": 1.0}}, ["input.padding.value", "constant"]),
    ({"padding": {"value": 1.0}}, ["input.padding.value", "constant"]),
    ({"patch": {"size": [16, 16, 16]}, "multiple_of": 2}, ["input.patch.size", "2D"]),
    ({"patch": {"size": [16, 15]}, "multiple_of": 2}, ["input.patch.size", "multiple_of"]),
    ({"patch": {"overlap": 0.5}}, ["input.patch", "size"]),
])
def test_bad_cards_name_the_field(tmp_path, change, words):
    path = om.save(om.identity(), tmp_path, "id")
    with pytest.raises(ibx.ModelCardError) as info:
        ibx.load_model(path, card={"spatial_dims": 2, "input": change})
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_patch_larger_than_the_models_fixed_shape(tmp_path):
    path = om.save(om.identity(spatial=[16, 16]), tmp_path, "fixed")
    with pytest.raises(ibx.ModelCardError, match="input.patch.size.*fixed size"):
        ibx.load_model(path, card={"input": {"layout": "NCHW", "patch": {"size": [16, 20]}}})


# -- IBIX on windowed models: only the windows a perturbation touches are evaluated again ----------------
def brute_force_forward(model, x, mask, n_jitters, max_jitter):
    """F from the definition, each jittered input run through the whole windowed pipeline (model.predict)."""
    base = model.predict(x).astype(np.float64)
    levels = np.concatenate([np.arange(-n_jitters, 0), np.arange(1, n_jitters + 1)]) * max_jitter / n_jitters
    total = sum((model.predict(x + np.float32(h) * mask) - base) / h for h in levels)
    return total / (2 * n_jitters)


@pytest.mark.parametrize("dims", [2, 3])
def test_windowed_forward_equals_brute_force(tmp_path, rng, dims):
    if dims == 2:
        card = {"input": {"patch": {"size": [16, 16], "overlap": 0.25, "blend": "gaussian"}, "multiple_of": 2,
                          "padding": {"mode": "reflect"}}}
        # rows fewer than the window: each slice is padded (reflect, centred) before its windows are placed;
        # a fixed batch of 2 (windows go through the model two at a time)
        path, shape = om.save(om.small_autoencoder(seed=5, batch=2), tmp_path, "ae", card), (3, 13, 44)
    else:
        card = {"input": {"patch": {"size": [8, 12, 12], "overlap": 0.5, "blend": "gaussian"}, "multiple_of": 2}}
        path, shape = om.save(om.small_autoencoder_3d(), tmp_path, "ae3", card), (10, 26, 30)
    model = ibx.load_model(path)
    x = rng.normal(0, 0.2, size=shape).astype(np.float32)
    mask = np.zeros(shape, bool)
    mask[1, 0:3, 5:8] = True  # at the border: edge/reflect padding copies it into the padded margin
    result = ibx.forward_mapping(model, x, mask, n_jitters=3, max_jitter=0.1)
    expected = brute_force_forward(model, x, mask, 3, 0.1)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(result.signed, expected, atol=1e-5 * scale)  # float rounding (7e-8 and 6e-7 seen)
    windows_info = result.parameters["windows"]
    assert windows_info["window_evaluations"] == result.evaluations
    assert result.evaluations < windows_info["brute_force_window_evaluations"] / 2
    assert windows_info["brute_force_window_evaluations"] == 7 * windows_info["windows_per_sample"]


@pytest.mark.parametrize("method", ["batched", "auto"])
def test_windowed_backward_equals_brute_force(tmp_path, rng, method):
    card = {"input": {"patch": {"size": [8, 12, 12], "overlap": 0.25, "blend": "gaussian"}, "multiple_of": 2}}
    model = ibx.load_model(om.save(om.small_autoencoder_3d(), tmp_path, "ae3", card))
    shape = (10, 24, 28)
    x = rng.normal(0, 0.2, size=shape).astype(np.float32)
    labels = np.zeros(shape, np.int32)
    for k, (z, r, c) in enumerate([(0, 0, 0), (2, 8, 10), (5, 14, 20), (6, 3, 22), (1, 18, 2)]):
        labels[z:z + 3, r:r + 4, c:c + 5] = k + 1
    out_mask = np.zeros(shape, bool)
    out_mask[2:5, 9:13, 11:16] = True
    result = ibx.backward_mapping(model, x, out_mask, blocks=labels, n_jitters=2, max_jitter=0.1, method=method)
    expected = []
    for k in range(1, 6):
        response = np.abs(brute_force_forward(model, x, labels == k, 2, 0.1))
        expected.append(response[out_mask].sum() / response.sum())
    np.testing.assert_allclose(result.block_values[1:], expected, atol=1e-4)
    assert result.parameters["windows"]["window_evaluations"] < \
        result.parameters["windows"]["brute_force_window_evaluations"]


# -- the published-style Keras autoencoder: a fixed 232x200 input padded with zeros at the bottom and right ----
KERAS_CARD = {"input": {"layout": "NHWC", "size": [232, 200],
                        "intensity": {"from": [0, 255], "to": [0, 1], "clip": True},
                        "padding": {"mode": "constant", "value": 0, "position": "end"}},
              "output": {"layout": "NHWC", "intensity": {"from": [0, 1], "to": [0, 255]}}}


def keras_pipeline(path):
    """The autoencoder as its authors run it, written out: scale to [0, 1], zeros at the bottom and right up to
    232x200, channels last, batch 1, crop, scale back to [0, 255]."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(image):
        rows, cols = image.shape
        padded = np.zeros((232, 200), np.float32)
        padded[:rows, :cols] = np.clip(image / 255.0, 0, 1)
        out = session.run(None, {session.get_inputs()[0].name: padded[None, :, :, None]})[0]
        return out[0, :rows, :cols, 0].astype(np.float64) * 255.0
    return run


def keras_slice(rng):
    from scipy import ndimage
    return np.clip(ndimage.gaussian_filter(rng.uniform(0, 255, (217, 181)), 3) * 3 - 250, 0, 255).astype(np.float32)


def test_keras_style_padding_forward_and_backward_equal_independent_equations(tmp_path, rng):
    path = om.save(om.small_autoencoder(seed=2, layout="NHWC", batch=1, spatial=[232, 200]), tmp_path, "keras",
                   KERAS_CARD)
    model = ibx.load_model(path)
    run = keras_pipeline(path)
    x = keras_slice(rng)
    np.testing.assert_allclose(model.predict(x), run(x), atol=1e-3)  # grey levels 0..255

    n_jitters, h_max = 3, 20.0
    levels = np.concatenate([np.arange(-n_jitters, 0), np.arange(1, n_jitters + 1)]) * h_max / n_jitters

    def forward(mask):  # F = 1/(2N) sum_k (f(x + h_k M) - f(x)) / h_k
        return sum((run(x + h * mask) - run(x)) / h for h in levels) / (2 * n_jitters)

    mask = np.zeros(x.shape, bool)
    mask[205:215, 170:179] = True  # near the bottom-right corner, where the zeros start
    result = ibx.forward_mapping(model, x, mask, n_jitters=n_jitters, max_jitter=h_max)
    expected = forward(mask.astype(np.float32))
    assert np.corrcoef(result.signed.ravel(), expected.ravel())[0, 1] >= 0.9999

    labels = np.zeros(x.shape, np.int32)
    for k, (r, c) in enumerate([(195, 160), (195, 170), (205, 160), (205, 170), (180, 150), (100, 100)]):
        labels[r:r + 10, c:c + 10] = k + 1
    out_mask = np.zeros(x.shape, bool)
    out_mask[200:217, 165:181] = True
    back = ibx.backward_mapping(model, x, out_mask, blocks=labels, n_jitters=n_jitters, max_jitter=h_max,
                                method="batched")
    responses = [np.abs(forward((labels == k).astype(np.float32))) for k in range(1, 7)]
    expected_b = np.array([r[out_mask].sum() / r.sum() if r.sum() else 0.0 for r in responses])
    assert np.corrcoef(back.block_values[1:], expected_b)[0, 1] >= 0.9999
    np.testing.assert_allclose(back.block_values[1:], expected_b, atol=1e-3)

    # the default padding (centred, edge values) is another pipeline, with another map
    default_card = {"input": {k: v for k, v in KERAS_CARD["input"].items() if k != "padding"},
                    "output": KERAS_CARD["output"]}
    default = ibx.forward_mapping(ibx.load_model(path, card=default_card), x, mask, n_jitters=n_jitters,
                                  max_jitter=h_max)
    assert np.abs(default.signed - expected).max() > 0.05 * np.abs(expected).max()


@pytest.mark.parametrize("padding", [{"mode": "constant", "value": 0.3, "position": "end"},
                                     {"mode": "reflect", "position": "center"}])
def test_tiles_follow_the_cards_padding(tmp_path, rng, padding):
    """Backward with tiles (the local method) pads tiles as the model pads: equal to brute force at the border."""
    card = {"input": {"multiple_of": 8, "padding": padding, "intensity": {"from": [0, 2], "to": [0, 1]}}}
    model = ibx.load_model(om.save(om.small_autoencoder(seed=4), tmp_path, "cae", card))
    x = rng.uniform(0, 2, size=(61, 70)).astype(np.float32)  # padded to 64 x 72
    out_mask = np.zeros(x.shape, bool)
    out_mask[55:61, 62:70] = True  # the bottom-right corner, next to the padding
    brute = ibx.backward_mapping(model, x, out_mask, n_blocks=120, compactness=1.0, n_jitters=2, method="brute")
    local = ibx.backward_mapping(model, x, out_mask, blocks=brute.labels, n_jitters=2, method="local")
    assert local.tiling["tiles"] is True
    np.testing.assert_allclose(local.block_values, brute.block_values, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("padding", [{"mode": "constant", "value": -2.5, "position": "end"},
                                     {"mode": "edge", "position": "center"},
                                     {"mode": "reflect", "position": "center"},
                                     {"mode": "reflect", "position": "end"}])
def test_padded_window_is_a_window_of_the_padded_sample(tmp_path, rng, padding):
    """Tiles cut from a sample padded as the card says, without padding the whole sample (reflect: more padding
    than the axis is long, mirrored again)."""
    model = ibx.load_model(om.save(om.identity(), tmp_path, "id", {"input": {"size": [16, 12],
                                                                             "padding": padding}}))
    sample = rng.normal(size=(2, 5, 4)).astype(np.float32)
    pipeline = model.pipeline
    padded = pipeline.pad(sample, pipeline.padding((5, 4)))
    assert padded.shape == (2, 16, 12)
    for window in [(slice(0, 16), slice(0, 12)), (slice(3, 9), slice(7, 12)), (slice(10, 16), slice(0, 5))]:
        np.testing.assert_array_equal(pipeline.padded_window(sample, window), padded[(slice(None),) + window])
    direction = pipeline.padded_window(np.ones((1, 5, 4), np.float32), (slice(0, 16), slice(0, 12)), 0)
    expected = pipeline.pad(np.ones((1, 5, 4), np.float32), pipeline.padding((5, 4)), direction=True)
    np.testing.assert_array_equal(direction, expected)


def test_windowed_forward_can_be_cancelled_between_window_batches(tmp_path, rng):
    card = {"input": {"patch": {"size": [8, 12, 12], "overlap": 0.5}, "multiple_of": 2}}
    model = ibx.load_model(om.save(om.small_autoencoder_3d(), tmp_path, "ae3", card), memory_budget=2**22)
    x = rng.normal(0, 0.2, size=(10, 26, 30)).astype(np.float32)
    mask = np.zeros(x.shape, bool)
    mask[4:6, 10:14, 12:16] = True
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(ibx.Cancelled):
        ibx.forward_mapping(model, x, mask, n_jitters=2, max_jitter=0.1, cancel=cancel)
    assert model.evaluations < 2 * 2 * 32  # stopped before every window of every jitter ran
    expected = brute_force_forward(model, x, mask, 2, 0.1)  # a cancelled run leaves nothing behind
    np.testing.assert_allclose(ibx.forward_mapping(model, x, mask, n_jitters=2, max_jitter=0.1).signed, expected,
                               atol=1e-5 * np.abs(expected).max())
