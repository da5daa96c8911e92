"""What the command line, the demo and cohorts share: load a case from files, run one mapping, write its files.

One path per mapping (:func:`run_forward`, :func:`run_backward`, :func:`run_predict`, :func:`run_atlas`): each runs
the engine on loaded inputs and writes the volumes, the PNG figure and returns what ``summary.json`` says about it,
so that ``ibix forward``, ``ibix backward``, ``ibix demo`` and ``ibix cohort`` produce the same files the same way.
Messages go through a :class:`Console`: results on stdout, notes and progress on stderr; with the JSON-lines
progress format, stdout carries only machine-readable records (see :class:`JsonLinesProgress`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import __version__, figures, folders
from .atlas import ResponseAtlas, block_response_atlas
from .backward import BackwardResult, backward_mapping
from .cost import ADVICE_FROM_SECONDS, Estimate, estimate as estimate_of
from .errors import IBIXError, InputError, short_path
from .forward import ForwardResult, forward_mapping
from .geometry import Geometry, slice_array_axis
from .dicom import read_series
from .errors import is_folder
from .io import read_mask, read_volume, write_volume
from .structures import LABELS, is_structure_source, read_structure
from .model import Model, load_model as engine_load_model
from .pipeline import PreparedInput

FORMATS = {"nrrd": ".nrrd", "nifti": ".nii.gz"}
PROGRESS_FORMATS = ("human", "jsonl")
#: Grey levels of an output in Hounsfield units under F (the soft-tissue window, level 40, width 400).
CT_WINDOW = (-160.0, 240.0)


# -- console and progress -----------------------------------------------------------------------------------
class Progress:
    """A ``progress(done, total, message)`` callback for the engine that drives a tqdm bar on stderr.

    The bar appears only when a step takes more than a second, shows the time left, and starts afresh when the
    engine's message or total changes (e.g. the levels of a coarse-to-fine backward mapping).
    """

    def __init__(self, enabled: bool = True, unit: str = "step"):
        self.enabled = enabled
        self.unit = unit
        self.bar = None
        self.key: tuple[str, int] | None = None

    def __call__(self, done: int, total: int, message: str) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if self.bar is None or self.key != (message, total) or done < self.bar.n:
            self.close()
            self.bar = tqdm(total=total, desc=message, unit=self.unit, file=sys.stderr, delay=1.0, leave=False,
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


class JsonLinesProgress(Progress):
    """Progress as JSON lines on stdout: ``{"stage": message, "done": n, "total": m}``, one object per line.

    For programs that run ``ibix`` in a child process (the Slicer module does): each line parses on its own and
    is flushed at once. Consecutive reports of one stage are sent at most every ``interval`` seconds, except
    the last one of the stage.
    """

    def __init__(self, stream: Any = None, interval: float = 0.1):
        super().__init__(enabled=True)
        self.stream, self.interval = stream, interval
        self._last: tuple[str, float] = ("", 0.0)

    def __call__(self, done: int, total: int, message: str) -> None:
        now = time.monotonic()
        if message == self._last[0] and done < total and now - self._last[1] < self.interval:
            return
        self._last = (message, now)
        write_record({"stage": message, "done": int(done), "total": int(total)}, self.stream)

    def close(self) -> None:
        self._last = ("", 0.0)


def write_record(record: dict, stream: Any = None) -> None:
    """One JSON-lines record on ``stream`` (stdout by default), flushed."""
    stream = stream or sys.stdout
    stream.write(json.dumps(record, default=_json_default) + "\n")
    stream.flush()


class Console:
    """Where messages go: results on stdout, notes and progress on stderr, nothing but errors when quiet.

    With ``progress_format="jsonl"`` stdout carries JSON lines only (progress records, then one ``finished``
    or ``failed`` record) and the human results go to stderr.
    """

    def __init__(self, quiet: bool = False, progress_format: str = "human"):
        if progress_format not in PROGRESS_FORMATS:
            raise InputError(f"progress format must be one of {PROGRESS_FORMATS}, got {progress_format!r}")
        self.quiet = quiet
        self.jsonl = progress_format == "jsonl"

    def out(self, text: str = "") -> None:
        if not self.quiet:
            print(text, file=sys.stderr if self.jsonl else sys.stdout, flush=True)

    def note(self, text: str) -> None:
        if not self.quiet:
            print(f"ibix: {text}", file=sys.stderr, flush=True)

    def progress(self, unit: str = "step") -> Progress:
        """The engine's progress callback: JSON lines, or a bar counting ``unit`` (nothing when quiet)."""
        return JsonLinesProgress() if self.jsonl else Progress(enabled=not self.quiet, unit=unit)

    def estimate(self, found: Estimate, always: bool = False) -> None:
        """A run's estimate (:mod:`IBIXLogic.cost`): the ``estimate`` record with JSON lines; otherwise a line on
        stderr when the run is predicted to be long (from ADVICE_FROM_SECONDS), or ``always`` on stdout (the
        answer of ``--estimate``)."""
        if self.jsonl:
            write_record(found.record())
        elif always:
            self.out(found.describe())
        elif found.seconds >= ADVICE_FROM_SECONDS:
            self.note(found.describe())

    def finished(self, files: dict[str, Path], summary: Path | None, **extra: Any) -> None:
        """The last record of a successful run (JSON lines only; absolute paths; ``extra`` keys added)."""
        if self.jsonl:
            write_record({"stage": "finished", "files": {k: str(Path(v).resolve()) for k, v in files.items()},
                          "summary": None if summary is None else str(Path(summary).resolve()), **extra})

    def failed(self, message: str) -> None:
        """The last record of a failed run (JSON lines only)."""
        if self.jsonl:
            write_record({"stage": "failed", "error": message})


