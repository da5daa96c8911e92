"""A seeded fault campaign: damaged files of every format, result folders of earlier runs, interrupts at seeded
points of forward, backward, atlas and cohort runs, a full disk, concurrent runs on one folder, non-deterministic
models and damaged atlases.

Every case runs in a child process forked from the campaign's process (which imports IBIX but never opens a
model), so that a case may be killed without taking the campaign with it. Faults strike at seeded *events*, not at
seeded times: the child counts the file operations (``os.replace``, ``os.rename``, ``os.unlink``, ``os.rmdir``,
``SimpleITK.WriteImage``), model calls and progress records of the command it runs, and at the k-th one kills itself
(SIGKILL; or first cuts the volume file being written to half, then SIGKILL), interrupts its process group
(SIGINT, as Ctrl-C in a terminal) or pauses until the campaign releases it. A first run of each scenario counts its
events; the kill points are drawn from them. Nothing depends on how fast the machine is.

Each case ends in one outcome:

- ``clean``: a clear error (exit 2, or the documented code: 3 for a cohort with failed cases, 130 for an
  interrupt; the message names the file or the cause) or a correct result (compared with the undamaged input's);
- ``raw``: any other exception, exit code or a message that names nothing;
- ``wrong``: a result that completed but is not the correct one (a damaged input read as if whole, a noisy model
  explained);
- ``partial``: a result folder whose ``summary.json`` does not describe exactly the files beside it, a file under a
  final name that does not read whole, or temporary files left after a rerun.

A kill between the first and the last rename of publishing a folder leaves the staged summary that marks it; the
next run into the folder completes the publishing first. Such cases are counted (``mid_publish``) and checked after
that run; the folder's files are whole at every point.

As a script: ``python faults.py WORKDIR SEED [CATEGORY ...]`` prints one JSON line per case (after ``@faults ``)
and the tally per category at the end.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

#: Seconds a case may run before it counts as hung (a guard against hangs, far above any case's time).
CASE_TIMEOUT = 600.0
#: Address space of a case's process (bytes): a header that makes a reader allocate gigabytes fails there, not the
#: machine.
CHILD_MEMORY = 6 * 2**30
OUTCOMES = ("clean", "raw", "wrong", "partial")
MARK = "@faults "
CATEGORIES = ("files", "models", "atlases", "folders", "interrupts", "disk", "concurrent", "messages")
SHAPE = (6, 16, 18)


# -- a child process per case, with a seeded fault -----------------------------------------------------------------
@dataclass
class Fault:
    """Where a fault strikes: at event ``at`` (1-based; 0 never), ``kind`` "kill" (SIGKILL), "kill-mid-write" (the
    volume being written cut to half, then SIGKILL; at a write event), "interrupt" (SIGINT to the process group) or
    "pause" (until the file ``release`` exists; ``release`` + ".paused" says it is paused)."""

    at: int = 0
    kind: str = "none"
    release: str | None = None


def _arm(fault: Fault, log: str) -> None:
    """Count the events of this (child) process in the file ``log`` and strike at ``fault.at``."""
    import SimpleITK

    from IBIXLogic import model as model_module
    from IBIXLogic import session as session_module

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    count = [0]

    def event(kind: str) -> bool:
        count[0] += 1
        os.write(fd, f"{kind}\n".encode())
        if count[0] != fault.at:
            return False
        if fault.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault.kind == "interrupt":
            os.killpg(0, signal.SIGINT)
        elif fault.kind == "pause":
            Path(fault.release + ".paused").touch()
            while not os.path.exists(fault.release):
                time.sleep(0.01)
        return fault.kind == "kill-mid-write"

    def wrap(owner: Any, name: str, kind: str) -> None:
        real = getattr(owner, name)

        def patched(*args, **kwargs):
            event(kind)
            return real(*args, **kwargs)
        setattr(owner, name, patched)

    for name in ("replace", "rename", "unlink", "rmdir"):
        wrap(os, name, name)
    real_write = SimpleITK.WriteImage

    def write(image, path, *args, **kwargs):
        if event("write"):  # a kill in the middle of writing: the file so far, then the end
            real_write(image, path, *args, **kwargs)
            os.truncate(path, os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(image, path, *args, **kwargs)
    SimpleITK.WriteImage = write
    wrap(model_module.Model, "_call", "evaluation")
    wrap(session_module.Progress, "__call__", "progress")
    wrap(session_module.JsonLinesProgress, "__call__", "progress")


class Child:
    """``body()`` run in a forked child (its own process group), with ``fault`` armed; :meth:`finish` waits for it."""

    def __init__(self, body: Callable[[], Any], fault: Fault | None = None):
        self._output = tempfile.TemporaryFile()
        self.log = tempfile.mktemp(prefix="ibix-events-")
        read, write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child
            payload: dict = {}
            try:
                os.setsid()
                import resource
                resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY))
                os.close(read)
                os.dup2(self._output.fileno(), 1)
                os.dup2(self._output.fileno(), 2)
                if fault is not None:
                    _arm(fault, self.log)
                payload = {"value": body()}
            except SystemExit as exc:
                payload = {"value": exc.code}
            except BaseException as exc:  # noqa: BLE001 - every escape is reported to the campaign
                payload = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
            try:
                sys.stdout.flush()
                sys.stderr.flush()
                os.write(write, json.dumps(payload, default=str).encode())
            finally:
                os._exit(0)
        os.close(write)
        self._read = read

    def finish(self, timeout: float = CASE_TIMEOUT) -> dict:
        """Wait for the child; returns ``value`` (what ``body`` returned), ``error``, ``signal`` (that ended it),
        ``output`` (its stdout and stderr), ``events`` (the kinds counted) and ``hung``."""
        data, deadline, hung = b"", time.monotonic() + timeout, False
        while True:
            ready, _, _ = select.select([self._read], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                hung = True
                os.killpg(self.pid, signal.SIGKILL)
                break
            chunk = os.read(self._read, 1 << 16)
            if not chunk:
                break
            data += chunk
        os.close(self._read)
        os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
        try:  # what the child started in its group (a cohort's workers) ends with it
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        _, status = os.waitpid(self.pid, 0)
        self._output.seek(0)
        output = self._output.read().decode("utf-8", "replace")
        self._output.close()
        events = Path(self.log).read_text().split() if os.path.exists(self.log) else []
        Path(self.log).unlink(missing_ok=True)
        result = json.loads(data) if data else {}
        result.update(output=output, events=events, hung=hung,
                      signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None)
        return result


def forked(body: Callable[[], Any], fault: Fault | None = None) -> dict:
    return Child(body, fault).finish()


def command(argv: list[str]) -> Callable[[], int]:
    """A body that runs ``ibix`` with these arguments and returns its exit code."""
    def body() -> int:
        from IBIXLogic.cli import main
        return main([str(a) for a in argv])
    return body


# -- judging -------------------------------------------------------------------------------------------------------
def listing(folder: Path) -> dict:
    """Every entry of a folder (hidden ones too) with a digest of its bytes (folders: their listing)."""
    if not folder.exists():
        return {}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else listing(p)
            for p in sorted(folder.iterdir())}


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


def mid_publish(folder: Path) -> bool:
    """Whether a killed run left a complete staged run (its summary written) that the next run publishes."""
    return any(p.is_dir() and re.match(r"^\.ibix-run-\d+-[0-9a-f]{8}\.partial$", p.name) and (p / "summary.json")
               .is_file() for p in folder.iterdir()) if folder.exists() else False


def names(message: str, *words: str) -> bool:
    return any(w.lower() in message.lower() for w in words)


def last_line(result: dict) -> str:
    lines = [line for line in result.get("output", "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def outcome_of_refusal(result: dict, *words: str, code: int = 2) -> tuple[str, str]:
    """A command that must be refused: clean when it exits ``code`` with a message naming one of ``words``."""
    if result.get("error"):
        return "raw", result["error"]
    if result.get("value") == code and names(result["output"], *words):
        return "clean", last_line(result)
    return "raw", f"exit {result.get('value')} (signal {result.get('signal')}): {result['output'][-400:]}"


# -- the campaign's inputs ----------------------------------------------------------------------------------------
class Setup:
    """The campaign's shared inputs in ``workdir``: a 2D convolution model, a volume, masks, reference results."""

    def __init__(self, workdir: Path, seed: int):
        import IBIXLogic as ibx
        import onnx_models as om

        self.workdir, self.rng = workdir, random.Random(seed)
        self.data = workdir / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.model = om.save(om.convolution(om.KERNEL), self.data, "conv", {"spatial_dims": 2,
                                                                             "slice_axis": "axial"})
        self.geometry = ibx.Geometry((4.0, -3.0, 12.0), (0.9, 0.9, 2.0), np.diag([-1.0, -1.0, 1.0]), SHAPE)
        grid = np.indices(SHAPE).sum(axis=0)
        self.array = (40.0 + (grid % 7) * 3.0 + np.random.default_rng(seed).normal(0, 1, SHAPE)).astype(np.float32)
        mask = np.zeros(SHAPE, np.uint8)
        mask[2:4, 6:10, 7:11] = 1
        self.mask_array = mask
        self.volume = ibx.write_volume(self.data / "t1.nrrd", self.array, self.geometry)
        self.mask = ibx.write_volume(self.data / "mask.nrrd", mask, self.geometry)
        self.other = ibx.write_volume(self.data / "t1_other.nrrd", self.array[::-1].copy(), self.geometry)
        self.counter = 0
        self._references: dict = {}

    def folder(self, prefix: str) -> Path:
        self.counter += 1
        return self.workdir / f"{prefix}{self.counter:04d}"

    def argv(self, kind: str, out: Path, **changes: Any) -> list:
        """Arguments of a small run of ``kind`` (predict, forward, backward, atlas; with a png or not) into ``out``."""
        volume, mask = changes.get("volume", self.volume), changes.get("mask", self.mask)
        base = ["--model", changes.get("model", self.model), "--input", volume, "--output", out, "--quiet"]
        if kind == "predict":
            return ["predict", *base, *changes.get("extra", [])]
        if kind.startswith("forward"):
            ending = {"forward-no-png": ["--no-png"], "forward-progressive": ["--progressive"]}.get(kind, [])
            return ["forward", *base, "--mask", mask, "--n-jitters", "2", *changes.get("extra", []), *ending]
        if kind.startswith("backward"):
            return ["backward", *base, "--out-mask", mask, "--n-blocks", "8", "--n-jitters", "1",
                    *changes.get("extra", [])] + (["--no-png"] if kind == "backward-no-png" else [])
        if kind == "atlas":
            return ["atlas", *base, "--n-blocks", "8", "--n-jitters", "1", *changes.get("extra", [])]
        raise ValueError(kind)

    def reference(self, kind: str) -> list[str]:
        """The files a run of ``kind`` writes into an empty folder (computed once)."""
        if kind not in self._references:
            out = self.folder("reference-")
            result = forked(command(self.argv(kind, out)))
            assert result.get("value") == 0, result
            self._references[kind] = visible(out)
        return self._references[kind]


