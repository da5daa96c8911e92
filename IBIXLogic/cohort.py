"""Explain a cohort: one forward or backward map per case of a manifest, cases run in parallel on Dask.

The manifest is a CSV file with the columns ``case`` (a folder name), ``input`` (the input volume or DICOM folder;
several channels separated by ``;``, in the card's channel order), ``mask`` (the input mask for forward maps, the
output mask for backward maps: a label volume, a .seg.nrrd, a DICOM RT structure set or SEG, or a DICOM folder holding
one), optional ``label`` (the mask file's label), ``segment`` (the structure's name) and ``series`` (the
SeriesInstanceUID of each DICOM folder input, ``;``-separated) and optional per-case parameter columns named as
the parameters of :func:`IBIXLogic.forward_mapping` / :func:`IBIXLogic.backward_mapping` (``n_jitters``,
``max_jitter``, ``n_blocks``, ...; ``block_labels`` for a block label file). Relative paths are relative to the
manifest's folder; an empty cell keeps the default.

Each case writes what the single-case command writes (maps, PNG, ``summary.json``) into ``DIR/<case>/``: first
into a temporary folder, renamed to ``DIR/<case>`` when complete, so ``DIR/<case>`` exists only for a finished case.
``DIR/cohort.csv`` gets one row per case; with ``DIR/report.html`` and the cohort's ``DIR/summary.json`` it is
published as one unit at the end of the run (:class:`IBIXLogic.session.Outputs`), and the cohort holds DIR's lock
while it runs. A rerun skips the cases whose folder exists and runs the others again (it does not check that the
model or the parameters are those of the earlier run: use a new DIR for new ones).
"""
from __future__ import annotations

import csv
import inspect
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__, session
from .errors import IBIXError, InputError, is_file, short_path
from .io import atomic_write, temporary_path
from .backward import backward_mapping
from .forward import forward_mapping
from .report import write_report
from .statistics import BACKWARD_STATISTICS, FORWARD_STATISTICS, flatten

MAPPINGS = ("forward", "backward")
REQUIRED_COLUMNS = ("case", "input", "mask")
#: Optional columns that say what to read from the case's files.
SELECTION_COLUMNS = ("label", "segment", "series")
#: Engine arguments that the cohort sets itself, so they cannot be manifest columns.
_NOT_PARAMETERS = {"model", "x", "mask", "out_mask", "geometry", "preview", "progress", "cancel"}
#: Columns of cohort.csv before the statistics.
ROW_COLUMNS = ("case", "status", "error", "evaluations", "seconds")
#: Columns of cohort.csv that say what a case read: the input series' UIDs (';'-separated), the structure's name
#: (or "label N") and its file.
PROVENANCE_COLUMNS = ("series_uid", "structure", "structure_file")
#: How long joining a Dask scheduler may take before the cohort gives up.
SCHEDULER_TIMEOUT_S = 10
log = logging.getLogger("IBIX")
_CASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
#: The cohort's own files in DIR, which no case folder may take (compared ignoring case, as some file systems do).
COHORT_FILES = ("cohort.csv", "report.html", "summary.json")


def parameter_columns(mapping: str) -> tuple[str, ...]:
    """The per-case parameter columns a manifest may have for this mapping (the engine's argument names)."""
    function = forward_mapping if mapping == "forward" else backward_mapping
    names = [n for n in inspect.signature(function).parameters if n not in _NOT_PARAMETERS]
    return tuple(names + (["block_labels"] if mapping == "backward" else []))


def statistic_columns(mapping: str) -> tuple[str, ...]:
    """The statistics columns of cohort.csv (a peak location is three columns, R, A and S in mm)."""
    names = FORWARD_STATISTICS if mapping == "forward" else BACKWARD_STATISTICS
    return tuple(flatten({name: None for name in names}))


@dataclass(frozen=True)
class Case:
    """One row of the manifest, with paths made absolute."""

    name: str
    inputs: tuple[Path, ...]
    mask: Path
    label: int | None = None
    parameters: dict = field(default_factory=dict)
    segment: str | None = None
    series: tuple[str, ...] = ()