# -- loading ------------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """Input volumes (one per channel) on one grid, and the DICOM series each was read from (None for a file)."""

    arrays: list[np.ndarray]
    geometry: Geometry
    paths: list[Path]
    series: list[Any] = field(default_factory=list)

    @property
    def x(self) -> Any:
        return self.arrays[0] if len(self.arrays) == 1 else self.arrays

    @property
    def dicom_series(self) -> list[Any]:
        """The :class:`IBIXLogic.dicom.Series` of the inputs read from DICOM folders."""
        return [s for s in self.series if s is not None]


def load_model(path: Path, card: Path | None, device: str = "auto", memory_budget_mib: float | None = None) -> Model:
    """The model and its card from files (the card beside the model, or inferred, when ``card`` is None); the
    engine's default batch memory budget when ``memory_budget_mib`` is None."""
    if card is not None and not Path(card).is_file():
        raise InputError(f"{card}: model card not found")
    return engine_load_model(path, card=None if card is None else str(card), device=device,
                             memory_budget=None if memory_budget_mib is None else int(memory_budget_mib * 2**20))


def series_per_input(paths: Sequence[Path], series: Sequence[str] | None) -> list[str | None]:
    """The SeriesInstanceUID to read from each input: ``series`` holds one per DICOM folder among ``paths``, in
    their order (or is empty: each folder then holds one image series)."""
    folders = [p for p in paths if is_folder(p)]
    series = [str(s).strip() for s in series or []]
    if series and len(series) != len(folders):
        raise InputError(f"{len(series)} series UID(s) given for {len(folders)} DICOM folder input(s)"
                         + (f" ({', '.join(str(p) for p in folders)})" if folders else "")
                         + "; give one --series per DICOM folder --input, in the same order, or none")
    chosen = iter(series)
    return [next(chosen, None) if is_folder(p) else None for p in paths]


def load_inputs(paths: Sequence[Path], model: Model, series: Sequence[str] | None = None) -> Inputs:
    """Read one volume per card channel (a file, or a DICOM folder: ``series`` as in :func:`series_per_input`) and
    check they share one grid."""
    names = list(model.card.input.channels)
    if len(paths) != len(names):
        raise InputError(f"the model {model.path.name} takes {len(names)} input channel(s) {names} but "
                         f"{len(paths)} --input volume(s) were given ({', '.join(str(p) for p in paths)}); "
                         "pass one --input per channel, in that order")
    arrays, geometries, found = [], [], []
    for path, uid in zip(paths, series_per_input(paths, series)):
        if is_folder(path):
            array, geometry, info = read_series(path, uid)
        else:
            (array, geometry), info = read_volume(path), None
        found.append(info)
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
    return Inputs(arrays, geometries[0], list(paths), found)


