"""Runs the IBIX engine in a separate Python process and brings its results into the scene.

Why a process: in Slicer, PythonQt holds the GIL while Qt's event loop idles, so a Python worker thread only
advances while the main thread runs Python; a forward map that takes 0.45 s alone took 10.9 s that way. The
engine therefore runs in a child process (``PythonSlicer`` in Slicer, started through
``slicer.util.launchConsoleProcess`` as SlicerTotalSegmentator and SlicerMONAIAuto3DSeg do), and the main thread
only writes the inputs, polls, and loads the results.

* :class:`Process` - one child speaking the JSON-lines protocol of ``ibix ... --progress-format jsonl``
  (``{"stage", "done", "total"}`` lines, then ``{"stage": "finished", "files", "summary"}`` or
  ``{"stage": "failed", "error"}``). A daemon thread reads the child's output into a queue; :meth:`Process.poll`
  (called by a timer on the main thread) drains it without ever waiting. Its job ends when the child ends.
* :class:`Run` - one module run: writes the inputs of a :class:`IBIXLib.scene.Request` (NRRD files with their
  geometry) to a temporary folder, starts ``ibix predict|forward|backward`` there, reports progress, and on
  success adds the result node; on failure, crash or cancel the scene is left as it was. The folder is removed
  in every case. Before its first progress record a forward, backward or atlas run sends its estimate
  (``{"stage": "estimate", "evaluations", "seconds", "advice", ...}``: predicted model evaluations and time, and
  what would cut them); ``run.estimate`` holds it (None until it arrives). ``Run(..., estimate_only=True)`` asks
  for the estimate alone (``ibix ... --estimate``): the run then finishes with ``run.estimate`` and no node, and
  nothing is written.
* :func:`probe_model` - loads a model in a child (the provider that really runs it, without creating an ONNX
  Runtime session or calling ``nvidia-smi`` on the main thread).
* :class:`Standby` - an engine process started ahead of time (Python started, engine and ONNX Runtime imported)
  that runs the module's jobs one after the other, so that a run neither waits for the child's start-up nor loads
  its model again, and the engine's caches (ONNX Runtime sessions, measured response radii, cut supervoxels) carry
  over from run to run. Each job (:class:`StandbyJob`, with the states of a :class:`Process`) has its own folder
  and its own records, and ends at the ``{"stage": "job-ended"}`` line the process prints after its final record;
  the process goes on. A cancel ends the process (the module starts a new standby); so does a crash.
* :func:`wait` - the synchronous form for the Python console (polls until the run ends).

The way the child is started is one injectable function (a *launcher*), ``slicer.util.launchConsoleProcess`` in
Slicer and :func:`subprocess_launcher` in tests and outside Slicer.
"""
from __future__ import annotations

import functools
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

import IBIXLogic as ibx

from . import scene
from . import tr as _
from .child import JOB_ENDED  # the line that ends each job of a standby process, after its final record
from .dependencies import CHILD_SCRIPT, python_executable  # the child's entry point and its Python

#: ``launcher(args, environment) -> Popen`` with text ``stdout`` (stderr merged into it), ``poll``, ``kill``.
Launcher = Callable[[Sequence[str], dict], Any]

#: Last lines of the child's other output kept for error messages.
TAIL_LINES = 20

#: Seconds between two polls in :func:`wait`.
WAIT_INTERVAL = 0.05

#: Seconds a result read may take for the result node to be added in the same poll (else at the next poll).
SPLIT_AFTER = 0.05

#: Exit code of ``ibix`` for bad usage or bad input.
USAGE_ERROR = 2
#: Exit codes of ``ibix`` that end with its ``finished`` record: success, and a cohort that ran with failed cases.
FINISHED_CODES = (0, 3)

#: States of a process or a run; the last four are final.
RUNNING, FINISHED, FAILED, CANCELLED, CRASHED = "running", "finished", "failed", "cancelled", "crashed"
#: The stage of the JSON-lines record that carries a run's estimate.
ESTIMATE = "estimate"


