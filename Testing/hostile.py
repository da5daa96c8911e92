"""Seeded hostile inputs for IBIX's public API, and a runner that tries each one in a child process.

Four categories, each a deterministic list of cases built from a seed:

- ``cards``: model cards mutated from the shipped ones and the test cards (dropped, added, retyped and nested
  fields, numbers float32 or float64 cannot hold, deep nesting, cards of the wrong type, unreadable card files),
  tried through ``validate_card`` and through ``load_model`` on a real model (accepted models are run).
- ``models``: hostile ONNX files (truncated, random, byte-flipped, wrong rank, classifiers, NaN/Inf-emitting,
  several inputs or outputs, integer inputs, huge declared dimensions, shape-changing, batch-mixing, fixed
  batches, unknown operators) and ordinary ones; every model that loads is explained (backward and forward
  mappings) and its forward map compared with brute force, one perturbed input per model call.
- ``arrays``: inputs, masks, block label images and parameters of ``load_model``, ``predict``,
  ``forward_mapping`` and ``backward_mapping`` (wrong types, shapes, dtypes, values, sizes).
- ``commands``: ``ibix`` command lines (missing, broken or mismatched files, option values out of range, usage
  errors) run through ``IBIXLogic.cli.main``: exit 0 with finite outputs, or exit 2 with a message naming the
  option or file; no temporary file left behind.

Each case ends in one outcome: ``clean`` (an IBIX error whose message names the field or argument; a
``TypeError`` raised by IBIX itself naming the argument counts too; for a command line, exit code 2), ``accepted``
(a finite, in-range result that agrees with the oracle where there is one), ``raw`` (any other exception, an error
that names nothing, or a wrong result), ``crash`` (the child process died or hung on it). ``changed`` counts cases
that modified an input (array, card or file). The suite (``test_hostile.py``) runs :func:`run_category` for each
category, and for ``selftest``, cases of known outcome that check the runner itself.

As a script: ``python hostile.py CATEGORY SEED FIRST WORKDIR`` tries the cases of CATEGORY from index FIRST on and
prints one JSON line when a case starts and one with its outcome.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import queue
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

HERE = Path(__file__).resolve().parent
#: Seconds a case may run before the runner counts it as a crash (a hang) and goes on with the next case: a guard
#: against hangs, far above any case's time on a loaded machine (a case takes well under a second alone).
CASE_TIMEOUT = 120.0
#: Seconds a child may take to start (import IBIX, build the cases) before its first case: not a case's time.
STARTUP_TIMEOUT = 600.0
#: Address space of a child (bytes): an allocation that would take the machine down fails there instead.
CHILD_MEMORY = 6 * 2**30
OUTCOMES = ("clean", "accepted", "raw", "crash")
#: Start of the child's protocol lines on its standard output.
MARK = "@hostile "


@dataclass
class Case:
    """One hostile call. ``make()`` builds its inputs and returns (call, names): ``call()`` runs the public API
    (through :func:`watch` for every input it passes) and returns what to check; a clean error must name one of
    ``names`` (case-insensitive)."""

    kind: str
    make: Callable[[], tuple[Callable[[], Any], tuple[str, ...]]]


# -- outcome of one case ------------------------------------------------------------------------------------------
_WATCHED: list[tuple[Any, Any]] = []


def _fingerprint(value: Any, depth: int = 0) -> Any:
    if depth > 100:  # deeper (or self-referencing) structures are compared down to here
        return "..."
    if isinstance(value, np.ndarray):
        data = value.tobytes() if value.dtype != object else repr(value.tolist()).encode()
        return ("array", value.dtype.str, value.shape, value.flags.writeable, hashlib.sha1(data).hexdigest())
    if isinstance(value, Path):
        return ("file", str(value), hashlib.sha1(value.read_bytes()).hexdigest() if value.is_file() else None)
    if isinstance(value, dict):
        return {repr(k): _fingerprint(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_fingerprint(v, depth + 1) for v in value]
    return repr(value)


def watch(*values: Any) -> Any:
    """Remember the inputs a case passes to IBIX, so that the runner can tell whether they were changed."""
    for value in values:
        _WATCHED.append((value, _fingerprint(value)))
    return values[0] if len(values) == 1 else values


class WrongResult(AssertionError):
    """An accepted result that is not finite, not in range, or not what the oracle says."""


class Refused(Exception):
    """A clean refusal that is not an exception of the API: the command line's exit code 2 and its message."""


def _raised_by_ibix(exc: BaseException) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and f"{os.sep}IBIXLogic{os.sep}" in frames[-1].filename


def _names(message: str, names: Iterable[str]) -> bool:
    return any(name.lower() in message.lower() for name in names)


def check_result(result: Any) -> None:
    """Raise WrongResult unless ``result`` (whatever a public call returned) is finite and in range."""
    import IBIXLogic as ibx

    def finite(array, what):
        array = np.asarray(array)
        if not np.isfinite(array).all():
            raise WrongResult(f"{what} has {int((~np.isfinite(array)).sum())} non-finite values")

    if isinstance(result, ibx.ForwardResult):
        finite(result.signed, "signed F")
        finite(result.normalized, "normalized F")
        if result.normalized.min() < 0 or result.normalized.max() > 1:
            raise WrongResult(f"normalized F spans [{result.normalized.min()}, {result.normalized.max()}]")
    elif isinstance(result, ibx.BackwardResult):
        finite(result.map, "B")
        if result.map.min() < 0 or result.map.max() > 1 + 1e-6:
            raise WrongResult(f"B spans [{result.map.min()}, {result.map.max()}]")
        if result.labels.min() < 0 or int(result.labels.max()) != len(result.block_values) - 1:
            raise WrongResult("block labels are not 0..K")
    elif isinstance(result, np.ndarray):
        finite(result, "the output")
    elif isinstance(result, dict):
        json.dumps(result, allow_nan=False)
    elif isinstance(result, (list, tuple)):
        for item in result:
            check_result(item)


def try_case(case: Case) -> dict:
    """Run one case in this process and classify its outcome."""
    import IBIXLogic as ibx

    _WATCHED.clear()
    outcome, detail, names = "raw", "", ()
    try:
        call, names = case.make()
        check_result(call())
        outcome = "accepted"
    except WrongResult as exc:
        detail = f"wrong result: {exc}"
    except (ibx.IBIXError, Refused) as exc:
        outcome = "clean" if _names(str(exc), names) else "raw"
        detail = f"{type(exc).__name__}: {exc}"
    except TypeError as exc:
        outcome = "clean" if _raised_by_ibix(exc) and _names(str(exc), names) else "raw"
        detail = f"TypeError: {exc}"
        if outcome == "raw":
            detail += " at " + ":".join(map(str, traceback.extract_tb(exc.__traceback__)[-1][:2]))
    except Exception as exc:  # noqa: BLE001 - classifying every escape is the point
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        detail = f"{type(exc).__name__}: {str(exc)[:300]} at {frame.filename}:{frame.lineno}"
    changed = [i for i, (value, before) in enumerate(_WATCHED) if _fingerprint(value) != before]
    _WATCHED.clear()
    return {"kind": case.kind, "outcome": outcome, "detail": detail[:500], "changed": bool(changed)}


# -- cards --------------------------------------------------------------------------------------------------------
def _shipped_cards() -> list[dict]:
    folder = HERE.parent / "Resources" / "Models"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


FIELD_WORDS = ("ibix_card", "name", "description", "license", "authors", "spatial_dims", "slice_axis", "in_plane",
               "transpose", "flip_rows", "flip_cols", "input", "output", "layout", "channels", "size",
               "multiple_of", "intensity", "from", "to", "clip", "percentiles", "units", "training", "metrics")
