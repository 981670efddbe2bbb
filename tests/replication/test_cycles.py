"""Replication cycles against a real qemu-storage-daemon, restored and compared byte for byte.

A writer changes the disk through a writable NBD export of the same block node the tracker
watches, so every write goes through QEMU's block layer and is seen by the dirty bitmaps, as a
guest's writes would be. A reference model (a bytearray per disk) follows every write; each
recovery point is restored and compared with the model as it was at that cycle's instant.
Writes that land *during* a cycle (after the transaction, before shipping ends) must not be in
that cycle's point, and must be in the next one.
"""

from __future__ import annotations

import random
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from siterecovery.hypervisor.errors import BitmapError
from siterecovery.hypervisor.nbd import NbdClient
from siterecovery.hypervisor.process import DriveSpec, StorageDaemon, qmp_execute
from siterecovery.hypervisor.tracking import ChangeTracker, CycleView
from siterecovery.replication.engine import Replicator
from siterecovery.store.keys import StoreKeys
from siterecovery.store.manifest import PointManifest
from siterecovery.store.repository import ReplicaStore

pytestmark = pytest.mark.qemu

MiB = 1 << 20
SIZES = {"d0": 24 * MiB + 4096, "d1": 8 * MiB}


@dataclass
class Rig:
    """A daemon serving two disks, writers on them, a tracker, a store and the model."""

    daemon: StorageDaemon
    tracker: ChangeTracker
    store: ReplicaStore
    writers: dict[str, NbdClient]
    model: dict[str, bytearray]
    workdir: Path

    def write(self, disk: str, offset: int, data: bytes) -> None:
        self.writers[disk].pwrite(offset, data)
        self.writers[disk].flush()
        self.model[disk][offset : offset + len(data)] = data

    def random_writes(self, rng: random.Random, count: int) -> None:
        for _ in range(count):
            disk = rng.choice(sorted(SIZES))
            length = rng.choice([512, 4096, 65536, 300 * 1024, 2 * MiB + 512])
            offset = rng.randrange(0, (SIZES[disk] - length) // 512) * 512
            self.write(disk, offset, rng.randbytes(length))

    def snapshot(self) -> dict[str, bytes]:
        return {disk: bytes(data) for disk, data in self.model.items()}

    def restore(self, point: PointManifest, disk: str) -> bytes:
        dest = self.workdir / f"restore-{point.point_id}-{disk}.raw"
        self.store.restore_disk(point, disk, dest)
        return dest.read_bytes()


class WritingTracker(ChangeTracker):
    """A tracker that runs a callback right after the transaction: writes during a cycle."""

    during_cycle: list[object]

    def begin(self, *, initial: bool) -> CycleView:
        view = super().begin(initial=initial)
        hooks, self.during_cycle = getattr(self, "during_cycle", []), []
        for hook in hooks:
            hook()  # type: ignore[operator]
        return view


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    rng = random.Random(7)
    model = {}
    drives = []
    for disk, size in SIZES.items():
        image = tmp_path / f"{disk}.qcow2"
        argv = ["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(size)]
        subprocess.run(argv, check=True)
        drives.append(DriveSpec(disk, image))
        model[disk] = bytearray(size)
    daemon = StorageDaemon.start(tmp_path, drives)
    writers = {}
    try:
        for disk in SIZES:
            qmp_execute(daemon.qmp_path, "block-export-add", {
                "type": "nbd", "id": f"rw-{disk}", "node-name": disk, "name": f"rw-{disk}",
                "writable": True,
            })  # fmt: skip
            writers[disk] = NbdClient.connect_unix(str(daemon.nbd_path), f"rw-{disk}")
        tracker = WritingTracker(
            daemon.qmp_path, tmp_path, secrets.token_hex(8), nodes={d: d for d in SIZES}
        )
        store = ReplicaStore.init(f"file://{tmp_path / 'store'}", StoreKeys.generate())
        r = Rig(daemon, tracker, store, writers, model, tmp_path)
        # Some content before protection, including data in the last, short 4 KiB.
        r.random_writes(rng, 6)
        r.write("d0", SIZES["d0"] - 4096, rng.randbytes(4096))
        yield r
    finally:
        for client in writers.values():
            client.close()
        daemon.stop()


def test_every_point_restores_to_the_disk_at_its_instant(rig: Rig) -> None:
    rng = random.Random(11)
    replicator = Replicator(rig.tracker, rig.store, "vm1")
    expected: list[tuple[PointManifest, dict[str, bytes]]] = []
    previous: PointManifest | None = None
    for cycle in range(5):
        at_instant = rig.snapshot()
        # Writes that land after the transaction belong to the next point.
        rig.tracker.during_cycle = [lambda: rig.random_writes(rng, 4)]
        result = replicator.run_cycle(previous)
        assert result.initial is (cycle == 0)
        expected.append((result.point, at_instant))
        previous = result.point
        rig.random_writes(rng, 5)
    # A final cycle with no change between cycles still captures the in-cycle writes.
    at_instant = rig.snapshot()
    final = replicator.run_cycle(previous)
    expected.append((final.point, at_instant))

    assert [p.point_id for p in rig.store.list_points("vm1")] == [p.point_id for p, _ in expected]
    for point, disks in expected:
        for disk, content in disks.items():
            assert rig.restore(point, disk) == content, f"{point.point_id} {disk}"


def test_delta_reads_only_what_changed(rig: Rig) -> None:
    replicator = Replicator(rig.tracker, rig.store, "vm1")
    first = replicator.run_cycle(None)
    rig.write("d0", 5 * MiB, b"\x5a" * 65536)
    rig.write("d1", 0, b"\xa5" * 512)
    second = replicator.run_cycle(first.point)
    # 64 KiB on d0, and the 64 KiB bitmap granule around the 512 bytes on d1.
    assert second.bytes_read == 2 * 65536
    third = replicator.run_cycle(second.point)
    assert third.bytes_read == 0
    assert rig.restore(third.point, "d1") == bytes(rig.model["d1"])


def test_failed_shipping_loses_no_change(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    replicator = Replicator(rig.tracker, rig.store, "vm1")
    first = replicator.run_cycle(None)
    rig.write("d0", 3 * MiB, b"\x11" * 65536)

    class Boom(Exception):
        pass

    def fail(*args: object, **kwargs: object) -> None:
        raise Boom

    # Segments are stored, then publishing the point fails: the frozen bitmap is merged back.
    with monkeypatch.context() as patch:
        patch.setattr(rig.store, "publish_point", fail)
        with pytest.raises(Boom):
            replicator.run_cycle(first.point)
    assert len(rig.store.list_points("vm1")) == 1  # nothing half-made was published
    rig.write("d1", 0, b"\x44" * 512)
    second = replicator.run_cycle(first.point)
    assert second.bytes_read == 2 * 65536
    assert rig.restore(second.point, "d0") == bytes(rig.model["d0"])


def test_killed_agent_leftovers_are_reconciled(rig: Rig) -> None:
    replicator = Replicator(rig.tracker, rig.store, "vm1")
    first = replicator.run_cycle(None)
    rig.write("d1", 1 * MiB, b"\x22" * 4096)
    # An agent killed after the transaction: export, job, overlay and a frozen bitmap remain.
    abandoned = rig.tracker.begin(initial=False)
    assert abandoned.generation == 2
    rig.write("d1", 2 * MiB, b"\x33" * 4096)
    second = replicator.run_cycle(first.point)
    for disk in SIZES:
        assert rig.restore(second.point, disk) == bytes(rig.model[disk])
    exports = {e["id"] for e in qmp_execute(rig.daemon.qmp_path, "query-block-exports")}
    assert exports == {f"rw-{d}" for d in SIZES}  # the abandoned cycle's exports are gone
    assert qmp_execute(rig.daemon.qmp_path, "query-block-jobs") == []


def test_missing_bitmap_requires_resync(rig: Rig) -> None:
    replicator = Replicator(rig.tracker, rig.store, "vm1")
    first = replicator.run_cycle(None)
    qmp_execute(rig.daemon.qmp_path, "block-dirty-bitmap-remove", {
        "node": "d1", "name": f"{rig.tracker.prefix}1",
    })  # fmt: skip
    with pytest.raises(BitmapError, match=r"d1.*missing"):
        replicator.run_cycle(first.point)
    assert len(rig.store.list_points("vm1")) == 1