def record(category: str, kind: str, outcome: str, detail: str = "", **extra: Any) -> dict:
    return {"category": category, "kind": kind, "outcome": outcome, "detail": detail[:600], **extra}


# -- damaged files ------------------------------------------------------------------------------------------------
#: (name, suffix, SimpleITK compression, detached data file suffix)
FORMATS = [("nii", ".nii", False, None), ("nii.gz", ".nii.gz", True, None),
           ("nrrd raw", ".nrrd", False, None), ("nrrd gzip", ".nrrd", True, None),
           ("nhdr raw", ".nhdr", False, ".raw"), ("nhdr gzip", ".nhdr", True, ".raw.gz"),
           ("mha raw", ".mha", False, None), ("mha compressed", ".mha", True, None),
           ("mhd raw", ".mhd", False, ".raw"), ("mhd compressed", ".mhd", True, ".zraw")]


def _nifti2(path: Path) -> None:
    """Rewrite a NIfTI-1 file as NIfTI-2 (the same voxels and geometry)."""
    raw = path.read_bytes()
    one = {k: struct.unpack_from(f, raw, o) for k, f, o in (
        ("dim", "<8h", 40), ("datatype", "<h", 70), ("bitpix", "<h", 72), ("pixdim", "<8f", 76),
        ("vox_offset", "<f", 108), ("qform", "<2h", 252), ("quatern", "<6f", 256), ("srow", "<12f", 280))}
    header = bytearray(540)
    struct.pack_into("<i", header, 0, 540)
    header[4:12] = b"n+2\0\r\n\x1a\n"
    struct.pack_into("<h", header, 12, one["datatype"][0])
    struct.pack_into("<h", header, 14, one["bitpix"][0])
    struct.pack_into("<8q", header, 16, *one["dim"])
    struct.pack_into("<8d", header, 104, *one["pixdim"])
    struct.pack_into("<q", header, 168, 544)
    struct.pack_into("<dd", header, 176, 1.0, 0.0)
    struct.pack_into("<ii", header, 344, *one["qform"])
    struct.pack_into("<6d", header, 352, *one["quatern"])
    struct.pack_into("<12d", header, 400, *one["srow"])
    struct.pack_into("<i", header, 500, 2 | 8)  # mm, s
    path.write_bytes(bytes(header) + b"\0" * 4 + raw[int(one["vox_offset"][0]):])


