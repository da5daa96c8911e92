"""Model cards (card.py): validation, resolution against the ONNX signature, and hostile cards. Random and mutated
cards either load or fail with a clean ModelCardError.

Every outcome of ``validate_card`` and ``load_model(path, card=...)`` on a small real model must be a valid
model or an ``IBIXLogic.IBIXError`` whose message names the offending field; never a KeyError, TypeError,
jsonschema or ONNX Runtime exception.
"""
from __future__ import annotations

import copy
import json
import math
import re

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import IBIXLogic as ibx  # noqa: E402
import onnx_models as om  # noqa: E402

#: Cards tried by each property test (kept small enough for CI: the two tests take a few seconds together).
VALIDATE_EXAMPLES = 500
LOAD_EXAMPLES = 300


def _schema_fields(schema: dict, found: set | None = None) -> set:
    found = set() if found is None else found
    if isinstance(schema, dict):
        for key, value in schema.get("properties", {}).items():
            found.add(key)
            _schema_fields(value, found)
        for value in schema.values():
            if isinstance(value, (dict, list)):
                _schema_fields(value, found)
    elif isinstance(schema, list):
        for value in schema:
            _schema_fields(value, found)
    return found


FIELDS = _schema_fields(ibx.card_schema()) | {"from", "to", "percentiles"}


json_leaf = (st.none() | st.booleans() | st.integers(-10**12, 10**12)
             | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
             | st.sampled_from(["NCHW", "NDHWC", "axial", "x", "y", 2, 3, 0, -1, 1.0, 2.0, ""])
             | st.builds(list) | st.builds(dict))  # fresh containers: mutations must not touch shared objects
json_values = st.recursive(
    json_leaf,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(sorted(FIELDS)) | st.text(max_size=6), children, max_size=4),
    max_leaves=12)
# Non-string keys are possible from Python callers (not from JSON files).
weird_keys = st.sampled_from(sorted(FIELDS)) | st.text(max_size=6) | st.integers(-3, 3) | st.none()


def _containers(card, path=()):
    """Every (path, container) pair of dicts and lists inside ``card``."""
    yield path, card
    items = card.items() if isinstance(card, dict) else enumerate(card) if isinstance(card, list) else []
    for key, value in items:
        if isinstance(value, (dict, list)):
            yield from _containers(value, path + (key,))


@st.composite
def mutated_cards(draw):
    card = copy.deepcopy(draw(st.sampled_from(om.IDENTITY_CARDS)))
    for _ in range(draw(st.integers(1, 4))):
        containers = list(_containers(card))
        _, target = containers[draw(st.integers(0, len(containers) - 1))]
        op = draw(st.sampled_from(["drop", "add", "replace", "retype", "nest"]))
        keys = list(target) if isinstance(target, dict) else list(range(len(target)))
        if op == "drop" and keys:
            key = keys[draw(st.integers(0, len(keys) - 1))]
            del target[key]
        elif op == "add":
            if isinstance(target, dict):
                target[draw(weird_keys)] = draw(json_values)
            else:
                target.append(draw(json_values))
        elif op in ("replace", "retype", "nest") and keys:
            key = keys[draw(st.integers(0, len(keys) - 1))]
            old = target[key]
            if op == "replace":
                target[key] = draw(json_values)
            elif op == "retype":  # same content, another JSON type
                target[key] = draw(st.sampled_from([str(old), [old], {"value": old},
                                                    -abs(old) if isinstance(old, (int, float)) else 0,
                                                    float(old) if isinstance(old, int) else 1,
                                                    bool(old), None]))
            else:
                target[key] = {draw(weird_keys): old, draw(weird_keys): draw(json_values)}
    return card


any_cards = mutated_cards() | json_values | st.dictionaries(weird_keys, json_values, max_size=5)


def _names_a_field(message: str) -> bool:
    if "model card must be a JSON object" in message or re.search(r"field (name )?'[^']+'", message):
        return True
    return any(re.search(rf"\b{re.escape(name)}\b", message) for name in FIELDS)


def _check_outcome(call, card):
    try:
        return call(card)
    except ibx.IBIXError as exc:
        assert _names_a_field(str(exc)), f"error does not name a field: {exc}\ncard: {card!r}"
        assert "Traceback" not in str(exc)
        return exc