def engine_path() -> str:
    """The folder that holds the ``IBIXLogic`` package (put on the child's Python path)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(ibx.__file__)))


def slicer_launcher(args: Sequence[str], environment: dict):
    """Start a child the way Slicer does (hidden console on Windows, Slicer's startup environment)."""
    import slicer

    return slicer.util.launchConsoleProcess(list(args), updateEnvironment=environment)


def subprocess_launcher(args: Sequence[str], environment: dict):
    """Start a child with :class:`subprocess.Popen` (outside Slicer and in tests) with the pipes of Slicer's
    ``launchConsoleProcess``: stderr merged into stdout, text mode in the locale's encoding (strict)."""
    return subprocess.Popen(list(args), env={**os.environ, **environment}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True)


def default_launcher() -> Launcher:
    """:func:`slicer_launcher` in the Slicer application, :func:`subprocess_launcher` elsewhere."""
    try:
        import slicer

        if getattr(slicer, "app", None) is not None:
            return slicer_launcher
    except ImportError:
        pass
    return subprocess_launcher


def child_command(folder: str, device: str, arguments: Sequence[str], python: str | None = None) -> list[str]:
    """The command line of a child that runs ``ibix <arguments>`` (or ``probe ...``) for a job folder; the child
    ends by itself when this process (3D Slicer) has ended."""
    return [python or python_executable(), CHILD_SCRIPT, "--job-folder", folder, "--device", device,
            "--engine-path", engine_path(), "--parent-pid", str(os.getpid()), "--", *arguments]


# ------------------------------------------------------------------------------------------------------------------
# One child process and its protocol
# ------------------------------------------------------------------------------------------------------------------

class Process:
    """A child process that prints JSON-lines progress records; never blocks the caller.

    Parameters
    ----------
    args : sequence of str
        The command line.
    folder : str
        The job folder; :meth:`cancel` creates ``folder/cancel``, which the child's watchdog obeys.
    launcher : callable, optional
        How to start it (default :func:`default_launcher`).
    environment : dict, optional
        Extra environment variables of the child.
    """

    def __init__(self, args: Sequence[str], folder: str, launcher: Launcher | None = None,
                 environment: dict | None = None):
        self.args = list(args)
        self.folder = folder
        self._begin()
        self._lines: queue.Queue = queue.Queue()
        environment = {"PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8", **(environment or {})}
        self._proc = (launcher or default_launcher())(self.args, environment)
        self._reader = threading.Thread(target=self._read, name="IBIX child output", daemon=True)
        self._reader.start()

    def _begin(self) -> None:
        """The state of a job that has just started."""
        self.state = RUNNING
        self.progress: tuple[int, int, str] = (0, 1, "starting")
        self.record: dict | None = None          # the final "finished" or "failed" record
        self.estimate: dict | None = None        # the "estimate" record, once it arrived
        self.record_at: float | None = None      # when its line arrived (time.perf_counter)
        self.returncode: int | None = None
        self.tail: list[str] = []                # the child's other output (human messages, tracebacks)
        self._cancelled = False
        self._closed = False                     # the child's output ended (it may not be reaped yet)
        self._ended: int | None = None           # a standby job's exit code, from its job-ended line

    def _read(self) -> None:
        """Reader thread: every output line (with the time it arrived) into the queue, then None once the pipe
        closes.

        It reads bytes (the text pipe's buffer) and decodes each line on its own, undecodable bytes replaced: a
        child's stray byte costs one character, never the rest of the output (which would hang the child on a
        full pipe, or lose its final record).
        """
        stream = getattr(self._proc.stdout, "buffer", self._proc.stdout)
        try:
            while True:
                line = stream.readline()
                if not line:
                    break
                if isinstance(line, bytes):
                    line = line.decode("utf-8", errors="replace")
                self._lines.put((line.rstrip("\r\n"), time.perf_counter()))
        except (OSError, ValueError):  # the pipe was closed under us: the output ends here
            pass
        finally:
            self._lines.put(None)

    @property
    def done(self) -> bool:
        return self.state != RUNNING

    def poll(self) -> str:
        """Take what the child printed since the last call (main thread, never waits); returns the state."""
        if self.done:
            return self.state
        while not self._closed and self._ended is None:  # nothing after a job's end is the job's
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._closed = True
            else:
                line, arrived = line
                self._take(line)
                if self.record is not None and self.record_at is None:
                    self.record_at = arrived
        if self._ended is not None and not self._cancelled:  # a standby's job ended; its process goes on
            self.returncode = self._ended
        elif self._closed or self._cancelled:
            returncode = self._proc.poll()
            if returncode is None:
                return self.state  # output closed but not yet reaped: next poll
            self.returncode = returncode
        else:
            return self.state
        self.state = self._final_state()
        return self.state

    def _take(self, line: str) -> None:
        record = _decode(line)
        if record is None:
            self.tail = (self.tail + [line])[-TAIL_LINES:]
            return
        stage = str(record["stage"])
        if stage in (FINISHED, FAILED):
            self.record = record
        elif stage == ESTIMATE:
            self.estimate = record
        else:
            self.progress = (int(record.get("done", 0)), max(1, int(record.get("total", 1))), stage)

    def _final_state(self) -> str:
        if self._cancelled:
            return CANCELLED
        if self.record is not None and self.record["stage"] == FINISHED and self.returncode in FINISHED_CODES:
            return FINISHED
        if self.record is not None and self.record["stage"] == FAILED:
            return FAILED
        if self.returncode == USAGE_ERROR and self.tail:  # refused its arguments (argparse prints no record)
            self.record = {"stage": FAILED, "error": self.tail[-1]}
            return FAILED
        return CRASHED

    def cancel(self) -> None:
        """End the child now: the cancel file for its watchdog, then kill the process that was started."""
        if self.done or self._cancelled:
            return
        self._cancelled = True
        try:
            open(os.path.join(self.folder, "cancel"), "w").close()
        except OSError:
            pass
        try:
            self._proc.kill()
        except OSError:
            pass

    @property
    def error(self) -> str:
        """What went wrong, in words (empty unless failed or crashed)."""
        if self.state == FAILED:
            return str(self.record.get("error", _("the IBIX engine failed")))
        if self.state == CRASHED:
            last = "\n".join(self.tail[-5:]) or _("(no output)")
            return _("the IBIX engine process stopped unexpectedly (exit code {code}); the scene was not changed. "
                     "Its last output:\n{output}").format(code=self.returncode, output=last)
        return ""


def _decode(line: str) -> dict | None:
    """The JSON-lines record of an output line, or None for any other line (a human message, a traceback)."""
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and "stage" in record else None


def wait(job, idle: Callable[[], None] | None = None, interval: float = WAIT_INTERVAL) -> str:
    """Poll ``job`` (a :class:`Process` or :class:`Run`) until it ends; ``idle`` runs between polls."""
    while not job.done:
        job.poll()
        if job.done:
            break
        if idle is not None:
            idle()
        time.sleep(interval)
    return job.state


def remove_folder(folder: str | None) -> None:
    if folder and os.path.isdir(folder):
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------------------
# Model probe
# ------------------------------------------------------------------------------------------------------------------

def probe_model(model_path: str, device: str = "auto", launcher: Launcher | None = None,
                python: str | None = None) -> "Probe":
    """Load a model in a child process; poll the returned :class:`Probe` until ``done``, then read ``info``."""
    return Probe(model_path, device, launcher, python)


class Probe:
    """A child that loads a model and reports its card, device and provider (``info`` once finished)."""

    def __init__(self, model_path: str, device: str, launcher: Launcher | None, python: str | None):
        if not model_path:
            raise ibx.InputError("no model selected: choose an ONNX model file (.onnx with its .json model card)")
        if not os.path.isfile(model_path):
            raise ibx.InputError(f"model file not found: {model_path}: choose an existing .onnx file")
        self.folder = tempfile.mkdtemp(prefix="IBIX-probe-")
        self.process = Process(child_command(self.folder, device, ["probe", "--model", str(model_path)], python),
                               self.folder, launcher)
        self.info: dict | None = None

    @property
    def done(self) -> bool:
        return self.process.done

    @property
    def state(self) -> str:
        return self.process.state

    @property
    def error(self) -> str:
        return self.process.error

    def poll(self) -> str:
        state = self.process.poll()
        if self.done:
            if state == FINISHED:
                self.info = self.process.record.get("model")
            remove_folder(self.folder)
        return state

    def cancel(self) -> None:
        self.process.cancel()


# ------------------------------------------------------------------------------------------------------------------
# A standby engine process
# ------------------------------------------------------------------------------------------------------------------

class Standby:
    """An engine process started ahead of time (``child.py serve``) that runs jobs one after the other.

    :meth:`take` says whether it can run a job now (its process goes on and no job of it is in flight: one job at
    a time, a busy standby is never handed a second; one whose process ended is cleaned up); :meth:`serve` hands it
    the next job and returns the job's :class:`StandbyJob`. Its folder holds only the hand-over file
    (``job.json``) and the cancel file its watchdog obeys; each job's inputs and outputs are in the job's own
    folder. :meth:`stop` ends it. A standby that gets no job ends by itself after ``child.IDLE_LIMIT`` seconds.
    """

    def __init__(self, device: str = "auto", launcher: Launcher | None = None, python: str | None = None):
        self.device, self.launcher, self.python = device, launcher, python
        self.folder = tempfile.mkdtemp(prefix="IBIX-engine-")
        try:
            self.process = Process(child_command(self.folder, device, ["serve"], python), self.folder, launcher)
        except BaseException:
            remove_folder(self.folder)
            raise
        self.job: StandbyJob | None = None       # the job handed last
        self.jobs = 0                            # jobs handed so far
        self.stopped = False

    def matches(self, device: str, launcher: Launcher | None, python: str | None) -> bool:
        return (device, launcher, python) == (self.device, self.launcher, self.python)

    @property
    def busy(self) -> bool:
        """A job of it is in flight (until its job-ended line, or the process's end, has been polled)."""
        return self.job is not None and not self.job.done

    def take(self) -> "Standby | None":
        """This standby for the next job, if its process goes on and is not busy; else None (one whose process
        ended is cleaned up). Between jobs its process's stray output goes to its own tail, never to a job."""
        if self.busy or self.stopped:
            return None
        if self.process.poll() == RUNNING:
            return self
        self.stop()
        return None

    def serve(self, arguments: Sequence[str]) -> "StandbyJob":
        """Hand this standby (see :meth:`take`) the job ``ibix <arguments>``; returns the job."""
        if self.busy or self.stopped:
            raise RuntimeError("this engine process is running a job or was stopped; see Standby.take")
        self.jobs += 1
        job = StandbyJob(self, self.jobs)
        path = os.path.join(self.folder, "job.json")
        with open(path + ".partial", "w", encoding="utf-8") as f:
            json.dump({"job": job.number, "arguments": [str(a) for a in arguments]}, f)
        os.replace(path + ".partial", path)  # the process reads it whole or not at all
        self.job = job
        return job

    def stop(self) -> None:
        self.stopped = True
        self.process.cancel()
        remove_folder(self.folder)


class StandbyJob(Process):
    """One job of a :class:`Standby`: its process's output from the hand-over to the job's ``job-ended`` line, with
    the states and records of a :class:`Process` whose child ended with the job's exit code. The process goes on
    for the next job; :meth:`cancel` ends it (a new standby takes its place), and a process that ends within the
    job is the job's crash. ``folder`` is the standby's (its watchdog's cancel file), not the job's."""

    def __init__(self, standby: Standby, number: int):
        self.standby, self.number = standby, number
        self.args, self.folder = standby.process.args, standby.folder
        self._proc, self._lines = standby.process._proc, standby.process._lines
        self._begin()

    def _take(self, line: str) -> None:
        record = _decode(line)
        if record is not None and record["stage"] == JOB_ENDED and record.get("job") == self.number:
            self._ended = int(record.get("code", 1))
        else:
            super()._take(line)

    def poll(self) -> str:
        running = not self.done
        state = super().poll()
        if running and self.done and (self._cancelled or self._ended is None):
            self.standby.stop()  # cancelled, or the process ended within the job: it serves no other job
        return state


# ------------------------------------------------------------------------------------------------------------------
# A module run: inputs -> child -> result node
# ------------------------------------------------------------------------------------------------------------------

#: Engine parameters the command line takes, per run kind, with their options.
OPTIONS = {
    "output": {},
    "forward": {"n_jitters": "--n-jitters", "max_jitter": "--max-jitter", "progressive": "--progressive",
                "tolerance": "--tolerance"},
    "backward": {"n_jitters": "--n-jitters", "max_jitter": "--max-jitter", "progressive": "--progressive",
                 "n_blocks": "--n-blocks", "compactness": "--compactness", "blocks": "--blocks",
                 "normalization": "--normalization", "coarse_blocks": "--coarse-blocks",
                 "refine_threshold": "--refine-threshold", "method": "--method",
                 "locality_tolerance": "--locality-tolerance"},
    "atlas": {"n_jitters": "--n-jitters", "max_jitter": "--max-jitter", "n_blocks": "--n-blocks",
              "compactness": "--compactness", "blocks": "--blocks"},
}

#: The preview file a progressive run writes (and removes) in its output folder, per run kind (hidden: the folder's
#: results are only what its summary.json lists).
PREVIEW_FILE = {"forward": ".forward_normalized_preview.nrrd", "backward": ".backward_preview.nrrd"}

#: The file role (JSON-lines "files") that holds each result.
RESULT_ROLE = {"output": "output", "forward": "forward_normalized", "backward": "backward"}


#: Read result and preview maps in a worker thread (the web page sets this). Slicer keeps it off: PythonQt holds the
#: GIL while Qt's event loop idles, so a worker thread there advances only while a poll runs Python, and a map is
#: read sooner on the main thread.
READ_IN_THREAD = False


@functools.lru_cache(maxsize=None)
def _reader():
    """The one worker thread that reads result and preview maps off the main thread."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="IBIX map reader")


def _read_map(path: str):
    """A Future of ``ibx.read_volume(path)``: read by the worker thread with :data:`READ_IN_THREAD`, else here."""
    if READ_IN_THREAD:
        return _reader().submit(ibx.read_volume, path)
    from concurrent.futures import Future

    future = Future()
    try:
        future.set_result(ibx.read_volume(path))
    except Exception as error:  # handed to whoever takes the result, as the worker thread would
        future.set_exception(error)
    return future


def command_arguments(request: scene.Request, model_path: str, folder: str, inputs: Sequence[str],
                      mask: str | None, device: str) -> list[str]:
    """The ``ibix`` command line of a request whose inputs were written to ``folder``."""
    command = {"output": "predict", "forward": "forward", "backward": "backward", "atlas": "atlas"}[request.kind]
    args = [command, "--model", str(model_path), "--device", device, "--output", os.path.join(folder, "out"),
            "--quiet", "--progress-format", "jsonl"]
    for path in inputs:
        args += ["--input", path]
    if request.kind == "forward":
        args += ["--mask", mask, "--label", "1", "--no-png"]
    elif request.kind == "backward":
        args += ["--out-mask", mask, "--out-label", "1", "--no-png"]
    options = OPTIONS[request.kind]
    for key, value in request.params.items():
        if key not in options:
            raise ibx.InputError(f"unknown parameter {key!r} for a {request.kind} run: use "
                                 f"{', '.join(sorted(options)) or 'none'}")
        if value is None or value is False:
            continue
        if value is True:
            args.append(options[key])
        elif isinstance(value, (list, tuple)):
            args += [options[key], *[str(v) for v in value]]
        else:
            args += [options[key], str(value)]
    return args


class _Job:
    """What a run and a cohort share at their end: the state, the job folder removed, the time, the callback."""

    def _end(self, state: str, error: str) -> None:
        self.state, self.error = state, error
        remove_folder(self.folder)
        self.seconds = time.perf_counter() - self._started
        if self.on_done is not None:
            self.on_done(self)


class Run(_Job):
    """One IBIX run of the module, from a scene request to a result node, in a child process.

    Call :meth:`start`, then :meth:`poll` from a timer (or :func:`wait`) until ``done``; ``node`` holds the new
    result node when ``state == "finished"``, ``error`` the message otherwise. :meth:`cancel` ends the child at
    once. Closing the scene (the request's nodes leave it) cancels the run at the next poll.

    Parameters
    ----------
    request : IBIXLib.scene.Request
        What to compute, read from the scene.
    model_path : str
        The ``.onnx`` file (its card ``<model>.json`` beside it).
    device : {"auto", "cpu", "cuda"}
        Where the child runs the model.
    display : dict, optional
        Display options of the result (see :func:`IBIXLib.scene.show_overlay`) and ``show``.
    on_progress : callable, optional
        ``on_progress(done, total, stage)`` on the main thread while the child reports progress.
    on_done : callable, optional
        ``on_done(run)`` on the main thread once the run ended (any final state).
    launcher, python
        How the child is started and with which Python (defaults: Slicer's way inside Slicer).
    estimate_only : bool
        Ask for the run's estimate alone (forward, backward and atlas runs: ``ibix ... --estimate``): the engine
        plans the run and times one batch, then stops; the run finishes with ``estimate`` set, no node and no
        file. Every forward, backward or atlas run sets ``estimate`` before its first progress anyway.

    Attributes
    ----------
    estimate : dict or None
        The engine's estimate, once it arrived: ``evaluations`` (model evaluations of the whole run), ``seconds``
        (predicted time), ``advice`` (what would cut it, in words), ``note`` (what it leaves out, or None),
        ``device``, ``work`` and ``brute_force`` (model work in whole samples).
    standby : Standby or None
        The standby engine process that ran the job (None: a new process ran it and ended with it). It is free
        for another job once this one ended, unless the job was cancelled or its process ended.
    """

    def __init__(self, request: scene.Request, model_path: str, device: str = "auto", display: dict | None = None,
                 on_progress: Callable[[int, int, str], None] | None = None,
                 on_done: Callable[["Run"], None] | None = None, launcher: Launcher | None = None,
                 python: str | None = None, estimate_only: bool = False):
        if estimate_only and request.kind not in ("forward", "backward", "atlas"):
            raise ibx.InputError(f"an estimate is made for forward, backward and atlas runs, not {request.kind!r}")
        self.estimate_only = bool(estimate_only)
        self.request = request
        self.model_path = str(model_path)
        self.device = device
        self.display = dict(display or {})
        self.on_progress = on_progress
        self.on_done = on_done
        self.launcher = launcher
        self.python = python
        self.folder: str | None = None
        self.process: Process | None = None
        self.standby: Standby | None = None      # the standby engine process that runs this job, if one does
        self.state = "idle"
        self.node = None
        self.summary: dict | None = None
        self.error = ""
        self.seconds = 0.0
        self._started = 0.0
        self._reported: tuple | None = None
        self._result: tuple | None = None        # (array, geometry) read, not yet in the scene
        self.timings: dict[str, float] = {}      # time.perf_counter() when each step ended (see start, poll)
        self.preview = scene.Preview(request, display)
        self._preview_stamp: float | None = None
        self._preview_read = None                # the newest preview map being read (a Future)
        self._fetch: tuple | None = None         # (path, Future): the result read as soon as the child names it

    @property
    def done(self) -> bool:
        return self.state in (FINISHED, FAILED, CANCELLED, CRASHED)

    @property
    def estimate(self) -> dict | None:
        """The engine's estimate of this run (see the class docstring), or None until it arrived."""
        return None if self.process is None else self.process.estimate

    @property
    def finishing(self) -> bool:
        """The child sent its final record, or its result waits to be added: the run ends within the next polls
        (a timer polls again at once rather than after its interval)."""
        return self.state == RUNNING and (self._result is not None or self.process.record is not None)

    def start(self, standby: Standby | None = None) -> "Run":
        """Write the inputs to a new job folder and start a child there, or hand the job to ``standby`` where it is
        free and started the same way (device, launcher, Python); one that is not is stopped (main thread; returns
        at once)."""
        if self.state != "idle":
            raise ibx.InputError("this run was already started: make a new one")
        self._started = time.perf_counter()
        if standby is not None and not standby.matches(self.device, self.launcher, self.python):
            standby.stop()
            standby = None
        standby = standby.take() if standby is not None else None
        self.folder = tempfile.mkdtemp(prefix="IBIX-run-")
        try:
            inputs = []
            for i, array in enumerate(self.request.arrays):
                inputs.append(_write(os.path.join(self.folder, f"input{i}.nrrd"), array, self.request.geometry))
            mask = None
            if self.request.mask is not None:
                mask = _write(os.path.join(self.folder, "mask.nrrd"), self.request.mask.astype(np.uint8),
                              self.request.geometry)
            arguments = command_arguments(self.request, self.model_path, self.folder, inputs, mask, self.device)
            if self.estimate_only:
                arguments.append("--estimate")
            if standby is not None:
                self.process = standby.serve(arguments)
            else:
                self.process = Process(child_command(self.folder, self.device, arguments, self.python), self.folder,
                                       self.launcher)
        except BaseException:  # refused before it ran: a standby stays free for the next run
            remove_folder(self.folder)
            raise
        self.standby = standby
        self.state = RUNNING
        self.timings = {"started": self._started, "handed": time.perf_counter()}  # inputs written, child has the job
        return self

    def poll(self) -> str:
        """Progress and completion (main thread, never waits); returns the state.

        ``timings`` gets ``exited`` (the job's end was seen: the child's, or a standby's job-ended line),
        ``engine_finished`` (its final record arrived) and ``added`` (the result node is in the scene) as they
        happen.

        A finished child's result is read, and put into the scene at the same poll when the read was quick, else at
        the next one, so that no single step holds the main thread long.
        """
        if self.state != RUNNING:
            return self.state
        if self._result is not None:
            self._add()
            return self.state
        if not self.request.scene_alive():  # the scene was closed: nothing may be added to it
            self.process.cancel()
        state = self.process.poll()
        if self.process.progress != self._reported and self.on_progress is not None and not self.process.done:
            self._reported = self.process.progress
            self.on_progress(*self.process.progress)
        if state == RUNNING and self.process.record is None:  # no preview once the final map is on its way
            self._show_preview()
        if self.process.record is not None and self._fetch is None:
            self._fetch = self._prefetch()
        if state == FINISHED and self.estimate_only:
            self._end(FINISHED, "")  # the estimate is all there is
        elif state == FINISHED:
            self.timings.setdefault("exited", time.perf_counter())
            reading = self._fetch[1]
            if reading is not None and not reading.done():
                return self.state  # still being read (the run is finishing: it is polled again soon)
            self.timings["engine_finished"] = self.process.record_at or self.timings["exited"]
            started = time.perf_counter()
            self._read()
            if self._result is not None and time.perf_counter() - started < SPLIT_AFTER:
                self._add()  # a quick read: the node now rather than one poll later
        elif self.process.done:
            self._end(state, self.process.error if state != CANCELLED else self._cancel_reason())
        return self.state

    def cancel(self) -> None:
        """End the child at once; the scene is left as it was (the run ends at the next poll)."""
        if self.process is not None and self.state == RUNNING:
            if self._result is not None:  # already computed: just do not add it
                self._result = None
                self._end(CANCELLED, self._cancel_reason())
            else:
                self.process.cancel()

    def _show_preview(self) -> None:
        """A progressive run's newest preview map: read in a worker thread once the engine has written a new one
        (a large volume's read would hold the main thread), shown at a later poll."""
        name = PREVIEW_FILE.get(self.request.kind)
        if not name or not self.request.params.get("progressive"):
            return
        reading = self._preview_read
        if reading is not None:
            if not reading.done():
                return
            self._preview_read = None
            try:
                array, geometry = reading.result()
            except (OSError, ibx.IBIXError):  # removed or rewritten meanwhile (the run just ended): the next one
                pass
            else:
                self.preview.show(array, geometry, "preview")
        path = os.path.join(self.folder, "out", name)
        try:
            stamp = os.stat(path).st_mtime_ns
        except OSError:  # none yet
            return
        if stamp != self._preview_stamp:
            self._preview_stamp = stamp
            self._preview_read = _read_map(path)

    def _cancel_reason(self) -> str:
        if not self.request.scene_alive():
            return _("the scene was closed during the run; it was cancelled and nothing was written")
        return _("cancelled; the scene was not changed")

    def _result_role(self) -> str | None:
        """The file role (JSON-lines "files") of this run's result."""
        if self.request.kind == "forward" and self.request.display == "signed":
            return "forward_signed"
        return RESULT_ROLE.get(self.request.kind)

    def _prefetch(self) -> tuple:
        """(path, Future) reading the result that the child's "finished" record names, in the worker thread while
        the child exits: the file is complete once that record is printed, and it is used only if the child then
        ends with success. (None, None) where there is nothing to read."""
        record = self.process.record
        path = (record.get("files") or {}).get(self._result_role()) if record.get("stage") == FINISHED else None
        return (path, _read_map(path)) if path else (None, None)

    def _read(self) -> None:
        """Step 1 of a finished run: the result file (read ahead by :meth:`_prefetch`) and the summary."""
        record = self.process.record
        files = record.get("files") or {}
        role = self._result_role()
        path, reading = self._fetch or (None, None)
        try:
            if role not in files:
                raise ibx.IBIXError(f"the IBIX engine finished without a {role} file; this is a bug: please report it")
            array, geometry = reading.result() if path == files[role] else ibx.read_volume(files[role])
            with open(record.get("summary") or files["summary"], encoding="utf-8") as f:
                self.summary = json.load(f)
        except (ibx.IBIXError, OSError, ValueError, KeyError) as error:
            self._end(FAILED, f"could not read the IBIX engine's result: {error}")
            return
        self._result = (array, geometry)

    def _add(self) -> None:
        """Step 2 of a finished run: the result node (unless the scene was closed meanwhile)."""
        array, geometry = self._result
        self._result = None
        self.preview.remove()
        try:
            self.node = scene.add_result(self.request, array, geometry, self.summary, **self.display)
        except ibx.Cancelled as error:
            self._end(CANCELLED, str(error))
        except (ibx.IBIXError, ValueError) as error:
            self._end(FAILED, str(error))
        else:
            self.timings["added"] = time.perf_counter()
            self._end(FINISHED, "")

    def _end(self, state: str, error: str) -> None:
        self.preview.remove()
        super()._end(state, error)

    @property
    def statistics(self) -> dict:
        """The map's statistics from the engine's summary.json (forward: reach95_mm, inside_fraction, peak,
        peak_ras_mm; backward: reach95_mm, blocks90, peak, peak_ras_mm); empty for an output run or before the end."""
        if self.request.kind not in ("forward", "backward"):
            return {}
        return dict(((self.summary or {}).get(self.request.kind) or {}).get("statistics") or {})

    @property
    def status(self) -> str:
        """One line for a status bar: what ran, evaluations, time, and the device that really ran it."""
        if self.state != FINISHED:
            return self.error
        if self.estimate_only:
            from IBIXLogic.cost import duration

            found = self.estimate or {}
            return (f"{self.request.kind} estimate: {found.get('evaluations', '?')} evaluations, about "
                    f"{duration(float(found.get('seconds', 0.0)))} on {found.get('device', '?')}")
        summary = self.summary or {}
        model = summary.get("model") or {}
        section = summary.get(self.request.kind if self.request.kind != "output" else "predict") or {}
        parts = [_("{kind} done").format(kind=self.request.kind)]
        if section.get("evaluations") is not None:
            parts.append(_("{count} evaluations").format(count=section["evaluations"]))
        parts.append(_("{seconds} s").format(seconds=f"{self.seconds:.1f}"))
        if model.get("device"):
            parts.append(_("on {device}").format(device=model["device"])
                         + (f" ({model['provider']})" if model.get("provider") else ""))
        text = ", ".join(parts)
        if self.device == "cuda" and model.get("device") == "cpu":
            text += "; " + _("CUDA was asked for but the CPU ran the model")
        if self.request.mask_resampled:
            text += "; " + _("segment '{segment}' was on a different grid and was resampled onto '{volume}'").format(
                segment=self.request.segment_name, volume=self.request.reference_node.GetName())
        return text


#: The statistics of each map kind, in the order they are shown.
STATISTICS = {"forward": ("reach95_mm", "inside_fraction", "peak", "peak_ras_mm"),
              "backward": ("reach95_mm", "blocks90", "peak", "peak_ras_mm")}


def statistics_rows(kind: str, statistics: dict) -> list[tuple[str, str]]:
    """(name, value as text) rows of a map's statistics for a small table (empty for an output run)."""
    rows = []
    for key in STATISTICS.get(kind, ()):
        value = (statistics or {}).get(key)
        if value is None:
            text = "-"
        elif key == "reach95_mm":
            text = f"{value:.3g} mm"
        elif key == "inside_fraction":
            text = f"{100 * value:.1f} %"
        elif key == "peak_ras_mm":
            text = "(" + ", ".join(f"{v:.1f}" for v in value) + ") mm"
        elif key == "blocks90":
            text = str(int(value))
        else:
            text = f"{value:.4g}"
        rows.append((key, text))
    return rows


# ------------------------------------------------------------------------------------------------------------------
# A response atlas: ibix atlas of a request's input, kept in a folder
# ------------------------------------------------------------------------------------------------------------------

class AtlasRun(Run):
    """``ibix atlas`` of a request's input (kind "atlas") in a child process: a :class:`Run` whose result is a file.

    Once finished, ``atlas_path`` is ``output_dir/atlas.npz`` (``output_dir`` default: a new temporary folder,
    kept), for :class:`IBIXLib.live.LiveBackward`; nothing is added to the scene.
    """

    def __init__(self, request: scene.Request, model_path: str, output_dir: str | None = None, **kw):
        if request.kind != "atlas":
            raise ibx.InputError(f"an atlas run needs an atlas request, not {request.kind!r}")
        super().__init__(request, model_path, **kw)
        self.output_dir = output_dir
        self.atlas_path: str | None = None

    def _read(self) -> None:
        record = self.process.record
        files = record.get("files") or {}
        try:
            if "atlas" not in files:
                raise ibx.IBIXError("the IBIX engine finished without an atlas file; this is a bug: please report it")
            with open(record.get("summary") or files["summary"], encoding="utf-8") as f:
                self.summary = json.load(f)
            folder = self.output_dir or tempfile.mkdtemp(prefix="IBIX-atlas-")
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, "atlas.npz")
            shutil.move(files["atlas"], path)  # out of the job folder, which is removed
        except (ibx.IBIXError, OSError, ValueError, KeyError) as error:
            self._end(FAILED, f"could not keep the response atlas: {error}")
            return
        self.atlas_path = path
        self._end(FINISHED, "")


# ------------------------------------------------------------------------------------------------------------------
# A cohort: ibix cohort in the engine process
# ------------------------------------------------------------------------------------------------------------------

class CohortRun(_Job):
    """``ibix cohort MANIFEST ... --progress-format jsonl`` in a child process; nothing is added to the scene.

    Call :meth:`start`, then :meth:`poll` (a timer, or :func:`wait`) until ``done``; ``on_progress(done, total,
    stage)`` counts cases. Once finished, ``files`` holds ``cohort_csv`` and ``report`` (paths) and ``cases`` the
    counts the engine reported (total, failed, run, skipped). The results stay in ``output_dir`` (a rerun skips
    the cases already done); only the job folder is removed.
    """

    def __init__(self, manifest: str, model_path: str, output_dir: str, mapping: str = "forward",
                 card_path: str | None = None, workers: int = 2, device: str = "auto",
                 on_progress: Callable[[int, int, str], None] | None = None,
                 on_done: Callable[["CohortRun"], None] | None = None, launcher: Launcher | None = None,
                 python: str | None = None):
        if mapping not in ("forward", "backward"):
            raise ibx.InputError(f"unknown mapping {mapping!r}: use forward or backward")
        for what, path in (("manifest", manifest), ("model file", model_path)):
            if not path or not os.path.isfile(str(path)):
                raise ibx.InputError(f"{what} not found: {path}: choose an existing file")
        if not output_dir:
            raise ibx.InputError("no output folder: choose a folder for the cohort's results")
        self.manifest, self.model_path, self.output_dir = str(manifest), str(model_path), str(output_dir)
        self.mapping, self.card_path, self.workers, self.device = mapping, card_path, int(workers), device
        self.on_progress, self.on_done = on_progress, on_done
        self.launcher, self.python = launcher, python
        self.folder: str | None = None
        self.process: Process | None = None
        self.state = "idle"
        self.error = ""
        self.files: dict = {}
        self.cases: dict = {}
        self.seconds = 0.0
        self._started = 0.0
        self._reported: tuple | None = None

    @property
    def done(self) -> bool:
        return self.state in (FINISHED, FAILED, CANCELLED, CRASHED)

    def arguments(self) -> list[str]:
        args = ["cohort", self.manifest, "--model", self.model_path, "--mapping", self.mapping,
                "--output", self.output_dir, "--workers", str(self.workers), "--device", self.device,
                "--quiet", "--progress-format", "jsonl"]
        if self.card_path:
            args += ["--card", str(self.card_path)]
        return args

    def start(self) -> "CohortRun":
        if self.state != "idle":
            raise ibx.InputError("this cohort run was already started: make a new one")
        self._started = time.perf_counter()
        self.folder = tempfile.mkdtemp(prefix="IBIX-cohort-")
        try:
            self.process = Process(child_command(self.folder, self.device, self.arguments(), self.python),
                                   self.folder, self.launcher)
        except BaseException:
            remove_folder(self.folder)
            raise
        self.state = RUNNING
        return self

    def poll(self) -> str:
        if self.state != RUNNING:
            return self.state
        state = self.process.poll()
        if self.process.progress != self._reported and self.on_progress is not None and not self.process.done:
            self._reported = self.process.progress
            self.on_progress(*self.process.progress)
        if state == FINISHED:
            record = self.process.record
            self.files = {k: str(v) for k, v in (record.get("files") or {}).items()}
            self.cases = dict(record.get("cases") or {})
            self._end(FINISHED, "")
        elif self.process.done:
            self._end(state, self.process.error if state != CANCELLED else _("cancelled; finished cases were kept"))
        return self.state

    def cancel(self) -> None:
        if self.process is not None and self.state == RUNNING:
            self.process.cancel()

    @property
    def status(self) -> str:
        if self.state != FINISHED:
            return self.error
        c = self.cases
        return _("cohort done: {total} cases, {failed} failed ({run} run now, {skipped} finished earlier), "
                 "{seconds} s").format(total=c.get("total", "?"), failed=c.get("failed", "?"), run=c.get("run", "?"),
                                       skipped=c.get("skipped", "?"), seconds=f"{self.seconds:.1f}")


def cohort_cases(output_dir: str) -> list[dict]:
    """The rows of ``output_dir/cohort.csv`` (case, status, error, evaluations, seconds, statistics)."""
    from IBIXLogic import cohort

    path = os.path.join(str(output_dir), "cohort.csv")
    if not os.path.isfile(path):
        raise ibx.InputError(f"no cohort.csv in {output_dir}: run the cohort first")
    return cohort.read_rows(path)


#: Map files a case folder may hold, in the order they are loaded (the last one loaded is the one shown).
CASE_MAPS = (("forward_signed", "forward"), ("forward_normalized", "forward"), ("backward", "backward"))


def case_maps(output_dir: str, case: str) -> tuple[dict, list[tuple[str, str, str]]]:
    """A finished case's summary and its map files: (summary, [(role, kind, path)])."""
    folder = os.path.join(str(output_dir), str(case))
    try:
        with open(os.path.join(folder, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError) as error:
        raise ibx.InputError(f"case {case!r} has no finished result in {output_dir} ({error}); see its row in "
                             f"cohort.csv") from None
    maps = []
    for role, kind in CASE_MAPS:
        for path in summary.get("files") or []:
            name = os.path.basename(str(path))
            if name.startswith(role + ".") and os.path.isfile(path):
                maps.append((role, kind, str(path)))
    if not maps:
        raise ibx.InputError(f"case {case!r} holds no map volume in {folder}")
    return summary, maps


def _write(path: str, array: np.ndarray, geometry) -> str:
    """An input file for the child: uncompressed NRRD (fast to write on the main thread) with its geometry."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    geometry.to_sitk(image)
    sitk.WriteImage(image, path, False)
    return path
