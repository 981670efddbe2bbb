"""Resynchronization against a real (paused) QEMU VM, restored and compared byte for byte.

The VM's disks are attached with ``share-rw=on`` so the test can write to them through a
writable NBD export of the same block node while QEMU holds them: every write goes through
QEMU's block layer and its dirty bitmaps, as a guest's would. A byte model follows every
write. :class:`VmRig` is shared with ``test_faults.py``.

The reference-image figures (2 GiB, 1 % divergence, against rsync) run only with
``SITERECOVERY_BENCH=1``; see docs/replication.md.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from siterecovery.agent.embedded import EmbeddedAgent
from siterecovery.domain import Health
from siterecovery.domain import ReplicationState as S
from siterecovery.hypervisor.errors import BitmapError
from siterecovery.hypervisor.nbd import NbdClient
from siterecovery.hypervisor.process import DriveSpec, QemuProcess, VmProcessSpec, qmp_execute
from siterecovery.hypervisor.tracking import ChangeTracker, CycleView
from siterecovery.replication.errors import ChangeLogTooLarge
from siterecovery.replication.resync import BLOCK
from siterecovery.store.keys import StoreKeys
from siterecovery.store.repository import ReplicaStore
from siterecovery.vault import points, service
from siterecovery.vault.db import Database, open_database
from siterecovery.vault.errors import VmNotProtected
from siterecovery.vault.models import SiteRole
from siterecovery.vault.operations import RESYNC_TASKS

pytestmark = pytest.mark.qemu

MiB = 1 << 20
SIZES = {"d0": 16 * MiB, "d1": 8 * MiB + 4096}


@dataclass
class Clock:
    """The vault's injectable clock: time moves only when a test says so."""

    now: datetime = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