def write_format(array: np.ndarray, geometry: Any, folder: Path, name: str, fmt: tuple) -> tuple[Path, Path]:
    """The array in a format; returns (the file to read, the file holding its voxels)."""
    import SimpleITK as sitk

    label, suffix, compress, detached = fmt
    path = folder / f"{name}{suffix}"
    image = sitk.GetImageFromArray(array)
    geometry.to_sitk(image)
    sitk.WriteImage(image, str(path), compress)
    data = path.with_name(f"{name}{detached}") if detached else path
    if detached and not data.exists():  # the writer names the data file itself
        data = next(p for p in folder.iterdir() if p.name.startswith(name + ".") and p != path)
    return path, data


def _text_field(path: Path, pattern: bytes, replace: Callable[[bytes], bytes]) -> None:
    """Replace group 1 of ``pattern`` in a text header (NRRD or MetaImage)."""
    raw = path.read_bytes()
    head_end = raw.find(b"\n\n") if path.suffix in (".nrrd", ".nhdr") else raw.find(b"ElementDataFile")
    head_end = len(raw) if head_end < 0 else head_end
    match = re.search(pattern, raw[:head_end])
    path.write_bytes(raw[:match.start(1)] + replace(match.group(1)) + raw[match.end(1):])


def _scale_last_size(path: Path, factor: int | None = None, sizes: bytes | None = None) -> None:
    """Change the sizes a header declares (the last one times ``factor``, or all to ``sizes``)."""
    if path.suffix in (".nii", ".gz"):
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        raw = bytearray(raw)
        dims = list(struct.unpack_from("<8h", raw, 40))
        dims[1:4] = [2000, 2400, 600] if sizes else dims[1:3] + [dims[3] * factor]
        struct.pack_into("<8h", raw, 40, *dims)
        path.write_bytes(gzip.compress(bytes(raw)) if path.suffix == ".gz" else bytes(raw))
        return
    key = rb"sizes: ([0-9 ]+)\n" if path.suffix in (".nrrd", ".nhdr") else rb"DimSize = ([0-9 ]+)\n"
    _text_field(path, key, lambda v: sizes if sizes else b" ".join(
        v.split()[:-1] + [str(int(v.split()[-1]) * factor).encode()]))


def _nifti_edit(path: Path, edit: Callable[[bytearray], None]) -> None:
    """Change a NIfTI-1 header (of a .nii or .nii.gz file) in place."""
    raw = path.read_bytes()
    packed = path.suffix == ".gz"
    data = bytearray(gzip.decompress(raw) if packed else raw)
    edit(data)
    path.write_bytes(gzip.compress(bytes(data)) if packed else bytes(data))


def _set_pixdim(value: float) -> Callable[[bytearray], None]:
    return lambda data: struct.pack_into("<f", data, 80, value)  # pixdim[1]


def _shear(data: bytearray) -> None:
    struct.pack_into("<f", data, 284, 0.4)  # srow_x[1]


def _vox_offset_past_end(data: bytearray) -> None:
    struct.pack_into("<f", data, 108, float(len(data) + 4096))


def _dim_zero(data: bytearray) -> None:
    struct.pack_into("<h", data, 46, 0)  # dim[3]


def _double_bitpix(data: bytearray) -> None:
    struct.pack_into("<h", data, 72, struct.unpack_from("<h", data, 72)[0] * 2)


def damages(fmt: tuple, rng: random.Random) -> list[tuple[str, Callable[[Path, Path], Any]]]:
    """(what, damage(file, data file)) for a format; appended bytes leave every voxel readable, the others not."""
    label = fmt[0]
    nifti = label.startswith("nii")
    cuts = sorted({round(rng.uniform(0.02, 0.98), 3) for _ in range(3)})
    found: list = []
    for fraction in cuts:
        found.append((f"data cut at {fraction:.0%}", lambda p, d, f=fraction: _cut(d, f)))
    found.append(("empty file", lambda p, d: p.write_bytes(b"")))
    found.append(("file cut to its first 40 bytes", lambda p, d: p.write_bytes(p.read_bytes()[:40])))
    found.append(("header declares twice the slices", lambda p, d: _scale_last_size(p, 2)))
    found.append(("header declares 2000x2400x600 voxels", lambda p, d: _scale_last_size(p, sizes=b"2000 2400 600")))
    found.append(("bytes appended after the data", lambda p, d: d.write_bytes(d.read_bytes() + b"\0" * 37)))
    if label.endswith(("gz", "gzip", "compressed")) or label == "nii.gz":
        part = round(rng.uniform(0.1, 0.9), 2)
        found.append((f"a valid compressed stream of {part:.0%} of the data",
                      lambda p, d, f=part: _recompressed_part(p, d, f)))
    if fmt[3]:  # a detached data file
        found.append(("data file missing", lambda p, d: d.unlink()))
        found.append(("header cut in half", lambda p, d: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2])))
    if nifti:
        found += [("vox_offset past the end", lambda p, d: _nifti_edit(p, _vox_offset_past_end)),
                  ("dim[3] = 0", lambda p, d: _nifti_edit(p, _dim_zero)),
                  ("pixdim[1] = 0 (sform 0.9 mm)", lambda p, d: _nifti_edit(p, _set_pixdim(0.0))),
                  ("pixdim[1] = 1.0 (sform 0.9 mm)", lambda p, d: _nifti_edit(p, _set_pixdim(1.0))),
                  ("pixdim[1] NaN", lambda p, d: _nifti_edit(p, _set_pixdim(float("nan")))),
                  ("sheared sform", lambda p, d: _nifti_edit(p, _shear)),
                  ("bitpix doubled", lambda p, d: _nifti_edit(p, _double_bitpix))]
    return found


