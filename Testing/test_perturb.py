"""The perturbation engine: jitter grids, default H, response radius, non-finite outputs, inputs left unchanged,
cancellation (perturb.py)."""
import numpy as np
import pytest
from onnx import helper

import IBIXLogic as ibx
import onnx_models as om
from IBIXLogic.perturb import jitter_levels, jitter_schedule
from onnx_models import box_mask


def test_inputs_are_never_modified(conv_model, image, mask):
    image_before, mask_before = image.copy(), mask.copy()
    ibx.forward_mapping(conv_model, image, mask, n_jitters=2)
    ibx.backward_mapping(conv_model, image, mask, n_blocks=10, n_jitters=1)
    conv_model.predict(image)
    np.testing.assert_array_equal(image, image_before)
    np.testing.assert_array_equal(mask, mask_before)


def test_cancel_stops_a_run(conv_model, image, mask):
    import threading
    event = threading.Event()
    event.set()
    with pytest.raises(ibx.Cancelled):
        ibx.backward_mapping(conv_model, image, mask, n_blocks=20, n_jitters=1, cancel=event)


def inf_above(threshold: float, **kw):
    """Identity plus exp(1000 (x - t)): exactly x below the threshold, +Inf (float32 overflow) above it."""
    nodes = [helper.make_node("Sub", ["core_in", "t"], ["d"]),
             helper.make_node("Mul", ["d", "k"], ["kd"]),
             helper.make_node("Exp", ["kd"], ["e"]),
             helper.make_node("Add", ["core_in", "e"], ["core_out"])]
    return om.build(nodes, {"t": np.float32(threshold), "k": np.float32(1000.0)}, **kw)


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_nan_or_inf_only_for_large_perturbations(tmp_path, unit_image, unit_mask, kind):
    model_proto = om.nan_above(3.0) if kind == "nan" else inf_above(3.0)
    model = ibx.load_model(om.save(model_proto, tmp_path, kind), device="cpu")
    with pytest.raises(ibx.ModelError, match=r"NaN or infinite values for the input mask perturbed .* jitter "
                                             r"h = 4\b.*lower the maximum jitter H"):
        ibx.forward_mapping(model, unit_image, unit_mask, n_jitters=2, max_jitter=4.0)
    with pytest.raises(ibx.ModelError, match="NaN or infinite values"):
        ibx.backward_mapping(model, unit_image, unit_mask, n_blocks=6, blocks="grid", n_jitters=2, max_jitter=4.0,
                             method="batched")
    ok = ibx.forward_mapping(model, unit_image, unit_mask, n_jitters=2, max_jitter=1.0)
    np.testing.assert_allclose(ok.signed, unit_mask.astype(np.float32), atol=1e-4)


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


def test_default_max_jitter_is_15_percent_of_robust_range(tmp_path, rng):
    model = ibx.load_model(om.save(om.identity(), tmp_path, "identity"))
    x = rng.uniform(0, 1000, (40, 40)).astype(np.float32)
    mask = box_mask(x.shape, slice(1, 3), slice(1, 3))
    low, high = np.percentile(x, [1, 99])
    result = ibx.forward_mapping(model, x, mask, n_jitters=1)
    assert result.parameters["max_jitter"] == pytest.approx(0.15 * (high - low), rel=1e-6)


def test_jitter_levels_are_symmetric():
    np.testing.assert_allclose(ibx.jitter_levels(2, 10.0), [-10, -5, 5, 10])


def test_probes_perturbed_together_measure_what_single_probes_measure(tmp_path, rng):
    from IBIXLogic import locality
    model = ibx.load_model(om.save(om.small_autoencoder(), tmp_path, "cae", {"input": {"multiple_of": 2}}))
    x = rng.normal(size=(64, 72)).astype(np.float32)
    radius = ibx.measure_response_radius(model, x, 1.0, channels=[0])
    assert radius.evaluations == 3  # the unperturbed image and the jitters +-H with all probes at once
    points = locality.probe_points(x.shape, 5, locality.probe_spacing(x.shape, 5))
    grids = np.indices(x.shape)
    reaches = []
    for point in points:  # the oracle: one forward mapping per probe voxel
        single = np.zeros(x.shape, bool)
        single[tuple(point)] = True
        response = ibx.forward_mapping(model, x, single, n_jitters=1, max_jitter=1.0).signed
        distance = np.max(np.abs(grids - point[:, None, None]), axis=0)
        reaches.append(distance[response != 0].max())
    assert radius.measured == max(reaches) and radius.margin == 0