def _value(text: str) -> Any:
    """A manifest cell as a Python value: true/false, an integer, a number, a ';'-separated list, or text."""
    if ";" in text:
        return [_value(part.strip()) for part in text.split(";") if part.strip()]
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_manifest(path: str | os.PathLike, mapping: str) -> list[Case]:
    """Read and check a cohort manifest.

    Parameters
    ----------
    path : path-like
        The CSV file (header row first).
    mapping : {"forward", "backward"}
        Which map the cases compute; sets the parameter columns allowed.

    Returns
    -------
    list of Case
        In manifest order. Problems of the manifest itself (missing or unknown columns, bad or repeated case
        names, a label that is not a whole number) raise :class:`InputError` naming the line; problems of a case's
        files are found when the case runs.
    """
    path = Path(path)
    if mapping not in MAPPINGS:
        raise InputError(f"mapping must be one of {MAPPINGS}, got {mapping!r}")
    if not is_file(path, "manifest", InputError):
        raise InputError(f"{short_path(path)}: no such manifest file")
    folder = path.resolve().parent
    allowed = parameter_columns(mapping)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: not a readable CSV manifest ({exc})") from None
    rows = [(number, row) for number, row in enumerate(rows, start=1) if any(cell.strip() for cell in row)]
    if not rows:
        raise InputError(f"{path}: the manifest is empty; it needs a header row {','.join(REQUIRED_COLUMNS)}")
    header = [cell.strip() for cell in rows[0][1]]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    unknown = [c for c in header if c not in REQUIRED_COLUMNS + SELECTION_COLUMNS + allowed]
    if missing or unknown or len(set(header)) != len(header):
        raise InputError(f"{path}: the header {header} " + (f"lacks the column(s) {missing}; " if missing else "")
                         + (f"has unknown column(s) {unknown}; " if unknown else "")
                         + ("repeats a column; " if len(set(header)) != len(header) else "")
                         + f"the columns are {list(REQUIRED_COLUMNS)}, optional {list(SELECTION_COLUMNS)} and the "
                           f"{mapping} parameters {list(allowed)}")

    def absolute(text: str) -> Path:
        return folder / Path(text).expanduser()

    cases, names = [], set()
    for number, row in rows[1:]:
        if len(row) > len(header):
            raise InputError(f"{path}, line {number}: {len(row)} cells for {len(header)} columns")
        cells = {name: (row[i].strip() if i < len(row) else "") for i, name in enumerate(header)}
        name = cells["case"]
        if not _CASE_NAME.match(name):
            raise InputError(f"{path}, line {number}: case name {name!r} must start with a letter or digit and hold "
                             "only letters, digits, '.', '_' and '-' (it names the case's folder)")
        if name.lower() in COHORT_FILES:
            raise InputError(f"{path}, line {number}: case name {name!r} is the name of one of the cohort's own "
                             f"files ({', '.join(COHORT_FILES)}); rename the case")
        if name in names:
            raise InputError(f"{path}, line {number}: case {name!r} appears twice; case names must be unique")
        names.add(name)
        label = cells.get("label", "")
        if label and not label.isdigit():
            raise InputError(f"{path}, line {number}: label {label!r} must be a whole number >= 0")
        if label and cells.get("segment"):
            raise InputError(f"{path}, line {number}: case {name!r} has a label and a segment; give one of them")
        for column in ("input", "mask"):
            if not cells[column]:
                raise InputError(f"{path}, line {number}: case {name!r} has no {column}")
        parameters = {k: _value(v) for k, v in cells.items() if k in allowed and v}
        if "block_labels" in parameters:
            parameters["block_labels"] = absolute(str(parameters["block_labels"]))
        cases.append(Case(name, tuple(absolute(p.strip()) for p in cells["input"].split(";") if p.strip()),
                          absolute(cells["mask"]), int(label) if label else None, parameters,
                          cells.get("segment") or None,
                          tuple(uid.strip() for uid in cells.get("series", "").split(";") if uid.strip())))
    if not cases:
        raise InputError(f"{path}: the manifest has a header but no case")
    return cases


