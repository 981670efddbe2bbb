"""What only the file:// backend does: temp files, fsync'd renames, ENOSPC, URL forms."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from siterecovery.store import StoreFull, StoreInputError
from siterecovery.store.file import TEMP_PREFIX, FileBackend


@pytest.fixture
def fb(tmp_path: Path) -> FileBackend:
    return FileBackend.from_url(f"file://{tmp_path}/root")


def test_objects_are_plain_files(fb: FileBackend) -> None:
    fb.put("chunks/ab/abc", b"data")
    assert (fb.root / "chunks/ab/abc").read_bytes() == b"data"
    assert not [p for p in fb.root.rglob("*") if p.name.startswith(TEMP_PREFIX)]


def test_leftover_temp_files_are_invisible_and_cleaned(fb: FileBackend) -> None:
    fb.put("segments/vm/vda/s1", b"done")
    old = fb.root / "segments/vm/vda" / f"{TEMP_PREFIX}crashed"
    old.write_bytes(b"half a segm")
    young = fb.root / "segments/vm/vda" / f"{TEMP_PREFIX}running"
    young.write_bytes(b"in progress")
    past = time.time() - 3600
    os.utime(old, (past, past))
    assert [i.key for i in fb.list()] == ["segments/vm/vda/s1"]
    assert fb.cleanup_temp(older_than=600) == 1
    assert not old.exists() and young.exists()
    assert fb.get("segments/vm/vda/s1") == b"done"


def test_enospc_is_store_full_and_leaves_nothing(
    fb: FileBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    fb.put("k", b"old")

    def full(tmp: Path, data: bytes) -> None:
        tmp.write_bytes(data[:3])  # a partial temp file, as a real ENOSPC leaves
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FileBackend, "_write_temp", staticmethod(full))
    with pytest.raises(StoreFull) as err:
        fb.put("k", b"new data")
    assert err.value.recoverable
    assert fb.get("k") == b"old"
    assert sorted(p.name for p in fb.root.iterdir()) == ["k"]


@pytest.mark.parametrize("url", ["file://relative/path", "file:relative", "file://host/abs"])
def test_bad_file_urls(url: str) -> None:
    with pytest.raises(StoreInputError, match="absolute"):
        FileBackend.from_url(url)


def test_localhost_url(tmp_path: Path) -> None:
    assert FileBackend.from_url(f"file://localhost{tmp_path}").root == tmp_path


def test_listing_a_missing_root_is_empty(tmp_path: Path) -> None:
    assert list(FileBackend(tmp_path / "absent").list()) == []