@settings(max_examples=VALIDATE_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(card=any_cards)
def test_validate_card_only_raises_clean_errors(card):
    before = copy.deepcopy(card) if not _has_nan(card) else None
    outcome = _check_outcome(ibx.validate_card, card)
    if before is not None:
        assert card == before, "validate_card modified the caller's card"
    if isinstance(outcome, dict):  # accepted cards are JSON-clean and finite
        assert _all_finite(outcome)
        json.dumps(outcome, allow_nan=False)


@pytest.fixture(scope="module")
def identity_path(tmp_path_factory):
    return om.save(om.identity(), tmp_path_factory.mktemp("cards"), "identity")


@settings(max_examples=LOAD_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(card=mutated_cards())
def test_load_model_with_mutated_cards_gives_a_model_or_a_clean_error(identity_path, card):
    outcome = _check_outcome(lambda c: ibx.load_model(identity_path, card=c, device="cpu"), card)
    if isinstance(outcome, ibx.Model):
        x = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(1, 64, 48) if outcome.card.input.size is None \
            else np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(1, 32, 32)
        try:
            y = outcome.predict(x)
        except ibx.IBIXError as exc:  # e.g. a size the card forbids; must still be clean
            assert _names_a_field(str(exc)) or "input" in str(exc), str(exc)
        else:
            assert y.shape == x.shape and np.isfinite(y).all()


def _has_nan(value) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, dict):
        return any(_has_nan(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_nan(v) for v in value)
    return False


def _all_finite(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_all_finite(v) for v in value)
    return True


@pytest.mark.parametrize("card, field, accepted", [
    ({"colour": "red"}, "colour", "accepted fields"),
    ({"input": {"chanels": ["T1"]}}, "input.chanels", "accepted fields of input"),
    ({"spatial_dims": "2"}, "spatial_dims", r"accepted values: \[2, 3\]"),
    ({"spatial_dims": 4}, "spatial_dims", r"accepted values: \[2, 3\]"),
    ({"input": {"size": [-32, 32]}}, "input.size.0", "minimum"),
    ({"input": {"size": [0, 32]}}, "input.size.0", "minimum"),
    ({"input": {"multiple_of": 0}}, "input.multiple_of", "minimum"),
    ({"input": {"channels": []}}, "input.channels", "non-empty|too short|at least"),
    ({"output": {"channels": ["a", "b"]}}, "output.channels", "too long|at most|expected"),
    ({"input": {"intensity": {"from": [1, 0], "to": [0, 1]}}}, "input.intensity.from", "low < high"),
    ({"input": {"intensity": {"percentiles": [99, 1], "to": [0, 1]}}}, "input.intensity.percentiles", "low < high"),
    ({"input": {"intensity": {"percentiles": [1, 120], "to": [0, 1]}}}, "input.intensity", "percentiles"),
    ({"output": {"intensity": {"from": [0, 1], "to": [5, 5]}}}, "output.intensity.to", "span a range"),
    ({"input": {"intensity": {"from": [0, float("inf")], "to": [0, 1]}}}, "input.intensity.from", "finite"),
    ({"input": {"intensity": {"from": [0, float("nan")], "to": [0, 1]}}}, "input.intensity.from", "finite"),
    ({"input": {"layout": "NCHW"}, "spatial_dims": 3}, "input.layout", "NCDHW"),
    ({"in_plane": {"transpose": "yes"}}, "in_plane.transpose", "boolean"),
    ({1: "x"}, "field name 1", "not text"),
    ({"input": {None: 1}}, "'input'", "not text"),
    ({"training": {"loss": float("nan")}}, "training.loss", "finite"),
    ({"name": object()}, "name", "JSON values only"),
])
def test_bad_cards_name_the_field_and_the_accepted_values(card, field, accepted):
    with pytest.raises(ibx.ModelCardError) as info:
        ibx.validate_card(card)
    message = str(info.value)
    assert field in message, message
    assert re.search(accepted, message), message


def test_integral_floats_count_as_integers_and_run(tmp_path):
    """JSON Schema takes 2.0 as an integer; IBIX stores it as 2 and runs (no float pad widths downstream)."""
    card = ibx.validate_card({"spatial_dims": 2.0, "input": {"size": [32.0, 32.0]}})
    assert card == {"spatial_dims": 2, "input": {"size": [32, 32]}}
    assert all(type(v) is int for v in card["input"]["size"])
    model = ibx.load_model(om.save(om.identity(), tmp_path, "identity"), card={"input": {"multiple_of": 8.0}})
    x = np.arange(20 * 21, dtype=np.float32).reshape(20, 21)
    np.testing.assert_array_equal(model.predict(x), x)


def test_tuples_and_numpy_scalars_from_python_callers_are_accepted():
    card = ibx.validate_card({"spatial_dims": np.int64(2),
                              "input": {"intensity": {"from": (0, np.float32(1)), "to": (0, 1)}}})
    assert card["input"]["intensity"]["from"] == [0, 1.0]
    json.dumps(card)


def test_card_rank_mismatch(tmp_path):
    path = om.save(om.identity(), tmp_path, "identity", {"spatial_dims": 3})
    with pytest.raises(ibx.ModelCardError, match="spatial_dims 3 .* rank 4"):
        ibx.load_model(path)


def test_card_channel_count_mismatch(tmp_path):
    path = om.save(om.identity(), tmp_path, "identity", {"input": {"channels": ["water", "fat"]}})
    with pytest.raises(ibx.ModelCardError, match="2 input channels .* has 1 channels"):
        ibx.load_model(path)


def test_card_layout_mismatch_is_caught(tmp_path):
    # NHWC model with 3 channels declared NCHW: the card's channel count no longer matches
    path = om.save(om.channel_mix([1, 2, 3], layout="NHWC"), tmp_path, "mix",
                   {"input": {"layout": "NCHW", "channels": ["a", "b", "c"]}})
    with pytest.raises(ibx.ModelError, match="does not run as its card describes.*'input.layout'"):
        ibx.load_model(path)


def test_ambiguous_layout_without_card_asks_for_the_field(tmp_path):
    model = om.build([om.helper.make_node("Identity", ["core_in"], ["core_out"])], {}, "NCHW",
                     in_channels="C", out_channels="C")
    path = om.save(model, tmp_path, "dynamic")
    with pytest.raises(ibx.ModelCardError, match="write 'input.layout'"):
        ibx.load_model(path)


def test_invalid_card_field_is_named(tmp_path):
    path = om.save(om.identity(), tmp_path, "identity", {"input": {"layout": "NCWH"}})
    with pytest.raises(ibx.ModelCardError, match="'input.layout' is 'NCWH'; accepted values"):
        ibx.load_model(path)


# -- defects found by the hostile generator (Testing/hostile.py) ---------------------------------------------------

@pytest.mark.parametrize("card, field, expected", [
    ({"input": {"intensity": {"from": [-10**400, 10**400], "to": [0, 1]}}}, "input.intensity.from.0", "401 digits"),
    ({"input": {"intensity": {"from": [0, 1e-40], "to": [0, 1]}}}, "input.intensity", "scale factor of 1e\\+40"),
    ({"input": {"intensity": {"from": [0, 1], "to": [0, 1e-30]}}}, "input.intensity", "scale factor of 1e-30"),
    ({"output": {"intensity": {"from": [0, 1e-40], "to": [0, 1]}}}, "output.intensity", "scale factor"),
    ({"input": {"intensity": {"from": [-1e300, 1e300], "to": [0, 1]}}}, "input.intensity", "within"),
    ({"input": {"intensity": {"from": [1e30, 2e30], "to": [0, 1e30]}}}, "input.intensity", "within"),
])
def test_numbers_float32_cannot_carry_are_refused_with_the_field(card, field, expected):
    with pytest.raises(ibx.ModelCardError) as info:
        ibx.validate_card(card)
    assert field in str(info.value) and re.search(expected, str(info.value)), str(info.value)


def test_ordinary_intensity_ranges_still_pass():
    for source, target in ([-1024, 3071], [0, 1]), ([0, 1], [-1000, 2000]), ([0, 4095], [-1, 1]):
        ibx.validate_card({"input": {"intensity": {"from": source, "to": target}}})


@pytest.mark.parametrize("card", [[1, 2], b"{}", 3.5, ("a",), bytearray(b"x")])
def test_a_card_of_the_wrong_type_names_the_argument(identity_path, card):
    with pytest.raises(ibx.ModelCardError, match=r"card must be a model card \(a dict\), the path of a JSON file"):
        ibx.load_model(identity_path, card=card, device="cpu")


@pytest.mark.parametrize("text, expected", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"input": {"multiple_of": ' + "9" * 5000 + "}}", "'input.multiple_of' is a number of 5000 digits"),
    ('{"input": {"intensity": {"from": [-1e400, 1e400], "to": [0, 1]}}}', "'input.intensity.from.0' is -inf"),
    ('{"name": "\\ud800"', "not valid JSON"),
])
def test_card_files_that_json_cannot_read_are_refused_cleanly(identity_path, tmp_path, text, expected):
    path = tmp_path / "card.json"
    path.write_text(text)
    with pytest.raises(ibx.ModelCardError, match=re.escape(str(path)) + ".*" + re.escape(expected)):
        ibx.load_model(identity_path, card=path, device="cpu")


def test_a_huge_card_file_is_refused_before_reading(identity_path, tmp_path):
    path = tmp_path / "huge.json"
    path.write_text('{"description": "' + "x" * (2 << 20) + '"}')
    with pytest.raises(ibx.ModelCardError, match="a card is a small JSON file"):
        ibx.load_model(identity_path, card=path, device="cpu")


def test_an_input_the_percentile_mapping_takes_beyond_float32_is_refused(identity_path):
    model = ibx.load_model(identity_path, card={"input": {"intensity": {"percentiles": [1, 99], "to": [0, 1]}}},
                           device="cpu")
    x = np.full((16, 16), 1.0, np.float32)
    x[:8] += 1e-6
    x[0, 0] = 3e38
    with pytest.raises(ibx.InputError, match="input intensity mapping .* beyond what float32 holds.*'input.intensity'"):
        model.predict(x)


def test_a_card_path_the_file_system_refuses_is_named(identity_path):
    with pytest.raises(ibx.ModelCardError, match=r"card: .*\.\.\..* \(5000 characters\) cannot be opened"):
        ibx.load_model(identity_path, card="9" * 5000, device="cpu")