#: Values that have broken or nearly broken card handling.
NASTY_VALUES = [None, True, False, 0, -1, 1, 2, 3, 2.0, -0.0, 1e-40, 1e-320, 1e40, 1e300, -1e300, 10**400,
                -10**400, 2**63, 2**31, float("nan"), float("inf"), -float("inf"), "", "x", "NCHW", "NDHWC",
                "axial", "\x00", "\ud800", "é" * 300, "9" * 5000, [], {}, [0], [0, 1], [1, 0], [0, 1e-40],
                [0, 1, 2], [[0, 1]], [None, None], ["a", "a"], {"from": [0, 1]}, b"bytes", (1, 2), {1, 2},
                np.float32(1.5), np.int64(7), np.array([0.0, 1.0]), object()]
CARD_CALLERS = ("validate_card", "load_model")


def _containers(card: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    found = [(path, card)]
    items = card.items() if isinstance(card, dict) else enumerate(card) if isinstance(card, list) else []
    for key, value in items:
        if isinstance(value, (dict, list)):
            found += _containers(value, path + (key,))
    return found


def _nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for i in range(depth):
        value = {"input": value} if i % 2 else [value]
    return value


def _mutate(card: dict, rng: np.random.Generator) -> dict:
    card = copy.deepcopy(card)
    for _ in range(int(rng.integers(1, 4))):
        containers = _containers(card)
        _, target = containers[int(rng.integers(len(containers)))]
        keys = list(target) if isinstance(target, dict) else list(range(len(target)))
        op = rng.choice(["drop", "add", "replace", "replace", "retype", "nest", "scale"])
        value = NASTY_VALUES[int(rng.integers(len(NASTY_VALUES)))]
        value = copy.deepcopy(value) if not isinstance(value, np.ndarray) else value.copy()
        if op == "add" or not keys:
            if isinstance(target, dict):
                key = rng.choice(list(FIELD_WORDS) + ["", "x", "1", "Input", "input "])
                target[str(key) if rng.random() < 0.95 else int(rng.integers(-2, 3))] = value
            else:
                target.append(value)
            continue
        key = keys[int(rng.integers(len(keys)))]
        old = target[key]
        if op == "drop":
            del target[key]
        elif op == "replace":
            target[key] = value
        elif op == "retype":
            target[key] = [str(old), [old], {"value": old}, isinstance(old, (dict, list)), None, repr(old)][
                int(rng.integers(6))]
        elif op == "nest":
            target[key] = _nested(int(rng.integers(1, 60)), old)
        elif isinstance(old, (int, float)) and not isinstance(old, bool) and abs(old) < 1e300:
            # scale a number to an extreme (not one that is already beyond float64: 10**400 * 1e38 cannot be made)
            target[key] = old * float(rng.choice([1e-45, 1e-38, 1e38, 1e308])) if old else 1e-40
    return card


def _card_file_texts(rng: np.random.Generator) -> list[tuple[str, bytes]]:
    """Card files JSON (or Python's json) cannot read, or reads into something hostile."""
    texts = [("empty file", b""), ("whitespace", b"  \n"), ("JSON null", b"null"), ("JSON list", b"[1, 2]"),
             ("JSON string", b'"card"'), ("JSON number", b"3"), ("truncated", b'{"input": {"layout": "NC'),
             ("trailing comma", b'{"name": "x",}'), ("latin-1", '{"name": "\u00e9"}'.encode("latin-1")),
             ("UTF-16", '{"name": "x"}'.encode("utf-16")), ("BOM", b'\xef\xbb\xbf{"name": "x"}'),
             ("NaN literal", b'{"input": {"intensity": {"from": [NaN, 1], "to": [0, 1]}}}'),
             ("Infinity literal", b'{"output": {"intensity": {"from": [0, Infinity], "to": [0, 1]}}}'),
             ("1e400", b'{"input": {"intensity": {"from": [-1e400, 1e400], "to": [0, 1]}}}'),
             ("lone surrogate", b'{"name": "\\ud800"}'), ("NUL", b'{"name": "a\x00b"}'),
             ("duplicate keys", b'{"spatial_dims": 2, "spatial_dims": 3}'),
             ("huge file", b'{"description": "' + b"x" * (2 << 20) + b'"}')]
    for digits in (300, 400, 401, 4300, 5000, 100_000):
        field = ["input\": {\"multiple_of", "input\": {\"intensity\": {\"to\": [0, 1], \"from\": [0"][digits % 2]
        texts.append((f"{digits}-digit number", f'{{"{field}": {"9" * digits}'.encode()
                      + (b"}}" if digits % 2 == 0 else b"]}}}")))
    for depth in (31, 33, 100, 1000, 100_000):
        texts.append((f"nested {depth} deep", b"[" * depth + b"]" * depth))
        texts.append((f"objects nested {depth} deep", b'{"training": ' * depth + b"1" + b"}" * depth))
    for i in range(12):  # random bytes and random printable text
        size = int(rng.integers(1, 400))
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes() if i % 2 else \
            bytes(rng.choice(list(b'{}[]":,0123456789.eE+-truefalsnul "abc'), size).tolist())
        texts.append((f"random {'bytes' if i % 2 else 'JSON-ish text'}", data))
    return texts


def make_card_cases(seed: int, workdir: Path) -> list[Case]:
    import onnx_models as om

    rng = np.random.default_rng(seed)
    shipped = _shipped_cards()
    models: dict[str, Path] = {}

    def model_for(card: dict) -> Path:
        """The identity test model, or an autoencoder with the shipped cards' tensor names and channels."""
        sides = [card.get(side) if isinstance(card.get(side), dict) else {} for side in ("input", "output")]
        names = (sides[0].get("name", "x"), sides[1].get("name", "y"))
        channels = sides[0].get("channels")
        n = len(channels) if isinstance(channels, list) and 0 < len(channels) < 5 else 1
        key = f"{names[0]}_{names[1]}_{n}"
        if not isinstance(names[0], str) or not isinstance(names[1], str) or not names[0] or not names[1]:
            key, names = "x_y_1", ("x", "y")
        if key not in models:
            model = om.channel_mix([1.0] * n, input_name=names[0], output_name=names[1]) if n > 1 else \
                om.identity(input_name=names[0], output_name=names[1])
            models[key] = om.save(model, workdir, f"card_model_{len(models)}")
        return models[key]

    def run_card(card: Any, caller: str, path: Path | None = None):
        def call():
            import IBIXLogic as ibx
            if isinstance(card, (dict, list)):
                watch(card)
            if caller == "validate_card":
                return ibx.validate_card(card)
            model = ibx.load_model(path or model_for(card if isinstance(card, dict) else {}),
                                   card=card, device="cpu")
            side = 20 if model.card.input.size is None else min(model.card.input.size)
            x = [np.linspace(-1, 2, side * side, dtype=np.float32).reshape(side, side) + c
                 for c in range(model.n_channels)]
            watch(x)
            return model.predict(x if len(x) > 1 else x[0])
        return call, ("card", "field")

    cases: list[Case] = []
    from onnx_models import IDENTITY_CARDS

    bases = shipped + IDENTITY_CARDS
    for i in range(1000):
        card = _mutate(bases[i % len(bases)], rng)
        caller = CARD_CALLERS[i % 2]
        cases.append(Case(f"mutated card via {caller}", lambda c=card, a=caller: run_card(c, a)))
    for value in NASTY_VALUES + [_nested(40), _nested(2000), [{"input": {}}], "missing.json", Path("missing.json"),
                                 b"{}", bytearray(b"{}"), 12, 1.5]:
        cases.append(Case("card of another type", lambda v=value: run_card(v, "load_model")))
    recursive: dict = {"input": {}}
    recursive["input"]["intensity"] = recursive
    cases.append(Case("self-referencing card", lambda: run_card(recursive, "load_model")))
    for what, data in _card_file_texts(rng):
        def from_file(what=what, data=data):
            path = workdir / f"card_{hashlib.sha1(what.encode()).hexdigest()[:8]}.json"
            path.write_bytes(data)
            watch(path)
            return run_card(path, "load_model", path=model_for({}))
        cases.append(Case(f"card file: {what}", from_file))
    for i, base in enumerate(shipped * 10):  # valid JSON files of mutated shipped cards
        card = _mutate(base, rng)
        try:
            text = json.dumps(card).encode()
        except (TypeError, ValueError):
            continue

        def mutated_file(card=card, text=text, i=i):
            path = workdir / f"mutated_{i}.json"
            path.write_bytes(text)
            watch(path)
            return run_card(path, "load_model", path=model_for(card))
        cases.append(Case("mutated card file", mutated_file))
    return cases


# -- models -------------------------------------------------------------------------------------------------------
def _graph_model(nodes: list, inputs: list, outputs: list, initializers: dict | None = None, opset: int = 17,
                 ir_version: int = 8, domain_ops: Iterable[str] = ()):
    from onnx import helper, numpy_helper

    graph = helper.make_graph(nodes, "hostile", inputs, outputs,
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in (initializers or {}).items()])
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domain_ops]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = ir_version
    return model


