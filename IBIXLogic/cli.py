"""The ``ibix`` command line: predict, forward and backward mappings and response atlases on volumes in files, and
the demo.

Parsing and exit codes only; loading, running and writing live in :mod:`IBIXLogic.session`.
Exit codes: 0 success, 2 bad usage or bad input (the message names the file and the problem), 3 a cohort that ran
but in which some cases failed, 1 any other error, 130 interrupted. With ``--progress-format jsonl`` stdout carries
JSON lines only, ending with a ``finished`` or ``failed`` record.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import __version__, cohort, session, structures
from .atlas import ResponseAtlas
from .blocks import DEFAULT_COMPACTNESS
from .checks import channel_indices
from .demo import run_demo
from .errors import IBIXError, InputError
from .model import Model
from .session import FORMATS, PROGRESS_FORMATS, Console, FigureOptions, Inputs, Outputs
from .statistics import describe

DEFAULT_OUTPUT = "ibix-output"
#: Exit codes: bad usage or input; a cohort that ran with some cases failed; interrupted.
USAGE, CASES_FAILED, INTERRUPTED = 2, 3, 130


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


def _common(parser: argparse.ArgumentParser, needs_model: bool = True, estimate: bool = False) -> None:
    group = parser.add_argument_group("model and inputs")
    group.add_argument("--model", type=Path, required=True, metavar="ONNX",
                       help="the ONNX image-to-image model")
    group.add_argument("--card", type=Path, default=None, metavar="JSON",
                       help="the model card; none: <model>.json beside the model, or inferred from the ONNX model")
    group.add_argument("--input", "-i", dest="inputs", type=Path, action="append", required=True, metavar="VOLUME",
                       help="input volume (NIfTI, NRRD or MHA) or a folder of DICOM files; repeat once per channel "
                            "of a multi-channel model, in the card's channel order")
    group.add_argument("--series", action="append", default=None, metavar="UID",
                       help="SeriesInstanceUID of the series to read from a DICOM folder that holds several; one per "
                            "DICOM folder --input, in the same order")
    run = parser.add_argument_group("running")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="where ONNX Runtime runs the model; auto: CUDA when available, else the CPU")
    run.add_argument("--memory-budget", type=_number(0.0, strict_min=True), default=None, metavar="MiB",
                     help="memory one batch of model inputs and activations may take; sets the batch size; none: "
                          "512 MiB on the CPU, half the GPU's free memory with CUDA")
    out = parser.add_argument_group("output")
    out.add_argument("--output", "-o", type=Path, default=Path(DEFAULT_OUTPUT), metavar="DIR",
                     help="folder for the results (created if missing)")
    out.add_argument("--format", choices=tuple(FORMATS), default="nrrd",
                     help="file format of the volumes written (geometry of the input kept)")
    out.add_argument("--quiet", "-q", action="store_true", default=False,
                     help="print nothing but errors (no progress bar, no list of files)")
    out.add_argument("--progress-format", choices=PROGRESS_FORMATS, default="human",
                     help="human: a progress bar on stderr; jsonl: one JSON object per line on stdout "
                          "({stage, done, total}), ending with {stage: finished, files, summary} or "
                          "{stage: failed, error}")
    if estimate:
        out.add_argument("--estimate", action="store_true", default=False,
                         help="print the predicted model evaluations and time and what would cut them (with jsonl: "
                              "{stage: estimate, evaluations, seconds, advice}), then stop: nothing is written. "
                              "It plans the run (response radius, blocks) and times one batch")


def _figure_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("figure")
    group.add_argument("--slice", type=_int_at_least(0), default=None, metavar="N",
                       help="array index of the slice the PNG shows (along a 2D model's slice axis, else the "
                            "axial axis); none: a montage of up to 6 slices the mask touches")
    group.add_argument("--crop", choices=("roi", "body", "none"), default="roi",
                       help="PNG field of view: the mask and the visible map with some context, the head/body, "
                            "or the whole slice")
    group.add_argument("--no-png", action="store_true", default=False, help="write no PNG figure")


def _jitter_options(group, n_jitters: int) -> None:
    group.add_argument("--n-jitters", type=_int_at_least(1), default=n_jitters, metavar="N",
                       help="N: jitters h_k = k H / N for k = -N..N, k != 0 (2N model evaluations per sample)")
    group.add_argument("--max-jitter", type=_max_jitter, default="auto", metavar="H",
                       help="H, the largest jitter, in input units; auto: 15 %% of the input's 1st-99th "
                            "percentile range")
    group.add_argument("--channels", nargs="+", default=None, metavar="CHANNEL",
                       help="input channels to jitter (card names or indices); none: all channels")


def _block_options(group) -> None:
    group.add_argument("--n-blocks", type=_int_at_least(1), default=500, metavar="K",
                       help="K, blocks per sample (SLIC superpixels per slice for 2D models, supervoxels for 3D)")
    group.add_argument("--compactness", type=_number(0.0, strict_min=True), default=DEFAULT_COMPACTNESS,
                       help="SLIC compactness: higher gives more regular blocks")
    blocks = group.add_mutually_exclusive_group()
    blocks.add_argument("--blocks", choices=("slic", "grid"), default="slic",
                        help="how the input is cut into blocks")
    blocks.add_argument("--block-labels", type=Path, default=None, metavar="LABELS",
                        help="a label volume giving the blocks instead (0 = no block), on the input's grid")


def _mapping_options(group, n_jitters: int) -> None:
    _jitter_options(group, n_jitters)
    group.add_argument("--progressive", action="store_true", default=False,
                       help="nested jitter grids N = 1, 2, 4 ... reuse every evaluation; a preview map is written "
                            "(<map>_preview) after each level and replaced by the final map")
    group.add_argument("--tolerance", type=_number(0.0, strict_min=True), default=None, metavar="FRACTION",
                       help="with --progressive: stop once a level changes the map by less than this (F: fraction "
                            "of max |F|; B: absolute)")


def _cohort_parser(sub) -> None:
    """The ``cohort`` command's arguments."""
    group = sub.add_parser("cohort", formatter_class=_Formatter, help="explain every case of a manifest, on Dask",
                           description="One forward or backward map per case of a manifest (CSV: case, input with "
                                       "';'-separated channel files, mask, optional label and parameter columns), "
                                       "cases run in parallel on Dask. Writes DIR/<case>/ as the single-case "
                                       "command does, DIR/cohort.csv (status, error, evaluations, seconds, "
                                       "statistics per case) and DIR/report.html. A rerun skips finished cases.",
                           epilog="Exit codes: 0 every case is ok, 3 the cohort ran but some cases failed (they are "
                                  "listed, and cohort.csv records why; a rerun retries them), 2 bad usage, a bad "
                                  "manifest or an output folder in use, 130 interrupted (finished cases are kept), "
                                  "1 other errors.")
    group.add_argument("manifest", type=Path, metavar="MANIFEST", help="the cohort manifest (CSV)")
    group.add_argument("--model", type=Path, required=True, metavar="ONNX", help="the ONNX image-to-image model")
    group.add_argument("--card", type=Path, default=None, metavar="JSON",
                       help="the model card; none: <model>.json beside the model, or inferred from the ONNX model")
    group.add_argument("--mapping", choices=cohort.MAPPINGS, required=True, help="the map computed for every case")
    group.add_argument("--output", "-o", type=Path, required=True, metavar="DIR", help="folder for the results")
    group.add_argument("--workers", type=_int_at_least(1), default=2, metavar="N",
                       help="worker processes of the local Dask cluster (one case at a time each; not used with "
                            "--scheduler)")
    group.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="join the running Dask scheduler at this address (e.g. tcp://10.0.0.5:8786) instead "
                            "of starting a local cluster; its workers need IBIX and the same file paths")
    group.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="where ONNX Runtime runs the model on each worker")
    group.add_argument("--format", choices=tuple(FORMATS), default="nrrd", help="file format of the volumes")
    group.add_argument("--quiet", "-q", action="store_true", default=False, help="print nothing but errors")
    group.add_argument("--progress-format", choices=PROGRESS_FORMATS, default="human",
                       help="human: a progress bar counting cases on stderr; jsonl: JSON lines on stdout "
                            "({stage: cases, done, total}, then {stage: finished, files, summary})")
    group.set_defaults(handler=cmd_cohort)


