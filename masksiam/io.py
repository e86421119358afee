"""The one atomic-write helper: a file appears complete under its name, or not at all.

    atomic_write(path, lambda f: torch.save(obj, f))            # binary
    atomic_write(path, lambda f: f.write(text), mode="w")       # text

The content goes to a temporary file in the same folder, is flushed to disk (fsync), then renamed
over `path`; the folder entry is synced so the rename survives a crash. Any error (disk full, a
failing write function) removes the temporary file and re-raises: an existing `path` is untouched.
The file gets the permissions open() would give it (0666 minus the umask), not mkstemp's 0600:
datasets and reports are shared.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, IO

_UMASK = os.umask(0)        # read once (setting it is process-wide), then put back
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[IO], object], mode: str = "wb") -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")
