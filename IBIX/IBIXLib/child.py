"""Entry point of the IBIX engine process that the Slicer module starts (run as a script, never imported by Slicer).

Usage::

    PythonSlicer child.py --job-folder DIR [--device auto|cpu|cuda] -- <ibix command line arguments>
    PythonSlicer child.py --job-folder DIR [--device ...] -- probe --model MODEL.onnx
    PythonSlicer child.py --job-folder DIR [--device ...] -- wait

It runs the ``ibix`` command line (``IBIXLogic.cli.main``) with the given arguments, or ``probe``: load the model
and print one JSON line ``{"stage": "finished", "model": {...}}`` with its card, device and the ONNX Runtime
provider that really runs it, or ``wait``: a standby process that imports the engine and ONNX Runtime at once,
then waits for ``<job folder>/job.json`` (the ``ibix`` arguments, a JSON list) and runs it, so that a run does not
wait for Python to start (it ends by itself after ``IDLE_LIMIT`` seconds without a job). Three things are done
here rather than in the command line:

* A watchdog thread ends this process at once when ``<job folder>/cancel`` appears or the job folder is removed.
  On some platforms ``PythonSlicer`` is a launcher that starts the real Python as its own child, so killing the
  process the module started would leave this one running; the cancel file reaches it either way.
* With the GPU build of ONNX Runtime, ``onnxruntime.preload_dlls()`` loads the CUDA and cuDNN libraries that the
  ``onnxruntime-gpu[cuda,cudnn]`` wheels installed, before any session is created (Slicer ships neither).
* Once the command returned (its files written, its final record printed), the process ends at once
  (:func:`exit_now`): the module reads the result when the process has ended.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

#: Seconds between two looks of the watchdog at the job folder.
WATCH_INTERVAL = 0.05

#: Exit code of a cancelled run (as ``ibix`` after an interrupt).
CANCELLED = 130

#: Seconds a standby process waits for a job before it ends by itself.
IDLE_LIMIT = 900.0

#: Seconds between two looks of a standby process for its job.
JOB_INTERVAL = 0.01


def watch(folder: str) -> None:
    """End the process (exit code 130) as soon as ``folder/cancel`` exists or ``folder`` is gone."""
    cancel = os.path.join(folder, "cancel")

    def loop() -> None:
        while True:
            if os.path.exists(cancel) or not os.path.isdir(folder):
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


def wait_for_job(folder: str) -> list[str] | None:
    """A standby process's job: the ``ibix`` arguments written to ``folder/job.json``, or None after IDLE_LIMIT."""
    import IBIXLogic.backward  # noqa: F401  (the imports a run needs, done while waiting)
    import IBIXLogic.cli  # noqa: F401
    import IBIXLogic.forward  # noqa: F401
    try:
        import onnxruntime  # noqa: F401
    except ImportError:  # the run reports it
        pass
    path = os.path.join(folder, "job.json")
    end = time.monotonic() + IDLE_LIMIT
    while not os.path.exists(path):
        if time.monotonic() > end:
            return None
        time.sleep(JOB_INTERVAL)
    with open(path, encoding="utf-8") as f:
        return [str(a) for a in json.load(f)]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="child.py", description=__doc__.splitlines()[0])
    parser.add_argument("--job-folder", required=True)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--engine-path", default=None, help="folder that holds the IBIXLogic package")
    split = argv.index("--") if "--" in argv else None
    own, rest = (argv[:split], argv[split + 1:]) if split is not None else (argv, [])
    args = parser.parse_args(own)
    if args.engine_path:
        sys.path.insert(0, args.engine_path)
    watch(args.job_folder)
    preload_cuda(args.device)
    if rest[:1] == ["probe"]:
        sub = argparse.ArgumentParser(prog="child.py probe")
        sub.add_argument("--model", required=True)
        return probe(sub.parse_args(rest[1:]).model, args.device)
    if rest == ["wait"]:
        rest = wait_for_job(args.job_folder)
        if rest is None:
            return 0
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