@dataclass(frozen=True)
class Settings:
    """What every case of a cohort shares."""

    mapping: str
    model: Path
    card: Path | None
    output: Path
    fmt: str = "nrrd"
    device: str = "auto"


def case_row(case: str, status: str, error: str = "", summary: dict | None = None, mapping: str = "forward",
             seconds: float | None = None) -> dict:
    """One row of cohort.csv: status, error, the mapping's evaluations, seconds and the map's statistics.

    ``seconds`` is the single-case command's total time from the summary for a finished case (so a rerun gives the
    same row), the time until the failure for a failed one.
    """
    result = (summary or {}).get(mapping, {})
    statistics = flatten(result.get("statistics") or {name: None for name in
                                                       (FORWARD_STATISTICS if mapping == "forward" else
                                                        BACKWARD_STATISTICS)})
    if seconds is None and summary is not None:
        seconds = summary.get("seconds_total")
    return {"case": case, "status": status, "error": error, "evaluations": result.get("evaluations"),
            "seconds": None if seconds is None else round(float(seconds), 3), **provenance(summary), **statistics}


def provenance(summary: dict | None) -> dict:
    """What a case read, from its summary: the input series' UIDs, the structure's name (or label) and file."""
    summary = summary or {}
    series = [s["series_uid"] if s else "" for s in summary.get("series") or []]
    structure = summary.get("structure") or {}
    name = structure.get("name")
    if name is None and structure.get("number") is not None:
        name = f"label {structure['number']}"
    return {"series_uid": ";".join(series) if any(series) else None, "structure": name,
            "structure_file": structure.get("file")}


def _explain(case: Case, settings: Settings, folder: Path, final: Path) -> dict:
    """One case through the single-case command's path (:mod:`IBIXLogic.session`), written into ``folder``, which
    is renamed to ``final`` once complete (the summary names the files there).

    Returns its summary (what ``summary.json`` holds).
    """
    started = time.perf_counter()
    console = session.Console(quiet=True)
    forward = settings.mapping == "forward"
    model = session.load_model(settings.model, settings.card, settings.device)
    inputs = session.load_inputs(list(case.inputs), model, case.series)
    mask, structure = session.load_structure(case.mask, case.label, inputs.geometry, console,
                                             "input mask" if forward else "output mask", case.segment,
                                             inputs.dicom_series)
    parameters = dict(case.parameters)
    block_labels = parameters.pop("block_labels", None)
    if block_labels is not None:
        parameters["blocks"] = session.load_block_labels(block_labels, inputs.geometry)
    with session.Outputs(folder, settings.fmt, [*inputs.paths, case.mask, block_labels, settings.model,
                                                settings.card], settings.mapping, publish=final) as outputs:
        outputs.check(["summary.json"])
        run = (session.run_forward if forward else session.run_backward)(model, inputs, mask, outputs, console,
                                                                         parameters)
        extra = {} if forward else {"block_labels": None if block_labels is None else str(block_labels)}
        session.write_summary(outputs, settings.mapping, model, inputs, started, case=case.name,
                              mask=str(case.mask), label=case.label, structure=structure, **extra,
                              **{settings.mapping: run.result.to_dict()}, figure=run.figure)
    return json.loads((folder / "summary.json").read_text())


def run_case(case: Case, settings: Settings) -> dict:
    """Explain one case into ``DIR/<case>`` (written under a temporary name, renamed when complete).

    Runs on a Dask worker. Never raises for a failed case: returns its cohort.csv row with status ``failed`` and
    the error message.
    """
    started = time.perf_counter()
    final = settings.output / case.name
    temporary = temporary_path(final)
    try:
        if final.exists():
            raise InputError(f"{final} exists already; remove it to run case {case.name} again")
        temporary.mkdir(parents=True)
        summary = _explain(case, settings, temporary, final)
        os.rename(temporary, final)  # never over a folder that appeared meanwhile
        return case_row(case.name, "ok", summary=summary, mapping=settings.mapping)
    except IBIXError as exc:
        message = str(exc)
    except Exception as exc:  # anything else fails this case only; the others go on
        message = f"{type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return failed_row(case, message, settings.mapping, time.perf_counter() - started)