def load_structure(path: Path, label: int | None, reference: Geometry, console: Console, what: str,
                   segment: str | None = None, series: Sequence[Any] = ()) -> tuple[np.ndarray, dict]:
    """A mask on the input grid and what ``summary.json`` records about it (file, format, name or label).

    A label volume on another grid is resampled (nearest neighbour) if it overlaps; a structure by name (a
    .seg.nrrd, DICOM RT structure set or SEG) is placed on the input's grid, a DICOM one after checking that it
    refers to the input ``series``.
    """
    if is_structure_source(path, label, segment):
        mask, structure, notes = read_structure(path, segment, reference, series)
        for note in notes:
            console.note(f"{path}: {note}")
        return mask, structure.to_dict()
    _, geometry = read_volume(path)
    mask = read_mask(path, label=label, reference=reference)  # refuses a mask that cannot be resampled
    if not geometry.matches(reference):
        console.note(f"{path}: the {what}'s grid (shape {geometry.shape}, spacing {geometry.spacing}) differs from "
                     f"the input's (shape {reference.shape}, spacing {reference.spacing}); resampled onto the "
                     "input's grid (nearest neighbour)")
    return mask, {"file": str(path), "format": LABELS, "name": None, "number": label}


def load_mask(path: Path, label: int | None, reference: Geometry, console: Console, what: str,
              segment: str | None = None, series: Sequence[Any] = ()) -> np.ndarray:
    """The mask of :func:`load_structure`."""
    return load_structure(path, label, reference, console, what, segment, series)[0]


def load_block_labels(path: Path, reference: Geometry) -> np.ndarray:
    """A block label volume on the input's grid, as integers."""
    labels, geometry = read_volume(path)
    if not geometry.matches(reference):
        raise InputError(f"{path}: the block labels' grid (shape {geometry.shape}) differs from the "
                         f"input's (shape {reference.shape}); give block labels on the input's grid")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise InputError(f"{path}: block labels must be whole numbers")
    return labels if np.issubdtype(labels.dtype, np.integer) else labels.astype(np.int64)  # the engine relabels


def channel_arguments(values: Sequence[str] | None, model: Model) -> list[str | int] | None:
    """Channel names or indices given as text (card names win over numbers)."""
    if values is None:
        return None
    names = list(model.card.input.channels)
    return [int(v) if v not in names and v.lstrip("-").isdigit() else v for v in values]


# -- output -------------------------------------------------------------------------------------------------
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