def test_probes_whose_responses_could_meet_are_measured_one_by_one(tmp_path, rng):
    kernel = rng.normal(size=(15, 15)).astype(np.float32)  # reach 7: half of the 16-voxel probe spacing
    model = ibx.load_model(om.save(om.convolution(kernel), tmp_path, "wide"))
    x = rng.normal(size=(64, 64)).astype(np.float32)
    radius = ibx.measure_response_radius(model, x, 1.0, channels=[0])
    assert radius.measured == 7 and radius.evaluations == 3 + 2 * 5


@pytest.mark.parametrize("call", ["forward", "forward progressive", "backward", "backward batched", "backward brute"])
def test_nan_for_some_jitters_names_every_failing_jitter_and_stops(tmp_path, unit_image, unit_mask, call):
    """NaN only where x + h > 1.25: the positive jitters above 0.25 fail; the run stops and says which."""
    model = ibx.load_model(om.save(om.nan_above(1.25), tmp_path, "nan"), device="cpu")
    x = unit_image * 0.999
    options = {"n_jitters": 4, "max_jitter": 0.5}
    with pytest.raises(ibx.ModelError) as info:
        if call.startswith("forward"):
            ibx.forward_mapping(model, x, unit_mask, progressive=call.endswith("progressive"), **options)
        else:
            method = call.split()[1] if " " in call else "auto"
            ibx.backward_mapping(model, x, unit_mask, n_blocks=9, blocks="grid", method=method, **options)
    message = str(info.value)
    assert "NaN or infinite values for" in message and "with jitter h = 0.5" in message
    assert "h = -" not in message and "h = 0.125" not in message  # only the failing jitters are named
    if call == "forward":
        assert "with jitter h = 0.375" in message and "(2 of the 8 inputs of this model call)" in message


# -- the response radius: only where it pays for itself, and measured once per process ----------------------------
def test_radius_is_kept_for_the_same_model_card_channels_jitter_and_shape(tmp_path, rng):
    from IBIXLogic.perturb import forget_radii
    model = ibx.load_model(om.save(om.small_autoencoder(), tmp_path, "cae", {"input": {"multiple_of": 2}}))
    x = rng.normal(size=(64, 72)).astype(np.float32)
    first = ibx.measure_response_radius(model, x, 1.0, channels=[0])
    assert first.source == "measured" and first.evaluations > 0
    again = ibx.measure_response_radius(model, rng.normal(size=(64, 72)).astype(np.float32), 1.0, channels=[0])
    assert again.source == "cached" and again.evaluations == 0 and again.measured == first.measured
    for other in (dict(x=x[:, :64]), dict(max_jitter=2.0)):  # another sample shape, another jitter: measured
        arguments = dict(x=x, max_jitter=1.0, channels=[0]) | other
        assert ibx.measure_response_radius(model, **arguments).source == "measured"
    assert forget_radii() >= 3
    assert ibx.measure_response_radius(model, x, 1.0, channels=[0]).evaluations == first.evaluations


def test_one_probe_tells_a_global_response(tmp_path, rng):
    model = ibx.load_model(om.save(om.convolution_plus_mean(om.KERNEL, 0.5), tmp_path, "global"))
    x = rng.normal(size=(64, 64)).astype(np.float32)
    radius = ibx.measure_response_radius(model, x, 1.0)
    # the unperturbed image, the probes together (their responses meet), then the first probe alone: global
    assert radius.is_global and radius.radius is None and radius.evaluations == 1 + 2 + 2


def test_probes_that_cannot_pay_for_themselves_are_skipped_and_say_why(tmp_path, rng):
    from IBIXLogic.perturb import Perturber, ProbeBudget, forget_radii, response_radius
    model = ibx.load_model(om.save(om.small_autoencoder(), tmp_path, "cae", {"input": {"multiple_of": 2}}))
    prepared = model.prepare(rng.normal(size=(64, 72)).astype(np.float32))

    def radius(budget):
        forget_radii()
        return response_radius(Perturber(model, prepared, np.array([-1.0, 1.0]), [0], None), 0, 0.0, budget=budget)

    over = radius(ProbeBudget(limit=0.5, saving=lambda r: 100.0, brute_force=6.25))
    assert over.source == "skipped" and over.radius is None and not over.is_global and over.evaluations == 0
    assert "above the 0.50 allowed (8 % of brute force's 6.25)" in over.reason
    useless = radius(ProbeBudget(limit=100.0, saving=lambda r: 1.0, brute_force=1250.0))
    assert useless.source == "skipped" and "more than it could save (at most 1.00)" in useless.reason
    assert radius(ProbeBudget(limit=100.0, saving=lambda r: 100.0, brute_force=1250.0)).radius is not None
