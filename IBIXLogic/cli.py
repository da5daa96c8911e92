"""The ``ibix`` command line: predict, forward and backward mappings on volumes in files, and the demo.

Exit codes: 0 success, 2 bad usage or bad input (the message names the file and the problem), 1 any other
error, 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import __version__
from .errors import IBIXError, InputError
from .blocks import DEFAULT_COMPACTNESS
from .geometry import Geometry

FORMATS = {"nrrd": ".nrrd", "nifti": ".nii.gz"}
DEFAULT_OUTPUT = "ibix-output"
#: Grey levels of an output in Hounsfield units under F (the soft-tissue window, level 40, width 400).
CT_WINDOW = (-160.0, 240.0)


# -- console and progress -----------------------------------------------------------------------------------
class Console:
    """Where messages go: results on stdout, notes and progress on stderr, nothing but errors when quiet."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    def out(self, text: str = "") -> None:
        if not self.quiet:
            print(text, flush=True)

    def note(self, text: str) -> None:
        if not self.quiet:
            print(f"ibix: {text}", file=sys.stderr, flush=True)

    def progress(self) -> "Progress":
        return Progress(enabled=not self.quiet)


class Progress:
    """A ``progress(done, total, message)`` callback for the engine that drives a tqdm bar on stderr.

    The bar appears only when a step takes more than a second, shows the time left, and starts afresh when the
    engine's message or total changes (e.g. the levels of a coarse-to-fine backward mapping).
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = None
        self.key: tuple[str, int] | None = None

    def __call__(self, done: int, total: int, message: str) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if self.bar is None or self.key != (message, total) or done < self.bar.n:
            self.close()
            self.bar = tqdm(total=total, desc=message, unit="step", file=sys.stderr, delay=1.0, leave=False,
                            dynamic_ncols=True)
            self.key = (message, total)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.key = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- argument types -----------------------------------------------------------------------------------------
def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def _number(minimum: float | None = None, maximum: float | None = None, strict_min: bool = False,
            strict_max: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not np.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if minimum is not None and (value < minimum or (strict_min and value == minimum)):
            raise argparse.ArgumentTypeError(f"must be {'above' if strict_min else 'at least'} {minimum}, "
                                             f"got {value:g}")
        if maximum is not None and (value > maximum or (strict_max and value == maximum)):
            raise argparse.ArgumentTypeError(f"must be {'below' if strict_max else 'at most'} {maximum}, "
                                             f"got {value:g}")
        return value
    parse.__name__ = "number"
    return parse


def _max_jitter(text: str) -> float | None:
    if text.strip().lower() == "auto":
        return None
    return _number(0.0, strict_min=True)(text)


_max_jitter.__name__ = "max-jitter"


# -- parser -------------------------------------------------------------------------------------------------
class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        # show every default, including None ("none") and flags, so --help documents all of them
        text = action.help or ""
        if action.required or "%(default)" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            return text
        return text + " (default: %(default)s)"


def _common(parser: argparse.ArgumentParser, needs_model: bool = True) -> None:
    group = parser.add_argument_group("model and inputs")
    group.add_argument("--model", type=Path, required=True, metavar="ONNX",
                       help="the ONNX image-to-image model")
    group.add_argument("--card", type=Path, default=None, metavar="JSON",
                       help="the model card; none: <model>.json beside the model, or inferred from the ONNX model")
    group.add_argument("--input", "-i", dest="inputs", type=Path, action="append", required=True, metavar="VOLUME",
                       help="input volume (NIfTI, NRRD or MHA); repeat once per channel of a multi-channel model, "
                            "in the card's channel order")
    run = parser.add_argument_group("running")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="where ONNX Runtime runs the model; auto: CUDA when available, else the CPU")
    run.add_argument("--memory-budget", type=_number(0.0, strict_min=True), default=512.0, metavar="MiB",
                     help="memory one batch of model inputs and activations may take; sets the batch size")
    out = parser.add_argument_group("output")
    out.add_argument("--output", "-o", type=Path, default=Path(DEFAULT_OUTPUT), metavar="DIR",
                     help="folder for the results (created if missing)")
    out.add_argument("--format", choices=tuple(FORMATS), default="nrrd",
                     help="file format of the volumes written (geometry of the input kept)")
    out.add_argument("--quiet", "-q", action="store_true", default=False,
                     help="print nothing but errors (no progress bar, no list of files)")


def _figure_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("figure")
    group.add_argument("--slice", type=_int_at_least(0), default=None, metavar="N",
                       help="array index of the slice the PNG shows (along a 2D model's slice axis, else the "
                            "axial axis); none: a montage of up to 6 slices the mask touches")
    group.add_argument("--crop", choices=("roi", "body", "none"), default="roi",
                       help="PNG field of view: the mask and the visible map with some context, the head/body, "
                            "or the whole slice")
    group.add_argument("--no-png", action="store_true", default=False, help="write no PNG figure")


def _mapping_options(group, n_jitters: int) -> None:
    group.add_argument("--n-jitters", type=_int_at_least(1), default=n_jitters, metavar="N",
                       help="N: jitters h_k = k H / N for k = -N..N, k != 0 (2N model evaluations per sample)")
    group.add_argument("--max-jitter", type=_max_jitter, default="auto", metavar="H",
                       help="H, the largest jitter, in input units; auto: 15 %% of the input's 1st-99th "
                            "percentile range")
    group.add_argument("--channels", nargs="+", default=None, metavar="CHANNEL",
                       help="input channels to jitter (card names or indices); none: all channels")
    group.add_argument("--progressive", action="store_true", default=False,
                       help="nested jitter grids N = 1, 2, 4 ... reuse every evaluation; a preview map is written "
                            "(<map>_preview) after each level and replaced by the final map")
    group.add_argument("--tolerance", type=_number(0.0, strict_min=True), default=None, metavar="FRACTION",
                       help="with --progressive: stop once a level changes the map by less than this (F: fraction "
                            "of max |F|; B: absolute)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ibix", formatter_class=_Formatter,
        description="IBIX: instance-based inference explainers for ONNX image-to-image generators. "
                    "Forward map F: where the output changes when an input region is jittered. "
                    "Backward map B: which input regions drive an output region.",
        epilog="Exit codes: 0 success, 2 bad usage or bad input, 1 other errors. "
               "Run 'ibix demo' for an end-to-end example on the shipped models.")
    parser.add_argument("--version", action="version", version=f"ibix {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    predict = sub.add_parser("predict", formatter_class=_Formatter, help="run the model; write output volume",
                             description="Run the model on the input and write its output (output units) "
                                         "on the input's grid.")
    _common(predict)
    predict.set_defaults(handler=cmd_predict)

    forward = sub.add_parser("forward", formatter_class=_Formatter, help="forward map F of an input mask",
                             description="Forward map F(M^x): how the output reacts to jittering the input "
                                         "voxels of a mask. Writes forward_signed (output units per input unit), "
                                         "forward_normalized (|F| / max |F|), forward.png and summary.json.")
    _common(forward)
    group = forward.add_argument_group("forward mapping")
    group.add_argument("--mask", type=Path, required=True, metavar="LABELS",
                       help="input mask M^x: a label volume (resampled onto the input's grid if it differs)")
    group.add_argument("--label", type=_int_at_least(0), default=None, metavar="N",
                       help="use the voxels of this label of the mask file (needed when it holds several labels)")
    _mapping_options(group, 8)
    _figure_options(forward)
    forward.set_defaults(handler=cmd_forward)

    backward = sub.add_parser("backward", formatter_class=_Formatter, help="backward map B of an output mask",
                              description="Backward map B(M^f): which input blocks drive the output voxels of a "
                                          "mask. Writes backward (B on the input grid), backward_blocks (block "
                                          "labels), backward.png and summary.json.")
    _common(backward)
    group = backward.add_argument_group("backward mapping")
    group.add_argument("--out-mask", "--mask", dest="out_mask", type=Path, required=True, metavar="LABELS",
                       help="output mask M^f: a label volume on the output (= input) grid, resampled if it "
                            "differs")
    group.add_argument("--out-label", "--label", dest="out_label", type=_int_at_least(0), default=None,
                       metavar="N", help="use the voxels of this label of the mask file (needed when it holds several labels)")
    group.add_argument("--n-blocks", type=_int_at_least(1), default=500, metavar="K",
                       help="K, blocks per sample (SLIC superpixels per slice for 2D models, supervoxels for 3D)")
    group.add_argument("--compactness", type=_number(0.0, strict_min=True), default=DEFAULT_COMPACTNESS,
                       help="SLIC compactness: higher gives more regular blocks")
    _mapping_options(group, 4)
    blocks = group.add_mutually_exclusive_group()
    blocks.add_argument("--blocks", choices=("slic", "grid"), default="slic",
                        help="how the input is cut into blocks")
    blocks.add_argument("--block-labels", type=Path, default=None, metavar="LABELS",
                        help="a label volume giving the blocks instead (0 = no block), on the input's grid")
    group.add_argument("--normalization", choices=("fraction", "magnitude"), default="fraction",
                       help="B_k as the fraction of block k's effect that lands in M^f, or that effect scaled "
                            "to a maximum of 1")
    group.add_argument("--coarse-blocks", type=_int_at_least(1), nargs="+", default=None, metavar="K",
                       help="coarse-to-fine: block counts of coarser levels (increasing, below --n-blocks); "
                            "only blocks above --refine-threshold are refined")
    group.add_argument("--refine-threshold", type=_number(0.0, 1.0), default=0.25, metavar="FRACTION",
                       help="coarse-to-fine: refine the blocks with B >= this fraction of the level's largest B")
    group.add_argument("--method", choices=("auto", "local", "batched", "brute"), default="auto",
                       help="local: skip blocks out of the model's measured response radius and perturb far-apart "
                            "blocks together (exact for finite receptive fields); batched: every block; brute: "
                            "one block per evaluation; auto: local unless the response is global")
    group.add_argument("--locality-tolerance", type=_number(0.0, 1.0, strict_max=True), default=0.0,
                       metavar="FRACTION",
                       help="0: exact; above 0: cut a global response at the radius holding all but this fraction")
    group.add_argument("--no-tiles", dest="tiles", action="store_false", default=True,
                       help="local method: perturb blocks in whole samples only, not in tiles of them")
    _figure_options(backward)
    backward.set_defaults(handler=cmd_backward)

    demo = sub.add_parser("demo", formatter_class=_Formatter, help="run both shipped demos end to end",
                          description="Run the shipped demos (T1 to T2, MRI to pseudo-CT) end to end: prediction, "
                                      "one forward and one backward map each, with PNG figures and summaries.")
    demo.add_argument("--output", "-o", type=Path, default=Path("ibix-demo-output"), metavar="DIR",
                      help="folder for the results (one subfolder per demo)")
    demo.add_argument("--quick", action="store_true", default=False,
                      help="a reduced run (fewer blocks and jitters) for smoke tests")
    demo.add_argument("--figures", type=Path, default=None, metavar="DIR",
                      help="also write small palette PNGs of the four maps for documentation into DIR "
                           "(<demo>_forward.png, <demo>_backward.png)")
    demo.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the models run")
    demo.add_argument("--format", choices=tuple(FORMATS), default="nrrd", help="file format of the volumes")
    demo.add_argument("--quiet", "-q", action="store_true", default=False, help="print nothing but errors")
    demo.set_defaults(handler=cmd_demo)
    return parser


# -- loading ------------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """Input volumes (one per channel) on one grid."""

    arrays: list[np.ndarray]
    geometry: Geometry
    paths: list[Path]

    @property
    def x(self) -> Any:
        return self.arrays[0] if len(self.arrays) == 1 else self.arrays


def load_model(path: Path, card: Path | None, device: str, memory_budget_mib: float = 512.0):
    from .model import load_model as engine_load

    if card is not None and not Path(card).is_file():
        raise InputError(f"{card}: model card not found")
    return engine_load(path, card=None if card is None else str(card), device=device,
                       memory_budget=int(memory_budget_mib * 2**20))


def load_inputs(paths: Sequence[Path], model) -> Inputs:
    """Read one volume per card channel and check they share one grid."""
    from .io import read_volume

    names = list(model.card.input.channels)
    if len(paths) != len(names):
        raise InputError(f"the model {model.path.name} takes {len(names)} input channel(s) {names} but "
                         f"{len(paths)} --input volume(s) were given ({', '.join(str(p) for p in paths)}); "
                         "pass one --input per channel, in that order")
    arrays, geometries = [], []
    for path in paths:
        array, geometry = read_volume(path)
        if array.ndim not in (2, 3):
            raise InputError(f"{path}: a {array.ndim}D image; IBIX reads 2D images and 3D volumes")
        arrays.append(array)
        geometries.append(geometry)
    for path, geometry in zip(paths[1:], geometries[1:]):
        if not geometry.matches(geometries[0]):
            raise InputError(f"{path}: its grid (shape {geometry.shape}, spacing {geometry.spacing}, origin "
                             f"{geometry.origin}) differs from {paths[0]}'s (shape {geometries[0].shape}, spacing "
                             f"{geometries[0].spacing}, origin {geometries[0].origin}); resample the channels "
                             "onto one grid")
    return Inputs(arrays, geometries[0], list(paths))


def load_mask(path: Path, label: int | None, reference: Geometry, console: Console, what: str) -> np.ndarray:
    """A mask on the input grid; one on another grid is resampled (nearest neighbour) if it overlaps."""
    from .io import read_mask, read_volume

    _, geometry = read_volume(path)
    if not geometry.matches(reference):
        console.note(f"{path}: the {what}'s grid (shape {geometry.shape}, spacing {geometry.spacing}) differs from "
                     f"the input's (shape {reference.shape}, spacing {reference.spacing}); resampled onto the "
                     "input's grid (nearest neighbour)")
    return read_mask(path, label=label, reference=reference)


def _channels(values: Sequence[str] | None, model) -> list[str | int] | None:
    if values is None:
        return None
    names = list(model.card.input.channels)
    return [int(v) if v not in names and v.lstrip("-").isdigit() else v for v in values]


# -- output -------------------------------------------------------------------------------------------------
class Outputs:
    """The output folder: plans the files, refuses to overwrite inputs, writes volumes atomically."""

    def __init__(self, folder: Path, fmt: str, protected: Sequence[Path | None]):
        self.folder = Path(folder)
        self.suffix = FORMATS[fmt]
        self.protected = {Path(p).resolve() for p in protected if p is not None}
        self.written: list[Path] = []

    def volume(self, stem: str) -> Path:
        return self.path(stem + self.suffix)

    def path(self, name: str) -> Path:
        path = self.folder / name
        if path.resolve() in self.protected:
            raise InputError(f"{path}: writing it would overwrite an input file; choose another --output folder")
        return path

    def check(self, names: Sequence[str]) -> None:
        """Create the folder, check it is writable, and refuse names that are inputs."""
        for name in names:
            self.path(name)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"{self.folder}: cannot create the output folder ({exc.strerror or exc})") from None
        if not self.folder.is_dir():
            raise InputError(f"{self.folder}: the output folder is not a folder")
        try:
            with tempfile.NamedTemporaryFile(dir=self.folder, prefix=".ibix-write-test-"):
                pass
        except OSError as exc:
            raise InputError(f"{self.folder}: the output folder is not writable ({exc.strerror or exc})") from None

    def write_volume(self, stem: str, array: np.ndarray, geometry: Geometry) -> Path:
        from .io import write_volume

        path = write_volume(self.volume(stem), array, geometry)
        self.written.append(path)
        return path

    def write_json(self, name: str, content: dict) -> Path:
        path = self.path(name)
        temporary = path.with_name(f".{name}.partial")
        try:
            temporary.write_text(json.dumps(content, indent=2, default=_json_default) + "\n")
            os.replace(temporary, path)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None
        self.written.append(path)
        return path

    def add(self, path: Path) -> None:
        self.written.append(Path(path))


class Preview:
    """The engine's ``preview(map, N)`` callback: writes ``<stem>_preview`` and removes it once the run ends."""

    def __init__(self, outputs: Outputs, stem: str, geometry: Geometry, console: Console, progress: Progress):
        self.outputs, self.stem, self.geometry = outputs, stem, geometry
        self.console, self.progress = console, progress
        self.path: Path | None = None

    def __call__(self, values: np.ndarray, n_jitters: int) -> None:
        from .io import write_volume

        self.path = write_volume(self.outputs.volume(self.stem + "_preview"), values, self.geometry)
        self.progress.close()
        self.console.note(f"preview with N = {n_jitters} written to {self.path}")

    def __enter__(self) -> "Preview":
        return self

    def __exit__(self, *exc) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _stem_names(stems: Sequence[str], fmt: str, extra: Sequence[str] = ()) -> list[str]:
    return [s + FORMATS[fmt] for s in stems] + list(extra)