def _tensor(name: str, shape: list, elem: int | None = None):
    from onnx import TensorProto, helper
    return helper.make_tensor_value_info(name, TensorProto.FLOAT if elem is None else elem, shape)


#: A dynamic 2D image tensor shape.
DYNAMIC = ["N", 1, "H", "W"]


def _model_specs(rng: np.random.Generator) -> list[tuple[str, Callable[[], Any], dict | None]]:
    """(kind, builder of the ONNX model or of the raw file bytes, card) for every hostile model."""
    import onnx_models as om
    from onnx import TensorProto, helper

    node = helper.make_node
    specs: list[tuple[str, Callable[[], Any], dict | None]] = []

    def add(kind: str, build: Callable[[], Any], card: dict | None = None):
        specs.append((kind, build, card))

    def unary(ops: list[tuple[str, dict]], consts: dict | None = None, **kw):
        """core_in -> op -> op ... -> core_out (each op unary, or binary with a named constant)."""
        nodes, last = [], "core_in"
        for i, (op, attrs) in enumerate(ops):
            out = "core_out" if i == len(ops) - 1 else f"t{i}"
            extra = attrs.pop("_with", None)
            nodes.append(node(op, [last] + ([extra] if extra else []), [out], **attrs))
            last = out
        return om.build(nodes, consts or {}, **kw)

    source = om.small_autoencoder(seed=3)
    data = source.SerializeToString()
    # broken files
    for fraction in np.linspace(0.01, 0.995, 24):
        add("truncated", lambda f=fraction: data[: max(1, int(len(data) * f))])
    for i in range(16):
        size = int(rng.integers(1, 30000))
        add("random bytes", lambda s=size, seed=i: np.random.default_rng(seed).integers(0, 256, s, np.uint8).tobytes())
    for i in range(40):
        flips = int(rng.integers(1, 60))

        def flipped(flips=flips, seed=i):
            corrupt = bytearray(data)
            r = np.random.default_rng(1000 + seed)
            where = r.integers(0, min(len(corrupt), 400) if seed % 2 else len(corrupt), flips)  # header or anywhere
            for w in where:
                corrupt[w] = int(r.integers(0, 256))
            return bytes(corrupt)
        add("byte-flipped", flipped)
    for text in (b"", b"\x00", b"not an onnx model", b'{"graph": {}}', b"PK\x03\x04zip", b"<html></html>" * 50,
                 b"\x08" * 1000, b"\xff" * 64):
        add("not a model", lambda t=text: t)
    # wrong rank and classifiers
    for rank_in in (0, 1, 2, 3, 6, 7):
        shape = ["N", 1, "H", "W", "D", "E", "F"][:rank_in]
        add("wrong input rank", lambda s=shape: _graph_model([node("Identity", ["x"], ["y"])], [_tensor("x", s)],
                                                             [_tensor("y", s)]))
    for rank_out in (0, 1, 2, 3, 5):
        add("classifier or wrong output rank", lambda r=rank_out: _graph_model(
            [node("ReduceMean", ["x"], ["m"], keepdims=0), node("Reshape", ["m", "shape"], ["y"])]
            if r == 0 else [node("ReduceMean", ["x"], ["y"], axes=list(range(r, 4)), keepdims=0)] if r < 4 else
            [node("Unsqueeze", ["x", "ax"], ["y"])],
            [_tensor("x", DYNAMIC)], [_tensor("y", [] if r == 0 else ["N", 1, "H", "W", 1][:r])],
            {"shape": np.array([], np.int64), "ax": np.array([4], np.int64)}))
    for classes in (2, 3, 10):
        add("multi-channel output", lambda c=classes: om.build(
            [node("Conv", ["core_in", "w"], ["core_out"])], {"w": np.ones((c, 1, 1, 1), np.float32)},
            out_channels=c))
    # NaN and Inf
    for threshold in (-10.0, 0.0, 0.5, 0.99, 1.5, 3.0, 100.0):
        add("NaN above a threshold", lambda t=threshold: om.nan_above(t))
    for op, consts in (("Log", None), ("Reciprocal", None), ("Sqrt", None)):
        add(f"{op}(x)", lambda o=op: unary([(o, {})]))
    add("log(x + 2)", lambda: unary([("Add", {"_with": "c"}), ("Log", {})], {"c": np.float32(2)}))
    add("1/(x + 5)", lambda: unary([("Add", {"_with": "c"}), ("Reciprocal", {})], {"c": np.float32(5)}))
    add("always NaN", lambda: unary([("Mul", {"_with": "z"}), ("Div", {"_with": "z"})], {"z": np.float32(0)}))
    add("always Inf", lambda: unary([("Mul", {"_with": "z"}), ("Reciprocal", {})], {"z": np.float32(0)}))
    for k in (10.0, 50.0, 100.0, 1e4):
        add("exp(k x), Inf for large inputs", lambda k=k: unary([("Mul", {"_with": "k"}), ("Exp", {})],
                                                               {"k": np.float32(k)}))
    add("x * 1e38 (overflow)", lambda: unary([("Mul", {"_with": "k"}), ("Mul", {"_with": "k"})],
                                             {"k": np.float32(1e38)}))
    # several inputs or outputs
    two_in = lambda: _graph_model([node("Add", ["a", "b"], ["y"])], [_tensor("a", DYNAMIC),  # noqa: E731
                                                                     _tensor("b", DYNAMIC)],
                                  [_tensor("y", DYNAMIC)])
    two_out = lambda: _graph_model([node("Identity", ["x"], ["y"]), node("Neg", ["x"], ["z"])],  # noqa: E731
                                   [_tensor("x", DYNAMIC)],
                                   [_tensor("y", DYNAMIC), _tensor("z", DYNAMIC)])
    add("two inputs", two_in)
    add("two inputs, card names one", two_in, {"input": {"name": "a"}})
    add("two inputs, card names another", two_in, {"input": {"name": "c"}})
    add("two outputs", two_out)
    add("two outputs, card names one", two_out, {"output": {"name": "z"}})
    add("two outputs, card names a missing one", two_out, {"output": {"name": "w"}})
    add("no outputs", lambda: _graph_model([node("Identity", ["x"], ["y"])], [_tensor("x", DYNAMIC)], []))
    add("no inputs", lambda: _graph_model([node("Constant", [], ["y"], value=helper.make_tensor(
        "c", TensorProto.FLOAT, [1, 1, 2, 2], [1, 2, 3, 4]))], [], [_tensor("y", [1, 1, 2, 2])]))
    # element types
    for elem in (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT32, TensorProto.INT64, TensorProto.BOOL,
                 TensorProto.STRING):
        add("integer, boolean or text input", lambda e=elem: _graph_model(
            [node("Identity", ["x"], ["y"])], [_tensor("x", DYNAMIC, e)],
            [_tensor("y", DYNAMIC, e)]))
    for elem in (TensorProto.FLOAT16, TensorProto.DOUBLE):
        add("float16 or double model", lambda e=elem: _graph_model(
            [node("Mul", ["x", "x"], ["y"])], [_tensor("x", DYNAMIC, e)],
            [_tensor("y", DYNAMIC, e)]))
    add("float input, integer output", lambda: _graph_model(
        [node("Cast", ["x"], ["y"], to=TensorProto.INT32)], [_tensor("x", DYNAMIC)],
        [_tensor("y", DYNAMIC, TensorProto.INT32)]))
    # huge or odd declared dimensions
    for shape in ([1, 1, 100000, 100000], [1, 1, 2**31 - 1, 2], [1, 1, 65536, 65536], [1, 1, 4096, 4096, 4096],
                  [10**6, 1, 8, 8], [2**40, 1, 8, 8], ["N", 10**6, "H", "W"], ["N", 1, 0, 8], ["N", 1, -5, 8],
                  ["N", 1, 2**62, 2**62], ["N", 100000, 1, 1], [0, 1, 8, 8]):
        for card in (None, {"input": {"layout": "NCHW" if len(shape) == 4 else "NCDHW", "channels": ["a"]}}):
            add("huge or odd declared dimensions", lambda s=shape: _graph_model(
                [node("Identity", ["x"], ["y"])], [_tensor("x", s)], [_tensor("y", s)]), card)
    # shape-changing models
    add("downsampling output", lambda: unary([("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]})]))
    add("upsampling output", lambda: om.build([node("Resize", ["core_in", "", "s"], ["core_out"], mode="nearest")],
                                              {"s": np.array([1, 1, 2, 2], np.float32)}))
    add("cropping output", lambda: om.build([node("Slice", ["core_in", "st", "en", "ax"], ["core_out"])],
                                            {"st": np.array([1]), "en": np.array([-1]), "ax": np.array([2])}))
    add("transposing output", lambda: unary([("Transpose", {"perm": [0, 1, 3, 2]})]))
    add("output batch of one", lambda: om.build([node("ReduceMean", ["core_in"], ["core_out"], axes=[0],
                                                      keepdims=1)], {}))
    # batch-mixing models (a sample's output depends on the others in the batch)
    for op in ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceLogSumExp"):
        add(f"batch-mixing: x + {op} over N", lambda o=op: om.batch_mixing(o))
    add("batch-mixing: x - mean over N (batch statistics)", lambda: om.batch_mixing("ReduceMean", -1.0))
    add("batch-mixing: cumulative sum over N", lambda: om.build(
        [node("CumSum", ["core_in", "axis0"], ["core_out"])], {"axis0": np.array(0)}))
    add("batch-mixing: 3D mean over N", lambda: om.batch_mixing("ReduceMean", layout="NCDHW"))
    # fixed batch sizes
    for batch in (1, 2, 3, 7):
        add(f"fixed batch {batch}", lambda b=batch: om.convolution(np.ones((3, 3)), batch=b))
    # opsets, IR versions, unknown operators, broken graphs
    add("opset 1000", lambda: _graph_model([node("Identity", ["x"], ["y"])], [_tensor("x", DYNAMIC)],
                                           [_tensor("y", DYNAMIC)], opset=1000))
    add("IR version 99", lambda: _graph_model([node("Identity", ["x"], ["y"])], [_tensor("x", DYNAMIC)],
                                              [_tensor("y", DYNAMIC)], ir_version=99))
    add("unknown operator", lambda: _graph_model([node("Frobnicate", ["x"], ["y"], domain="ibix.hostile")],
                                                 [_tensor("x", DYNAMIC)], [_tensor("y", DYNAMIC)],
                                                 domain_ops=["ibix.hostile"]))
    add("undefined tensor", lambda: _graph_model([node("Add", ["x", "ghost"], ["y"])], [_tensor("x", DYNAMIC)],
                                                 [_tensor("y", DYNAMIC)]))
    add("cycle", lambda: _graph_model([node("Add", ["x", "b"], ["a"]), node("Neg", ["a"], ["b"]),
                                       node("Identity", ["a"], ["y"])], [_tensor("x", DYNAMIC)],
                                      [_tensor("y", DYNAMIC)]))
    add("declared shape lies", lambda: _graph_model([node("Identity", ["x"], ["y"])], [_tensor("x", DYNAMIC)],
                                                    [_tensor("y", ["N", 3, "H", "W"])]))
    # ordinary models, which must load and explain correctly
    kernel = om.KERNEL
    for layout in ("NCHW", "NHWC"):
        add(f"convolution {layout}", lambda lo=layout: om.convolution(kernel, lo))
        add(f"polynomial {layout}", lambda lo=layout: om.polynomial(0.5, -1.0, lo))
        add(f"constant output {layout}", lambda lo=layout: unary([("Mul", {"_with": "z"})], {"z": np.float32(0)},
                                                                 layout=lo))
    for layout in ("NCDHW", "NDHWC"):
        add(f"3D convolution {layout}", lambda lo=layout: om.convolution(np.ones((3, 3, 3)) / 27, lo))
    for n in (2, 3, 5):
        add(f"{n} channels", lambda n=n: om.channel_mix(list(range(1, n + 1))))
    for seed in range(4):
        add("autoencoder", lambda s=seed: om.small_autoencoder(seed=s), {"input": {"multiple_of": 2}})
    add("autoencoder without its multiple_of", lambda: om.small_autoencoder(seed=9))
    add("3D autoencoder", lambda: om.small_autoencoder_3d(), {"input": {"multiple_of": 2}})
    add("fixed size", lambda: om.convolution(kernel, spatial=[24, 20]))
    add("fixed size too small", lambda: om.convolution(kernel, spatial=[4, 4]))
    add("convolution plus mean", lambda: om.convolution_plus_mean(kernel, 0.3))
    return specs


def _brute_forward(model, x: list[np.ndarray], mask: np.ndarray, n_jitters: int, max_jitter: float) -> np.ndarray:
    """F from one model call per perturbed input (the definition, with no batching)."""
    base = model.predict(x if len(x) > 1 else x[0])
    total = np.zeros(base.shape, np.float64)
    for k in [*range(-n_jitters, 0), *range(1, n_jitters + 1)]:
        h = k * max_jitter / n_jitters
        moved = [c + np.float32(h) * mask for c in x]
        total += (model.predict(moved if len(moved) > 1 else moved[0]).astype(np.float64) - base) / np.float32(h)
    return total / (2 * n_jitters)


def make_model_cases(seed: int, workdir: Path) -> list[Case]:
    rng = np.random.default_rng(seed)
    cases = []
    for index, (kind, build, card) in enumerate(_model_specs(rng)):
        def make(index=index, build=build, card=card):
            built = build()
            path = workdir / f"model_{index}.onnx"
            path.write_bytes(built if isinstance(built, bytes) else built.SerializeToString())

            def call():
                import IBIXLogic as ibx
                watch(path)
                model = ibx.load_model(path, card=copy.deepcopy(card), device="cpu", memory_budget=2**26)
                dims, size = model.card.spatial_dims, model.card.input.size
                shape = (6, 12, 10) if dims == 3 else (12, 10)
                shape = tuple(min(n, s or n) for n, s in zip(shape, size)) if size else shape
                r = np.random.default_rng(index)
                x = [r.uniform(0.1, 1.0, shape).astype(np.float32) for _ in range(model.n_channels)]
                mask = np.zeros(shape, bool)
                mask[tuple(slice(n // 3, n // 3 + 2) for n in shape)] = True
                watch(x, mask)
                ibx.backward_mapping(model, x if len(x) > 1 else x[0], mask, n_blocks=6, n_jitters=1, max_jitter=0.2,
                                     blocks="grid")
                result = ibx.forward_mapping(model, x if len(x) > 1 else x[0], mask, n_jitters=2, max_jitter=0.2)
                expected = _brute_forward(model, x, mask, 2, 0.2)
                scale = np.abs(expected).max() + 1e-6
                if np.abs(result.signed - expected).max() > 1e-3 * scale + 1e-4:
                    raise WrongResult(f"forward map differs from brute force by "
                                      f"{np.abs(result.signed - expected).max():.3g} (max |F| {scale:.3g})")
                return result
            return call, ("model", path.name)
        cases.append(Case(kind, make))
    for name, how in (("missing file", None), ("directory", "dir"), ("dangling link", "link"), ("link loop", "loop")):
        def special(name=name, how=how):
            path = workdir / f"special_{name.replace(' ', '_')}.onnx"
            if how == "dir":
                path.mkdir(exist_ok=True)
            elif how in ("link", "loop") and not path.is_symlink():
                try:
                    path.symlink_to(workdir / "nowhere.onnx" if how == "link" else path)
                except OSError:  # no symbolic links here (Windows without the privilege): a missing file then
                    pass

            def call():
                import IBIXLogic as ibx
                return ibx.load_model(path, device="cpu")
            return call, ("model", path.name)
        cases.append(Case(f"model path: {name}", special))
    return cases


# -- arrays and parameters ----------------------------------------------------------------------------------------
def _label(value: Any) -> str:
    """A case label for a value (long values shortened)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:30]}... ({len(text)} characters)"


def _array_values(rng: np.random.Generator, shape: tuple[int, ...]) -> list[tuple[str, Any]]:
    """Hostile stand-ins for an array of ``shape``."""
    good = rng.uniform(0, 1, shape).astype(np.float32)
    strings = good.astype(str)
    readonly = good.copy()
    readonly.flags.writeable = False
    values = [("string array", strings), ("object array", good.astype(object)),
              ("object array of strings", strings.astype(object)), ("list of lists", good.tolist()),
              ("ragged list", [[1.0, 2.0], [3.0]]), ("None", None), ("scalar", 3.0), ("string", "image.nrrd"),
              ("dict", {"x": good}), ("bytes", good.tobytes()), ("complex", good.astype(np.complex64)),
              ("bool", good > 0.5), ("uint8", (good * 255).astype(np.uint8)), ("int64 huge", np.full(shape, 2**62)),
              ("uint64 max", np.full(shape, 2**64 - 1, np.uint64)), ("float16", good.astype(np.float16)),
              ("float64 1e300", good.astype(np.float64) * 1e300), ("float64 tiny", good.astype(np.float64) * 1e-300),
              ("1e38", good * np.float32(3e38)), ("denormal", good * np.float32(1e-42)),
              ("NaN", np.where(good > 0.9, np.nan, good)), ("Inf", np.where(good > 0.9, np.inf, good)),
              ("1D", good.ravel()), ("4D", good[None, None]), ("0-d", np.float32(1.0)),
              ("empty", np.zeros((0,) + shape[1:], np.float32)), ("one voxel", good[:1, :1]),
              ("transposed view", good.T), ("strided view", good[::2]), ("read-only", readonly),
              ("masked array", np.ma.masked_array(good, good > 0.5)), ("matrix-like subclass", np.asmatrix(good)
                                                                       if good.ndim == 2 else good[None]),
              ("structured", np.zeros(shape, [("a", "f4"), ("b", "f4")])), ("datetime", np.zeros(shape, "M8[s]")),
              ("constant", np.full(shape, 5.0, np.float32)), ("negative zero", np.full(shape, -0.0, np.float32))]
    return values


def _mask_values(rng: np.random.Generator, shape: tuple[int, ...]) -> list[tuple[str, Any]]:
    good = np.zeros(shape, bool)
    good[tuple(slice(n // 3, n // 3 + 2) for n in shape)] = True
    return [("string mask", good.astype(str)), ("object mask", good.astype(object)),
            ("string-object mask", good.astype(str).astype(object)), ("list mask", good.tolist()),
            ("float mask with NaN", np.where(good, np.nan, 0.0)), ("float mask", good * 0.5),
            ("int mask 2**40", good * 2**40), ("uint8 mask", good.astype(np.uint8)), ("empty mask", good & False),
            ("full mask", np.ones(shape, bool)), ("mask of another shape", good[:-1]), ("mask with an extra axis",
                                                                                     good[None]),
            ("mask of fewer axes", good[0]), ("None mask", None), ("True mask", True), ("string", "mask.nrrd"),
            ("complex mask", good.astype(np.complex64)), ("negative mask", -good.astype(np.int8)),
            ("transposed mask", good.T), ("Inf mask", np.where(good, np.inf, 0.0))]


def make_array_cases(seed: int, workdir: Path) -> list[Case]:
    import onnx_models as om

    rng = np.random.default_rng(seed)
    kernel = om.KERNEL
    paths = {"conv": om.save(om.convolution(kernel), workdir, "conv"),
             "conv3d": om.save(om.convolution(np.ones((3, 3, 3)) / 27, "NCDHW"), workdir, "conv3d"),
             "mix": om.save(om.channel_mix([1.0, 2.0]), workdir, "mix")}
    shape2, shape3 = (12, 10), (5, 12, 10)
    image = rng.uniform(0, 1, shape2).astype(np.float32)
    volume = rng.uniform(0, 1, shape3).astype(np.float32)
    mask2 = np.zeros(shape2, bool)
    mask2[4:6, 4:6] = True
    mask3 = np.zeros(shape3, bool)
    mask3[2, 4:6, 4:6] = True
    cases: list[Case] = []

    default = object()

    def api(function: str, model: str = "conv", x: Any = default, mask: Any = default, names: tuple = (), **kwargs):
        """A case calling ``function`` (predict, forward, backward) with a fresh copy of the defaults."""
        def make():
            def call():
                import IBIXLogic as ibx
                m = ibx.load_model(paths[model], device="cpu")
                three = model == "conv3d"
                xx = (volume if three else image).copy() if x is default else x
                mm = (mask3 if three else mask2).copy() if mask is default else mask
                if model == "mix" and x is default:
                    xx = [image.copy(), image.copy() * 2]
                watch(xx, mm, kwargs)
                options = dict(kwargs)
                if function == "predict":
                    return m.predict(xx, **options)
                if function == "forward":
                    result = ibx.forward_mapping(m, xx, mm, **options)
                    if model == "conv" and x is default and set(kwargs) <= {"n_jitters", "max_jitter", "progress",
                                                                           "cancel", "progressive", "tolerance"}:
                        expected = om.correlate(np.asarray(mm) != 0, kernel)
                        if np.abs(result.signed - expected).max() > 1e-3 * np.abs(expected).max():
                            raise WrongResult("forward map of the convolution differs from the kernel")
                    return result
                options.setdefault("n_blocks", 12)
                options.setdefault("n_jitters", 1)
                return ibx.backward_mapping(m, xx, mm, **options)
            return call, names
        return make

    def add(kind, function, names, **kw):
        cases.append(Case(kind, api(function, names=names, **kw)))

    for function in ("predict", "forward", "backward"):
        for what, value in _array_values(rng, shape2):
            add(f"input: {what}", function, ("input", "volume"), x=value)
    for what, value in _array_values(rng, shape3)[:12]:
        add(f"3D input: {what}", "forward", ("input",), model="conv3d", x=value)
    for function in ("forward", "backward"):
        for what, value in _mask_values(rng, shape2):
            add(f"mask: {what}", function, ("mask",), mask=value)
    for what, value in _mask_values(rng, shape3):
        add(f"3D mask: {what}", "forward", ("mask",), model="conv3d", mask=value)
    add("2D mask for a 3D input", "forward", ("mask",), model="conv3d", mask=mask2)
    for x in ([image], [image, image, image], [image, image[:5]], (image, image.astype(np.float64)), [image, None],
              [image, "x"], {"a": image}):
        add("channel list", "forward", ("input", "channel"), model="mix", x=x)
    count_values = [0, -1, 1.0, 2.5, "3", True, None, 1e12, 2**63, 10**20, -2**63, np.int64(2), np.uint8(3),
                    float("nan"), [2], complex(2, 0)]
    for function, name in (("forward", "n_jitters"), ("backward", "n_jitters"), ("backward", "n_blocks")):
        for value in count_values:
            add(f"{name}={_label(value)}", function, (name,), **{name: value})
    jitter_values = [0, -1.0, 1e-45, 1e-40, 1e-30, 1e-12, 1e-7, 1e30, 1e39, float("inf"), float("nan"), "1", True,
                     None, [1.0], np.float32(0.1), np.float64(1e-300), complex(1, 1), 10**400]
    for function in ("forward", "backward"):
        for value in jitter_values:
            add(f"max_jitter={_label(value)}", function, ("max_jitter",), max_jitter=value)
    for value in (1.0, "x", "input", 0, 1, -1, 5, [], [0, 0], ["input", "input"], True, None, 2.0, [1.5], {"a": 1}):
        add(f"channels={_label(value)}", "forward", ("channel",), channels=value)
    for value in (1.0, "x", "water", [0, 1], [0, 0], 2, [], True):
        add(f"two-channel channels={_label(value)}", "forward", ("channel",), model="mix", channels=value)
    for name, values in (("progress", [5, "x", True, object()]), ("cancel", [True, "x", 0, 1, object(), [], False]),
                         ("preview", [5, "x"]), ("tolerance", [-1.0, "x", float("nan"), float("inf"), [0.1]]),
                         ("progressive", ["yes", 2, None]), ("geometry", ["x", 5, {"spacing": 1}, [1, 1]])):
        for value in values:
            for function in ("forward", "backward"):
                extra = {"progressive": True} if name in ("preview", "tolerance") else {}
                add(f"{name}={_label(value)}", function, (name,), **{name: value, **extra})
    for name, values in (("compactness", ["x", -1.0, float("nan"), float("inf"), 0.0, 1e300, None, [1]]),
                         ("locality_tolerance", ["0", -0.5, 1.0, float("nan"), None, True]),
                         ("refine_threshold", [float("nan"), "0.5", -0.1, None]),
                         ("coarse_blocks", [0, -1, "x", 1e12, [4, 2], [2**63], 2.5, [3.0]]),
                         ("normalization", ["sum", None, 1]), ("method", ["fast", None, 1, "LOCAL"]),
                         ("blocks", ["hexagons", None, 5, 1.5, [1, 2]]), ("tiles", ["x", 2, None])):
        for value in values:
            add(f"{name}={_label(value)}", "backward", (name,), **{name: value})
    base_labels = (np.arange(shape2[0] * shape2[1]).reshape(shape2) % 6 + 1).astype(np.int64)
    for what, labels in (("2**31 labels", base_labels + 2**31 - 1), ("2**40 labels", base_labels * 2**40),
                         ("uint64 2**63", base_labels.astype(np.uint64) + np.uint64(2**63)),
                         ("negative labels", -base_labels), ("all zero labels", base_labels * 0),
                         ("float labels", base_labels.astype(np.float32)), ("bool labels", base_labels > 2),
                         ("labels of another shape", base_labels[:-1]), ("string labels", base_labels.astype(str)),
                         ("object labels", base_labels.astype(object)), ("int8 labels", base_labels.astype(np.int8)),
                         ("uint16 labels", base_labels.astype(np.uint16) * 1000),
                         ("one block", np.ones(shape2, np.int32)), ("label list", base_labels.tolist()),
                         ("sparse labels", base_labels * 1000003)):
        add(f"blocks: {what}", "backward", ("block", "label"), blocks=labels)
    for value in ("gpu", 5, None, "CPU", ""):
        cases.append(Case(f"device={_label(value)}", lambda v=value: (
            lambda: __import__("IBIXLogic").load_model(paths["conv"], device=v), ("device",))))
    for value in (0, -1, 1, 1.5, "x", True, 2**70, float("inf"), None):
        cases.append(Case(f"memory_budget={_label(value)}", lambda v=value: (
            lambda: _predict_with_budget(paths["conv"], v, image.copy()), ("memory_budget",))))
    for value in (None, 5, b"conv.onnx", ["conv.onnx"], str(workdir), str(workdir / "conv"), "", "x" * 5000,
                  "a\x00b.onnx"):
        cases.append(Case(f"model path {_label(value)}", lambda v=value: (
            lambda: __import__("IBIXLogic").load_model(v, device="cpu"), ("model", "path"))))
    cases += _helper_cases(workdir, image)
    for what, geometry in (("another shape", (3, 4)), ("3D geometry for 2D input", (2, 12, 10)),
                           ("zero spacing", "spacing0"), ("NaN origin", "nan")):
        add(f"geometry: {what}", "forward", ("geometry",), geometry=_geometry(geometry))
    return cases


def _helper_cases(workdir: Path, image: np.ndarray) -> list[Case]:
    """Wrong arguments of the public file, geometry and block helpers."""
    import IBIXLogic as ibx

    volume = workdir / "helper_volume.nrrd"
    two = ibx.Geometry.identity(image.shape)
    bad_paths = [None, 5, b"v.nrrd", ["v.nrrd"], "", "x" * 5000, str(workdir / "missing.nrrd"), str(workdir)]
    calls: list[tuple[str, Callable[[], Any], tuple[str, ...]]] = []
    for path in bad_paths:
        calls += [(f"read_volume({_label(path)})", lambda p=path: ibx.read_volume(p), ("path", "file", "characters")),
                  (f"read_mask({_label(path)})", lambda p=path: ibx.read_mask(p), ("path", "file", "characters")),
                  (f"write_volume({_label(path)})", lambda p=path: ibx.write_volume(p, image, two),
                   ("path", "format", "folder"))]
    for what, value in _array_values(np.random.default_rng(3), image.shape)[:16]:
        calls.append((f"write_volume array: {what}", lambda v=value: ibx.write_volume(volume, v, two),
                      ("volume", "geometry", "array")))
    for what, geometry in (("string", "g"), ("None", None), ("3D", ibx.Geometry.identity((2,) + image.shape)),
                           ("another shape", ibx.Geometry.identity((3, 3)))):
        calls.append((f"write_volume geometry: {what}", lambda g=geometry: ibx.write_volume(volume, image, g),
                      ("geometry",)))
        calls.append((f"resample_mask geometry: {what}", lambda g=geometry: ibx.resample_mask(image > 0.5, g, two),
                      ("geometry", "mask")))
    for label in ("1", 1.5, True, 2**70, [1]):
        calls.append((f"read_mask label={_label(label)}", lambda v=label: ibx.read_mask(_mask_file(workdir), label=v),
                      ("label",)))
    for args in (("x",), ((2, "a"),), ((2, -1),), ((2, 2.5),), (None,), ((10**20, 10**20),)):
        calls.append((f"Geometry.identity{_label(args)}", lambda a=args: ibx.Geometry.identity(*a), ("geometry",)))
    for args in (("x", 1, 2), ((0, 0), (1, 0), np.eye(2)), ((0, 0), (1, 1), np.zeros((2, 2))), ((np.nan, 0), (1, 1))):
        calls.append((f"Geometry{_label(args)}", lambda a=args: ibx.Geometry(*a), ("geometry",)))
    for shape, n in (((0, 5), 3), ((4, 5), "3"), ((4, 5), 0), (("a", 5), 3), ((4, 5), 2**63), ((4, 5.5), 3)):
        calls.append((f"grid_blocks({_label(shape)}, {_label(n)})", lambda s=shape, k=n: ibx.grid_blocks(s, k),
                      ("shape", "n_blocks")))
    for img, n, c in (("abc", 3, 0.5), (image, "x", 0.5), (image, 3, "x"), (image, 3, -1.0),
                      (image.astype(str), 3, 0.5), (image.astype(complex), 3, 0.5), (image, 10**18, 0.5)):
        calls.append((f"superpixel_blocks({_label(n)}, {_label(c)})",
                      lambda i=img, k=n, m=c: ibx.superpixel_blocks(i, k, m), ("image", "n_blocks", "compactness")))
    return [Case(f"helper: {label}", lambda c=call, n=names: (lambda: c(), n)) for label, call, names in calls]


def _mask_file(workdir: Path) -> Path:
    import IBIXLogic as ibx
    path = workdir / "helper_mask.nrrd"
    if not path.exists():
        ibx.write_volume(path, np.ones((4, 4), np.uint8), ibx.Geometry.identity((4, 4)))
    return path


def _predict_with_budget(path: Path, budget: Any, x: np.ndarray) -> np.ndarray:
    import IBIXLogic as ibx
    watch(x)
    return ibx.load_model(path, device="cpu", memory_budget=budget).predict(x)


def _geometry(spec: Any) -> Any:
    import IBIXLogic as ibx
    if isinstance(spec, tuple):
        return ibx.Geometry.identity(spec)
    try:
        if spec == "spacing0":
            return ibx.Geometry(spacing=(0.0, 1.0), origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0))
        return ibx.Geometry(spacing=(1.0, 1.0), origin=(float("nan"), 0.0), direction=(1.0, 0.0, 0.0, 1.0))
    except (ibx.IBIXError, TypeError) as exc:  # refused already when built: pass what a caller could still pass
        return f"geometry refused: {exc}"

# -- command lines ------------------------------------------------------------------------------------------------
def _command_files(workdir: Path) -> dict[str, Path]:
    """The model, volumes, masks, cards and block labels the command lines name (written once per child)."""
    import IBIXLogic as ibx
    import onnx_models as om

    folder = workdir / "files"
    if (folder / "done").exists():
        return {p.stem if p.suffix != ".gz" else p.name[:-7]: p for p in folder.iterdir()}
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    shape = (4, 12, 10)
    geometry = ibx.Geometry((1.0, -2.0, 3.0), (0.9, 1.1, 2.5), np.eye(3), shape)
    files = {"model": om.save(om.convolution(om.KERNEL), folder, "model", {"spatial_dims": 2, "slice_axis": "axial"}),
             "mixing": om.save(om.batch_mixing("ReduceMean"), folder, "mixing")}
    mask = np.zeros(shape, np.uint8)
    mask[1:3, 4:7, 3:6] = 1
    labels = (np.arange(int(np.prod(shape))).reshape(shape) // 30 + 1).astype(np.int64)
    volumes = {"volume": rng.uniform(0, 100, shape).astype(np.float32), "mask": mask, "empty_mask": mask * 0,
               "labelled_mask": mask + (mask * rng.integers(0, 2, shape)).astype(np.uint8),
               "labels": labels, "big_labels": labels + 2**31, "float_labels": labels + 0.5}
    for name, array in volumes.items():
        files[name] = ibx.write_volume(folder / f"{name}.nrrd", array, geometry)
    files["flat_mask"] = ibx.write_volume(folder / "flat_mask.nrrd", mask[1], ibx.Geometry.identity(shape[1:]))
    files["far_mask"] = ibx.write_volume(folder / "far_mask.nrrd", mask, ibx.Geometry((900.0, 900.0, 900.0),
                                                                                      (0.9, 1.1, 2.5), np.eye(3),
                                                                                      shape))
    files["other_grid"] = ibx.write_volume(folder / "other_grid.nrrd", np.ones((3, 5, 5), np.float32),
                                           ibx.Geometry.identity((3, 5, 5)))
    for name, data in (("garbage", rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()), ("text", b"hello"),
                       ("card_list", b"[1, 2]"), ("card_broken", b'{"input": '),
                       ("card_deep", b"[" * 50000 + b"]" * 50000), ("blocker", b"a file, not a folder")):
        files[name] = folder / f"{name}.{'json' if name.startswith('card') else 'bin'}"
        files[name].write_bytes(data)
    files["garbage_model"] = folder / "garbage_model.onnx"
    files["garbage_model"].write_bytes(files["garbage"].read_bytes())
    files["garbage_volume"] = folder / "garbage_volume.nrrd"
    files["garbage_volume"].write_bytes(files["garbage"].read_bytes())
    (folder / "done").write_text("")
    return files


#: Command lines: (label, arguments with {name} for the files of :func:`_command_files` and {out} for the output
#: folder, what a refusal must name). A refusal is exit code 2 with a message; anything else but exit 0 is raw.
COMMANDS = [
    ("predict", "predict --model {model} --input {volume}", ()),
    ("forward", "forward --model {model} --input {volume} --mask {mask} --n-jitters 1", ()),
    ("backward", "backward --model {model} --input {volume} --out-mask {mask} --n-blocks 6 --n-jitters 1", ()),
    ("backward with block labels", "backward --model {model} --input {volume} --out-mask {mask} --block-labels {labels}"
                                   " --n-jitters 1", ()),
    ("block labels of 2**31 and more", "backward --model {model} --input {volume} --out-mask {mask} --block-labels "
                                       "{big_labels} --n-jitters 1", ()),
    ("batch-mixing model", "forward --model {mixing} --input {volume} --mask {mask} --n-jitters 1", ()),
    ("progressive", "forward --model {model} --input {volume} --mask {mask} --n-jitters 4 --progressive", ()),
    ("jsonl progress", "forward --model {model} --input {volume} --mask {mask} --n-jitters 1 --progress-format jsonl",
     ()),
    ("help", "forward --help", ()), ("version", "--version", ()),
    ("no command", "", ("command",)), ("unknown command", "explain --model {model}", ("explain", "choice")),
    ("no model", "predict --input {volume}", ("--model",)), ("no input", "predict --model {model}", ("--input",)),
    ("no mask", "forward --model {model} --input {volume}", ("--mask",)),
    ("missing model", "predict --model {out}/none.onnx --input {volume}", ("none.onnx",)),
    ("garbage model", "predict --model {garbage_model} --input {volume}", ("garbage_model",)),
    ("text as model", "predict --model {text} --input {volume}", ("text.bin",)),
    ("folder as model", "predict --model {out} --input {volume}", ("model",)),
    ("missing input", "predict --model {model} --input {out}/none.nrrd", ("none.nrrd",)),
    ("garbage input", "predict --model {model} --input {garbage_volume}", ("garbage_volume",)),
    ("two inputs for one channel", "predict --model {model} --input {volume} --input {volume}", ("channel",)),
    ("missing mask", "forward --model {model} --input {volume} --mask {out}/none.nrrd", ("none.nrrd",)),
    ("mask of several labels", "forward --model {model} --input {volume} --mask {labelled_mask}", ("labelled_mask",)),
    ("empty mask", "forward --model {model} --input {volume} --mask {empty_mask}", ("empty_mask", "empty")),
    ("absent label", "forward --model {model} --input {volume} --mask {mask} --label 7", ("label 7",)),
    ("label not a number", "forward --model {model} --input {volume} --mask {mask} --label x", ("--label",)),
    ("2D mask for a 3D input", "forward --model {model} --input {volume} --mask {flat_mask}", ("flat_mask",)),
    ("mask far away", "forward --model {model} --input {volume} --mask {far_mask}", ("far_mask",)),
    ("mask on another grid", "forward --model {model} --input {volume} --mask {other_grid}", ("other_grid",)),
    ("missing card", "predict --model {model} --card {out}/none.json --input {volume}", ("none.json",)),
    ("card of a list", "predict --model {model} --card {card_list} --input {volume}", ("card_list", "card")),
    ("broken card", "predict --model {model} --card {card_broken} --input {volume}", ("card_broken",)),
    ("deeply nested card", "predict --model {model} --card {card_deep} --input {volume}", ("card_deep",)),
    ("output is a file", "predict --model {model} --input {volume} --output {blocker}", ("blocker",)),
    ("float block labels", "backward --model {model} --input {volume} --out-mask {mask} --block-labels {float_labels}",
     ("float_labels", "whole numbers")),
    ("block labels on another grid", "backward --model {model} --input {volume} --out-mask {mask} --block-labels "
                                     "{other_grid}", ("other_grid",)),
]
for _option, _values, _command in (
        ("--n-jitters", ["0", "-1", "abc", "1.5", "99999999999999999999", "1e12"], "forward"),
        ("--max-jitter", ["0", "-1", "nan", "inf", "abc", "1e-40", "1e-30", "1e39", "auto"], "forward"),
        ("--n-blocks", ["0", "abc", "1" + "0" * 30], "backward"),
        ("--compactness", ["0", "-1", "nan", "x"], "backward"),
        ("--method", ["fast"], "backward"), ("--normalization", ["sum"], "backward"),
        ("--coarse-blocks", ["0", "x", "600"], "backward"), ("--refine-threshold", ["2", "-1"], "backward"),
        ("--locality-tolerance", ["1", "-0.1"], "backward"), ("--blocks", ["hexagons"], "backward"),
        ("--device", ["gpu"], "forward"), ("--memory-budget", ["0", "-5", "abc", "1e30"], "forward"),
        ("--format", ["xyz"], "forward"), ("--slice", ["99", "-1"], "forward"), ("--channels", ["fat", "5"], "forward"),
        ("--progress-format", ["xml"], "forward")):
    for _value in _values:
        _mask = "--mask {mask}" if _command == "forward" else "--out-mask {mask} --n-blocks 6"
        COMMANDS.append((f"{_option} {_label(_value)}", f"{_command} --model {{model}} --input {{volume}} {_mask} "
                                                      f"--n-jitters 1 {_option} {_value}".replace(
            "--n-jitters 1 --n-jitters", "--n-jitters"), (_option, _option.strip("-").replace("-", "_"))))


def make_command_cases(seed: int, workdir: Path) -> list[Case]:
    """The command lines of :data:`COMMANDS`, each run through ``IBIXLogic.cli.main`` (outputs must be complete and
    finite; a refusal must exit 2 naming the option or file; no temporary file may stay behind)."""
    cases = []
    for index, (label, template, names) in enumerate(COMMANDS):
        def make(index=index, template=template, names=names):
            files = _command_files(workdir)
            out = workdir / f"out_{index}"
            argv = template.format(out=out, **{k: str(v) for k, v in files.items()}).split()
            if argv and argv[0] in ("predict", "forward", "backward") and "--output" not in argv:
                argv += ["--output", str(out), "--no-png"] if argv[0] != "predict" else ["--output", str(out)]

            def call():
                import contextlib
                import io

                from IBIXLogic.cli import main
                watch(*[files[k] for k in sorted(files)])
                stderr, stdout = io.StringIO(), io.StringIO()
                with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
                    code = main(argv)
                leftovers = [p.name for p in out.rglob(".*")] if out.is_dir() else []
                if leftovers:
                    raise WrongResult(f"temporary files left behind: {leftovers}")
                if code == 2:  # the message is the last line (usage and notes come before it)
                    raise Refused(stderr.getvalue().strip().splitlines()[-1])
                if code != 0:
                    raise WrongResult(f"exit code {code}: {stderr.getvalue().strip()[-300:]}")
                return [_read_output(p) for p in sorted(out.glob("*.nrrd"))]
            return call, names
        cases.append(Case(f"command: {label}", make))
    return cases


def _read_output(path: Path) -> np.ndarray:
    import IBIXLogic as ibx
    return ibx.read_volume(path)[0]


def make_selftest_cases(seed: int, workdir: Path) -> list[Case]:
    """Cases with a known outcome each, to check the runner itself (``run_category("selftest", ...)``)."""
    import time

    import IBIXLogic as ibx

    def case(kind: str, body: Callable[[], Any], names: tuple[str, ...] = ("argument",)) -> Case:
        return Case(kind, lambda: (body, names))

    def raise_(exc: BaseException):
        raise exc

    def modify():
        x = watch(np.zeros(3))
        x[0] = 1
        return x

    return [case("clean", lambda: raise_(ibx.InputError("argument n is wrong"))),
            case("accepted", lambda: np.ones(3)),
            case("raw: error naming nothing", lambda: raise_(ibx.InputError("something is wrong"))),
            case("raw: library error", lambda: np.zeros(2) + np.zeros(3)),
            case("raw: non-finite result", lambda: np.array([np.nan])),
            case("raw: type error outside IBIX", lambda: raise_(TypeError("argument"))),
            case("crash", lambda: os.abort()),
            case("accepted after a crash", lambda: np.ones(3)),
            case("crash: hang", lambda: time.sleep(3600)),
            case("changed input", modify),
            case("accepted despite printing", lambda: print('{"index": 0}') or np.ones(2)),
            case("accepted at the end", lambda: {"a": 1})]


CATEGORIES: dict[str, Callable[[int, Path], list[Case]]] = {
    "cards": make_card_cases, "models": make_model_cases, "arrays": make_array_cases,
    "commands": make_command_cases, "selftest": make_selftest_cases}


# -- running in child processes -----------------------------------------------------------------------------------
def _child(category: str, seed: int, first: int, workdir: Path) -> None:
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY))
    except (ImportError, ValueError, OSError):
        pass
    import logging
    import warnings
    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    cases = CATEGORIES[category](seed, workdir)
    report = sys.stdout  # the protocol's stream; anything the API prints goes to stderr
    sys.stdout = sys.stderr
    print(MARK + json.dumps({"total": len(cases)}), file=report, flush=True)
    for i in range(first, len(cases)):
        print(MARK + json.dumps({"start": i, "kind": cases[i].kind}), file=report, flush=True)
        print(MARK + json.dumps({"index": i, **try_case(cases[i])}), file=report, flush=True)


def run_category(category: str, seed: int, workdir: Path, case_timeout: float = CASE_TIMEOUT) -> dict:
    """Try every case of ``category`` in child processes (a new one after a crash); return the tally and the
    cases that were not clean or accepted."""
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[int, dict] = {}
    total, first = None, 0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    while total is None or first < total:
        child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), category, str(seed), str(first),
                                  str(workdir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        lines: "queue.Queue[str | None]" = queue.Queue()

        def read(stream=child.stdout):
            for line in stream:
                lines.put(line)
            lines.put(None)
        threading.Thread(target=read, daemon=True).start()
        stderr: list[str] = []
        threading.Thread(target=lambda: stderr.extend(child.stderr), daemon=True).start()
        started, kind, hung = None, "", False
        while True:
            try:
                line = lines.get(timeout=case_timeout if started is not None else STARTUP_TIMEOUT)
            except queue.Empty:
                hung = True
                child.kill()
                break
            if line is None:
                break
            if not line.startswith(MARK):  # output of a library, not of the runner
                continue
            message = json.loads(line[len(MARK):])
            if "total" in message:
                total = message["total"]
            elif "start" in message:
                started, kind = message["start"], message["kind"]
            else:
                results[message.pop("index")] = message
                started = None
        code = child.wait()
        if total is None:
            raise RuntimeError(f"the {category} generator failed: {''.join(stderr)[-2000:]}")
        if started is None:  # no case in flight: the child finished, or died between cases
            if code != 0 or hung or any(i not in results for i in range(first, total)):
                raise RuntimeError(f"the {category} child stopped between cases ({code}): {''.join(stderr)[-2000:]}")
            break
        results[started] = {"kind": kind, "outcome": "crash", "changed": False,
                            "detail": "hung" if hung else f"exit code {code}: {''.join(stderr)[-300:]}"}
        first = started + 1
    tally = {outcome: sum(r["outcome"] == outcome for r in results.values()) for outcome in OUTCOMES}
    tally["tried"] = len(results)
    tally["changed"] = sum(r["changed"] for r in results.values())
    problems = [dict(r, index=i) for i, r in sorted(results.items())
                if r["outcome"] in ("raw", "crash") or r["changed"]]
    return {"tally": tally, "problems": problems, "results": results}


def tally_line(category: str, tally: dict) -> str:
    return (f"{category}: tried {tally['tried']}, clean {tally['clean']}, accepted {tally['accepted']}, "
            f"raw {tally['raw']}, crashes {tally['crash']}, changed inputs {tally['changed']}")


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
