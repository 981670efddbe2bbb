"""What "touched nothing" and "private" mean in tests (DESIGN §6).

:func:`snapshot` records every entry under a directory with its type, size, mtime and content
hash; two equal snapshots mean nothing there was created, deleted, truncated or written.
:func:`not_private` lists what under a tree is not a 0700 directory, a 0600 file, or a socket
without group/other bits. :func:`umask` runs a block under a given umask (children inherit it).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    """One directory entry as a test compares it: kind, size, mtime (ns), content digest."""

    kind: str
    size: int = 0
    mtime_ns: int = 0
    digest: str = ""


def snapshot(root: Path) -> dict[str, Entry]:
    """Every entry under ``root`` (recursive); sockets are compared by name and kind only."""
    out: dict[str, Entry] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        name = str(path.relative_to(root))
        if stat.S_ISREG(st.st_mode):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[name] = Entry("file", st.st_size, st.st_mtime_ns, digest)
        elif stat.S_ISDIR(st.st_mode):
            out[name] = Entry("dir")
        elif stat.S_ISSOCK(st.st_mode):
            out[name] = Entry("socket")
        else:
            out[name] = Entry(f"other {stat.filemode(st.st_mode)}")
    return out


def not_private(root: Path) -> list[str]:
    """Entries under ``root`` (and ``root`` itself) that break the 0700/0600 rule."""
    problems = []
    for path in [root, *sorted(root.rglob("*"))]:
        mode = path.lstat().st_mode
        perms = stat.S_IMODE(mode)
        if stat.S_ISDIR(mode):
            ok = perms == 0o700
        elif stat.S_ISREG(mode):
            ok = perms == 0o600
        elif stat.S_ISSOCK(mode):
            ok = not perms & 0o077
        else:
            ok = False  # siterecovery makes no links, fifos or devices
        if not ok:
            problems.append(f"{stat.filemode(mode)} {path.relative_to(root.parent)}")
    return problems


@contextmanager
def umask(mask: int) -> Iterator[None]:
    """Run the block with ``mask`` as this process's umask (restored afterwards)."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)