# -- figures ------------------------------------------------------------------------------------------------
def display_axis(model, geometry: Geometry, ndim: int) -> int | None:
    """Slices of the PNGs: along a 2D model's slice axis, else the axial axis (None for a 2D image)."""
    from . import figures
    from .geometry import slice_array_axis

    preferred = None
    if ndim == 3 and model.card.spatial_dims == 2:
        preferred = slice_array_axis(geometry, model.card.slice_axis or "axial")
    return figures.display_axis(geometry, ndim, preferred)


def output_on_slices(model, inputs: Inputs, axis: int | None, slices: Sequence[int]) -> tuple[np.ndarray, int]:
    """The model output on the given slices only (zeros elsewhere) and the evaluations it took."""
    before = model.evaluations
    prepared = model.prepare(inputs.x, inputs.geometry)
    if model.card.spatial_dims == 2 and prepared.slice_axis is not None and axis == prepared.slice_axis:
        samples = np.zeros((len(prepared.samples),) + tuple(prepared.sample_shape), np.float32)
        samples[list(slices)] = model.predict_samples(prepared, list(slices))
        return prepared.from_samples(samples), model.evaluations - before
    return prepared.from_samples(model.predict_samples(prepared)), model.evaluations - before


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def forward_png(path: Path, model, inputs: Inputs, output: np.ndarray, result, mask: np.ndarray,
                axis: int | None, slices: Sequence[int], crop: str = "roi", **kw) -> Path:
    from . import figures

    p = result.parameters
    subtitle = (f"{model.card.name or model.path.name} · channels {', '.join(p['channels'])} · N = {p['n_jitters']} "
                f"jitters up to H = {_fmt(p['max_jitter'])} · {result.evaluations} evaluations in "
                f"{result.seconds:.1f} s on {result.device} · max |F| = {_fmt(float(np.abs(result.signed).max()))}")
    name = model.card.output.channels[0] if model.card.output.channels else "output"
    units = model.card.output.units
    if units == "HU" and "window" not in kw:
        kw["window"] = CT_WINDOW
    return figures.forward_figure(path, output, result.signed, mask, inputs.geometry, axis, slices,
                                  result.units, f"{name}{', ' + units if units else ''}", subtitle=subtitle,
                                  crop=crop, crop_reference=inputs.arrays[0], **kw)


