"""The files a web page may read and write: only under its data folder, and writes only under its output folder.

A name from the page is a path relative to the data folder. It is refused when it is absolute, holds ``..``, or
leads outside the folder through a symbolic link (the resolved path must stay inside the resolved folder); uploads
keep only a plain file name, go under ``<output>/uploads/`` and have a size limit.
"""
import os
import re
from pathlib import Path

import IBIXLogic as ibx

#: Volume and model files the page lists.
VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
MODEL_SUFFIXES = (".onnx",)

#: Largest upload (bytes).
UPLOAD_LIMIT = 512 * 2**20


class DataFolder:
    """The server's data folder (read) and its output folder (written; inside the data folder or elsewhere)."""

    def __init__(self, root, output, upload_limit=UPLOAD_LIMIT):
        self.root = Path(root).resolve(strict=True)
        if not self.root.is_dir():
            raise ibx.InputError(f"--data {root}: not a folder")
        self.output = Path(output).resolve()
        self.upload_limit = int(upload_limit)

    def resolve(self, name):
        """The file ``name`` (relative to the data folder or the output folder, '/'-separated) as a real path;
        InputError when it is absolute, climbs with '..', or leads outside both folders (a link included)."""
        text = str(name or "")
        parts = text.replace("\\", "/").split("/")
        if not text or os.path.isabs(text) or text.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", text) \
                or ".." in parts:
            raise ibx.InputError(f"{text!r}: give a path inside the data folder (no absolute path, no '..')")
        for base in (self.output, self.root):
            path = (base / text).resolve()
            if path.is_relative_to(base) and path.is_file():
                return path
        inside = (self.root / text).resolve()
        if not inside.is_relative_to(self.root):
            raise ibx.InputError(f"{text!r} leads outside the data folder: only files under it are read")
        raise ibx.InputError(f"{text!r}: no such file in the data folder")

    def listing(self, suffixes):
        """Files under the data folder with one of ``suffixes``, relative '/'-separated names, sorted; links
        that lead outside it are left out."""
        found = []
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = sorted(d for d in dirs if (Path(folder, d).resolve()).is_relative_to(self.root))
            for name in files:
                path = Path(folder, name)
                if name.lower().endswith(suffixes) and path.resolve().is_relative_to(self.root):
                    found.append(path.relative_to(self.root).as_posix())
        return sorted(found)

    def writable(self, *parts):
        """A path under the output folder (its folders made)."""
        path = self.output.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def save_upload(self, name, content, size=None):
        """Write an uploaded file under ``<output>/uploads`` (plain file name kept) -> its path. ``content`` None:
        the browser sent only the file's ``size`` (bytes), being over the limit."""
        base = os.path.basename(str(name).replace("\\", "/"))
        if not base or base in (".", "..") or not re.fullmatch(r"[\w .+-]+", base):
            raise ibx.InputError(f"{name!r}: an upload needs a plain file name (letters, digits, . _ + -)")
        size = len(content) if content is not None else int(size or 0)
        if content is None or size > self.upload_limit:
            raise ibx.InputError(f"{base}: {size / 2**20:.1f} MiB is more than the upload limit of "
                                 f"{self.upload_limit / 2**20:.1f} MiB; put large files in the data folder on the "
                                 "server instead (ibix web --data DIR)")
        path = self.writable("uploads", base)
        path.write_bytes(content)
        return path
