"""Model cards: how IBIX feeds an ONNX model (validated against ``model_card.schema.json``)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import ModelCardError, is_file, short_path

_FLOAT_MAX = 1.7976931348623157e308
SCHEMA_PATH = Path(__file__).with_name("model_card.schema.json")
LAYOUTS = {2: ("NCHW", "NHWC"), 3: ("NCDHW", "NDHWC")}
#: Most input values (batch x channels x voxels) one model call may take: 4 GiB of float32.
MAX_CALL_VOXELS = 2**30
#: Channel dimensions this small (and no spatial dimension) suggest where the channels are.
_MAX_CHANNELS_GUESS = 16


@lru_cache(maxsize=1)
def card_schema() -> dict:
    """The published JSON Schema of model cards."""
    return json.loads(SCHEMA_PATH.read_text())


@dataclass(frozen=True)
class Intensity:
    """A linear map between two intensity ranges, fixed or derived from percentiles of the input.

    ``kind`` is ``"identity"``, ``"linear"`` (``source`` is a value range) or ``"percentile"`` (``source`` is
    a percentile pair, turned into a value range per channel from the unperturbed input).
    """

    kind: str = "identity"
    source: tuple[float, float] = (0.0, 1.0)
    target: tuple[float, float] = (0.0, 1.0)
    clip: bool = False

    @classmethod
    def from_card(cls, spec: Mapping[str, Any] | None) -> "Intensity":
        if spec is None:
            return cls()
        kind = "percentile" if "percentiles" in spec else "linear"
        source = tuple(float(v) for v in spec["percentiles" if kind == "percentile" else "from"])
        return cls(kind, source, tuple(float(v) for v in spec["to"]), bool(spec.get("clip", False)))

    def to_card(self) -> dict | None:
        if self.kind == "identity":
            return None
        key = "percentiles" if self.kind == "percentile" else "from"
        return {key: list(self.source), "to": list(self.target), "clip": self.clip}


@dataclass(frozen=True)
class Padding:
    """How a sample is padded to the shape the model takes (card ``input.padding``).

    ``mode``: ``"constant"`` (``value``, in model units), ``"edge"`` (repeat the border voxel) or ``"reflect"``
    (mirror, border voxel not repeated); ``position``: ``"center"`` (split, the odd voxel after the image) or
    ``"end"`` (all after the image along every axis). The default, centred edge padding, is what IBIX did before
    cards could say.
    """

    mode: str = "edge"
    value: float = 0.0
    position: str = "center"

    @classmethod
    def from_card(cls, spec: Mapping[str, Any] | None) -> "Padding":
        spec = spec or {}
        return cls(spec.get("mode", "edge"), float(spec.get("value", 0.0)), spec.get("position", "center"))

    def to_card(self) -> dict:
        out = {"mode": self.mode, "position": self.position}
        if self.mode == "constant":
            out["value"] = self.value
        return out


@dataclass(frozen=True)
class Patch:
    """Sliding-window (patch) inference (card ``input.patch``): windows of ``size`` voxels overlapping by
    ``overlap`` (a fraction of the window), outputs blended with ``blend`` weights (``"constant"`` or
    ``"gaussian"``, sigma = ``sigma_scale`` * size per axis), as MONAI's ``sliding_window_inference``."""

    size: tuple[int, ...]
    overlap: float = 0.25
    blend: str = "constant"
    sigma_scale: float = 0.125

    @classmethod
    def from_card(cls, spec: Mapping[str, Any] | None) -> "Patch | None":
        if spec is None:
            return None
        return cls(tuple(int(v) for v in spec["size"]), float(spec.get("overlap", 0.25)),
                   spec.get("blend", "constant"), float(spec.get("sigma_scale", 0.125)))

    def to_card(self) -> dict:
        return {"size": list(self.size), "overlap": self.overlap, "blend": self.blend,
                "sigma_scale": self.sigma_scale}