def backward_png(path: Path, model, inputs: Inputs, result, mask: np.ndarray, axis: int | None,
                 slices: Sequence[int], crop: str = "roi", background_channel: int = 0, **kw) -> Path:
    from . import figures

    p = result.parameters
    levels = "" if not p.get("coarse_blocks") else f" (levels {p['coarse_blocks'] + [p['n_blocks']]})"
    subtitle = (f"{model.card.name or model.path.name} · {p['blocks']} blocks, K = {p['n_blocks']}{levels} · "
                f"N = {p['n_jitters']} jitters up to H = {_fmt(p['max_jitter'])} · method {p['method']} · "
                f"{result.evaluations} evaluations in {result.seconds:.1f} s on {result.device}")
    channel = model.card.input.channels[background_channel]
    return figures.backward_figure(path, inputs.arrays[background_channel], result.map, mask, inputs.geometry,
                                   axis, slices, channel, labels=result.labels,
                                   normalization=p["normalization"], subtitle=subtitle, crop=crop,
                                   crop_reference=inputs.arrays[0], **kw)


# -- commands -----------------------------------------------------------------------------------------------
def _summary(command: str, model, inputs: Inputs, started: float, outputs: Outputs, **extra) -> dict:
    summary = {"ibix": __version__, "command": command,
               "model": {"path": str(model.path), "card": model.card.summary(), "device": model.device,
                         "provider": model.provider},
               "inputs": [str(p) for p in inputs.paths], "geometry": inputs.geometry.to_dict()}
    summary.update(extra)
    summary["seconds_total"] = round(time.perf_counter() - started, 3)
    summary["files"] = [str(p) for p in outputs.written] + [str(outputs.folder / "summary.json")]
    return summary