def _cut(path: Path, fraction: float) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[:max(1, int(len(raw) * fraction))])


def _recompressed_part(path: Path, data: Path, fraction: float) -> None:
    """Replace the compressed voxel data with a valid stream holding only part of them."""
    import zlib

    raw = data.read_bytes()
    if data == path and path.suffix in (".nrrd", ".mha"):  # attached: the stream follows the header
        end = raw.find(b"\n\n") + 2 if path.suffix == ".nrrd" else raw.find(b"\n", raw.find(b"ElementDataFile")) + 1
        head, stream = raw[:end], raw[end:]
    else:
        head, stream = b"", raw
    decoded = zlib.decompressobj(32 + zlib.MAX_WBITS).decompress(stream)
    part = decoded[:int(len(decoded) * fraction)]
    if stream[:2] == b"\x1f\x8b":
        packed = gzip.compress(part)
    else:
        packed = zlib.compress(part)
        if path.suffix in (".mha", ".mhd"):
            header = path.read_bytes()
            header = re.sub(rb"CompressedDataSize = \d+", b"CompressedDataSize = " + str(len(packed)).encode(), header)
            if data != path:
                path.write_bytes(header)
            else:
                head = re.sub(rb"CompressedDataSize = \d+", b"CompressedDataSize = " + str(len(packed)).encode(), head)
    data.write_bytes(head + packed)


def file_cases(setup: Setup) -> list[dict]:
    """Each damage of each format, for a volume and for a mask: read through the API (every case) and through
    ``ibix forward`` (a seeded third of them)."""
    import IBIXLogic as ibx

    results = []
    reference_out = setup.folder("files-reference-")
    assert forked(command(setup.argv("forward-no-png", reference_out))).get("value") == 0
    reference = ibx.read_volume(reference_out / "forward_signed.nrrd")[0]
    for use, array in (("volume", setup.array), ("mask", setup.mask_array)):
        for fmt in FORMATS:
            for what, damage in damages(fmt, setup.rng):
                folder = setup.folder("files-")
                folder.mkdir()
                path, data = write_format(array, setup.geometry, folder, use, fmt)
                damage(path, data)
                kind = f"{use}: {fmt[0]}: {what}"
                results.append(_judge_read(setup, kind, path, data, use, array))
                if setup.rng.random() < 0.34:
                    results.append(_judge_command(setup, kind, path, data, use, reference))
    return results


def _judge_read(setup: Setup, kind: str, path: Path, data: Path, use: str, array: np.ndarray) -> dict:
    import IBIXLogic as ibx

    def read():
        if use == "volume":
            values, geometry = ibx.read_volume(path)
            return {"same": bool(values.shape == array.shape and np.array_equal(values, array)
                                 and geometry.matches(setup.geometry))}
        mask = ibx.read_mask(path, reference=setup.geometry)
        return {"same": bool(np.array_equal(mask, array > 0))}

    result = forked(read)
    if result.get("error"):
        message = result["error"]
        if message.startswith(("InputError", "ModelError")) and names(message, path.name, data.name):
            return record("files", kind + " (read)", "clean", message)
        return record("files", kind + " (read)", "raw", message)
    if result.get("value", {}).get("same"):
        return record("files", kind + " (read)", "clean", "read whole and equal to the undamaged file")
    return record("files", kind + " (read)", "wrong", "read without an error but not equal to the undamaged file")


def _judge_command(setup: Setup, kind: str, path: Path, data: Path, use: str, reference: np.ndarray) -> dict:
    import IBIXLogic as ibx

    out = setup.folder("files-out-")
    argv = setup.argv("forward-no-png", out, **({"volume": path} if use == "volume" else {"mask": path}))
    result = forked(command(argv))
    if result.get("value") == 2 and names(last_line(result), path.name, data.name):
        return record("files", kind + " (ibix forward)", "clean", last_line(result))
    if result.get("value") == 0:
        same = np.allclose(ibx.read_volume(out / "forward_signed.nrrd")[0], reference, atol=1e-5)
        return record("files", kind + " (ibix forward)", "clean" if same else "wrong",
                      "a map equal to the undamaged file's" if same else "exit 0 with a map unlike the undamaged "
                                                                         "file's")
    return record("files", kind + " (ibix forward)", "raw", f"exit {result.get('value')}: {result['output'][-400:]}")


# -- non-deterministic models --------------------------------------------------------------------------------------
def model_cases(setup: Setup) -> list[dict]:
    import onnx_models as om

    results = []
    for kind in om.NOISY_KINDS:
        scales = [1.0] if kind not in ("normal", "uniform", "scalar") else [1.0, setup.rng.choice([1e-2, 1e-3]), 1e-9]
        for scale in scales:
            path = om.save(om.noisy(kind, scale), setup.data, f"noisy_{kind}_{scale:g}")
            noisy = kind not in om.NOISY_DETERMINISTIC and scale > 1e-6 and kind != "conv-then-dropout"
            label = f"{kind}, scale {scale:g}"

            def explain(path=path):
                import IBIXLogic as ibx
                model = ibx.load_model(path, device="cpu")
                x, mask = setup.array[2], setup.mask_array[2] > 0
                result = ibx.forward_mapping(model, x, mask, n_jitters=2, max_jitter=1.0)
                brute = np.zeros(x.shape)
                base = model.predict(x).astype(np.float64)
                for k in (-2, -1, 1, 2):
                    h = np.float32(k / 2)
                    brute += (model.predict(x + h * mask).astype(np.float64) - base) / h
                return {"agrees": bool(np.allclose(result.signed, brute / 4, atol=1e-3))}

            result = forked(explain)
            error = result.get("error", "")
            if noisy:
                outcome = ("clean" if error.startswith("ModelError") and "not deterministic" in error else
                           "wrong" if not error else "raw")
            else:
                outcome = "clean" if not error and result["value"]["agrees"] else "wrong" if not error else "raw"
            results.append(record("models", f"load_model: {label}", outcome, error or "loaded and explained"))
            if noisy and setup.rng.random() < 0.5:
                out = setup.folder("models-out-")
                run = forked(command(setup.argv("forward-no-png", out, model=path)))
                outcome, detail = outcome_of_refusal(run, "not deterministic")
                if outcome == "clean" and not names(detail, path.name):
                    outcome, detail = "raw", "the message does not name the model: " + detail
                results.append(record("models", f"ibix forward: {label}", outcome, detail))
    return results


