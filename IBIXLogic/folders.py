"""Result folders written as one unit: the lock that keeps one run per folder, the staging folder a run writes
into, publishing a complete staged run in place of the earlier one, and sweeping what dead runs left.

A run holds ``<folder>/.ibix.lock`` (an OS lock on the file, released by the system when the process ends, however
it ends; the file names the process) while it writes. Its files go into a staging folder
``<folder>/.ibix-run-<pid>-<random>.partial/``; ``summary.json`` is written there last, so a staging folder with a
summary holds a complete run. :func:`publish` then removes the files the earlier run's ``summary.json`` lists that
the new run does not write, and moves the new files into place, ``summary.json`` last. Every run first recovers the
folder (:func:`recover`): it completes the publishing of a complete staged run that a killed process left (that
run's summary says exactly which files are its own), and removes incomplete staging folders, hidden previews and the
temporary files of processes that are gone.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import InputError, short_path
from .io import TEMPORARY_NAME

LOCK_NAME = ".ibix.lock"
SUMMARY = "summary.json"
#: A run's staging folder: ``.ibix-run-<pid>-<8 hex digits>.partial``.
STAGING_NAME = re.compile(r"^\.ibix-run-(?P<pid>\d+)-[0-9a-f]{8}\.partial$")
#: A progressive run's preview map, written in the folder while the run goes on (hidden; removed at its end).
PREVIEW_NAME = re.compile(r"^\..+_preview\.(nrrd|nii\.gz)$")
#: Temporary names of earlier IBIX versions (fixed or without a process id), removed under the lock.
_LEGACY_TEMPORARY = re.compile(r"^\.(summary\.json|cohort\.csv|report\.html|atlas\.npz)\.partial$|"
                               r"^\.[A-Za-z0-9][A-Za-z0-9._-]*\.partial-[0-9a-f]{8}$")


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (True when that cannot be found out)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    if os.name == "nt":
        import ctypes

        kernel = ctypes.windll.kernel32
        handle = kernel.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return kernel.GetLastError() == 5  # access denied: it exists
        code = ctypes.c_ulong()
        kernel.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    try:  # a killed process whose parent has not reaped it yet (a zombie) is gone too
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def _try_lock(fd: int) -> bool:
    """An exclusive OS lock on an open file, without waiting; False when another process holds it."""
    if os.name == "nt":
        import msvcrt

        os.lseek(fd, 1 << 30, os.SEEK_SET)  # a byte far beyond the holder's record, which others must read
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class FolderLock:
    """``<folder>/.ibix.lock``: one run at a time writes into a folder.

    The lock is the operating system's lock on the file (``flock``; ``msvcrt.locking`` on Windows), so it is
    released when its process ends, even when it is killed; the file's text names the holder (process id, machine,
    command, start) for the message a second run gets. A lock file whose process is gone is taken over.
    """

    def __init__(self, folder: Path, command: str):
        self.folder, self.command = Path(folder), command
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> dict | None:
        """Take the lock, or raise :class:`InputError` naming the run that holds it; returns the record of a gone
        holder whose lock was taken over (None if the file was free)."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise InputError(f"{short_path(self.folder)}: cannot lock the output folder ({exc.strerror or exc}); "
                                 "check that it is writable") from None
            if not _try_lock(fd):
                holder = _read_record(self.path)
                os.close(fd)
                raise InputError(f"{short_path(self.folder)}: another IBIX run is writing into this folder "
                                 f"({_describe(holder)}); wait for it to end, or choose another output folder")
            try:  # a run that just finished may have removed the file we opened: lock the one at the path
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = _read_record(self.path)
            record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
            self._fd = fd
            try:
                os.lseek(fd, 0, os.SEEK_SET)
                os.ftruncate(fd, 0)
                os.write(fd, record)
            except OSError as exc:  # a full disk: the lock is held, but the folder cannot take the run
                self.release()
                raise InputError(f"{short_path(self.folder)}: cannot write into the output folder "
                                 f"({exc.strerror or exc}); free some space or choose another folder") from None
            return previous or None

    def release(self) -> None:
        """Remove the lock file and release the lock (an interrupt meanwhile waits until both are done)."""
        if self._fd is None:
            return
        with signals_deferred():
            self._release()

    def _release(self) -> None:
        fd, self._fd = self._fd, None
        if os.name == "nt":  # an open file cannot be removed there
            os.close(fd)
            try:
                self.path.unlink()
            except OSError:
                pass
            return
        try:
            self.path.unlink()  # while still held: the next run creates and locks a new file
        except OSError:
            pass
        os.close(fd)


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(record: dict) -> str:
    if not record.get("pid"):
        return "its process could not be named"
    where = f" on {record['host']}" if record.get("host") and record.get("host") != socket.gethostname() else ""
    return (f"{('ibix ' + record['command']) if record.get('command') else 'a run'}, process {record['pid']}{where}"
            + (f", started {record['started']}" if record.get("started") else ""))