@dataclass
class VmRig:
    """A paused QEMU VM with two qcow2 disks, registered and protectable, and its model."""

    workdir: Path
    db: Database
    clock: Clock
    store: ReplicaStore
    protection: EmbeddedAgent
    keys: StoreKeys
    vm: QemuProcess | None = None
    sizes: dict[str, int] = field(default_factory=lambda: dict(SIZES))
    writers: dict[str, NbdClient] = field(default_factory=dict)
    model: dict[str, bytearray] = field(default_factory=dict)

    @property
    def vmdir(self) -> Path:
        return self.workdir / "vm"

    @property
    def nbd_socket(self) -> Path:
        return self.protection.run_dir / "vm1" / "nbd.sock"

    def start(self) -> None:
        """Start (or restart) QEMU on the disks and open the writers."""
        args: list[str] = []
        for disk in self.sizes:
            args += DriveSpec(disk, self.vmdir / f"{disk}.qcow2").blockdev_args()
            args += ["-device", f"virtio-blk-pci,drive={disk},id={disk}-dev,share-rw=on"]
        spec = VmProcessSpec(name="vm1", workdir=self.vmdir, drives=[], extra_args=[*args, "-S"])
        self.vm = QemuProcess.start(spec)
        self.nbd_socket.parent.mkdir(parents=True, exist_ok=True)
        self.nbd_socket.unlink(missing_ok=True)
        addr = {"type": "unix", "data": {"path": str(self.nbd_socket)}}
        qmp_execute(self.vm.qmp_path, "nbd-server-start", {"addr": addr})
        for disk in self.sizes:
            qmp_execute(self.vm.qmp_path, "block-export-add", {
                "type": "nbd", "id": f"rw-{disk}", "node-name": disk, "name": f"rw-{disk}",
                "writable": True,
            })  # fmt: skip
            self.writers[disk] = NbdClient.connect_unix(str(self.nbd_socket), f"rw-{disk}")

    def close_writers(self) -> None:
        for client in self.writers.values():
            client.close()
        self.writers.clear()

    def kill(self) -> None:
        """SIGKILL QEMU, as a host crash would."""
        self.close_writers()
        assert self.vm is not None
        self.vm.kill()

    def stop(self) -> None:
        self.close_writers()
        if self.vm is not None:
            self.vm.stop()

    def write(self, disk: str, offset: int, data: bytes) -> None:
        self.writers[disk].pwrite(offset, data)
        self.writers[disk].flush()
        self.model[disk][offset : offset + len(data)] = data

    def random_writes(self, rng: random.Random, count: int, sizes: tuple[int, ...]) -> None:
        for _ in range(count):
            disk = rng.choice(sorted(self.sizes))
            length = rng.choice(sizes)
            offset = rng.randrange(0, (self.sizes[disk] - length) // 512) * 512
            self.write(disk, offset, rng.randbytes(length))

    def snapshot(self) -> dict[str, bytes]:
        return {disk: bytes(data) for disk, data in self.model.items()}

    def protect(self) -> None:
        self.protection.register_vm(
            host="h1", name="vm1", qmp_path=self.vm.qmp_path, config={}  # type: ignore[union-attr]
        )
        self.protection.enable_protection("vm1", "gold")

    def latest_disks(self) -> dict[str, bytes]:
        """Every disk of the newest recovery point, restored from the store."""
        latest = points.latest_point(self.db, vm="vm1")
        assert latest is not None
        point = self.store.load_point("vm1", latest.point_id)
        result = {}
        for disk in self.sizes:
            dest = self.workdir / f"restore-{point.point_id}-{disk}.raw"
            self.store.restore_disk(point, disk, dest, overwrite=True)
            result[disk] = dest.read_bytes()
            dest.unlink()
        return result

    def state(self) -> S:
        return service.get_protection(self.db, vm="vm1").state

    def drop_bitmaps(self) -> None:
        """Lose change tracking (as a bitmap deleted by hand would)."""
        for disk in self.sizes:
            for node in qmp_execute(self.vm.qmp_path, "query-named-block-nodes",  # type: ignore[union-attr]
                                    {"flat": True}):  # fmt: skip
                if node.get("node-name") != disk:
                    continue
                for bitmap in node.get("dirty-bitmaps", []):
                    qmp_execute(self.vm.qmp_path, "block-dirty-bitmap-remove",  # type: ignore[union-attr]
                                {"node": disk, "name": bitmap["name"]})  # fmt: skip


def make_rig(
    workdir: Path,
    store_url: str | None = None,
    *,
    sizes: dict[str, int] | None = None,
    model: bool = True,
    **options: float,
) -> VmRig:
    """Build the rig (vault, store, VM started, nothing protected yet)."""
    clock = Clock()
    # The vault clock is simulated; point times are the wall clock: not bounded by skew.
    db = open_database(f"sqlite:///{workdir / 'vault.db'}", clock=clock, clock_skew_s=None)
    service.ensure_site(db, name="primary", role=SiteRole.PRIMARY)
    service.ensure_host(db, name="h1", site="primary")
    service.create_policy(db, name="gold", copy_frequency_s=30, retention_h=24)
    keys = StoreKeys.generate()
    store = ReplicaStore.init(store_url or f"file://{workdir / 'store'}", keys)
    protection = EmbeddedAgent(db, store, workdir / "run", **options)  # type: ignore[arg-type]
    rig = VmRig(workdir, db, clock, store, protection, keys, sizes=dict(sizes or SIZES))
    rig.vmdir.mkdir(exist_ok=True)
    for disk, size in rig.sizes.items():
        image = rig.vmdir / f"{disk}.qcow2"
        if not image.exists():
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(size)],
                           check=True)  # fmt: skip
        if model:
            rig.model[disk] = bytearray(size)
    rig.start()
    return rig


@pytest.fixture
def vm_rig(tmp_path: Path) -> Iterator[VmRig]:
    rig = make_rig(tmp_path)
    try:
        rng = random.Random(5)
        rig.random_writes(rng, 8, (4096, 65536, 300 * 1024, MiB + 512))
        yield rig
    finally:
        rig.stop()
        rig.db.close()