# -- damaged atlases -----------------------------------------------------------------------------------------------
def _npz(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _write_npz(path: Path, arrays: dict, checksum: bool) -> None:
    from IBIXLogic.atlas import ARRAYS, contents_checksum

    if checksum and all(k in arrays for k in ARRAYS):
        meta = json.loads(str(arrays["meta"]))
        meta["checksum"] = contents_checksum(arrays)
        arrays = dict(arrays, meta=np.array(json.dumps(meta)))
    with open(path, "wb") as file:
        np.savez(file, **arrays)


def _edit_atlas(edit: Callable[[dict], None], checksum: bool = True) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        arrays = _npz(path)
        edit(arrays)
        _write_npz(path, arrays, checksum)
    return damage


def _edit_meta(edit: Callable[[dict], None]) -> Callable[[dict], None]:
    def change(arrays: dict) -> None:
        meta = json.loads(str(arrays["meta"]))
        edit(meta)
        arrays["meta"] = np.array(json.dumps(meta))
    return change


def _huge_member(path: Path) -> None:
    """Rewrite the 'values' member with a header declaring 10**12 entries."""
    arrays = _npz(path)
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w") as member:
                if name == "values":
                    np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False,
                                                                  "shape": (10**12,)})
                    member.write(array.tobytes())
                else:
                    np.lib.format.write_array(member, array)


def atlas_damages(rng: random.Random) -> list[tuple[str, Callable[[Path], None]]]:
    def setitem(key, value):
        return lambda a: a.__setitem__(key, value(a))

    found = [(f"cut at {f:.0%}", lambda p, f=f: p.write_bytes(p.read_bytes()[:int(len(p.read_bytes()) * f)]))
             for f in sorted({round(rng.uniform(0.05, 0.98), 2) for _ in range(3)})]
    found += [
        ("empty file", lambda p: p.write_bytes(b"")),
        ("random bytes", lambda p: p.write_bytes(bytes(rng.getrandbits(8) for _ in range(5000)))),
        ("a JSON file", lambda p: p.write_text('{"atlas": true}')),
        ("no denominator", _edit_atlas(lambda a: a.pop("denominator"))),
        ("metadata not JSON", _edit_atlas(setitem("meta", lambda a: np.array("{not json")), checksum=False)),
        ("metadata without geometry", _edit_atlas(_edit_meta(lambda m: m.pop("geometry")))),
        ("NaN responses (checksum updated)", _edit_atlas(setitem("values", lambda a: np.where(
            np.arange(len(a["values"])) % 3 == 0, np.float32(np.nan), a["values"]).astype(np.float32)))),
        ("NaN responses", _edit_atlas(setitem("values", lambda a: np.full_like(a["values"], np.nan)), checksum=False)),
        ("block offsets reversed", _edit_atlas(setitem("starts", lambda a: a["starts"][::-1].copy()))),
        ("negative denominators", _edit_atlas(setitem("denominator", lambda a: -a["denominator"]))),
        ("denominators doubled", _edit_atlas(setitem("denominator", lambda a: 2 * a["denominator"]))),
        ("indices out of the grid", _edit_atlas(setitem("index", lambda a: a["index"] + a["labels"].size))),
        ("boxes swapped", _edit_atlas(lambda a: a.update(low=a["high"].copy(), high=a["low"].copy()))),
        ("responses as float64", _edit_atlas(setitem("values", lambda a: a["values"].astype(np.float64)))),
        ("labels of another shape", _edit_atlas(_other_shape)),
        ("version 1", _edit_atlas(_edit_meta(lambda m: m.update(version=1)))),
        ("one response changed", _edit_atlas(setitem("values", lambda a: a["values"] * np.float32(1.0001)),
                                             checksum=False)),
        ("a member declaring 10**12 entries", _huge_member),
    ]
    return found


def _other_shape(arrays: dict) -> None:
    arrays["labels"] = arrays["labels"][:, :-2].copy()
    meta = json.loads(str(arrays["meta"]))
    meta["geometry"]["shape"] = list(arrays["labels"].shape)
    arrays["meta"] = np.array(json.dumps(meta))


def atlas_cases(setup: Setup) -> list[dict]:
    import IBIXLogic as ibx

    results = []
    source = setup.folder("atlas-reference-")
    assert forked(command(setup.argv("atlas", source))).get("value") == 0
    answer_out = setup.folder("atlas-answer-")
    argv = setup.argv("backward-no-png", answer_out, extra=["--atlas", source / "atlas.npz"])
    assert forked(command(argv)).get("value") == 0
    reference = ibx.read_volume(answer_out / "backward.nrrd")[0]
    other = setup.folder("atlas-other-")
    assert forked(command(setup.argv("atlas", other, volume=setup.other))).get("value") == 0
    cases = atlas_damages(setup.rng) + [("atlas of another input", None)]
    for what, damage in cases:
        folder = setup.folder("atlas-")
        folder.mkdir()
        path = folder / "damaged.npz"
        shutil.copyfile(other / "atlas.npz" if damage is None else source / "atlas.npz", path)
        if damage is not None:
            damage(path)
        out = setup.folder("atlas-out-")
        result = forked(command(setup.argv("backward-no-png", out, extra=["--atlas", path])))
        if result.get("value") == 0:
            same = np.allclose(ibx.read_volume(out / "backward.nrrd")[0], reference, atol=1e-6)
            results.append(record("atlases", f"ibix backward --atlas: {what}", "clean" if same else "wrong",
                                  "answered as the undamaged atlas" if same else "answered wrongly"))
        else:
            outcome, detail = outcome_of_refusal(result, path.name)
            results.append(record("atlases", f"ibix backward --atlas: {what}", outcome, detail))
        if damage is not None:
            loaded = forked(lambda p=path: bool(ibx.ResponseAtlas.load(p)))
            error = loaded.get("error", "")
            ok = error.startswith("InputError") and path.name in error
            results.append(record("atlases", f"ResponseAtlas.load: {what}",
                                  "clean" if ok else "wrong" if not error else "raw", error or "loaded"))
    return results