def new_staging(folder: Path) -> Path:
    """A fresh staging folder in ``folder`` for this process's run."""
    staging = Path(folder) / f".ibix-run-{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"
    staging.mkdir()
    return staging


def listed_files(folder: Path, summary: Path | None = None) -> list[str]:
    """Names of the files of ``folder`` that a run's summary (``folder/summary.json`` by default) lists as its own
    (files directly in the folder; summary.json itself excluded). An unreadable summary lists none."""
    try:
        content = json.loads((summary or Path(folder) / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    files = content.get("files") if isinstance(content, dict) else None
    names = []
    for entry in files if isinstance(files, list) else []:
        if isinstance(entry, str):
            name = Path(entry).name
            if name and name not in (SUMMARY, ".", "..") and not name.startswith(".") and name not in names:
                names.append(name)
    return names


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold back SIGINT, SIGTERM and SIGHUP until the block ends (main thread; elsewhere nothing changes): each one
    that comes meanwhile is recorded and raised again once the block is done, so that an interrupt comes after a
    folder is published, never halfway. (Blocking the signal in this thread would not do: another thread of the
    process, ONNX Runtime's say, would take it, and Python would raise the interrupt here all the same.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {}
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is not None:
            try:
                previous[number] = signal.signal(number, lambda signum, frame: held.append(signum))
            except (ValueError, OSError):
                pass
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(held):  # each once, as it would have come
            signal.raise_signal(number)


def publish(folder: Path, staging: Path) -> None:
    """Move a complete staged run (its ``summary.json`` written last) into ``folder`` in place of the earlier run.

    Removes the files the earlier run's summary lists that the new one does not write, then the earlier summary,
    moves the new files into place and the new summary last, and removes the staging folder. Interrupted (the
    process killed), it is completed by :func:`recover`: every step can be repeated.
    """
    folder, staging = Path(folder), Path(staging)
    new = listed_files(staging, staging / SUMMARY)
    for name in listed_files(folder):
        old = folder / name
        if name not in new and (old.is_symlink() or old.is_file()):
            old.unlink(missing_ok=True)
    (folder / SUMMARY).unlink(missing_ok=True)
    for name in new:
        if (staging / name).exists():
            os.replace(staging / name, folder / name)
    os.replace(staging / SUMMARY, folder / SUMMARY)
    shutil.rmtree(staging, ignore_errors=True)


def recover(folder: Path) -> list[str]:
    """Leave ``folder`` as its last complete run left it (call while holding its lock); returns notes on what was
    done.

    A complete staged run (with its summary) of a process that was killed while publishing is published; incomplete
    staging folders, previews and the temporary files of processes that are gone are removed.
    """
    notes = []
    folder = Path(folder)
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime if p.exists() else 0)
    except OSError:
        return notes
    for entry in entries:
        name = entry.name
        staging = STAGING_NAME.match(name)
        temporary = TEMPORARY_NAME.match(name)
        if staging and entry.is_dir() and int(staging["pid"]) != os.getpid():
            if (entry / SUMMARY).is_file():
                publish(folder, entry)
                notes.append(f"completed the publishing of the run that process {staging['pid']} left in {name}")
            else:
                shutil.rmtree(entry, ignore_errors=True)
                notes.append(f"removed {name}, the incomplete files of process {staging['pid']}, which is gone")
        elif PREVIEW_NAME.match(name) or _LEGACY_TEMPORARY.match(name) or (
                temporary and not process_alive(int(temporary["pid"]))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            notes.append(f"removed {name}, left by a run that is gone")
    return notes
