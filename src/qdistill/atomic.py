"""Atomic file writes: a reader (or a killed writer) never sees a file that looks complete
but is not. Torch-free, so layers that never touch a model (report, deploy) can use it."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from .errors import WriteError


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(f)`` on a temp file in the same folder, fsync, then rename it to ``path``.

    If anything fails (or the process is interrupted) the temp file is removed and
    ``path`` keeps its previous content; an OS error (disk full, permission lost, I/O
    error) becomes a `WriteError` naming ``path``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            why = f"{path.parent} is not a folder" if os.path.isfile(path.parent) else e.strerror or e
            raise WriteError(f"cannot write {path}: {why} (the previous file, if any, is intact)") from None
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def remove_temps(folder: str | Path) -> None:
    """Remove the temp files `atomic_write` left in ``folder`` when its process was
    killed mid-write (SIGKILL gives it no chance to clean up). Call it only where no
    writer can be live: `lock.locked` does once it holds the folder's lock."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(".*.tmp"):
            p.unlink(missing_ok=True)
