"""The ``file://`` backend: objects are files under a root directory.

``file:///srv/replica`` keeps object ``chunks/ab/ab12...`` at
``/srv/replica/chunks/ab/ab12...``. Crash safety follows one recipe for every put: write a
temporary file ``.tmp-<uuid>`` in the object's directory, fsync it, move it into place
(``rename``, or ``link`` for create-only puts so an existing object is never replaced), then
fsync the directory so the new name survives a power cut. Directories are made 0700 and
objects 0600 whatever the umask (:mod:`siterecovery.fsutil`). Temporary names start with a dot,
which no valid key component may, so they never collide with objects and :meth:`list` skips
them; :meth:`FileBackend.cleanup_temp` removes the ones a crash left behind.

The file backend cannot hold both ``a`` and ``a/b`` (a file cannot be a directory); the
replica store's key layout never needs that.
"""

from __future__ import annotations

import errno
import os
import stat as stat_mod
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

from siterecovery.fsutil import fsync_dir, private_dir, write_new
from siterecovery.store.backend import (
    ObjectInfo,
    register_scheme,
    validate_key,
    validate_prefix,
)
from siterecovery.store.errors import (
    InvalidKey,
    ObjectExists,
    ObjectNotFound,
    StoreError,
    StoreFull,
    StoreInputError,
    StoreUnavailable,
)

__all__ = ["TEMP_PREFIX", "FileBackend"]

#: Leading part of every temporary file name.
TEMP_PREFIX = ".tmp-"

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def _io_error(action: str, what: str, exc: OSError) -> StoreError:
    """Convert an ``OSError`` into the store error tree."""
    if exc.errno in _FULL_ERRNOS:
        return StoreFull(f"cannot {action} {what}: no space left ({exc.strerror})")
    if isinstance(exc, NotADirectoryError | IsADirectoryError):
        return StoreError(f"cannot {action} {what}: a file and a directory share a name")
    return StoreUnavailable(f"cannot {action} {what}: {exc.strerror or exc}")


class FileBackend:
    """Objects as files under ``root`` (an absolute path). See the module docstring."""

    def __init__(self, root: Path) -> None:
        if not root.is_absolute():
            raise StoreInputError(
                f"file store root {str(root)!r} is not an absolute path",
                hint="write it as file:///absolute/path",
            )
        self.root = root

    @classmethod
    def from_url(cls, url: str) -> FileBackend:
        """Build from ``file:///abs/path`` (``file://localhost/abs/path`` is accepted too)."""
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise StoreInputError(
                f"invalid file store URL {url!r}: the path must be absolute",
                hint="write it as file:///absolute/path (three slashes)",
            )
        if parts.query or parts.fragment:
            raise StoreInputError(f"invalid file store URL {url!r}: no query or fragment")
        return cls(Path(unquote(parts.path)))

    @property
    def url(self) -> str:
        return f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def put(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        path = self._path(key)
        try:
            private_dir(path.parent)
        except OSError as exc:
            raise _io_error("create the directory for", key, exc) from exc
        tmp = path.parent / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
        try:
            self._write_temp(tmp, data)
            self._move_into_place(tmp, path, key, create_only)
            fsync_dir(path.parent)
        except OSError as exc:
            raise _io_error("store", key, exc) from exc
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _write_temp(tmp: Path, data: bytes) -> None:
        """The temporary file of a put: 0600, written and fsynced."""
        write_new(tmp, data)

    @staticmethod
    def _move_into_place(tmp: Path, path: Path, key: str, create_only: bool) -> None:
        if not create_only:
            os.replace(tmp, path)
            return
        try:
            # link() fails if the name exists: the atomic create-only primitive of POSIX.
            os.link(tmp, path)
        except FileExistsError as exc:
            raise ObjectExists(f"object {key} already exists") from exc

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(key)
        if offset < 0 or (length is not None and length < 0):
            raise StoreInputError(f"invalid range offset={offset} length={length} for {key}")
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read() if length is None else f.read(length)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFound(f"object {key} not found in {self.url}") from exc
        except OSError as exc:
            raise _io_error("read", key, exc) from exc

    def stat(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise _io_error("stat", key, exc) from exc
        if not stat_mod.S_ISREG(st.st_mode):
            return None
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        # Walk only below the deepest directory the prefix names.
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        infos = [i for i in self._walk(self.root / base) if i.key.startswith(prefix)]
        infos.sort(key=lambda i: i.key)
        return iter(infos)

    def _walk(self, top: Path) -> Iterator[ObjectInfo]:
        def fail(exc: OSError) -> None:
            if not isinstance(exc, FileNotFoundError | NotADirectoryError):
                raise _io_error("list", str(top), exc) from exc

        for dirpath, dirnames, filenames in os.walk(top, onerror=fail):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith("."):
                    continue
                full = Path(dirpath, name)
                try:
                    st = full.stat()
                except FileNotFoundError:
                    continue  # deleted while listing
                if stat_mod.S_ISREG(st.st_mode):
                    key = full.relative_to(self.root).as_posix()
                    yield ObjectInfo(key, st.st_size, st.st_mtime)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            return
        except IsADirectoryError as exc:
            raise InvalidKey(f"{key} names a directory, not an object") from exc
        except OSError as exc:
            raise _io_error("delete", key, exc) from exc
        try:
            fsync_dir(path.parent)
        except OSError as exc:
            raise _io_error("delete", key, exc) from exc

    def cleanup_temp(self, older_than: float) -> int:
        """Remove temporary files of unfinished puts last modified more than ``older_than``
        seconds ago; return how many were removed. Younger ones may belong to a put still
        running, so they are left alone."""
        cutoff = time.time() - older_than
        removed = 0
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for name in filenames:
                if not name.startswith(TEMP_PREFIX):
                    continue
                full = Path(dirpath, name)
                try:
                    if full.stat().st_mtime < cutoff:
                        full.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise _io_error("remove", str(full), exc) from exc
        return removed


register_scheme("file", FileBackend.from_url)
