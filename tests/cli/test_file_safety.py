"""What `siterecovery` leaves on disk, run as a user runs it under the usual umask 022.

- a fresh `vault init` work directory holds only 0700 directories and 0600 files (database,
  its WAL and shared memory, key file, store, TLS files), and after a protect, cycles and a
  restore the store's chunks too;
- the store is encrypted by default: no chunk holds the guest's plaintext; `--no-encrypt`
  warns, and then the plaintext is there (so the check can fail);
- `restore --to` an existing file, a non-empty directory or a path under a file is refused
  with exit code 2, naming the path, and writes nothing.
"""

from __future__ import annotations

import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from siterecovery.hypervisor.process import DriveSpec, QemuProcess, VmProcessSpec
from siterecovery.settings import Settings
from siterecovery.store.keys import StoreKeys
from siterecovery.store.repository import ReplicaStore
from siterecovery.vault import service
from siterecovery.vault.db import open_database

from .test_app import run

import filesafety  # isort: skip

#: 1 MiB of incompressible guest data; a chunk that holds it in clear holds this window.
PLAINTEXT = random.Random(20240601).randbytes(1 << 20)
WINDOW = PLAINTEXT[4096:4160]
DISK_SIZE = 8 << 20


@pytest.fixture(autouse=True)
def umask_022() -> Iterator[None]:
    with filesafety.umask(0o022):
        yield


def _store(workdir: Path) -> ReplicaStore:
    settings = Settings.load(workdir)
    return ReplicaStore.open(settings.store_url, StoreKeys.load(settings.key_file))


def test_a_fresh_vault_is_private_and_encrypted(tmp_path: Path) -> None:
    workdir = tmp_path / "vault"
    result = run(workdir, "vault", "init")
    assert "(encrypted)" in result.stdout and "warning" not in result.stderr
    assert filesafety.not_private(workdir) == []
    made = set(filesafety.snapshot(workdir))
    assert {"vault.db", "store.key", "siterecovery.json", "store/siterecovery-store.json",
            "pki/ca.key", "pki/ca.pem", "pki/server.key", "pki/server.pem"} <= made  # fmt: skip
    assert _store(workdir).encrypted

    db = open_database(Settings.load(workdir).vault_url)  # the WAL exists while it is open
    try:
        service.create_policy(db, name="p", copy_frequency_s=30, retention_h=24)
        for name in ("vault.db-wal", "vault.db-shm"):
            assert (workdir / name).exists(), name
        assert filesafety.not_private(workdir) == []
    finally:
        db.close()


def test_no_encrypt_warns_that_the_disks_are_readable(tmp_path: Path) -> None:
    workdir = tmp_path / "vault"
    result = run(workdir, "vault", "init", "--no-encrypt")
    said = " ".join(result.stderr.split())
    assert "warning" in said and "readable by anyone who can read the store" in said
    assert "(not encrypted)" in result.stdout
    assert not _store(workdir).encrypted
    assert filesafety.not_private(workdir) == []


@dataclass
class Protected:
    """A vault with a protected, paused QEMU VM whose disk holds :data:`PLAINTEXT`."""

    workdir: Path
    disk: Path
    vm: QemuProcess


def _guest_disk(path: Path) -> None:
    raw = path.with_suffix(".raw")
    raw.write_bytes(PLAINTEXT)
    with raw.open("r+b") as f:
        f.truncate(DISK_SIZE)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)],
                   check=True, capture_output=True)  # fmt: skip
    raw.unlink()


@pytest.fixture(params=[True, False], ids=["encrypted", "no-encrypt"])
def protected(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Protected]:
    workdir = tmp_path / "vault"
    run(workdir, "vault", "init", *([] if request.param else ["--no-encrypt"]))
    run(workdir, "policy", "create", "gold")
    vmdir = tmp_path / "vm"
    vmdir.mkdir()
    disk = vmdir / "disk0.qcow2"
    _guest_disk(disk)
    vm = QemuProcess.start(VmProcessSpec(name="vm1", workdir=vmdir,
                                         drives=[DriveSpec("disk0", disk)], extra_args=["-S"]))
    try:
        run(workdir, "vm", "register", "vm1", "--qmp", str(vm.qmp_path))
        run(workdir, "protect", "vm1", "--policy", "gold")
        run(workdir, "replicate", "vm1")
        yield Protected(workdir, disk, vm)
    finally:
        vm.stop()


def _chunks(workdir: Path) -> list[Path]:
    return [p for p in (workdir / "store" / "chunks").rglob("*") if p.is_file()]


@pytest.mark.qemu
def test_store_after_protect_is_private_and_only_ciphertext(
    protected: Protected, tmp_path: Path
) -> None:
    chunks = _chunks(protected.workdir)
    assert chunks
    holding = [c for c in chunks if WINDOW in c.read_bytes()]
    if _store(protected.workdir).encrypted:
        assert holding == []  # the guest's bytes are nowhere in clear
    else:
        assert holding  # in clear: what --no-encrypt warns about
    out = tmp_path / "restored"
    run(protected.workdir, "restore", "vm1", "--to", str(out))
    compare = subprocess.run(["qemu-img", "compare", "-U", str(protected.disk),
                              str(out / "disk0.qcow2")], capture_output=True, text=True,
                             check=False)  # fmt: skip
    assert compare.returncode == 0, compare.stdout + compare.stderr
    assert filesafety.not_private(protected.workdir) == []
    assert filesafety.not_private(out) == []


@pytest.mark.qemu
@pytest.mark.parametrize("protected", [True], ids=["encrypted"], indirect=True)
def test_restore_refuses_what_exists_and_writes_nothing(
    protected: Protected, tmp_path: Path
) -> None:
    area = tmp_path / "user"
    area.mkdir()
    (area / "disk0.qcow2").write_bytes(b"the user's own image")
    (area / "full").mkdir()
    (area / "full" / "notes.txt").write_text("keep me")
    before = filesafety.snapshot(area)
    for target, words in (
        (area / "disk0.qcow2", "exists and is not a directory"),
        (area / "full", "is not empty"),
        (area / "disk0.qcow2" / "sub", "exists and is not a directory"),
    ):
        result = run(protected.workdir, "restore", "vm1", "--to", str(target), check=False)
        said = " ".join(result.stderr.split())  # as one line, whatever the terminal width
        assert result.returncode == 2, said
        assert str(target) in said and words in said
        assert "hint:" in said and "Traceback" not in said
        assert filesafety.snapshot(area) == before
