"""The one helper every writer uses: 0700 directories, 0600 files, whatever the umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from siterecovery import fsutil

import filesafety  # isort: skip


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o000, 0o277])
def test_private_dir_makes_every_missing_level_0700(tmp_path: Path, mask: int) -> None:
    with filesafety.umask(mask):
        made = fsutil.private_dir(tmp_path / "a" / "b" / "c")
        fsutil.private_dir(made)  # idempotent
    assert made.is_dir()
    assert [_mode(p) for p in (tmp_path / "a", tmp_path / "a" / "b", made)] == [0o700] * 3


def test_private_dir_leaves_an_existing_directory_alone(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    theirs.chmod(0o755)
    with filesafety.umask(0o022):
        fsutil.private_dir(theirs / "ours")
    assert _mode(theirs) == 0o755 and _mode(theirs / "ours") == 0o700


def test_private_dir_refuses_a_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("user data")
    with pytest.raises(OSError):
        fsutil.private_dir(tmp_path / "f" / "sub")
    assert (tmp_path / "f").read_text() == "user data"


@pytest.mark.parametrize("mask", [0o022, 0o000, 0o277])
def test_write_private_is_0600_and_atomic(tmp_path: Path, mask: int) -> None:
    target = tmp_path / "doc.json"
    with filesafety.umask(mask):
        fsutil.write_private(target, b"one")
        fsutil.write_private(target, b"two")  # replaces
    assert target.read_bytes() == b"two" and _mode(target) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.json"]  # no temporary left


def test_write_private_without_replace_never_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "key"
    target.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        fsutil.write_private(target, b"new", replace=False)
    assert target.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]


def test_open_private_appends_and_create_private_never_truncates(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    with filesafety.umask(0o022):
        for line in (b"a\n", b"b\n"):
            fd = fsutil.open_private(log, append=True)
            os.write(fd, line)
            os.close(fd)
        assert fsutil.create_private(tmp_path / "db") is True
    assert log.read_bytes() == b"a\nb\n" and _mode(log) == 0o600
    assert _mode(tmp_path / "db") == 0o600
    assert fsutil.create_private(log) is False and log.read_bytes() == b"a\nb\n"