# -- result folders of earlier runs --------------------------------------------------------------------------------
RUN_KINDS = ("forward", "forward-no-png", "backward", "backward-no-png", "predict", "atlas", "forward-progressive")


def folder_cases(setup: Setup) -> list[dict]:
    from onnx_models import folder_problems

    results = []
    pairs = [(a, b) for a in RUN_KINDS for b in RUN_KINDS]
    setup.rng.shuffle(pairs)
    for first, second in pairs[:14] + [("forward", "forward-no-png"), ("predict", "predict-nifti")]:
        out = setup.folder("folders-")
        runs = [forked(command(setup.argv(k.replace("-nifti", ""), out, **(
            {"extra": ["--format", "nifti"]} if k.endswith("nifti") else {})))) for k in (first, second)]
        kind = f"{first}, then {second}"
        if any(r.get("value") != 0 for r in runs):
            results.append(record("folders", kind, "raw", " / ".join(r["output"][-300:] for r in runs)))
            continue
        problems = folder_problems(out, rerun=True)
        expected = [n.replace(".nrrd", ".nii.gz") for n in setup.reference(second.replace("-nifti", ""))] \
            if second.endswith("nifti") else setup.reference(second)
        if visible(out) != sorted(expected):
            problems.append(f"holds {visible(out)}, the second run writes {sorted(expected)}")
        results.append(record("folders", kind, "partial" if problems else "clean", "; ".join(problems)))
    return results


# -- interrupts ----------------------------------------------------------------------------------------------------
def _cohort_setup(setup: Setup) -> tuple[Path, list]:
    """A manifest of three small forward cases (different masks)."""
    import csv

    import IBIXLogic as ibx

    manifest = setup.data / "manifest.csv"
    if not manifest.exists():
        rows = [["case", "input", "mask", "n_jitters"]]
        for i in range(3):
            mask = np.zeros(SHAPE, np.uint8)
            mask[i + 1, 4 + i:8 + i, 5:9] = 1
            ibx.write_volume(setup.data / f"case_mask{i}.nrrd", mask, setup.geometry)
            rows.append([f"case{i}", str(setup.volume), str(setup.data / f"case_mask{i}.nrrd"), "1"])
        with open(manifest, "w", newline="") as handle:
            csv.writer(handle).writerows(rows)
    return manifest, ["case0", "case1", "case2"]


def cohort_argv(setup: Setup, out: Path) -> list:
    manifest, _ = _cohort_setup(setup)
    return ["cohort", manifest, "--model", setup.model, "--mapping", "forward", "--output", out, "--workers", "1",
            "--quiet"]


def _judge_after_fault(setup: Setup, kind: str, result: dict, out: Path, before: dict, rerun: list,
                       expected: list[str], category: str = "interrupts") -> list[dict]:
    """After a kill or an interrupt: the folder's files whole and described (a folder mid-publish excepted, which the
    rerun must complete); an interrupt exits 130 saying so, with the earlier or the new set in place; the rerun
    exits 0 and leaves exactly its files, no temporary one."""
    from onnx_models import folder_problems

    results = []
    extra = {}
    if result.get("hung") or result.get("error"):
        return [record(category, kind, "raw", result.get("error") or "hung")]
    if result["signal"] == signal.SIGKILL:
        problems = folder_problems(out)
        if problems and mid_publish(out) and not [p for p in problems if "does not read" in p]:
            extra["mid_publish"] = True
            problems = []
        outcome = "partial" if problems else "clean"
        results.append(record(category, kind, outcome, "; ".join(problems) or "killed; the folder describes itself",
                              **extra))
    else:
        code = result.get("value")
        problems = folder_problems(out, rerun=True)
        if code == 130 and names(result["output"], "interrupted"):
            files = sorted(n for n in visible(out) if (out / n).is_file())  # cohorts keep their finished cases
            earlier = sorted(n for n, v in before.items() if not n.startswith(".") and isinstance(v, str))
            if files != earlier and files != sorted(n for n in expected if "." in n):
                problems.append(f"after the interrupt the folder holds {visible(out)}: neither the earlier set nor "
                                "the new one")
            results.append(record(category, kind, "partial" if problems else "clean",
                                  "; ".join(problems) or last_line(result)))
        elif code == 0:  # the interrupt came after the last event that could stop it
            results.append(record(category, kind, "partial" if problems else "clean", "; ".join(problems) or
                                  "finished before the interrupt took effect"))
        else:
            results.append(record(category, kind, "raw", f"exit {code}: {result['output'][-400:]}"))
    again = forked(command(rerun))
    problems = folder_problems(out, rerun=True)
    if again.get("value") not in (0,):
        results.append(record(category, kind + ", rerun", "raw", f"exit {again.get('value')}: "
                              f"{again['output'][-400:]}"))
    else:
        if visible(out) != sorted(expected):
            problems.append(f"after the rerun the folder holds {visible(out)}, expected {sorted(expected)}")
        results.append(record(category, kind + ", rerun", "partial" if problems else "clean", "; ".join(problems)))
    return results


def _kill_points(events: list[str], rng: random.Random, count: int) -> list[int]:
    """Seeded event numbers (1-based) to strike at: spread over the run, the last ones (publishing) included."""
    n = len(events)
    points = {n, max(1, n - 2)} | {rng.randint(1, n) for _ in range(count)}
    return sorted(points)


def interrupt_cases(setup: Setup) -> list[dict]:
    results = []
    for run_kind in ("forward", "backward", "atlas", "forward-progressive"):
        for earlier in (None, setup.rng.choice(("forward", "backward-no-png", "predict"))):
            count_out = setup.folder("count-")
            if earlier:
                assert forked(command(setup.argv(earlier, count_out))).get("value") == 0
            counted = forked(command(setup.argv(run_kind, count_out)), Fault(kind="none"))
            assert counted.get("value") == 0, counted
            events = counted["events"]
            expected = setup.reference(run_kind)
            strikes = [(k, "kill") for k in _kill_points(events, setup.rng, 2)]
            writes = [i + 1 for i, e in enumerate(events) if e == "write"]
            strikes += [(setup.rng.choice(writes), "kill-mid-write")] if writes else []
            strikes += [(setup.rng.randint(1, len(events)), "interrupt")]
            for at, how in strikes:
                out = setup.folder("interrupt-")
                if earlier:
                    assert forked(command(setup.argv(earlier, out))).get("value") == 0
                before = listing(out)
                argv = setup.argv(run_kind, out)
                result = forked(command(argv), Fault(at=at, kind=how))
                kind = (f"{run_kind} over {earlier or 'an empty folder'}: {how} at event {at} of {len(events)} "
                        f"({events[at - 1]})")
                results += _judge_after_fault(setup, kind, result, out, before, argv, expected)
    results += cohort_interrupt_cases(setup)
    return results