@dataclass(frozen=True)
class TensorSpec:
    """One side (input or output) of the model as IBIX feeds it."""

    name: str
    layout: str
    channels: tuple[str, ...]
    size: tuple[int | None, ...] | None = None
    multiple_of: int = 1
    intensity: Intensity = Intensity()
    units: str = ""
    padding: Padding = Padding()
    patch: Patch | None = None

    @property
    def channels_last(self) -> bool:
        return self.layout.endswith("C")


@dataclass(frozen=True)
class ModelCard:
    """A complete, validated description of how to run one ONNX model."""

    spatial_dims: int
    input: TensorSpec
    output: TensorSpec
    slice_axis: str | None = None
    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False
    fixed_batch: int | None = None
    name: str = ""
    description: str = ""
    assumptions: tuple[str, ...] = field(default=(), compare=False)
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def summary(self) -> dict:
        """Short description for displays and JSON summaries."""
        return {"name": self.name, "spatial_dims": self.spatial_dims, "slice_axis": self.slice_axis,
                "channels": list(self.input.channels), "layout": self.input.layout,
                "units": self.output.units, "fixed_batch": self.fixed_batch,
                "size": list(self.input.size) if self.input.size else None,
                "multiple_of": self.input.multiple_of, "padding": self.input.padding.to_card(),
                "patch": self.input.patch.to_card() if self.input.patch else None,
                "assumptions": list(self.assumptions)}


def _field_path(error) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(card)"


def _describe(error) -> str:
    """Turn a jsonschema error into a message that names the field and the accepted values."""
    where = _field_path(error)
    keyword = error.validator
    if keyword == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed)) if isinstance(error.instance, dict) else []
        prefix = "" if where == "(card)" else where + "."
        return (f"unknown model card field {', '.join(repr(prefix + u) for u in unknown)}; "
                f"accepted fields{' of ' + where if prefix else ''}: {', '.join(allowed)}")
    if keyword in ("enum", "const"):
        accepted = error.validator_value if keyword == "enum" else [error.validator_value]
        return f"model card field {where!r} is {error.instance!r}; accepted values: {accepted}"
    if keyword == "oneOf" and where.endswith("intensity"):
        return (f"model card field {where!r} must be either {{\"from\": [a, b], \"to\": [c, d], \"clip\": bool}} "
                f"or {{\"percentiles\": [p_lo, p_hi], \"to\": [c, d], \"clip\": bool}}; got {error.instance!r}")
    if where.endswith("patch.overlap") and keyword in ("minimum", "exclusiveMaximum", "type"):
        return f"model card field {where!r} is {error.instance!r}; the overlap is a fraction in [0, 1)"
    if keyword == "not":
        return f"model card field {where!r} may give 'size' or 'multiple_of', not both"
    return f"model card field {where!r}: {error.message}"


_MAX_CARD_DEPTH = 32
#: Largest model card file IBIX reads (bytes); cards are small JSON files.
MAX_CARD_BYTES = 1 << 20
#: Digits an integer in a card file may have before it is refused (Python refuses 4300 itself, with a hint about
#: ``sys.set_int_max_str_digits`` that would mislead a card author).
_MAX_DIGITS = 400
#: Widest scale factor an intensity mapping may have: IBIX feeds float32, where a larger factor turns ordinary
#: values into infinity and a smaller one rounds them together.
MAX_INTENSITY_SCALE = 1e12
#: Largest magnitude of an intensity range bound: times the widest scale it stays within float32 (3.4e38).
MAX_INTENSITY_BOUND = 1e24


class _HugeInteger:
    """An integer of a card file too long to convert: kept for :func:`_json_clean` to refuse with the field name."""

    def __init__(self, digits: str):
        self.digits = len(digits.lstrip("+-"))


def _parse_int(text: str) -> int | _HugeInteger:
    return int(text) if len(text) <= _MAX_DIGITS else _HugeInteger(text)