def _finish(console: Console, outputs: Outputs, lines: Sequence[str]) -> None:
    for line in lines:
        console.out(line)
    for path in outputs.written:
        console.out(f"  wrote {path}")


def cmd_predict(args: argparse.Namespace, console: Console) -> int:
    started = time.perf_counter()
    model = load_model(args.model, args.card, args.device, args.memory_budget)
    inputs = load_inputs(args.inputs, model)
    outputs = Outputs(args.output, args.format, [*inputs.paths, args.model, args.card])
    outputs.check(_stem_names(["output"], args.format, ["summary.json"]))
    t0, before = time.perf_counter(), model.evaluations
    with console.progress() as progress:
        output = model.predict(inputs.x, inputs.geometry, progress=progress)
    seconds, evaluations = time.perf_counter() - t0, model.evaluations - before
    outputs.write_volume("output", output, inputs.geometry)
    summary = _summary("predict", model, inputs, started, outputs,
                       predict={"evaluations": evaluations, "seconds": round(seconds, 4), "device": model.device,
                                "units": model.card.output.units})
    outputs.write_json("summary.json", summary)
    _finish(console, outputs, [f"predict: {evaluations} evaluations in {seconds:.2f} s on {model.device}"])
    return 0


def cmd_forward(args: argparse.Namespace, console: Console) -> int:
    from . import figures
    from .forward import forward_mapping

    started = time.perf_counter()
    model = load_model(args.model, args.card, args.device, args.memory_budget)
    inputs = load_inputs(args.inputs, model)
    mask = load_mask(args.mask, args.label, inputs.geometry, console, "input mask")
    outputs = Outputs(args.output, args.format, [*inputs.paths, args.mask, args.model, args.card])
    axis = display_axis(model, inputs.geometry, inputs.arrays[0].ndim)
    slices = figures.choose_slices(mask, axis, requested=args.slice)
    outputs.check(_stem_names(["forward_signed", "forward_normalized"], args.format,
                              ["summary.json"] + ([] if args.no_png else ["forward.png"])))
    with console.progress() as progress, Preview(outputs, "forward_normalized", inputs.geometry, console,
                                                 progress) as preview:
        result = forward_mapping(model, inputs.x, mask, n_jitters=args.n_jitters, max_jitter=args.max_jitter,
                                 channels=_channels(args.channels, model), geometry=inputs.geometry,
                                 progressive=args.progressive, preview=preview, tolerance=args.tolerance,
                                 progress=progress)
    outputs.write_volume("forward_signed", result.signed, result.geometry)
    outputs.write_volume("forward_normalized", result.normalized, result.geometry)
    figure = {}
    if not args.no_png:
        t0 = time.perf_counter()
        output, evaluations = output_on_slices(model, inputs, axis, slices)
        outputs.add(forward_png(outputs.path("forward.png"), model, inputs, output, result, mask, axis, slices,
                                crop=args.crop))
        figure = {"slices": slices, "axis": axis, "evaluations": evaluations,
                  "seconds": round(time.perf_counter() - t0, 3)}
    summary = _summary("forward", model, inputs, started, outputs, mask=str(args.mask), label=args.label,
                       forward=result.to_dict(), figure=figure)
    outputs.write_json("summary.json", summary)
    _finish(console, outputs, [f"forward: {result.evaluations} evaluations in {result.seconds:.2f} s on "
                               f"{result.device}; max |F| = {_fmt(float(np.abs(result.signed).max()))} {result.units}"])
    return 0