class Outputs:
    """A run's result folder, written as one unit.

    Every run (``ibix predict``/``forward``/``backward``/``atlas``, the demo, each case of a cohort, the cohort
    itself) writes its folder through this class, which :func:`IBIXLogic.folders` backs: :meth:`check` takes the
    folder's lock (refusing a second run into it, naming the first), completes or removes what killed runs left,
    refuses to overwrite inputs, and opens a staging folder; the run's files are written there (:meth:`path`,
    :meth:`write_volume`, :meth:`write_json`, :meth:`add`); :meth:`commit` writes ``summary.json`` (listing every
    file) and moves the set into place in one step, removing the files the earlier run's summary listed that this
    run does not write. Until then the folder holds the earlier run's set untouched; closing without a commit (an
    error, an interrupt) removes the staging folder. Use it as a context manager.

    To add a file to every run of a kind, write it at ``outputs.path(name)`` and register it with
    ``outputs.add(role, path)`` (or use :meth:`write_volume` / :meth:`write_json`); to add a field to the summary,
    pass it to :func:`write_summary` (or put it in the dict given to :meth:`commit`).

    ``written`` maps each file's role (``forward_signed``, ``forward_png``, ``summary``, ...) to the path it has in
    the folder once committed; ``publish`` is the folder the summary names when the folder itself is renamed
    afterwards (a cohort case, written in a temporary folder).
    """

    def __init__(self, folder: Path, fmt: str, protected: Sequence[Path | None], command: str = "",
                 publish: Path | None = None):
        self.folder = Path(os.path.abspath(folder))
        self.suffix = FORMATS[fmt]
        self.protected = {_resolved(Path(p)) for p in protected if p is not None}
        self.command = command
        self.published = Path(os.path.abspath(publish)) if publish is not None else self.folder
        self.written: dict[str, Path] = {}
        self.notes: list[str] = []
        self._staged: dict[str, Path] = {}
        self._staging: Path | None = None
        self._lock: folders.FolderLock | None = None

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if isinstance(error, IBIXError) and self._staging is not None:  # name files where the user will look
            error.args = tuple(a.replace(str(self._staging), str(self.folder)) if isinstance(a, str) else a
                               for a in error.args)
        self.close()

    # -- planning ---------------------------------------------------------------------------------------------
    def volume(self, stem: str) -> Path:
        return self.path(stem + self.suffix)

    def final(self, name: str) -> Path:
        """Where the file ``name`` will be once the run is committed."""
        return self.published / name

    def path(self, name: str) -> Path:
        """Where the run writes the file ``name`` (in its staging folder)."""
        self.check([name])
        return self._staging / name

    def preview(self, stem: str) -> Path:
        """Where a progressive run shows its preview map while it runs (a hidden file in the folder itself)."""
        self.check()
        return self.folder / f".{stem}_preview{self.suffix}"

    def check(self, names: Sequence[str] = ()) -> None:
        """Refuse names that are inputs and a folder inside an input folder (a DICOM series' folder is never written
        into); create the folder, take its lock, recover it, open the staging folder."""
        for name in names:
            if _resolved(self.folder / name) in self.protected:
                raise InputError(f"{self.folder / name}: writing it would overwrite an input file; choose another "
                                 "--output folder")
        if self._staging is not None:
            return
        folder = _resolved(self.folder)
        for protected in self.protected:
            if (folder == protected or protected in folder.parents) and protected.is_dir():
                raise InputError(f"{self.folder}: the output folder is inside the input folder {protected}; IBIX "
                                 "never writes into an input's folder: choose another --output folder")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except (OSError, RuntimeError) as exc:
            raise InputError(f"{short_path(self.folder)}: cannot create the output folder "
                             f"({getattr(exc, 'strerror', None) or exc})") from None
        if not self.folder.is_dir():
            raise InputError(f"{short_path(self.folder)}: the output folder is not a folder")
        lock = folders.FolderLock(self.folder, self.command)
        taken = lock.acquire()
        try:
            if taken and taken.get("pid"):
                self.notes.append(f"took over the lock of process {taken['pid']}, which is gone")
            self.notes += folders.recover(self.folder)
            earlier = [self.folder / n for n in folders.listed_files(self.folder)]
            inputs = [p for p in earlier if _resolved(p) in self.protected]
            if inputs:
                raise InputError(f"{inputs[0]}: an input of this run is a file of the earlier run in "
                                 f"{self.folder}, which this run's results replace; choose another --output folder "
                                 "(or move the file out of it)")
            self._staging = folders.new_staging(self.folder)
        except OSError as exc:
            lock.release()
            raise InputError(f"{short_path(self.folder)}: the output folder is not writable "
                             f"({exc.strerror or exc})") from None
        except BaseException:
            lock.release()
            raise
        self._lock = lock

    def check_volumes(self, stems: Sequence[str], extra: Sequence[str] = ()) -> None:
        """:meth:`check` for volumes named by their stems, and other files."""
        self.check([s + self.suffix for s in stems] + list(extra))

    # -- writing ----------------------------------------------------------------------------------------------
    def add(self, role: str, path: Path) -> Path:
        """Register a file written at :meth:`path` as one of the run's files, under ``role``."""
        path = Path(path)
        self._staged[role] = path
        self.written[role] = self.final(path.name)
        return self.written[role]

    def write_volume(self, stem: str, array: np.ndarray, geometry: Geometry) -> Path:
        return self.add(stem, write_volume(self.volume(stem), array, geometry))

    def write_json(self, name: str, content: dict, role: str) -> Path:
        path = self.path(name)
        try:
            path.write_text(json.dumps(content, indent=2, default=_json_default) + "\n")
        except OSError as exc:
            raise InputError(f"{self.folder / name}: cannot write ({exc.strerror or exc})") from None
        return self.add(role, path)

    def commit(self, summary: dict) -> Path:
        """Write ``summary.json`` (``summary`` with ``files``: every file of the run, absolute paths) and move the
        run's files into the folder as one unit, in place of the earlier run's; returns the summary's path."""
        self.check()
        missing = [role for role, path in self._staged.items() if not path.is_file()]
        if missing:
            raise InputError(f"{self.folder}: the run's files {missing} were not written; nothing was changed")
        content = dict(summary)
        content["files"] = [str(p) for p in self.written.values()] + [str(self.final("summary.json"))]
        self.write_json("summary.json", content, "summary")
        try:
            with folders.signals_deferred():
                folders.publish(self.folder, self._staging)
        except OSError as exc:
            raise InputError(f"{self.folder}: cannot move the results into place ({exc.strerror or exc}); the "
                             "next run into this folder completes it") from None
        self._staging = None
        return self.written["summary"]

    def close(self) -> None:
        """Remove the staging folder of a run that did not commit, and release the folder's lock (an interrupt
        meanwhile waits until both are done)."""
        with folders.signals_deferred():
            staging, self._staging = self._staging, None
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            if self._lock is not None:
                self._lock.release()
                self._lock = None