def _parsed_defaults(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Each option's default as parsing gives it (a text default goes through the option's type, as argparse does)."""
    return {a.dest: a.type(a.default) if isinstance(a.default, str) and a.type else a.default
            for a in parser._actions if a.default is not argparse.SUPPRESS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ibix", formatter_class=_Formatter,
        description="IBIX: instance-based inference explainers for ONNX image-to-image generators. "
                    "Forward map F: where the output changes when an input region is jittered. "
                    "Backward map B: which input regions drive an output region.",
        epilog="Exit codes: 0 success, 2 bad usage or bad input, 3 a cohort with failed cases, 1 other errors, "
               "130 interrupted. "
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
    _common(forward, estimate=True)
    group = forward.add_argument_group("forward mapping")
    group.add_argument("--mask", type=Path, required=True, metavar="LABELS",
                       help="input mask M^x: a label volume (resampled onto the input's grid if it differs), or a "
                            "file of named structures: Slicer .seg.nrrd, DICOM RT structure set or SEG (or a DICOM "
                            "folder holding one)")
    selection = group.add_mutually_exclusive_group()
    selection.add_argument("--label", type=_int_at_least(0), default=None, metavar="N",
                           help="use the voxels of this label of the mask file (needed when it holds several labels)")
    selection.add_argument("--segment", default=None, metavar="NAME",
                           help="use the structure of this name (segment or ROI) of the mask file ('ibix masks FILE' "
                                "lists them)")
    _mapping_options(group, 8)
    _figure_options(forward)
    forward.set_defaults(handler=cmd_forward)

    backward = sub.add_parser("backward", formatter_class=_Formatter, help="backward map B of an output mask",
                              description="Backward map B(M^f): which input blocks drive the output voxels of a "
                                          "mask. Writes backward (B on the input grid), backward_blocks (block "
                                          "labels), backward.png and summary.json.")
    _common(backward, estimate=True)
    group = backward.add_argument_group("backward mapping")
    group.add_argument("--out-mask", "--mask", dest="out_mask", type=Path, required=True, metavar="LABELS",
                       help="output mask M^f: a label volume on the output (= input) grid, resampled if it "
                            "differs, or a file of named structures (Slicer .seg.nrrd, DICOM RT structure set or "
                            "SEG, or a DICOM folder holding one)")
    selection = group.add_mutually_exclusive_group()
    selection.add_argument("--out-label", "--label", dest="out_label", type=_int_at_least(0), default=None,
                           metavar="N",
                           help="use the voxels of this label of the mask file (needed when it holds several labels)")
    selection.add_argument("--out-segment", "--segment", dest="out_segment", default=None, metavar="NAME",
                           help="use the structure of this name (segment or ROI) of the mask file ('ibix masks "
                                "FILE' lists them)")
    _block_options(group)
    _mapping_options(group, 4)
    group.add_argument("--atlas", type=Path, default=None, metavar="NPZ",
                       help="answer from this response atlas (written by 'ibix atlas' for the same model and "
                            "input): no model evaluation; options that contradict the atlas are refused")
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
    backward.set_defaults(handler=cmd_backward, option_defaults=_parsed_defaults(backward))

    atlas = sub.add_parser("atlas", formatter_class=_Formatter, help="response atlas: B of any output mask later",
                           description="Response atlas: evaluate every block once and keep its response |F(D_k)|, "
                                       "so that 'ibix backward --atlas' answers any output mask with no model "
                                       "evaluation. Writes atlas.npz, atlas_blocks (block labels) and "
                                       "summary.json.")
    _common(atlas, estimate=True)
    group = atlas.add_argument_group("response atlas")
    _block_options(group)
    _jitter_options(group, 4)
    group.add_argument("--atlas-budget", type=_number(0.0, strict_min=True), default=1024.0, metavar="MiB",
                       help="memory the atlas's responses may take (checked before any block is evaluated)")
    atlas.set_defaults(handler=cmd_atlas)

    _cohort_parser(sub)

    masks = sub.add_parser("masks", formatter_class=_Formatter, help="list the structures of a mask file",
                           description="List the structures a mask file holds, by the names --segment and "
                                       "--out-segment take: the segments of a Slicer .seg.nrrd or a DICOM SEG, the "
                                       "ROIs of a DICOM RT structure set, those of every structure file of a DICOM "
                                       "folder, or the values of a label volume.")
    masks.add_argument("path", type=Path, metavar="FILE", help="a mask file or a DICOM folder")
    masks.add_argument("--json", action="store_true", default=False,
                       help="print one JSON object per structure instead of a table")
    masks.set_defaults(handler=cmd_masks)

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

    web = sub.add_parser("web", formatter_class=_Formatter, help="the IBIX page in a browser (pip install ibix[web])",
                         description="Serve the IBIX page (trame-slicer: Slicer's slice views and segment editor in "
                                     "a browser). It binds 127.0.0.1 unless told otherwise and prints its URL with a "
                                     "random access token; reach a server's page through an SSH tunnel.")
    try:
        from IBIXWeb import server as web_server
    except ImportError:  # the web extra is not installed: the command says so when run
        web_server = None
    if web_server is not None:
        web_server.add_arguments(web)
    web.set_defaults(handler=cmd_web, web_server=web_server)
    return parser


# -- commands -----------------------------------------------------------------------------------------------
def _open_case(args: argparse.Namespace) -> tuple[Model, Inputs]:
    """The model and the input volumes a command names (``args.loaded``: when the model was loaded)."""
    model = session.load_model(args.model, args.card, args.device, args.memory_budget)
    args.loaded = time.perf_counter()
    return model, session.load_inputs(args.inputs, model, args.series)


def _mapping_parameters(args: argparse.Namespace, model: Model) -> dict:
    """The engine parameters both mappings take."""
    return {"n_jitters": args.n_jitters, "max_jitter": args.max_jitter, "progressive": args.progressive,
            "tolerance": args.tolerance, "channels": session.channel_arguments(args.channels, model)}


def _figure(args: argparse.Namespace) -> FigureOptions:
    return FigureOptions(png=not args.no_png, slice=args.slice, crop=args.crop)


def cmd_predict(args: argparse.Namespace, console: Console) -> int:
    started = time.perf_counter()
    model, inputs = _open_case(args)
    loaded, read = args.loaded, time.perf_counter()
    with Outputs(args.output, args.format, [*inputs.paths, args.model, args.card], "predict") as outputs:
        outputs.check_volumes(["output"], ["summary.json"])
        _, predict = session.run_predict(model, inputs, outputs, console)
        session.write_summary(outputs, "predict", model, inputs, started, predict=predict,
                              timings=session.timings(args.start_up, started, loaded, read,
                                                      seconds=predict["seconds"]))
    session.finish(console, outputs, [f"predict: {predict['evaluations']} evaluations in {predict['seconds']:.2f} s "
                                      f"on {model.device}"])
    return 0


def cmd_forward(args: argparse.Namespace, console: Console) -> int:
    started = time.perf_counter()
    model, inputs = _open_case(args)
    mask, structure = session.load_structure(args.mask, args.label, inputs.geometry, console, "input mask",
                                             args.segment, inputs.dicom_series)
    read = time.perf_counter()
    if args.estimate:
        session.estimate_only("forward", model, inputs, console, _mapping_parameters(args, model), mask)
        return 0
    with Outputs(args.output, args.format, [*inputs.paths, args.mask, args.model, args.card], "forward") as outputs:
        outputs.check(["summary.json"])
        run = session.run_forward(model, inputs, mask, outputs, console, _mapping_parameters(args, model),
                                  _figure(args))
        result = run.result
        session.write_summary(outputs, "forward", model, inputs, started, mask=str(args.mask), label=args.label,
                              structure=structure, forward=result.to_dict(), figure=run.figure,
                              timings=session.timings(args.start_up, started, args.loaded, read, run))
    session.finish(console, outputs, [f"forward: {result.evaluations} evaluations in {result.seconds:.2f} s on "
                                      f"{result.device}; max |F| = {result.peak:.3g} "
                                      f"{result.units}; {describe(result.statistics)}"])
    return 0


def _atlas_conflicts(args: argparse.Namespace, model: Model, atlas: ResponseAtlas) -> None:
    """Refuse ``ibix backward --atlas`` options that ask for something other than what the atlas holds."""
    defaults, held = args.option_defaults, atlas.parameters
    given = {dest: getattr(args, dest) for dest in defaults
             if hasattr(args, dest) and getattr(args, dest) != defaults[dest]}
    conflicts = []
    for dest in ("n_blocks", "compactness", "n_jitters", "blocks"):
        if dest in given and given[dest] != held[dest]:
            conflicts.append(f"--{dest.replace('_', '-')} {given[dest]} (the atlas has {held[dest]})")
    if "max_jitter" in given and not np.isclose(given["max_jitter"], held["max_jitter"], rtol=1e-6):
        conflicts.append(f"--max-jitter {given['max_jitter']:g} (the atlas has {held['max_jitter']:g})")
    if "channels" in given:
        chosen = channel_indices(model.card, session.channel_arguments(given["channels"], model))
        if [model.card.input.channels[c] for c in chosen] != held["channels"]:
            conflicts.append(f"--channels {' '.join(given['channels'])} (the atlas jittered {held['channels']})")
    for dest in ("block_labels", "coarse_blocks", "progressive", "tolerance", "method", "locality_tolerance",
                 "tiles"):
        if dest in given:
            flag = "--no-tiles" if dest == "tiles" else f"--{dest.replace('_', '-')}"
            conflicts.append(f"{flag} (an atlas answers from its own blocks and responses)")
    if conflicts:
        raise InputError(f"{args.atlas}: options that contradict the response atlas: {'; '.join(conflicts)}; "
                         "leave them out, or compute a new atlas with them (ibix atlas)")


def cmd_backward(args: argparse.Namespace, console: Console) -> int:
    started = time.perf_counter()
    model, inputs = _open_case(args)
    atlas = None
    if args.atlas is not None:
        atlas = ResponseAtlas.load(args.atlas, model, inputs.x, inputs.geometry)
        _atlas_conflicts(args, model, atlas)
    mask, structure = session.load_structure(args.out_mask, args.out_label, inputs.geometry, console, "output mask",
                                             args.out_segment, inputs.dicom_series)
    blocks: Any = (args.blocks if args.block_labels is None
                   else session.load_block_labels(args.block_labels, inputs.geometry))
    read = time.perf_counter()
    if atlas is not None:
        parameters: dict = {"normalization": args.normalization}
    else:
        parameters = dict(_mapping_parameters(args, model), n_blocks=args.n_blocks, compactness=args.compactness,
                          blocks=blocks, normalization=args.normalization, coarse_blocks=args.coarse_blocks,
                          refine_threshold=args.refine_threshold, method=args.method,
                          locality_tolerance=args.locality_tolerance, tiles=args.tiles)
    if args.estimate:
        session.estimate_only("backward", model, inputs, console, parameters, mask, atlas)
        return 0
    with Outputs(args.output, args.format, [*inputs.paths, args.out_mask, args.block_labels, args.model, args.card,
                                            args.atlas], "backward") as outputs:
        outputs.check(["summary.json"])
        run = session.run_backward(model, inputs, mask, outputs, console, parameters, _figure(args), atlas=atlas)
        result = run.result
        session.write_summary(outputs, "backward", model, inputs, started, mask=str(args.out_mask),
                              label=args.out_label, structure=structure,
                              block_labels=None if args.block_labels is None else str(args.block_labels),
                              atlas=None if args.atlas is None else str(args.atlas),
                              backward=result.to_dict(), figure=run.figure,
                              timings=session.timings(args.start_up, started, args.loaded, read, run))
    radius = result.radius or {}
    session.finish(console, outputs, [
        f"backward: {result.evaluations} evaluations (per level {result.evaluations_per_level}) in "
        f"{result.seconds:.2f} s on {result.device}; {int(result.labels.max())} blocks; max B = "
        f"{float(result.block_values.max()):.3g}"
        + (f"; response radius {radius['radius']} voxels" if radius.get("radius") is not None else "")
        + f"; {describe(result.statistics)}"])
    return 0


def cmd_cohort(args: argparse.Namespace, console: Console) -> int:
    try:
        with console.progress(unit="case") as progress:
            result = cohort.run_cohort(args.manifest, args.model, args.mapping, args.output, card=args.card,
                                       workers=args.workers, scheduler=args.scheduler, fmt=args.format,
                                       device=args.device, progress=progress)
    except KeyboardInterrupt:
        return _fail(console, "cohort", f"interrupted; the cases finished so far are kept in {args.output} (a rerun "
                                        "skips them and runs the others), cases in progress were discarded, "
                                        "cohort.csv and report.html are those of the last complete run",
                     INTERRUPTED)
    console.out(f"cohort: {len(result.rows)} cases, {len(result.rows) - result.failed} ok, {result.failed} failed "
                f"({result.ran} run now, {result.skipped} finished earlier)")
    for row in result.rows:
        if row["status"] != "ok":
            console.out(f"  failed {row['case']}: {row['error']}")
    files = {"cohort_csv": result.csv, "report": result.report}
    for path in files.values():
        console.out(f"  wrote {path}")
    console.finished(files, None, cases={"total": len(result.rows), "failed": result.failed, "run": result.ran,
                                         "skipped": result.skipped})
    return CASES_FAILED if result.failed else 0


def cmd_atlas(args: argparse.Namespace, console: Console) -> int:
    started = time.perf_counter()
    model, inputs = _open_case(args)
    blocks: Any = (args.blocks if args.block_labels is None
                   else session.load_block_labels(args.block_labels, inputs.geometry))
    read = time.perf_counter()
    parameters = {"n_blocks": args.n_blocks, "compactness": args.compactness, "blocks": blocks,
                  "n_jitters": args.n_jitters, "max_jitter": args.max_jitter,
                  "channels": session.channel_arguments(args.channels, model),
                  "memory_budget": int(args.atlas_budget * 2**20)}
    if args.estimate:
        session.estimate_only("atlas", model, inputs, console, parameters)
        return 0
    with Outputs(args.output, args.format, [*inputs.paths, args.block_labels, args.model, args.card],
                 "atlas") as outputs:
        outputs.check(["summary.json"])
        before = time.perf_counter()
        atlas = session.run_atlas(model, inputs, outputs, console, parameters)
        written = time.perf_counter() - before - atlas.seconds
        session.write_summary(outputs, "atlas", model, inputs, started,
                              block_labels=None if args.block_labels is None else str(args.block_labels),
                              atlas=atlas.to_dict(),
                              timings=session.timings(args.start_up, started, args.loaded, read, seconds=atlas.seconds,
                                                      write=written))
    session.finish(console, outputs, [
        f"atlas: {atlas.n_blocks} blocks, {atlas.evaluations} evaluations in {atlas.seconds:.2f} s on "
        f"{atlas.device}; {atlas.nbytes / 2**20:.1f} MiB; answer any output mask with "
        f"'ibix backward --atlas {outputs.written['atlas']} ...'"])
    return 0


def cmd_masks(args: argparse.Namespace, console: Console) -> int:
    found = structures.list_structures(args.path)
    if args.json:
        for structure in found:
            print(json.dumps(structure.to_dict() | {"details": structure.details}))
        return 0
    if not found:
        print(f"{args.path}: no structure")
        return 0
    files = list(dict.fromkeys(s.file for s in found))
    for file in files:
        rows = [s for s in found if s.file == file]
        first = rows[0]
        where = ("" if not first.referenced_series else
                 f"; refers to series {', '.join(first.referenced_series)}")
        noun = "value" if first.format == structures.LABELS else "structure"
        print(f"{file}: {structures.FORMAT_NAMES[first.format]}, {len(rows)} {noun}{'s' if len(rows) != 1 else ''}"
              f"{where}")
        width = max(len(str(s.name)) for s in rows) if rows[0].name is not None else 0
        for s in rows:
            number = "" if s.number is None else str(s.number)
            name = "" if s.name is None else s.name
            print(f"  {number:>5}  {name:<{width}}  {s.details}".rstrip())
    return 0


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    run_demo(args.output, quick=args.quick, figures_dir=args.figures, device=args.device, fmt=args.format,
             console=console)
    return 0


def cmd_web(args: argparse.Namespace, console: Console) -> int:
    if args.web_server is None:
        raise InputError("the web page needs the web extra: pip install \"ibix[web]\" (trame-slicer)")
    return args.web_server.main(args)


# -- entry point --------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None, start_up: float | None = None) -> int:
    """Run the ``ibix`` command line; returns the exit code (the console script passes it to sys.exit).

    ``start_up``: seconds this process spent before the command (its summary's ``timings.start_up``); default the
    process's age, 0 for a job of an engine process that was started ahead of time."""
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("ibix: error: choose a command: predict, forward, backward, atlas, cohort, masks, demo or web "
              "(ibix --help)", file=sys.stderr)
        return 2
    args.start_up = session.process_age() if start_up is None else start_up  # Python and the imports
    console = Console(quiet=getattr(args, "quiet", False), progress_format=getattr(args, "progress_format", "human"))
    engine_log = logging.getLogger("IBIX")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("ibix: %(message)s"))
    engine_log.addHandler(handler)
    previous_level = engine_log.level
    engine_log.setLevel(logging.ERROR if console.quiet else logging.WARNING)
    try:
        return args.handler(args, console)
    except IBIXError as exc:
        return _fail(console, args.command, f"error: {exc}", USAGE)
    except KeyboardInterrupt:
        return _fail(console, args.command, "interrupted; the output folder holds the previous results (or the "
                                            "new ones, if they were complete), nothing half-written", INTERRUPTED)
    except MemoryError as exc:
        return _fail(console, args.command, f"error: out of memory ({exc}); lower --memory-budget or use a smaller "
                                            "volume", 1)
    except Exception as exc:  # anything unexpected: a short message, the traceback with IBIX_DEBUG=1
        if os.environ.get("IBIX_DEBUG"):
            traceback.print_exc()
        return _fail(console, args.command, f"unexpected error: {type(exc).__name__}: {exc} (set IBIX_DEBUG=1 "
                                            "for the traceback)", 1)
    finally:
        engine_log.removeHandler(handler)
        engine_log.setLevel(previous_level)


def _fail(console: Console, command: str, message: str, code: int) -> int:
    """Report a failed command on stderr (and as the last JSON-lines record); return its exit code."""
    print(f"ibix {command}: {message}", file=sys.stderr)
    console.failed(message)
    return code


if __name__ == "__main__":
    sys.exit(main())