def test_lost_tracking_resyncs_only_what_differs(
    vm_rig: VmRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = vm_rig
    rig.protect()
    replica = rig.snapshot()
    # Change tracking is lost, and the disks change without it.
    rig.drop_bitmaps()
    rig.write("d0", 3 * MiB, b"\x11" * BLOCK)  # one block
    rig.write("d0", 9 * MiB + 100, b"\x22" * 10)  # one block, partly
    rig.write("d1", 8 * MiB, b"\x33" * 4096)  # the short last block
    rig.write("d1", 0, bytes(2 * BLOCK))  # data (or zeros) overwritten with zeros
    with pytest.raises(BitmapError, match="missing"):
        rig.protection.replicate("vm1")
    replicated = service.get_protection(rig.db, vm="vm1")
    assert (replicated.state, replicated.health) == (S.RESYNC_REQUIRED, Health.WARNING)
    assert replicated.last_error and replicated.last_error.startswith("change tracking lost")

    rng = random.Random(9)
    frozen = _capture_during_resync(
        rig, monkeypatch, lambda: rig.random_writes(rng, 3, (4096, 65536))
    )
    job, result = rig.protection.resync("vm1")
    assert [t.name for t in job.tasks] == list(RESYNC_TASKS)
    assert job.state == "succeeded"
    assert result.blocks_compared == sum(-(-s // BLOCK) for s in rig.sizes.values())
    differing = _differing_blocks(replica, frozen[0])
    assert 3 <= len(differing) <= 5
    assert result.blocks_sent == len(differing), (result.figures(), differing)
    assert result.bytes_sent == sum(length for _, _, length in differing)
    figures = job.task("compare and send blocks").details
    assert figures["blocks_sent"] == result.blocks_sent
    assert {"blocks_compared", "bytes_sent", "duration_s"} <= set(figures)
    # The resync point is the disks at the freeze; the writes made during it come next.
    assert rig.latest_disks() == frozen[0]
    after = service.get_protection(rig.db, vm="vm1")
    assert (after.state, after.health, after.attempts) == (S.PROTECTED, Health.NORMAL, 0)
    cycle = rig.protection.replicate("vm1")
    assert 0 < cycle.bytes_read <= 3 * BLOCK * 2
    assert rig.latest_disks() == rig.snapshot()


def _differing_blocks(
    before: dict[str, bytes], after: dict[str, bytes]
) -> list[tuple[str, int, int]]:
    """(disk, offset, length) of every fixed block whose bytes differ."""
    return [
        (disk, offset, len(data[offset : offset + BLOCK]))
        for disk, data in after.items()
        for offset in range(0, len(data), BLOCK)
        if data[offset : offset + BLOCK] != before[disk][offset : offset + BLOCK]
    ]


def _capture_during_resync(
    rig: VmRig, monkeypatch: pytest.MonkeyPatch, writes: Callable[[], None]
) -> list[dict[str, bytes]]:
    """Run ``writes`` right after the next resync's freeze; return [model at the freeze]."""
    frozen: list[dict[str, bytes]] = []
    original = ChangeTracker.begin_resync

    def begin_resync(self: ChangeTracker) -> CycleView:
        view = original(self)
        frozen.append(rig.snapshot())
        writes()
        return view

    monkeypatch.setattr(ChangeTracker, "begin_resync", begin_resync)
    return frozen


def test_change_log_over_threshold_requires_resync(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, resync_threshold=0.25)
    try:
        rig.protect()
        rig.write("d1", 0, random.Random(1).randbytes(3 * MiB))  # 36 % of d1
        with pytest.raises(ChangeLogTooLarge, match=r"d1 3\d%"):
            rig.protection.replicate("vm1")
        assert rig.state() == S.RESYNC_REQUIRED
        assert len(rig.store.list_points("vm1")) == 1
        _job, result = rig.protection.resync("vm1")
        assert result.blocks_sent == 3 * MiB // BLOCK
        assert rig.latest_disks() == rig.snapshot()
        assert rig.state() == S.PROTECTED
    finally:
        rig.stop()
        rig.db.close()


def test_full_resync_copies_every_disk_whole(vm_rig: VmRig) -> None:
    rig = vm_rig
    rig.protect()
    rig.write("d0", 0, b"\x77" * 4096)
    job, result = rig.protection.resync("vm1", full=True)
    assert job.task("prepare resync").details["full"] is True
    assert sorted(result.figures()["full_copy_disks"]) == sorted(rig.sizes)
    assert rig.latest_disks() == rig.snapshot()
    # Normal delta replication resumes with a fresh change log.
    rig.write("d1", MiB, b"\x78" * 512)
    assert rig.protection.replicate("vm1").bytes_read == BLOCK
    assert rig.latest_disks() == rig.snapshot()


def test_damaged_replica_is_repaired_by_the_resync_verify_asks_for(vm_rig: VmRig) -> None:
    """verify finds a corrupt chunk -> resync required -> a whole-disk resync rewrites it."""
    from siterecovery.store.repair import DAMAGE_REASON, damaged_vms

    rig = vm_rig
    rig.write("d0", 2 * MiB, random.Random(5).randbytes(MiB))
    rig.protect()
    chunks = sorted(p for p in (rig.workdir / "store" / "chunks").rglob("*") if p.is_file())
    victim = max(chunks, key=lambda p: p.stat().st_size)  # the random block's chunk
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    report = rig.store.verify(deep=True)
    reasons = damaged_vms(report)
    assert list(reasons) == ["vm1"] and reasons["vm1"].startswith(DAMAGE_REASON)
    rig.protection.require_resync("vm1", reasons["vm1"])
    assert rig.state() == S.RESYNC_REQUIRED
    job, _ = rig.protection.resync("vm1", reason=reasons["vm1"])
    assert job.task("prepare resync").details["full"] is True  # damage: copy whole, repair
    assert rig.state() == S.PROTECTED
    assert rig.store.verify(deep=True).ok
    assert rig.latest_disks() == rig.snapshot()


def test_resync_refuses_a_vm_that_is_not_protected(vm_rig: VmRig) -> None:
    vm_rig.protection.register_vm(
        host="h1", name="vm1", qmp_path=vm_rig.vm.qmp_path, config={}  # type: ignore[union-attr]
    )
    with pytest.raises(VmNotProtected):
        vm_rig.protection.resync("vm1")
    assert service.list_protected(vm_rig.db) == []


# -- reference figures ----------------------------------------------------------------------


@pytest.mark.skipif(os.environ.get("SITERECOVERY_BENCH") != "1", reason="SITERECOVERY_BENCH=1")
def test_reference_resync_against_rsync(tmp_path: Path) -> None:
    """2 GiB reference image, 1 % divergence of 64 KiB writes: our resync against rsync."""
    from bench.workload import WorkloadSpec, apply_change, change_writes, generate_image

    spec = WorkloadSpec()
    raw = tmp_path / "ref.raw"
    generate_image(raw, spec)
    rsync = _rsync_figures(tmp_path, raw, spec, apply_change)
    image = tmp_path / "ref.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(image)], check=True)
    raw.unlink()
    ours = _resync_figures(tmp_path, image, list(change_writes(spec)))
    report = {"rsync": rsync, "siterecovery": ours}
    (Path(os.environ.get("SITERECOVERY_BENCH_OUT", tmp_path)) / "resync.txt").write_text(
        f"{report}\n"
    )
    print(report)
    assert ours["bytes_sent"] <= spec.change_bytes + BLOCK


def _rsync_figures(
    tmp_path: Path, raw: Path, spec: Any, apply_change: Callable[[Path, Any], None]
) -> dict[str, float]:
    old = tmp_path / "old.raw"
    subprocess.run(["cp", "--sparse=always", str(raw), str(old)], check=True)
    new = tmp_path / "new.raw"
    subprocess.run(["cp", "--sparse=always", str(raw), str(new)], check=True)
    apply_change(new, spec)
    subprocess.run(["sync"], check=True)
    started = time.monotonic()
    out = subprocess.run(["rsync", "--inplace", "--no-whole-file", "--stats", str(new), str(old)],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    took = time.monotonic() - started
    sent = int(re.search(r"Total bytes sent: ([\d,]+)", out).group(1).replace(",", ""))  # type: ignore[union-attr]
    old.unlink()
    new.unlink()
    return {"seconds": round(took, 2), "bytes_sent": sent}


def _resync_figures(
    tmp_path: Path, image: Path, writes: list[tuple[int, bytes]]
) -> dict[str, float]:
    workdir = tmp_path / "ours"
    (workdir / "vm").mkdir(parents=True)
    shutil.move(str(image), workdir / "vm" / "d0.qcow2")
    rig = make_rig(workdir, sizes={"d0": 2 << 30}, model=False)
    try:
        rig.protect()
        rig.drop_bitmaps()
        for offset, data in writes:
            rig.writers["d0"].pwrite(offset, data)
        rig.writers["d0"].flush()
        _job, result = rig.protection.resync("vm1")
        return {
            "seconds": round(result.duration_s, 2), "bytes_sent": result.bytes_sent,
            "bytes_stored": result.bytes_stored, "bytes_read": result.bytes_read,
            "blocks_sent": result.blocks_sent,
        }  # fmt: skip
    finally:
        rig.stop()
        rig.db.close()
