"""Every recovery point is a state the guest really had at one instant.

A real guest (the demo guest in ``linked`` mode) writes linked records across two disks: record
``i`` on the first, then its partner on the second, each flushed. Cycles run while it writes,
including the initial copy (the writes it makes during the initial copy must be in the first
delta). Every point is restored and checked: full records form a prefix on each disk, the
partner disk is never ahead of the record disk (no partner without its record) and at most one
record behind, and nothing is beyond. After the writer stops, one last point holds everything.

:class:`GuestRig` is shared with the app-consistency and long-run tests.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs
import pytest

from siterecovery.hypervisor.guest import (
    RECORD_SIZE,
    build_guest,
    expected_record,
    guest_cmdline,
    make_disk,
    parse_console,
)
from siterecovery.hypervisor.process import DriveSpec, QemuProcess, VmProcessSpec, probe_accel
from siterecovery.hypervisor.tracking import ChangeTracker
from siterecovery.replication.engine import Replicator
from siterecovery.store.keys import StoreKeys
from siterecovery.store.manifest import PointManifest
from siterecovery.store.repository import ReplicaStore

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

MiB = 1 << 20
SEED = 7
#: Node names of the two data disks; the guest sees them as vda and vdb.
REC, PARTNER = "rec", "partner"
DISK_SIZE = 8 * MiB


def guest_cache() -> Path:
    return Path(platformdirs.user_cache_dir("siterecovery")) / "guest"


@dataclass
class GuestRig:
    """A booted demo guest with its disks, and helpers to check restored points."""

    workdir: Path
    vm: QemuProcess
    store: ReplicaStore
    restored: list[str] = field(default_factory=list)

    def console(self) -> str:
        return self.vm.serial_text()

    def linked(self) -> int:
        return len(parse_console(self.console()).linked)

    def wait_linked(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.linked() < count:
            assert self.vm.alive(), self.console()[-2000:]
            assert time.monotonic() < deadline, f"guest wrote {self.linked()} of {count} records"
            time.sleep(0.1)

    def restore(self, point: PointManifest, disk: str) -> bytes:
        dest = self.workdir / f"restore-{point.point_id}-{disk}.raw"
        self.store.restore_disk(point, disk, dest, overwrite=True)
        data = dest.read_bytes()
        dest.unlink()
        return data

    def check_point(self, point: PointManifest) -> tuple[int, int]:
        """Check the linked-record invariant of ``point``; return (records, partners)."""
        rec, partner = self.restore(point, REC), self.restore(point, PARTNER)
        k_rec, k_partner = full_records(rec), full_records(partner)
        where = f"point {point.point_id}: {k_rec} records, {k_partner} partners"
        assert k_partner <= k_rec <= k_partner + 1, where  # no partner without its record
        assert is_zero(rec[(k_rec + 1) * RECORD_SIZE :]), where
        assert is_zero(partner[(k_partner + 1) * RECORD_SIZE :]), where
        if not is_zero(slot(rec, k_rec)):  # a record being written at the instant...
            assert k_partner == k_rec and is_zero(slot(partner, k_rec)), where  # ...no partner
        if not is_zero(slot(partner, k_partner)):  # a partner being written: record complete
            assert k_rec == k_partner + 1, where
        return k_rec, k_partner


def slot(data: bytes, i: int) -> bytes:
    return data[i * RECORD_SIZE : (i + 1) * RECORD_SIZE]


def is_zero(data: bytes) -> bool:
    return data.count(0) == len(data)


def full_records(data: bytes) -> int:
    """How many slots from 0 hold their exact record."""
    i = 0
    while slot(data, i) == expected_record(SEED, i):
        i += 1
    return i


def start_linked_guest(workdir: Path, *, count: int | None, interval_ms: int) -> QemuProcess:
    image = build_guest(guest_cache())
    drives = []
    for name in (REC, PARTNER):
        make_disk(workdir / f"{name}.qcow2", DISK_SIZE)
        drives.append(DriveSpec(name, workdir / f"{name}.qcow2"))
    params: dict[str, str | int] = {"seed": SEED, "disk": "vda", "partner": "vdb",
                                    "interval_ms": interval_ms}  # fmt: skip
    if count is not None:
        params["count"] = count
    spec = VmProcessSpec(
        name="g1", workdir=workdir, drives=drives, kernel=image.kernel, initrd=image.initrd,
        append=guest_cmdline("linked", **params), accel=probe_accel(),
    )  # fmt: skip
    vm = QemuProcess.start(spec)
    vm.wait_serial("^SR-BOOTED", 90)
    return vm


@pytest.fixture
def linked_guest(tmp_path: Path) -> Iterator[GuestRig]:
    vm = start_linked_guest(tmp_path, count=60, interval_ms=20)
    try:
        store = ReplicaStore.init(f"file://{tmp_path / 'store'}", StoreKeys.generate())
        yield GuestRig(tmp_path, vm, store)
    finally:
        vm.stop()


def test_every_point_is_a_state_the_guest_had(linked_guest: GuestRig) -> None:
    rig = linked_guest
    tracker = ChangeTracker(rig.vm.qmp_path, rig.workdir / "run", secrets.token_hex(8))
    replicator = Replicator(tracker, rig.store, "g1")
    rig.wait_linked(2)
    during_initial: list[int] = []

    def hook(step: str) -> None:
        if step == "exported":  # frozen: let the guest write while the initial copy runs
            seen = rig.linked()
            rig.wait_linked(seen + 3)
            during_initial.append(rig.linked())

    points = [replicator.run_cycle(None, hook=hook).point]
    initial = rig.check_point(points[0])
    assert initial[0] < during_initial[0]  # the initial point is older than those writes
    points.append(replicator.run_cycle(points[0]).point)
    first_delta = rig.check_point(points[1])
    assert first_delta[1] >= during_initial[0]  # shipped by the first delta
    for _ in range(3):
        time.sleep(1.0)
        points.append(replicator.run_cycle(points[-1]).point)
        rig.check_point(points[-1])
    rig.vm.wait_serial("^SR-WRITER-DONE 60", 180)
    points.append(replicator.run_cycle(points[-1]).point)
    assert rig.check_point(points[-1]) == (60, 60)
    counts = [rig.check_point(p) for p in points]
    assert counts == sorted(counts)  # time moves forward
    assert len({c for c in counts}) >= 3  # the points were taken while the guest wrote