def _resolved(path: Path) -> Path:
    """The real path of ``path``; a path that cannot be resolved (a link loop) is refused by name."""
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:
        raise InputError(f"{short_path(path)}: the path cannot be resolved ({getattr(exc, 'strerror', None) or exc}; "
                         "a symbolic link loop?); choose another path") from None


class Preview:
    """The engine's ``preview(map, N)`` callback: writes ``.<stem>_preview`` in the folder and removes it once the
    run ends."""

    def __init__(self, outputs: Outputs, stem: str, geometry: Geometry, console: Console, progress: Progress):
        self.outputs, self.stem, self.geometry = outputs, stem, geometry
        self.console, self.progress = console, progress
        self.path: Path | None = None

    def __call__(self, values: np.ndarray, n_jitters: int) -> None:
        self.path = write_volume(self.outputs.preview(self.stem), values, self.geometry)
        self.progress.close()
        self.console.note(f"preview with N = {n_jitters} written to {self.path}")

    def __enter__(self) -> "Preview":
        return self

    def __exit__(self, *exc) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


# -- figures ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FigureOptions:
    """What the PNG of a map shows: ``slice`` (array index; None: a montage the mask touches), the field of
    view ``crop`` ("roi", "body" or "none"), and ``png`` False for none."""

    png: bool = True
    slice: int | None = None
    crop: str = "roi"


def figure_axis(model: Model, geometry: Geometry, ndim: int) -> int | None:
    """Array axis the PNGs slice along: a 2D model's slice axis, else the axial axis (None for a 2D image)."""
    preferred = None
    if ndim == 3 and model.card.spatial_dims == 2:
        preferred = slice_array_axis(geometry, model.card.slice_axis or "axial")
    return figures.display_axis(geometry, ndim, preferred)


def output_on_slices(model: Model, inputs: Inputs, axis: int | None, slices: Sequence[int],
                     known: dict | None = None, preparation: PreparedInput | None = None,
                     reach: tuple[int, int] | None = None) -> tuple[np.ndarray, int]:
    """The model output on the given slices only (zeros elsewhere) and the evaluations it took.

    ``known``: unperturbed outputs a mapping already computed (``ForwardResult.outputs``: a 2D model's slices by
    index along its slice axis, or a 3D model's volume as 0); only what they miss is evaluated. ``preparation``:
    how that mapping prepared the input (``ForwardResult.preparation``), so that its intensity mapping is reused,
    not computed again. ``reach``: (response radius, tile alignment) of a 3D model whose map ran in tiles: its
    output on the slices is then that of a slab of whole slices around them, with the radius of context on each
    side and starting at a multiple of the alignment (what the tiles were checked to reproduce), not of the whole
    volume.
    """
    known = known or {}
    before = model.evaluations
    shape = inputs.arrays[0].shape
    if model.card.spatial_dims == 2 and len(shape) == 3 and axis == figure_axis(model, inputs.geometry, 3):
        output = np.zeros(shape, np.float32)  # untouched pages stay unallocated: only the slices shown are filled
        found = dict(known)
        missing = [s for s in slices if s not in found]
        if missing:
            prepared = model.prepare(inputs.x, inputs.geometry) if preparation is None else preparation
            slab = [np.take(v, missing, axis=prepared.slice_axis) for v in inputs.arrays]
            samples = np.stack([prepared.to_samples(c) for c in slab], axis=1).astype(np.float32)
            part = dataclasses.replace(prepared, samples=samples)
            values = part.from_samples(model.predict_samples(part))
            for i, s in enumerate(missing):
                found[s] = np.take(values, i, axis=prepared.slice_axis)
        for s in slices:
            index = [slice(None)] * 3
            index[axis] = s
            output[tuple(index)] = found[s]
        return output, model.evaluations - before
    if 0 in known and known[0].shape == shape:
        return known[0], 0
    if preparation is not None and preparation.slice_axis is None:  # one float32 copy of the channels
        part = dataclasses.replace(preparation, samples=np.stack(inputs.arrays, dtype=np.float32)[None])
        if reach is not None and axis is not None:
            return _output_in_slab(model, part, axis, slices, *reach), model.evaluations - before
        return part.from_samples(model.predict_samples(part)), model.evaluations - before
    return model.predict(inputs.x, inputs.geometry), model.evaluations - before


