"""Entry point of the IBIX engine process that the Slicer module starts (run as a script, never imported by Slicer).

Usage::

    PythonSlicer child.py --job-folder DIR [--device auto|cpu|cuda] -- <ibix command line arguments>
    PythonSlicer child.py --job-folder DIR [--device ...] -- probe --model MODEL.onnx
    PythonSlicer child.py --job-folder DIR [--device ...] -- serve
    PythonSlicer child.py --job-folder DIR [--device ...] -- runtime [--path DIR]

It runs the ``ibix`` command line (``IBIXLogic.cli.main``) with the given arguments, or ``probe``: load the model
and print one JSON line ``{"stage": "finished", "model": {...}}`` with its card, device and the ONNX Runtime
provider that really runs it, or ``serve``: a standby engine process that imports the engine and ONNX Runtime at
once and then runs jobs one after the other (see :func:`serve`), so that a run neither waits for Python to start
nor loads its model again, or ``runtime``: import ONNX Runtime (from ``--path`` first, where an install stages a new
build) and print ``{"stage": "finished", "runtime": {"version", "file", "providers"}}``. Three things are done here
rather than in the command line:

* A watchdog thread ends this process at once when ``<job folder>/cancel`` appears, the job folder is removed, or
  the process given as ``--parent-pid`` (3D Slicer) has ended. On some platforms ``PythonSlicer`` is a launcher
  that starts the real Python as its own child, so killing the process the module started would leave this one
  running, and its parent is the launcher, not Slicer; the cancel file and Slicer's process id reach it either way.
* With the GPU build of ONNX Runtime, ``onnxruntime.preload_dlls()`` loads the CUDA and cuDNN libraries that the
  ``onnxruntime-gpu[cuda,cudnn]`` wheels installed, before any session is created (Slicer ships neither).
* Once the command returned (its files written, its final record printed), the process ends at once
  (:func:`exit_now`): the module reads the result when the process has ended, or, in a standby process, when the
  job's end-of-job record has arrived.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
import warnings

#: Seconds between two looks of the watchdog at the job folder.
WATCH_INTERVAL = 0.05

#: Exit code of a cancelled run (as ``ibix`` after an interrupt).
CANCELLED = 130

#: Seconds a standby process waits for its next job before it ends by itself.
IDLE_LIMIT = 900.0

#: Seconds between two looks of a standby process for its next job.
JOB_INTERVAL = 0.01

#: The stage of the line that ends each job of a standby process, after everything the job printed.
JOB_ENDED = "job-ended"


def process_gone(pid: int):
    """A function telling whether process ``pid`` has ended (started while it runs).

    Linux: a pidfd, which names that very process (not a later one given the same id) and is ready once it has
    ended, reaped or not; Windows: a process handle, likewise; elsewhere: ``kill(pid, 0)``.
    """
    if hasattr(os, "pidfd_open"):
        import select

        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return lambda: True
        except OSError:  # an old kernel: fall through
            pass
        else:
            return lambda: bool(select.select([fd], [], [], 0)[0])
    if os.name == "nt":
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32")
        kernel32.OpenProcess.restype = ctypes.c_void_p
        kernel32.WaitForSingleObject.argtypes = (ctypes.c_void_p, ctypes.c_uint32)
        handle = kernel32.OpenProcess(0x00100000, False, pid)  # SYNCHRONIZE
        if not handle:
            return lambda: True
        return lambda: kernel32.WaitForSingleObject(handle, 0) == 0  # WAIT_OBJECT_0: it has ended

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    return gone


def watch(folder: str, parent_pid: int | None = None) -> None:
    """End the process (exit code 130) as soon as ``folder/cancel`` exists, ``folder`` is gone, or the process
    ``parent_pid`` has ended."""
    cancel = os.path.join(folder, "cancel")
    parent_gone = process_gone(parent_pid) if parent_pid else (lambda: False)

    def loop() -> None:
        while True:
            if os.path.exists(cancel) or not os.path.isdir(folder) or parent_gone():
                os._exit(CANCELLED)
            time.sleep(WATCH_INTERVAL)

    threading.Thread(target=loop, name="IBIX cancel watchdog", daemon=True).start()


def preload_cuda(device: str) -> None:
    """Load the CUDA/cuDNN libraries of the pip wheels where the GPU build of ONNX Runtime is installed."""
    if device == "cpu":
        return
    try:
        import onnxruntime
    except ImportError:
        return
    preload = getattr(onnxruntime, "preload_dlls", None)  # onnxruntime >= 1.21
    if preload is not None and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        try:
            preload()
        except Exception as error:  # the session falls back to the CPU and the module says so
            print(f"IBIX: could not preload the CUDA libraries: {error}", file=sys.stderr)


def probe(model_path: str, device: str) -> int:
    """Load the model as a run would; print its card, device and provider as one JSON line."""
    import IBIXLogic as ibx

    try:
        model = ibx.load_model(model_path, device=device)
    except Exception as error:  # reported to the module, which shows the message
        print(json.dumps({"stage": "failed", "error": str(error)}), flush=True)
        return 2 if isinstance(error, ValueError) else 1
    card = model.card
    info = {"name": card.name, "channels": list(card.input.channels), "spatial_dims": card.spatial_dims,
            "slice_axis": card.slice_axis, "units": card.output.units,
            "output_channels": list(card.output.channels or []), "device": model.device,
            "provider": model.provider, "requested": device}
    print(json.dumps({"stage": "finished", "model": info}), flush=True)
    return 0


def runtime_info() -> int:
    """Import ONNX Runtime; print its version, file and providers as one JSON line (an install's check)."""
    try:
        import onnxruntime
    except Exception as error:  # reported to the module, which keeps the installed build
        print(json.dumps({"stage": "failed", "error": f"{type(error).__name__}: {error}"}), flush=True)
        return 1
    info = {"version": str(getattr(onnxruntime, "__version__", "")), "file": os.path.abspath(onnxruntime.__file__),
            "providers": list(onnxruntime.get_available_providers())}
    print(json.dumps({"stage": "finished", "runtime": info}), flush=True)
    return 0


def serve(folder: str) -> int:
    """A standby engine process: run the jobs handed to it in ``folder`` one after the other; 0 once none came for
    IDLE_LIMIT seconds.

    A job is ``folder/job.json``, ``{"job": <number>, "arguments": [<ibix arguments>]}`` (written whole, renamed into
    place); it is removed when the job starts. The job runs ``ibix <arguments>``: its records and files are the
    command line's own, in the job's folder that its arguments name. After everything the job printed comes one
    more line, ``{"stage": "job-ended", "job": <number>, "code": <its exit code>}``. What the next job finds is the
    engine's in-process caches, each bounded: ONNX Runtime sessions, measured response radii, cut supervoxel chunks
    (keyed by what they depend on, so a map is the same as in a new process). Nothing else of a job stays: its
    warnings filters and their shown-once registries are reset, the command line removes its log handler, and
    unreachable objects are collected. A job that raises instead of returning ends the process (a crash).
    """
    import IBIXLogic.backward  # noqa: F401  (the imports a run needs, done while waiting)
    import IBIXLogic.cli
    import IBIXLogic.forward  # noqa: F401
    try:
        import jsonschema  # noqa: F401  (the card's check)
        import onnxruntime  # noqa: F401
    except ImportError:  # the run reports it
        pass
    IBIXLogic.cli.build_parser()  # and what the command line's parser imports
    path = os.path.join(folder, "job.json")
    while True:
        job = next_job(path)
        if job is None:
            return 0
        number, arguments = job
        with warnings.catch_warnings():  # a warning shown once by a job is shown again by the next
            code = IBIXLogic.cli.main(arguments, start_up=0.0)  # the process was up before the job
        sys.stderr.flush()
        print(json.dumps({"stage": JOB_ENDED, "job": number, "code": int(code or 0)}), flush=True)
        gc.collect()  # while the module reads the result


def next_job(path: str) -> tuple[int, list[str]] | None:
    """A standby process's next job from ``path``: (number, ``ibix`` arguments), the file removed once read; None
    after IDLE_LIMIT seconds without one."""
    end = time.monotonic() + IDLE_LIMIT
    while not os.path.exists(path):
        if time.monotonic() > end:
            return None
        time.sleep(JOB_INTERVAL)
    with open(path, encoding="utf-8") as f:
        job = json.load(f)
    os.remove(path)
    return int(job["job"]), [str(a) for a in job["arguments"]]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="child.py", description=__doc__.splitlines()[0])
    parser.add_argument("--job-folder", required=True)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--engine-path", default=None, help="folder that holds the IBIXLogic package")
    parser.add_argument("--parent-pid", type=int, default=None, help="end when this process (3D Slicer) has ended")
    split = argv.index("--") if "--" in argv else None
    own, rest = (argv[:split], argv[split + 1:]) if split is not None else (argv, [])
    args = parser.parse_args(own)
    if args.engine_path:
        sys.path.insert(0, args.engine_path)
    watch(args.job_folder, args.parent_pid)
    if rest[:1] == ["runtime"]:
        sub = argparse.ArgumentParser(prog="child.py runtime")
        sub.add_argument("--path", default=None, help="folder searched first for onnxruntime (a staged build)")
        path = sub.parse_args(rest[1:]).path
        if path:
            sys.path.insert(0, path)  # before anything imports onnxruntime
    preload_cuda(args.device)
    if rest[:1] == ["runtime"]:
        return runtime_info()
    if rest[:1] == ["probe"]:
        sub = argparse.ArgumentParser(prog="child.py probe")
        sub.add_argument("--model", required=True)
        return probe(sub.parse_args(rest[1:]).model, args.device)
    if rest == ["serve"]:
        return serve(args.job_folder)
    from IBIXLogic.cli import main as ibix

    return ibix(rest)


def exit_now(code: int) -> None:
    """End the process with ``code`` once its output is flushed, without the interpreter's teardown.

    Every file of the run is written and closed and its final record printed before this; tearing down ONNX
    Runtime, its thread pools and every module took 0.1-0.5 s more, and the module waits for this process's end
    before it reads the result."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))


if __name__ == "__main__":
    exit_now(main())
