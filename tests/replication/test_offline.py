"""A powered-off VM stays protected: its images are opened offline for the pending cycle,
and tracking continues when it starts again. Restores are compared byte for byte."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from siterecovery.domain import ReplicationState as S
from siterecovery.hypervisor.errors import QmpError
from siterecovery.hypervisor.process import live_processes
from siterecovery.replication.offline import powered_off
from siterecovery.vault import service

from .test_resync import MiB, VmRig, make_rig

pytestmark = pytest.mark.qemu


def _bitmap_flags(image: Path) -> dict[str, list[str]]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(image)],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    bitmaps = json.loads(out)["format-specific"]["data"].get("bitmaps", [])
    return {b["name"]: b["flags"] for b in bitmaps}


def _relationship(rig: VmRig) -> str:
    return service.get_protection(rig.db, vm="vm1").relationship_id.replace("-", "")


def test_powered_off_vm_is_replicated_offline_and_tracking_continues(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    try:
        rig.write("d0", 0, b"\x01" * MiB)
        rig.protect()
        rig.write("d0", 3 * MiB, b"\x02" * 65536)
        rig.write("d1", 5 * MiB, b"\x03" * 512)
        rig.stop()  # a clean shutdown: QEMU stores the bitmaps in the images
        record = service.get_vm(rig.db, name="vm1")
        assert powered_off(record, _relationship(rig))
        before = {p.pid for p in live_processes()}

        cycle = rig.protection.replicate("vm1")
        assert cycle.bytes_read == 2 * 65536  # the change log, not the disks
        assert rig.latest_disks() == rig.snapshot()
        assert {p.pid for p in live_processes()} == before  # the daemon is gone
        for disk in rig.sizes:  # stored back cleanly, still ours, ready for the next start
            flags = _bitmap_flags(rig.vmdir / f"{disk}.qcow2")
            assert [f for n, f in flags.items() if n.startswith("sr-")] == [["auto"]], flags

        rig.start()
        rig.write("d1", 7 * MiB, b"\x04" * 65536)
        cycle = rig.protection.replicate("vm1")
        assert cycle.bytes_read == 65536  # QEMU loaded the bitmap: only the new change
        assert rig.latest_disks() == rig.snapshot()
        assert service.get_protection(rig.db, vm="vm1").state == S.PROTECTED
    finally:
        rig.stop()
        rig.db.close()


def test_crashed_vm_is_not_opened_offline(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    try:
        rig.protect()
        rig.stop()
        rig.start()  # the bitmap is now stored in the images and loaded again
        rig.write("d0", 0, b"\x05" * 4096)
        rig.kill()
        record = service.get_vm(rig.db, name="vm1")
        assert not powered_off(record, _relationship(rig))  # flagged in-use by the dead QEMU
        with pytest.raises(QmpError):
            rig.protection.replicate("vm1")
        assert len(rig.store.list_points("vm1")) == 1
    finally:
        rig.stop()
        rig.db.close()