def _output_in_slab(model: Model, prepared: PreparedInput, axis: int, slices: Sequence[int], radius: int,
                    align: int) -> np.ndarray:
    """A 3D model's output on ``slices`` (along array ``axis``; zeros elsewhere) from one evaluation of the slab of
    whole slices that holds them and ``radius`` slices of context on each side, starting at a multiple of
    ``align`` in the padded volume."""
    from .perturb import Perturber

    perturber = Perturber(model, prepared, np.ones(1), [0], None)
    padded = model.pipeline.padded_shape(prepared.sample_shape)
    before = perturber.pads[axis][0]
    low = max(0, (min(slices) + before - radius) // align * align)
    high = min(padded[axis], -(-(max(slices) + before + radius + 1) // align) * align)
    window = [slice(0, n) for n in padded]
    window[axis] = slice(low, high)
    values = model.run(perturber.window_input(0, tuple(window))[None].copy(), prepared,
                       lambda i: "the unperturbed input (the slab of the figure's slices)")[0]
    source, target = perturber.overlap(tuple(window))
    slab = values[target]  # the part of the slab in the volume, from volume index source[axis].start on
    output = np.zeros(prepared.sample_shape, np.float32)  # untouched pages stay unallocated
    for s in slices:
        np.moveaxis(output, axis, 0)[s] = np.moveaxis(slab, axis, 0)[s - source[axis].start]
    return prepared.from_samples(output[None])


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def forward_png(path: Path, model: Model, inputs: Inputs, output: np.ndarray, result: ForwardResult,
                mask: np.ndarray, axis: int | None, slices: Sequence[int], crop: str = "roi", **kw) -> Path:
    """The forward map's PNG: |F| over the model's output, the input mask outlined."""
    p = result.parameters
    subtitle = (f"{model.card.name or model.path.name} · channels {', '.join(p['channels'])} · N = {p['n_jitters']} "
                f"jitters up to H = {_fmt(p['max_jitter'])} · {result.evaluations} evaluations in "
                f"{result.seconds:.1f} s on {result.device} · max |F| = {_fmt(result.peak)}")
    name = model.card.output.channels[0] if model.card.output.channels else "output"
    units = model.card.output.units
    if units == "HU" and "window" not in kw:
        kw["window"] = CT_WINDOW
    return figures.forward_figure(path, output, result.signed, mask, inputs.geometry, axis, slices,
                                  result.units, f"{name}{', ' + units if units else ''}", subtitle=subtitle,
                                  crop=crop, crop_reference=inputs.arrays[0], **kw)


def backward_png(path: Path, model: Model, inputs: Inputs, result: BackwardResult, mask: np.ndarray,
                 axis: int | None, slices: Sequence[int], crop: str = "roi", background_channel: int = 0,
                 **kw) -> Path:
    """The backward map's PNG: B over an input channel, the output mask outlined."""
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


# -- one mapping from loaded inputs to files ----------------------------------------------------------------
@dataclass
class MappingRun:
    """One mapping's result, its slices shown in the PNG and what the summary says about the figure."""

    result: Any
    axis: int | None
    slices: list[int]
    figure: dict = field(default_factory=dict)
    write_seconds: float = 0.0  # writing the result's volumes


def run_predict(model: Model, inputs: Inputs, outputs: Outputs, console: Console) -> tuple[np.ndarray, dict]:
    """The model's output written as ``output``; returns it with what the summary says about it."""
    t0, before = time.perf_counter(), model.evaluations
    with console.progress() as progress:
        output = model.predict(inputs.x, inputs.geometry, progress=progress)
    seconds, evaluations = time.perf_counter() - t0, model.evaluations - before
    outputs.write_volume("output", output, inputs.geometry)
    return output, {"evaluations": evaluations, "seconds": round(seconds, 4), "device": model.device,
                    "units": model.card.output.units}


def _run_mapping(mapping: Any, model: Model, inputs: Inputs, mask: np.ndarray, outputs: Outputs,
                 console: Console, parameters: dict, figure: FigureOptions, volumes: dict[str, str],
                 png: str, preview_stem: str) -> MappingRun:
    """Run ``mapping`` with progress and previews, and write the result's attributes named in ``volumes``
    (file stem -> attribute); the caller draws the PNG ``png``."""
    axis = figure_axis(model, inputs.geometry, inputs.arrays[0].ndim)
    slices = figures.choose_slices(mask, axis, requested=figure.slice)
    outputs.check_volumes(list(volumes), [png] if figure.png else [])
    with console.progress() as progress, \
            Preview(outputs, preview_stem, inputs.geometry, console, progress) as preview:
        result = mapping(model, inputs.x, mask, geometry=inputs.geometry, progress=progress, preview=preview,
                         estimate=console.estimate, **parameters)
    started = time.perf_counter()
    for stem, attribute in volumes.items():
        outputs.write_volume(stem, getattr(result, attribute), result.geometry)
    return MappingRun(result, axis, slices, write_seconds=time.perf_counter() - started)


def run_forward(model: Model, inputs: Inputs, mask: np.ndarray, outputs: Outputs, console: Console,
                parameters: dict, figure: FigureOptions = FigureOptions(), output: np.ndarray | None = None
                ) -> MappingRun:
    """Forward map F of ``mask`` written as ``forward_signed``, ``forward_normalized`` and ``forward.png``.

    ``parameters`` go to :func:`IBIXLogic.forward_mapping`; ``output`` is the model's output under the PNG
    (computed on the shown slices when not given). A progressive run writes a preview that it removes.
    """
    run = _run_mapping(forward_mapping, model, inputs, mask, outputs, console, parameters, figure,
                       {"forward_signed": "signed", "forward_normalized": "normalized"}, "forward.png",
                       "forward_normalized")
    if figure.png:
        t0, evaluations = time.perf_counter(), 0
        if output is None:
            tiling = run.result.tiling or {}
            reach = ((run.result.radius or {}).get("radius"), tiling.get("alignment")) if tiling.get("tiles") else None
            output, evaluations = output_on_slices(model, inputs, run.axis, run.slices, run.result.outputs,
                                                   run.result.preparation, reach)
        outputs.add("forward_png", forward_png(outputs.path("forward.png"), model, inputs, output, run.result, mask,
                                               run.axis, run.slices, crop=figure.crop))
        run.figure = {"slices": run.slices, "axis": run.axis, "evaluations": evaluations,
                      "seconds": round(time.perf_counter() - t0, 3)}
    return run


def _answer_from(atlas: ResponseAtlas):
    """A backward mapping that answers from ``atlas``: no model evaluation, nothing to preview or report."""
    def answer(model: Model, x: Any, mask: np.ndarray, normalization: str = "fraction", estimate: Any = None,
               **run: Any) -> BackwardResult:
        if estimate is not None:
            estimate(Estimate(0, 0.0, note="answered from the response atlas", device=model.device))
        return atlas.backward(mask, normalization)
    return answer


def run_backward(model: Model, inputs: Inputs, mask: np.ndarray, outputs: Outputs, console: Console,
                 parameters: dict, figure: FigureOptions = FigureOptions(), background_channel: int = 0,
                 atlas: ResponseAtlas | None = None) -> MappingRun:
    """Backward map B of ``mask`` written as ``backward``, ``backward_blocks`` and ``backward.png``.

    ``parameters`` go to :func:`IBIXLogic.backward_mapping`, or, with a response ``atlas`` (checked against the
    model and inputs by the caller), to :meth:`ResponseAtlas.backward`, which runs no model; the PNG shows B over
    input channel ``background_channel``. A progressive run writes a preview that it removes.
    """
    mapping = backward_mapping if atlas is None else _answer_from(atlas)
    run = _run_mapping(mapping, model, inputs, mask, outputs, console, parameters, figure,
                       {"backward": "map", "backward_blocks": "labels"}, "backward.png", "backward")
    if figure.png:
        t0 = time.perf_counter()
        outputs.add("backward_png", backward_png(outputs.path("backward.png"), model, inputs, run.result, mask,
                                                 run.axis, run.slices, crop=figure.crop,
                                                 background_channel=background_channel))
        run.figure = {"slices": run.slices, "axis": run.axis, "seconds": round(time.perf_counter() - t0, 3)}
    return run


def run_atlas(model: Model, inputs: Inputs, outputs: Outputs, console: Console, parameters: dict
              ) -> ResponseAtlas:
    """The response atlas of the inputs written as ``atlas.npz`` (role ``atlas``) and its blocks as
    ``atlas_blocks``; ``parameters`` go to :func:`IBIXLogic.block_response_atlas`."""
    outputs.check_volumes(["atlas_blocks"], ["atlas.npz"])
    with console.progress() as progress:
        atlas = block_response_atlas(model, inputs.x, geometry=inputs.geometry, progress=progress,
                                     estimate=console.estimate, **parameters)
    outputs.add("atlas", atlas.save(outputs.path("atlas.npz")))
    outputs.write_volume("atlas_blocks", atlas.labels, atlas.geometry)
    return atlas


def estimate_only(mapping: str, model: Model, inputs: Inputs, console: Console, parameters: dict,
                  mask: np.ndarray | None = None, atlas: ResponseAtlas | None = None) -> Estimate:
    """``ibix forward|backward|atlas --estimate``: the run's estimate printed (or its record), nothing written.

    The mapping runs as far as its first timed batch of jittered inputs (see :func:`IBIXLogic.estimate`).
    """
    if atlas is not None:
        found = Estimate(0, 0.0, note="answered from the response atlas", device=model.device)
    elif mapping == "atlas":
        found = estimate_of(block_response_atlas, model, inputs.x, geometry=inputs.geometry, **parameters)
    else:
        function = forward_mapping if mapping == "forward" else backward_mapping
        found = estimate_of(function, model, inputs.x, mask, geometry=inputs.geometry, **parameters)
    console.estimate(found, always=True)
    console.finished({}, None)
    return found


def process_age() -> float | None:
    """Seconds since this process started (Linux: /proc), or None where that cannot be read."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            started = float(stat.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
            return max(0.0, float(uptime.read().split()[0]) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def timings(start_up: float | None, started: float, loaded: float, read: float, run: MappingRun | None = None,
            seconds: float | None = None, write: float = 0.0) -> dict:
    """Where a command's time went (seconds), for its summary: ``start_up`` (Python and the imports, before the
    command began at ``started``), loading the model (until ``loaded``), reading the inputs (until ``read``), the
    mapping's own ``seconds`` (or ``run``'s), writing its volumes, the figure, and the rest until now (the summary,
    listing files); ``outside_mapping`` adds up all but the mapping."""
    mapping = run.result.seconds if run is not None else (seconds or 0.0)
    write = run.write_seconds if run is not None else write
    figure = (run.figure or {}).get("seconds", 0.0) if run is not None else 0.0
    total = time.perf_counter() - started
    parts = {"start_up": start_up, "load_model": loaded - started, "read": read - loaded, "mapping": mapping,
             "write": write, "figure": figure}
    parts["other"] = max(0.0, total - sum(v for k, v in parts.items() if k != "start_up"))
    parts["outside_mapping"] = total - mapping + (start_up or 0.0)
    return {k: None if v is None else round(v, 3) for k, v in parts.items()}


def model_summary(model: Model) -> dict:
    """What a summary says about the model: file, card, device and the ONNX Runtime provider."""
    return {"path": str(model.path), "card": model.card.summary(), "device": model.device,
            "provider": model.provider}


def write_summary(outputs: Outputs, command: str, model: Model, inputs: Inputs, started: float,
                  **content: Any) -> Path:
    """``summary.json``: the command, model, inputs and geometry, ``content``, timing and the files written; the
    run's files are committed with it (:meth:`Outputs.commit`)."""
    summary = {"ibix": __version__, "command": command, "model": model_summary(model),
               "inputs": [str(p) for p in inputs.paths],
               "series": [None if s is None else s.to_dict() for s in inputs.series] or None,
               "geometry": inputs.geometry.to_dict()}
    summary.update(content)
    summary["seconds_total"] = round(time.perf_counter() - started, 3)
    return outputs.commit(summary)


def finish(console: Console, outputs: Outputs, lines: Sequence[str]) -> None:
    """Print the result lines and the files written; end a JSON-lines run with its ``finished`` record."""
    for note in outputs.notes:
        console.note(f"{outputs.folder}: {note}")
    for line in lines:
        console.out(line)
    for path in outputs.written.values():
        console.out(f"  wrote {path}")
    console.finished(outputs.written, outputs.written.get("summary"))

