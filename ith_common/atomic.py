"""The one atomic file writer of ith-jax.

Readers see either the old file or the new one, never a mix, and a crash leaves no half-written file: the data
goes to a temporary file in the same directory, is flushed to disk, renamed over the target, and the directory
entry is flushed too.  New files get the permissions a plain ``open()`` would give them (0666 minus the
umask), and a replaced file keeps its mode, so caches and results can be shared between users.

Hand-written because the standard library has no atomic replace with durable rename, and the small libraries
that offer one (atomicwrites, now archived) use ``mkstemp``'s 0600 mode.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
import threading
from typing import Callable, Iterator

from ith_common.errors import UserError

_umask_lock = threading.Lock()


def _default_mode() -> int:
    """0666 minus the process umask (read by setting and restoring it: the only portable way)."""
    with _umask_lock:
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


def fsync_directory(directory: str | os.PathLike) -> None:
    """Flush a directory entry (a rename or a new file in it) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_output_file(path: str | os.PathLike, *, what: str = "output file") -> pathlib.Path:
    """Fails early (before any work) when ``path`` cannot be written: its directory is missing or not writable,
    or the path is a directory.  Returns the path."""
    path = pathlib.Path(path)
    directory = path.parent if str(path.parent) else pathlib.Path(".")
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory; expected a file path")
    if not directory.is_dir():
        raise UserError(f"{what} {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: directory {directory} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{what} {path} exists and is not writable")
    return path


def check_output_dir(path: str | os.PathLike, *, what: str = "output directory") -> pathlib.Path:
    """Fails early (before any work) when directory ``path`` cannot be written into or created: it is a file, it
    is not writable, or its nearest existing parent is a file or not writable.  Creates nothing; returns the path."""
    path = pathlib.Path(path)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{what} {path} is a file; expected a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"{what} {path} is not writable")
        return path
    parent = path.absolute().parent
    while not parent.exists():  # mkdir(parents=True) will create the missing ones below the first existing
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{what} {path}: {parent} is a file, so the directory cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: directory {parent} is not writable, so it cannot be created there")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yields a temporary path beside ``path``; when the block ends without an exception the temporary file is
    flushed and renamed over ``path``.  For writers that want a file name (soundfile, matplotlib, sqlite)."""
    path = pathlib.Path(path)
    directory = path.parent if str(path.parent) else pathlib.Path(".")
    if not directory.is_dir():
        raise UserError(f"cannot write {path}: directory {directory} does not exist")
    try:
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        mode = _default_mode()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp = pathlib.Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(directory)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (see the module docstring)."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: str | os.PathLike, write: Callable[[pathlib.Path], None]) -> None:
    """``write(tmp_path)`` fills a temporary file that then replaces ``path`` atomically."""
    with atomic_output(path) as tmp:
        write(tmp)