def cmd_backward(args: argparse.Namespace, console: Console) -> int:
    from . import figures
    from .io import read_volume
    from .backward import backward_mapping

    started = time.perf_counter()
    model = load_model(args.model, args.card, args.device, args.memory_budget)
    inputs = load_inputs(args.inputs, model)
    mask = load_mask(args.out_mask, args.out_label, inputs.geometry, console, "output mask")
    blocks: Any = args.blocks
    if args.block_labels is not None:
        labels, geometry = read_volume(args.block_labels)
        if not geometry.matches(inputs.geometry):
            raise InputError(f"{args.block_labels}: the block labels' grid (shape {geometry.shape}) differs from the "
                             f"input's (shape {inputs.geometry.shape}); give block labels on the input's grid")
        if not np.issubdtype(labels.dtype, np.integer):
            if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
                raise InputError(f"{args.block_labels}: block labels must be whole numbers")
        blocks = labels.astype(np.int32)
    outputs = Outputs(args.output, args.format,
                      [*inputs.paths, args.out_mask, args.block_labels, args.model, args.card])
    axis = display_axis(model, inputs.geometry, inputs.arrays[0].ndim)
    slices = figures.choose_slices(mask, axis, requested=args.slice)
    outputs.check(_stem_names(["backward", "backward_blocks"], args.format,
                              ["summary.json"] + ([] if args.no_png else ["backward.png"])))
    with console.progress() as progress, Preview(outputs, "backward", inputs.geometry, console,
                                                 progress) as preview:
        result = backward_mapping(
            model, inputs.x, mask, n_blocks=args.n_blocks, compactness=args.compactness, n_jitters=args.n_jitters,
            max_jitter=args.max_jitter, channels=_channels(args.channels, model), blocks=blocks,
            normalization=args.normalization, coarse_blocks=args.coarse_blocks,
            refine_threshold=args.refine_threshold, method=args.method,
            locality_tolerance=args.locality_tolerance, tiles=args.tiles, geometry=inputs.geometry,
            progressive=args.progressive, preview=preview, tolerance=args.tolerance, progress=progress)
    outputs.write_volume("backward", result.map, result.geometry)
    outputs.write_volume("backward_blocks", result.labels, result.geometry)
    figure = {}
    if not args.no_png:
        t0 = time.perf_counter()
        outputs.add(backward_png(outputs.path("backward.png"), model, inputs, result, mask, axis, slices,
                                 crop=args.crop))
        figure = {"slices": slices, "axis": axis, "seconds": round(time.perf_counter() - t0, 3)}
    summary = _summary("backward", model, inputs, started, outputs, mask=str(args.out_mask), label=args.out_label,
                       block_labels=None if args.block_labels is None else str(args.block_labels),
                       backward=result.to_dict(), figure=figure)
    outputs.write_json("summary.json", summary)
    radius = result.radius or {}
    _finish(console, outputs, [
        f"backward: {result.evaluations} evaluations (per level {result.evaluations_per_level}) in "
        f"{result.seconds:.2f} s on {result.device}; {int(result.labels.max())} blocks; max B = "
        f"{_fmt(float(result.block_values.max()))}"
        + (f"; response radius {radius['radius']} voxels" if radius.get("radius") is not None else "")])
    return 0


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    from .demo import run_demo

    run_demo(args.output, quick=args.quick, figures_dir=args.figures, device=args.device, fmt=args.format,
             console=console)
    return 0