def cohort_interrupt_cases(setup: Setup) -> list[dict]:
    """SIGKILL of ``ibix cohort`` at seeded events and Ctrl-C to its process group (its Dask workers included)."""
    results = []
    count_out = setup.folder("cohort-count-")
    counted = forked(command(cohort_argv(setup, count_out)), Fault(kind="none"))
    if counted.get("value") != 0:
        return [record("interrupts", "cohort: counting run", "raw", counted["output"][-600:])]
    events = counted["events"]
    expected = visible(count_out)
    progress = [i + 1 for i, e in enumerate(events) if e == "progress"]
    strikes = [(setup.rng.choice(progress[1:-1] or progress), how) for how in ("kill", "interrupt")]
    for at, how in strikes:
        out = setup.folder("cohort-")
        argv = cohort_argv(setup, out)
        result = forked(command(argv), Fault(at=at, kind=how))
        kind = f"cohort: {how} at event {at} of {len(events)} ({events[at - 1]})"
        if how == "interrupt" and result.get("value") == 130 and not names(result["output"], "cases finished"):
            results.append(record("interrupts", kind, "raw", "exit 130 without saying what was kept: "
                                  + last_line(result)))
            continue
        results += _judge_after_fault(setup, kind, result, out, {}, argv, expected)
    return results


# -- a full disk ---------------------------------------------------------------------------------------------------
def disk_cases(setup: Setup) -> list[dict]:
    """Runs into a small tmpfs filled to seeded levels (as root only; otherwise one skipped case says why)."""
    from onnx_models import folder_problems

    mount = setup.workdir / "disk"
    mount.mkdir(exist_ok=True)
    if os.geteuid() != 0:
        return [record("disk", "tmpfs", "skipped", "not root: a full disk is tried on a small tmpfs, which only root "
                                                   "may mount")]
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        return [record("disk", "tmpfs", "skipped", f"mount failed: {mounted.stderr.strip()}")]
    results = []
    try:
        for run_kind in ("forward", "backward", "atlas", "predict", "cohort"):
            probe = setup.folder("disk-size-")
            forked(command(cohort_argv(setup, probe) if run_kind == "cohort" else setup.argv(run_kind, probe)))
            size = sum(p.stat().st_size for p in probe.rglob("*") if p.is_file())
            for _ in range(1 if run_kind == "cohort" else 4):
                out = mount / "out"
                shutil.rmtree(out, ignore_errors=True)
                earlier = setup.rng.choice((None, "forward", "backward-no-png"))
                if earlier:
                    assert forked(command(setup.argv(earlier, out))).get("value") == 0
                before = listing(out)
                free = int(setup.rng.uniform(0.0, 1.3) * size)
                filler = mount / "filler"
                with open(filler, "wb") as handle:
                    try:
                        handle.write(b"\0" * max(0, shutil.disk_usage(mount).free - free))
                    except OSError:
                        pass
                argv = cohort_argv(setup, out) if run_kind == "cohort" else setup.argv(run_kind, out)
                kind = f"{run_kind} over {earlier or 'an empty folder'} with {free} of {size} bytes free"
                results.append(_judge_full_disk(kind, forked(command(argv)), out, before, run_kind == "cohort"))
                filler.unlink()
                again = forked(command(argv))
                problems = folder_problems(out, rerun=True)
                results.append(record("disk", kind + ", rerun with space",
                                      "partial" if problems or again.get("value") not in (0,) else "clean",
                                      "; ".join(problems) or f"exit {again.get('value')}"))
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
    return results


def _judge_full_disk(kind: str, result: dict, out: Path, before: dict, cohort: bool) -> dict:
    """A run on a full disk: it fits (exit 0: the new set, whole), or it is refused (exit 2, or 3 for a cohort whose
    cases failed, saying the disk is full) leaving the earlier set as it was, no temporary entry; a cohort keeps the
    cases it finished, each whole."""
    from onnx_models import folder_problems

    code = result.get("value")
    if code == 0:
        problems = folder_problems(out, rerun=True)
        return record("disk", kind, "partial" if problems else "clean", "; ".join(problems) or "fitted")
    if code not in (2, 3) or not names(result["output"], "space", "disk") or (code == 3 and not cohort):
        return record("disk", kind, "raw", f"exit {code}: {result['output'][-400:]}")
    problems = folder_problems(out)
    hidden = [n for n in listing(out) if n.startswith(".")]
    if hidden:
        problems.append(f"temporary entries left: {hidden}")
    now = listing(out)
    if cohort:  # finished cases stay (each whole, which folder_problems checks); the cohort's own files do not change
        if {n: v for n, v in now.items() if isinstance(v, str)} != {n: v for n, v in before.items()
                                                                    if isinstance(v, str)} and code == 2:
            problems.append("the cohort's own files changed although it was refused")
    elif now != before:
        problems.append(f"the earlier set changed: {sorted(before)} -> {sorted(now)}")
    return record("disk", kind, "partial" if problems else "clean", "; ".join(problems) or last_line(result))


