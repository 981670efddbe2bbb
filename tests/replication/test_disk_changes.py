"""Disks added, removed or resized while a VM is protected: the cycle refuses with a message
naming the disk, the VM goes to *resync required*, and the resync copies new and resized
disks whole, records the new layout, and delta cycles resume. Restores compared byte for
byte."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from siterecovery.domain import ReplicationState as S
from siterecovery.replication.errors import DiskLayoutChanged
from siterecovery.vault import service

from .test_resync import MiB, VmRig, make_rig

pytestmark = pytest.mark.qemu


def _resync_and_check(rig: VmRig, full_copies: list[str]) -> None:
    assert rig.state() == S.RESYNC_REQUIRED
    _job, result = rig.protection.resync("vm1")
    assert sorted(result.figures()["full_copy_disks"]) == full_copies
    assert rig.latest_disks() == rig.snapshot()
    record = service.get_vm(rig.db, name="vm1")
    assert {d.name: d.size for d in record.disks} == rig.sizes
    assert [d["name"] for d in record.config["disks"]] == sorted(rig.sizes)
    rig.write(sorted(rig.sizes)[0], MiB, b"\x09" * 65536)
    assert rig.protection.replicate("vm1").bytes_read == 65536
    assert rig.latest_disks() == rig.snapshot()


def _restart_with(rig: VmRig, sizes: dict[str, int]) -> None:
    rig.stop()
    for disk, size in sizes.items():
        image = rig.vmdir / f"{disk}.qcow2"
        if not image.exists():
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(size)],
                           check=True)  # fmt: skip
            rig.model[disk] = bytearray(size)
        elif size != rig.sizes.get(disk):
            subprocess.run(["qemu-img", "resize", "-q", str(image), str(size)], check=True)
            rig.model[disk] = rig.model[disk][:size].ljust(size, b"\0")
    for disk in set(rig.model) - set(sizes):
        del rig.model[disk]
    rig.sizes = dict(sizes)
    rig.start()


@pytest.fixture
def rig(tmp_path: Path) -> VmRig:
    rig = make_rig(tmp_path)
    rig.write("d0", 0, b"\x01" * MiB)
    rig.write("d1", 0, b"\x02" * MiB)
    rig.protect()
    return rig


def test_added_disk_is_resynced_whole(rig: VmRig) -> None:
    try:
        _restart_with(rig, {**rig.sizes, "d2": 4 * MiB})
        rig.write("d2", 0, b"\x03" * 65536)
        with pytest.raises(DiskLayoutChanged, match=r"disk d2 was added \(4 MiB\)"):
            rig.protection.replicate("vm1")
        assert len(rig.store.list_points("vm1")) == 1
        _resync_and_check(rig, ["d2"])
    finally:
        rig.stop()
        rig.db.close()


def test_resized_disk_is_resynced_whole(rig: VmRig) -> None:
    try:
        _restart_with(rig, {"d0": rig.sizes["d0"], "d1": 12 * MiB})
        rig.write("d1", 11 * MiB, b"\x04" * 4096)
        resized = r"disk d1 was resized from 8392704 bytes to 12 MiB"
        with pytest.raises(DiskLayoutChanged, match=resized):
            rig.protection.replicate("vm1")
        _resync_and_check(rig, ["d1"])
    finally:
        rig.stop()
        rig.db.close()


def test_removed_disk_leaves_the_points(rig: VmRig) -> None:
    try:
        _restart_with(rig, {"d0": rig.sizes["d0"]})
        with pytest.raises(DiskLayoutChanged, match=r"disk d1 was removed"):
            rig.protection.replicate("vm1")
        _resync_and_check(rig, [])
        first = rig.store.list_points("vm1")[0]
        assert sorted(first.disks) == ["d0", "d1"]  # older points keep the removed disk
    finally:
        rig.stop()
        rig.db.close()