def failed_row(case: Case, message: str, mapping: str, seconds: float | None = None) -> dict:
    """The cohort.csv row of a failed case, with what it was asked to read (series, structure and its file)."""
    row = case_row(case.name, "failed", message, mapping=mapping, seconds=seconds)
    row.update(series_uid=";".join(case.series) or None, structure_file=str(case.mask),
               structure=case.segment or (None if case.label is None else f"label {case.label}"))
    return row


@dataclass
class CohortResult:
    """What a cohort run did: its rows (manifest order), and how many cases it ran, skipped and lost."""

    rows: list[dict]
    csv: Path
    report: Path
    ran: int
    skipped: int

    @property
    def failed(self) -> int:
        return sum(row["status"] != "ok" for row in self.rows)


def _done_row(case: Case, settings: Settings) -> dict | None:
    """The row of a case whose folder exists (None when it does not): ok when an earlier run of the same mapping
    finished it, else failed with the reason (the folder is left as it is)."""
    folder = settings.output / case.name
    if not folder.exists():
        return None
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return case_row(case.name, "failed", f"{folder} exists but holds no readable summary.json (not written by "
                        "IBIX); remove it to run this case", mapping=settings.mapping)
    if summary.get("command") != settings.mapping or settings.mapping not in summary:
        return case_row(case.name, "failed", f"{folder} holds a {summary.get('command')} result, not a "
                        f"{settings.mapping} one; use another output folder", mapping=settings.mapping)
    return case_row(case.name, "ok", summary=summary, mapping=settings.mapping)


def write_rows(path: Path, rows: Sequence[dict], mapping: str) -> Path:
    """Write cohort.csv (under a temporary name, renamed when complete); empty cells for missing values."""
    columns = list(ROW_COLUMNS) + list(PROVENANCE_COLUMNS) + list(statistic_columns(mapping))
    try:
        with atomic_write(Path(path)) as temporary, open(temporary, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, columns, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    return Path(path)


def read_rows(path: Path) -> list[dict]:
    """Rows of a cohort.csv, with numbers as floats and empty cells as None."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key, value in row.items():
            if key in ("case", "status", "error") + PROVENANCE_COLUMNS:
                continue
            row[key] = None if value == "" else float(value)
    return rows


def _client(workers: int, scheduler: str | None):
    """A dask.distributed client: on a local cluster of ``workers`` processes, or joined to ``scheduler``."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise IBIXError("cohorts run on Dask, which is not installed here: pip install 'dask[distributed]'") from None

    if scheduler is not None:
        try:
            return Client(scheduler, timeout=f"{SCHEDULER_TIMEOUT_S}s"), None
        except (OSError, TimeoutError) as exc:
            raise InputError(f"cannot reach the Dask scheduler at {scheduler} ({exc}); start one with 'dask "
                             "scheduler' and its workers with 'dask worker ADDRESS', or leave out --scheduler for "
                             "a local cluster") from None
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.ERROR)
    return Client(cluster), cluster