# -- concurrent runs -----------------------------------------------------------------------------------------------
def concurrent_cases(setup: Setup) -> list[dict]:
    from onnx_models import folder_problems

    results = []
    count_out = setup.folder("concurrent-count-")
    events = forked(command(setup.argv("forward", count_out)), Fault(kind="none"))["events"]
    for second in ("forward", "backward", "atlas", "cohort"):
        for ending in ("release",) if second == "cohort" else ("release", "kill"):
            out = setup.folder("concurrent-")
            release = str(setup.workdir / f"release{setup.counter}")
            holding = next(i for i, e in enumerate(events, start=1) if e in ("progress", "write"))  # lock taken
            at = setup.rng.randint(holding, len(events))
            first = Child(command(setup.argv("forward", out)), Fault(at=at, kind="pause", release=release))
            deadline = time.monotonic() + CASE_TIMEOUT
            while not os.path.exists(release + ".paused") and time.monotonic() < deadline:
                time.sleep(0.01)
            argv = cohort_argv(setup, out) if second == "cohort" else setup.argv(second, out)
            blocked = forked(command(argv))
            kind = f"{second} while forward holds the folder (paused at event {at}: {events[at - 1]}), then {ending}"
            outcome, detail = outcome_of_refusal(blocked, f"process {first.pid}")
            results.append(record("concurrent", kind, outcome, detail))
            if ending == "kill":
                os.killpg(first.pid, signal.SIGKILL)
            Path(release).touch()
            ended = first.finish()
            if ending == "release" and ended.get("value") != 0:
                results.append(record("concurrent", kind + ": the first run", "raw", ended["output"][-400:]))
                continue
            after = forked(command(argv))
            problems = folder_problems(out, rerun=True)
            ok = after.get("value") == 0 and not problems
            results.append(record("concurrent", kind + ": the second run afterwards", "clean" if ok else "partial",
                                  "; ".join(problems) or after["output"][-300:]))
    return results


# -- messages that name the real cause -----------------------------------------------------------------------------
def message_cases(setup: Setup) -> list[dict]:
    import IBIXLogic as ibx

    results = []
    loop = setup.workdir / "loop"
    if not loop.is_symlink():
        loop.symlink_to(loop)
    outcome, detail = outcome_of_refusal(forked(command(setup.argv("predict", loop / "out"))), "loop")
    results.append(record("messages", "output folder through a symbolic link loop", outcome, detail))
    folder = setup.folder("messages-")
    folder.mkdir()
    for use in ("volume", "mask"):
        path, _ = write_format(setup.array if use == "volume" else setup.mask_array, setup.geometry, folder,
                               f"dim0_{use}", FORMATS[0])
        _nifti_edit(path, _dim_zero)
        argv = setup.argv("forward-no-png", setup.folder("messages-out-"), **{use: path})
        outcome, detail = outcome_of_refusal(forked(command(argv)), "degenerate dimension")
        if outcome == "clean" and path.name not in detail:
            outcome = "raw"
        results.append(record("messages", f"dim[3] = 0 in the {use}", outcome, detail))

    path, _ = write_format(setup.array, setup.geometry, folder, "nifti2", FORMATS[0])
    _nifti2(path)
    outcome, detail = outcome_of_refusal(forked(command(setup.argv("predict", setup.folder("messages-out-"),
                                                                   volume=path))), "NIfTI-2")
    results.append(record("messages", "a NIfTI-2 file (which ITK does not read)", outcome, detail))

    def other_shape():
        model = ibx.load_model(setup.model, device="cpu")
        atlas = ibx.block_response_atlas(model, setup.array, n_blocks=8, n_jitters=1)
        atlas.backward(np.ones(SHAPE[:2] + (SHAPE[2] - 2,), bool))
    result = forked(other_shape)
    ok = result.get("error", "").startswith("InputError") and "atlas" in result["error"]
    results.append(record("messages", "an output mask of another shape than the atlas", "clean" if ok else "raw",
                          result.get("error", "answered")))
    script = ("import re, resource, sys\nimport IBIXLogic.model as m\n"
              "size = int(re.search(r'VmSize:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024\n"
              "resource.setrlimit(resource.RLIMIT_AS, (size + 2**24, resource.RLIM_INFINITY))\n"
              "m._onnxruntime()\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)])))
    message = (run.stderr.strip().splitlines() or [""])[-1]
    ok = "lack of memory" in message and "not installed" not in message
    results.append(record("messages", "ONNX Runtime imported with too little memory", "clean" if ok else "raw",
                          message))
    manifest = setup.data / "clash.csv"
    manifest.write_text(f"case,input,mask\ncohort.csv,{setup.volume},{setup.mask}\n")
    argv = ["cohort", manifest, "--model", setup.model, "--mapping", "forward", "--output", setup.folder("clash-")]
    outcome, detail = outcome_of_refusal(forked(command(argv)), "the cohort's own files")
    results.append(record("messages", "a case named cohort.csv", outcome, detail))
    broken = setup.data / "broken.csv"
    broken.write_text(f"case,input,mask\nok,{setup.volume},{setup.mask}\nbad,{setup.data / 'none.nrrd'},"
                      f"{setup.mask}\n")
    out = setup.folder("cohort-codes-")
    run = forked(command(["cohort", broken, "--model", setup.model, "--mapping", "forward", "--output", out,
                          "--workers", "1", "--quiet"]))
    results.append(record("messages", "a cohort with a failed case exits 3", "clean" if run.get("value") == 3
                          else "raw", f"exit {run.get('value')}"))
    return results


# -- the campaign --------------------------------------------------------------------------------------------------
RUNNERS: dict[str, Callable[[Setup], list[dict]]] = {
    "files": file_cases, "models": model_cases, "atlases": atlas_cases, "folders": folder_cases,
    "interrupts": interrupt_cases, "disk": disk_cases, "concurrent": concurrent_cases, "messages": message_cases}


def tally(results: list[dict]) -> dict:
    counted = [r for r in results if r["outcome"] != "skipped"]
    found = {o: sum(r["outcome"] == o for r in counted) for o in OUTCOMES}
    return {"tried": len(counted), **found, "mid_publish": sum(bool(r.get("mid_publish")) for r in counted),
            "skipped": len(results) - len(counted)}


def main(workdir: Path, seed: int, categories: list[str]) -> None:
    import logging
    import warnings

    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    # imported once here (no model opened, no thread started), so that every forked child has them at once
    import distributed  # noqa: F401
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import onnxruntime  # noqa: F401
    import scipy.ndimage  # noqa: F401
    import SimpleITK  # noqa: F401
    import skimage.segmentation  # noqa: F401

    import IBIXLogic  # noqa: F401

    setup = Setup(workdir, seed)
    for category in categories:
        started = time.perf_counter()
        results = RUNNERS[category](setup)
        for result in results:
            print(MARK + json.dumps(result), flush=True)
        print(MARK + json.dumps({"tally": category, **tally(results),
                                 "seconds": round(time.perf_counter() - started, 1)}), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:] or list(CATEGORIES))
