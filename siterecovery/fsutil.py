"""Files siterecovery makes: 0700 directories and 0600 files, whatever the umask (DESIGN §6).

Every writer uses these helpers, so the rule lives in one place:

- :func:`private_dir` makes a directory and any missing parents 0700 (existing ones, which
  are not ours, are left as they are);
- :func:`open_private` opens a file for writing, created 0600; :func:`create_private`
  makes an empty one (the SQLite database, whose ``-wal`` and ``-shm`` files SQLite creates
  with the database file's own mode);
- :func:`write_private` writes a file atomically (temporary file, fsync, rename or link,
  fsync of the directory), 0600;
- :data:`CHILD_UMASK` is passed as ``umask=`` to every child process siterecovery starts
  (QEMU, qemu-storage-daemon, qemu-img, the NBD server, the vault), so what they create -
  logs, pidfiles, sockets, overlays, converted images - is private too.

These raise ``OSError``; callers convert it into their layer's errors.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600
#: The umask of child processes: nothing they create is readable by group or others.
CHILD_UMASK = 0o077

_WRITE = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC


def private_dir(path: Path) -> Path:
    """Make ``path`` and every missing parent with mode 0700; return ``path``.

    A directory that exists already is left untouched (it may be the operator's).
    Raises ``FileExistsError`` (or ``NotADirectoryError``) when a file has the name.
    """
    missing: list[Path] = []
    at = path
    while not at.is_dir():
        missing.append(at)
        if at.parent == at:
            break
        at = at.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, DIR_MODE)
        except FileExistsError:
            if not directory.is_dir():
                raise
            continue  # made by a concurrent writer: not ours to change
        os.chmod(directory, DIR_MODE)  # the umask may have taken owner bits away
    return path


def open_private(path: Path, *, exclusive: bool = False, append: bool = False) -> int:
    """Open ``path`` for writing and return the descriptor; a new file is 0600.

    ``exclusive``: fail with ``FileExistsError`` if it exists. Otherwise an existing file
    is truncated (or appended to, with ``append``): use it only on files siterecovery made.
    """
    flags = _WRITE | (os.O_EXCL if exclusive else 0) | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


def create_private(path: Path) -> bool:
    """Create ``path`` empty with mode 0600 unless it exists; True when it was created."""
    try:
        fd = open_private(path, exclusive=True)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def write_private(path: Path, data: bytes, *, replace: bool = True) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600.

    A temporary file next to it is written and fsynced, then renamed over ``path`` (or,
    without ``replace``, linked: ``FileExistsError`` if ``path`` exists), then the
    directory is fsynced. Nothing is left behind on failure.
    """
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        write_new(tmp, data)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist) with mode 0600, write ``data`` and fsync it."""
    fd = open_private(path, exclusive=True)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a directory, so a rename or link in it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