# -- entry point --------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ibix`` command line; returns the exit code (the console script passes it to sys.exit)."""
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("ibix: error: choose a command: predict, forward, backward or demo (ibix --help)", file=sys.stderr)
        return 2
    console = Console(quiet=args.quiet)
    engine_log = logging.getLogger("IBIX")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("ibix: %(message)s"))
    engine_log.addHandler(handler)
    previous_level = engine_log.level
    engine_log.setLevel(logging.ERROR if args.quiet else logging.WARNING)
    try:
        return args.handler(args, console)
    except IBIXError as exc:
        print(f"ibix {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ibix {args.command}: interrupted; files already written are complete, others were not written",
              file=sys.stderr)
        return 130
    except MemoryError as exc:
        print(f"ibix {args.command}: error: out of memory ({exc}); lower --memory-budget or use a smaller volume",
              file=sys.stderr)
        return 1
    except Exception as exc:  # anything unexpected: a short message, the traceback with IBIX_DEBUG=1
        if os.environ.get("IBIX_DEBUG"):
            import traceback
            traceback.print_exc()
        print(f"ibix {args.command}: unexpected error: {type(exc).__name__}: {exc} "
              "(set IBIX_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    finally:
        engine_log.removeHandler(handler)
        engine_log.setLevel(previous_level)


if __name__ == "__main__":
    sys.exit(main())
