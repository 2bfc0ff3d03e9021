"""Folder locks: one command at a time trains into a run directory or runs a study.

The lock is an OS-level advisory lock (``fcntl.flock``) on ``FOLDER/.lock``, so the
kernel releases it however its holder exits, ``kill -9`` included. The file also names
the holder's pid and host, for the line a second command prints. Commands that only
read a folder (``report``, ``eval``, ``export``) take no lock.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path

from .atomic import remove_temps
from .errors import RunError

NAME = ".lock"


def _acquire(path: Path, what: str) -> int:
    """An open descriptor of ``path`` holding its exclusive lock."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            for _ in range(25):  # the holder writes its pid just after it takes the lock
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                if holder:
                    break
                time.sleep(0.02)
            os.close(fd)
            holder = holder or "another process"
            raise RunError(f"{what} {path.parent} is in use by {holder}: wait for it to finish or stop it") \
                from None
        try:  # the holder before us may have removed the file we opened: lock the live one
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def locked(folder: str | Path, what: str = "folder"):
    """Hold ``folder``'s lock for the ``with`` block. The folder (and any missing parent) is
    created if needed and removed again if the block leaves nothing in it but the lock, so a
    command that fails before writing anything leaves nothing behind; temp files a writer
    killed mid-write left in it (`atomic.remove_temps`) are removed once the lock is held.
    Raises `RunError` naming the holder when another process holds the lock, or naming the
    folder when it cannot be created."""
    folder = Path(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise RunError(f"{what} path {folder} exists and is not a directory")
    created = _create(folder, what)
    path = folder / NAME
    fd = _acquire(path, what)  # on failure the folder is the holder's: leave it
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        remove_temps(folder)  # no writer is live here now: temp files are a killed one's
        yield folder
    finally:
        os.ftruncate(fd, 0)
        if created and {p.name for p in folder.iterdir()} <= {NAME}:
            path.unlink(missing_ok=True)
            _remove_empty(created)
        os.close(fd)  # releases the lock


def _create(folder: Path, what: str) -> list[Path]:
    """Create ``folder`` and its missing parents; the folders created, deepest first. An OS
    error (a parent that is a file, no permission, a name too long) is a `RunError`, with
    what was created removed again."""
    missing = [p for p in (folder, *folder.parents) if not os.path.exists(p)]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_empty(missing)
        raise RunError(f"cannot create {what} {folder}: {e.strerror or e}") from None
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) where they exist and are empty."""
    for p in folders:
        with contextlib.suppress(OSError):
            p.rmdir()