def _json_clean(value: Any, where: str, depth: int = 0) -> Any:
    """A deep copy of ``value`` with JSON types only (tuples become lists, numpy scalars Python numbers).

    Refuses what JSON cannot hold or the schema cannot judge: non-text field names, NaN or infinite numbers,
    other Python objects, absurd nesting. ``where`` is the field path, for the message.
    """
    name = where or "(the card itself)"
    if depth > _MAX_CARD_DEPTH:
        raise ModelCardError(f"model card field {name!r} is nested more than {_MAX_CARD_DEPTH} levels deep")
    if hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "shape", None) == ():
        value = value.item()  # numpy scalar
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ModelCardError(f"model card field {name!r} has a field name {key!r} that is not text; "
                                     "field names are JSON strings")
            shown = key or "(empty name)"
            out[key] = _json_clean(item, f"{where}.{shown}" if where else shown, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_json_clean(item, f"{where}.{i}" if where else str(i), depth + 1) for i, item in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        raise ModelCardError(f"model card field {name!r} is {value!r}; model cards take finite numbers only")
    if isinstance(value, _HugeInteger) or (isinstance(value, int) and not isinstance(value, bool)
                                           and abs(value) > _FLOAT_MAX):
        digits = value.digits if isinstance(value, _HugeInteger) else len(str(abs(value)))
        raise ModelCardError(f"model card field {name!r} is a number of {digits} digits; model cards take "
                             "finite numbers within +-1.8e308 only")
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise ModelCardError(f"model card field {name!r} holds a {type(value).__name__}; model cards take JSON "
                         "values only (objects, arrays, text, numbers, true/false, null)")


def _check_scale(side: str, source: Sequence[float], target: Sequence[float]) -> None:
    """Refuse a linear intensity mapping that float32 cannot carry (e.g. ``from: [0, 1e-40]``)."""
    with np.errstate(over="ignore"):
        widths = np.float32(float(source[1]) - float(source[0])), np.float32(float(target[1]) - float(target[0]))
        bounds = np.asarray([*source, *target], np.float64)
    scale = abs(float(widths[1]) / float(widths[0])) if np.all(np.isfinite(widths)) and widths[0] else math.inf
    if not (np.all(np.abs(bounds) <= MAX_INTENSITY_BOUND) and 1 / MAX_INTENSITY_SCALE <= scale
            <= MAX_INTENSITY_SCALE):
        raise ModelCardError(
            f"model card field '{side}.intensity' maps {list(source)} onto {list(target)}, a scale factor of "
            f"{scale:.3g}; IBIX computes in float32 and takes factors between {1 / MAX_INTENSITY_SCALE:g} and "
            f"{MAX_INTENSITY_SCALE:g} and bounds within +-{MAX_INTENSITY_BOUND:g}: fix 'from' or 'to' (in the "
            "units of the values they describe)")


def validate_card(card: Any) -> dict:
    """Check a card against the schema and the rules the schema cannot express; return it as a (new) dict."""
    import jsonschema

    if not isinstance(card, Mapping):
        raise ModelCardError(f"a model card must be a JSON object, got {type(card).__name__}")
    card = _json_clean(card, "")
    validator = jsonschema.Draft202012Validator(card_schema())
    errors = sorted(validator.iter_errors(card), key=lambda e: (len(list(e.absolute_path)), str(e.message)))
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        raise ModelCardError(_describe(best))
    # JSON Schema counts 2.0 as an integer: store the integer fields as Python ints.
    for key in ("spatial_dims", "ibix_card"):
        if key in card:
            card[key] = int(card[key])
    spec = card.get("input", {})
    if "multiple_of" in spec:
        spec["multiple_of"] = int(spec["multiple_of"])
    if "size" in spec:
        spec["size"] = [int(v) for v in spec["size"]]
    if "patch" in spec:
        spec["patch"]["size"] = [int(v) for v in spec["patch"]["size"]]
    padding = spec.get("padding", {})
    if "value" in padding and padding.get("mode", "edge") != "constant":
        raise ModelCardError(f"model card field 'input.padding.value' is given but 'input.padding.mode' is "
                             f"{padding.get('mode', 'edge')!r} (the default is 'edge'); a value applies to mode "
                             "'constant' only: set the mode to 'constant' or remove the value")
    for side in ("input", "output"):
        intensity = card.get(side, {}).get("intensity")
        if intensity is None:
            continue
        source = intensity.get("percentiles", intensity.get("from"))
        key = "percentiles" if "percentiles" in intensity else "from"
        if not source[0] < source[1]:
            raise ModelCardError(f"model card field '{side}.intensity.{key}' must be increasing "
                                 f"[low, high] with low < high; got {source}")
        if intensity["to"][0] == intensity["to"][1]:
            raise ModelCardError(f"model card field '{side}.intensity.to' must span a range (two different "
                                 f"values); got {intensity['to']}")
        if key == "from":
            _check_scale(side, source, intensity["to"])
    dims = card.get("spatial_dims")
    for side in ("input", "output"):
        layout = card.get(side, {}).get("layout")
        if layout and dims and layout not in LAYOUTS[dims]:
            raise ModelCardError(f"model card field '{side}.layout' is {layout!r} but spatial_dims is {dims}; "
                                 f"accepted layouts for {dims}D: {list(LAYOUTS[dims])}")
    size = card.get("input", {}).get("size")
    if size and dims and len(size) != dims:
        raise ModelCardError(f"model card field 'input.size' has {len(size)} values but spatial_dims is {dims}")
    patch = card.get("input", {}).get("patch")
    if patch:
        _check_patch(patch["size"], dims, size, "input.size", spec.get("multiple_of", 1))
    if card.get("slice_axis") and dims == 3:
        raise ModelCardError("model card field 'slice_axis' applies to 2D models only (spatial_dims is 3)")
    return card


def _check_patch(patch: Sequence[int], dims: int | None, size: Sequence[int | None] | None, size_field: str,
                 multiple_of: int) -> None:
    """The window of ``input.patch`` fits the model: one value per spatial axis, no larger than a fixed size
    (``size_field`` names where that size comes from), a multiple of ``multiple_of``."""
    if dims and len(patch) != dims:
        raise ModelCardError(f"model card field 'input.patch.size' has {len(patch)} values but the model is "
                             f"{dims}D; give one window size per spatial axis")
    if size:
        if len(size) != len(patch) or any(f is not None and p > f for p, f in zip(patch, size)):
            raise ModelCardError(f"model card field 'input.patch.size' is {list(patch)}, larger than the model's "
                                 f"fixed size {list(size)} ({size_field}); the window must fit the model")
    if any(p % multiple_of for p in patch):
        raise ModelCardError(f"model card field 'input.patch.size' is {list(patch)} but 'input.multiple_of' is "
                             f"{multiple_of}; every window size must be a multiple of it")


def read_card(card: Mapping[str, Any] | str | os.PathLike | None, model_path: Path) -> tuple[dict, str]:
    """Load the card given by the caller or the ``<model>.json`` beside the model.

    Returns the card as a dict (empty when there is none) and where it came from.
    """
    if isinstance(card, Mapping):
        return validate_card(card), "given card"
    if card is not None and not isinstance(card, (str, os.PathLike)):
        raise ModelCardError(f"card must be a model card (a dict), the path of a JSON file or None; got a "
                             f"{type(card).__name__}")
    try:
        path = Path(card) if card is not None else model_path.with_suffix(".json")
    except TypeError:  # an os.PathLike that returns bytes
        raise ModelCardError(f"card must be a model card (a dict), the path of a JSON file or None; got "
                             f"{card!r}") from None
    found = is_file(path, "card:", ModelCardError, "; give the path of a JSON file or the card itself (a dict)")
    if card is None and not found:
        return {}, "no card"
    if not found:
        raise ModelCardError(f"{short_path(path)}: model card not found")
    try:
        if path.stat().st_size > MAX_CARD_BYTES:
            raise ModelCardError(f"{path}: the model card is {path.stat().st_size / 2**20:.1f} MiB; a card is a "
                                 f"small JSON file (at most {MAX_CARD_BYTES // 2**20} MiB)")
        data = json.loads(path.read_text(encoding="utf-8"), parse_int=_parse_int)
    except RecursionError:
        raise ModelCardError(f"{path}: the model card is nested too deeply to read; model cards nest at most "
                             f"{_MAX_CARD_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise ModelCardError(f"{path}: not valid JSON ({exc}); fix the file or remove it") from None
    except OSError as exc:
        raise ModelCardError(f"{path}: the model card cannot be read ({exc.strerror or exc})") from None
    try:
        return validate_card(data), str(path)
    except ModelCardError as exc:
        raise ModelCardError(f"{path}: {exc}") from None


def _static(dim: Any) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def _guess_layout(shape: Sequence[Any], side: str) -> str:
    dims = len(shape) - 2
    first, last = _static(shape[1]), _static(shape[-1])
    first_small = first is not None and first <= _MAX_CHANNELS_GUESS
    last_small = last is not None and last <= _MAX_CHANNELS_GUESS
    channels_first, channels_last = LAYOUTS[dims]
    if first_small and not last_small:
        return channels_first
    if last_small and not first_small:
        return channels_last
    raise ModelCardError(
        f"cannot tell whether the model's {side} layout is {channels_first} or {channels_last} from its shape "
        f"{list(shape)}; write '{side}.layout' in the model card")


def resolve_card(card: Mapping[str, Any], inputs: Sequence, outputs: Sequence) -> ModelCard:
    """Complete a validated card with what the ONNX signature tells, and check the two agree.

    ``inputs`` and ``outputs`` are ONNX Runtime NodeArgs (``name``, ``shape``, ``type``).
    Anything inferred is listed in ``ModelCard.assumptions``.
    """
    assumed: list[str] = []
    card_in, card_out = card.get("input", {}), card.get("output", {})

    def pick(args: Sequence, side: str, spec: Mapping[str, Any]):
        names = [a.name for a in args]
        if "name" in spec:
            if spec["name"] not in names:
                raise ModelCardError(f"model card field '{side}.name' is {spec['name']!r} but the model's "
                                     f"{side}s are {names}")
            return next(a for a in args if a.name == spec["name"])
        if len(args) != 1:
            raise ModelCardError(f"the model has {len(args)} {side}s {names}; write '{side}.name' in the model "
                                 f"card to say which one IBIX uses")
        return args[0]

    arg_in, arg_out = pick(inputs, "input", card_in), pick(outputs, "output", card_out)
    if len(inputs) > 1:
        raise ModelCardError(f"the model has {len(inputs)} inputs {[a.name for a in inputs]}; IBIX feeds one "
                             "input tensor (stack channels into it) ")
    for arg, side in ((arg_in, "input"), (arg_out, "output")):
        if arg.type not in ("tensor(float)", "tensor(float16)", "tensor(double)"):
            raise ModelCardError(f"the model's {side} {arg.name!r} has type {arg.type}; IBIX needs a floating "
                                 "point image tensor")
    rank_in, rank_out = len(arg_in.shape), len(arg_out.shape)
    if rank_in not in (4, 5):
        raise ModelCardError(f"the model's input {arg_in.name!r} has rank {rank_in} (shape {arg_in.shape}); an "
                             "image-to-image model needs rank 4 (2D: NCHW or NHWC) or 5 (3D: NCDHW or NDHWC)")
    if rank_out != rank_in:
        raise ModelCardError(f"the model's output {arg_out.name!r} has rank {rank_out} (shape {arg_out.shape}) "
                             f"but its input has rank {rank_in}; IBIX explains image-to-image models whose "
                             "output is an image of the input's dimension")
    dims = rank_in - 2
    if card.get("spatial_dims", dims) != dims:
        raise ModelCardError(f"model card says spatial_dims {card['spatial_dims']} but the model's input has rank "
                             f"{rank_in}, i.e. {dims}D images; fix 'spatial_dims'")
    layout_in = card_in.get("layout")
    if layout_in is None:
        layout_in = _guess_layout(arg_in.shape, "input")
        assumed.append(f"input layout {layout_in} (from shape {list(arg_in.shape)})")
    layout_out = card_out.get("layout")
    if layout_out is None:
        layout_out = layout_in
        assumed.append(f"output layout {layout_out} (same as input)")
    channel_axis = -1 if layout_in.endswith("C") else 1
    static_channels = _static(arg_in.shape[channel_axis])
    channels = tuple(card_in.get("channels", ()))
    if channels and static_channels and len(channels) != static_channels:
        raise ModelCardError(f"model card lists {len(channels)} input channels {list(channels)} but the model's "
                             f"input {arg_in.name!r} has {static_channels} channels in layout {layout_in} "
                             f"(shape {list(arg_in.shape)}); fix 'input.channels' or 'input.layout'")
    if not channels:
        if static_channels is None:
            raise ModelCardError(f"the model's input channel count is dynamic (shape {list(arg_in.shape)}); "
                                 "write 'input.channels' in the model card")
        channels = ("input",) if static_channels == 1 else tuple(f"channel{i + 1}" for i in range(static_channels))
        assumed.append(f"{static_channels} input channel(s) named {list(channels)}")
    out_channel_axis = -1 if layout_out.endswith("C") else 1
    out_channels = _static(arg_out.shape[out_channel_axis])
    if out_channels not in (None, 1):
        raise ModelCardError(f"the model's output {arg_out.name!r} has {out_channels} channels in layout "
                             f"{layout_out} (shape {list(arg_out.shape)}); IBIX explains one output channel: "
                             "export the channel of interest or fix 'output.layout'")
    spatial_shape = list(arg_in.shape[2:] if channel_axis == 1 else arg_in.shape[1:-1])
    onnx_size = tuple(_static(d) for d in spatial_shape)
    size = card_in.get("size")
    if size is not None:
        for given, fixed in zip(size, onnx_size):
            if fixed is not None and given != fixed:
                raise ModelCardError(f"model card field 'input.size' is {size} but the model's input has fixed "
                                     f"spatial shape {spatial_shape}; fix 'input.size'")
        size = tuple(size)
    elif any(d is not None for d in onnx_size):
        size = onnx_size
        assumed.append(f"fixed spatial size {list(onnx_size)} from the model's input shape")
    if card_in.get("patch"):
        _check_patch(card_in["patch"]["size"], dims, size or onnx_size,
                     "input.size" if card_in.get("size") else f"the model's input shape {spatial_shape}",
                     int(card_in.get("multiple_of", 1)))
    call_voxels = math.prod([_static(arg_in.shape[0]) or 1, len(channels), *(d or 1 for d in size or ())])
    if call_voxels > MAX_CALL_VOXELS:
        raise ModelCardError(f"the model's input {arg_in.name!r} declares the fixed shape {list(arg_in.shape)}: "
                             f"{call_voxels:.3g} values per model call, more than the {MAX_CALL_VOXELS:.3g} IBIX "
                             "runs at once; export the model with dynamic (or smaller) batch and spatial dimensions")
    slice_axis = card.get("slice_axis")
    if dims == 2 and slice_axis is None:
        slice_axis = "axial"
        assumed.append("2D model applied to axial slices (write 'slice_axis' to change)")
    in_plane = card.get("in_plane", {})
    if not card_in.get("intensity") and card:
        assumed.append("no input intensity mapping: the model sees input units")
    return ModelCard(
        spatial_dims=dims,
        input=TensorSpec(arg_in.name, layout_in, channels, size, int(card_in.get("multiple_of", 1)),
                         Intensity.from_card(card_in.get("intensity")),
                         padding=Padding.from_card(card_in.get("padding")),
                         patch=Patch.from_card(card_in.get("patch"))),
        output=TensorSpec(arg_out.name, layout_out, tuple(card_out.get("channels", ("output",))),
                          intensity=Intensity.from_card(card_out.get("intensity")),
                          units=card_out.get("units", "")),
        slice_axis=slice_axis,
        transpose=bool(in_plane.get("transpose", False)),
        flip_rows=bool(in_plane.get("flip_rows", False)),
        flip_cols=bool(in_plane.get("flip_cols", False)),
        fixed_batch=_static(arg_in.shape[0]),
        name=card.get("name", ""),
        description=card.get("description", ""),
        assumptions=tuple(assumed),
        extra={k: card[k] for k in ("training", "metrics", "license", "authors") if k in card},
    )