def run_cohort(manifest: str | os.PathLike, model: str | os.PathLike, mapping: str, output: str | os.PathLike,
               card: str | os.PathLike | None = None, workers: int = 2, scheduler: str | None = None,
               fmt: str = "nrrd", device: str = "auto",
               progress: Callable[[int, int, str], None] | None = None) -> CohortResult:
    """Explain every case of a manifest on Dask and write ``DIR/cohort.csv``.

    Parameters
    ----------
    manifest : path-like
        The cohort manifest (see :func:`read_manifest`).
    model, card : path-like
        The ONNX model and, optionally, its card (default: the ``.json`` beside the model).
    mapping : {"forward", "backward"}
        The map computed for every case.
    output : path-like
        DIR: ``DIR/<case>/`` per case, ``DIR/cohort.csv`` and ``DIR/report.html``.
    workers : int
        Worker processes of the local Dask cluster (one case at a time each).
    scheduler : str, optional
        Address of a running Dask scheduler to join instead (its workers need IBIX installed and must see the
        manifest's files under the same paths).
    progress : callable, optional
        ``progress(done, total, message)`` counting cases (finished earlier ones included).

    Returns
    -------
    CohortResult
    """
    cases = read_manifest(manifest, mapping)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InputError(f"workers must be an integer of at least 1, got {workers!r}")
    output = Path(os.path.abspath(output))
    model, card = Path(os.path.abspath(model)), None if card is None else Path(os.path.abspath(card))
    if not is_file(model, "model", InputError):
        raise InputError(f"{short_path(model)}: no such model file")
    if card is not None and not is_file(card, "model card", InputError):
        raise InputError(f"{short_path(card)}: model card not found")
    settings = Settings(mapping, model, card, output, fmt, device)
    with session.Outputs(output, fmt, [Path(manifest), model, card], "cohort") as outputs:
        outputs.check(list(COHORT_FILES))  # DIR's lock for the whole run; what killed runs left is removed
        rows: dict[str, dict] = {}
        pending = []
        for case in cases:
            done = _done_row(case, settings)
            if done is not None:
                rows[case.name] = done
            else:
                pending.append(case)
        skipped = len(cases) - len(pending)

        def report(message: str) -> None:
            if progress is not None:
                progress(len(rows), len(cases), message)

        report("cases")
        if pending:
            _run_cases(pending, settings, rows, workers, scheduler, report)
        ordered = [rows[case.name] for case in cases]
        outputs.add("cohort_csv", write_rows(outputs.path("cohort.csv"), ordered, mapping))
        outputs.add("report", write_report(output, ordered, mapping, statistic_columns(mapping),
                                           path=outputs.path("report.html"), provenance=PROVENANCE_COLUMNS))
        failed = [row["case"] for row in ordered if row["status"] != "ok"]
        outputs.commit({"ibix": __version__, "command": "cohort", "mapping": mapping,
                        "manifest": str(Path(os.path.abspath(manifest))), "model": str(model),
                        "card": None if card is None else str(card),
                        "cases": {"total": len(ordered), "ok": len(ordered) - len(failed), "failed": len(failed),
                                  "run": len(pending), "skipped": skipped},
                        "case_folders": [row["case"] for row in ordered if row["status"] == "ok"],
                        "failed_cases": failed})
    return CohortResult(ordered, outputs.written["cohort_csv"], outputs.written["report"], ran=len(pending),
                        skipped=skipped)


def _run_cases(pending: Sequence[Case], settings: Settings, rows: dict, workers: int, scheduler: str | None,
               report: Callable[[str], None]) -> None:
    """Run the pending cases on Dask; each one's row goes into ``rows`` as it finishes.

    An interrupt (Ctrl-C) ends the cluster and propagates; cases in progress leave only temporary folders, which
    the next run removes.
    """
    client, cluster = _client(workers, scheduler)
    from distributed import as_completed

    try:
        futures = {client.submit(run_case, case, settings, key=f"ibix-{case.name}-{uuid.uuid4().hex[:8]}",
                                 pure=False, retries=0): case for case in pending}
        for future in as_completed(futures):
            case = futures[future]
            try:
                rows[case.name] = future.result()
            except Exception as exc:  # the worker died (e.g. killed for memory): this case fails
                rows[case.name] = failed_row(case, f"the worker running it was lost ({type(exc).__name__}: "
                                             f"{exc})", settings.mapping)
            report("cases")
    finally:
        with _interrupts_ignored():  # a second Ctrl-C while the cluster shuts down does not cut that short
            for close in (client.close, getattr(cluster, "close", None)):
                try:
                    if close is not None:
                        close()
                except Exception as exc:  # a cluster that its own interrupt already took down
                    log.debug("closing the Dask cluster: %s", exc)


@contextmanager
def _interrupts_ignored():
    """Ignore SIGINT in the main thread while the block runs (elsewhere: nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
