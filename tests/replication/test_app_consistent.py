"""App-consistent recovery points through a real qemu-guest-agent.

The agent guest (``build_guest(agent=True)``) runs ``qemu-ga`` and has an ext4 filesystem
mounted on its second disk. With a policy asking for app-consistent points every hour, the
first cycle freezes the filesystem around the transaction: the restored filesystem is clean
(ext4 clears ``needs_recovery`` when frozen) and holds a file the guest wrote without syncing.
The next cycle within the hour is crash-consistent (``needs_recovery`` set, as for any
mounted ext4). The thaw happens on every path, a failing transaction included. A guest
without a running agent gets crash-consistent points and a warning, not an error.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from siterecovery.agent.embedded import EmbeddedAgent
from siterecovery.domain import Consistency
from siterecovery.hypervisor.errors import QmpError
from siterecovery.hypervisor.guest import build_guest, guest_cmdline, make_disk, make_ext4_disk
from siterecovery.hypervisor.guestagent import GuestAgent, GuestAgentUnavailable
from siterecovery.hypervisor.process import DriveSpec, QemuProcess, VmProcessSpec, probe_accel
from siterecovery.hypervisor.tracking import ChangeTracker
from siterecovery.store.keys import StoreKeys
from siterecovery.store.repository import ReplicaStore
from siterecovery.vault import points, service
from siterecovery.vault.db import Database, open_database
from siterecovery.vault.models import SiteRole

from .test_consistency import guest_cache
from .test_resync import Clock

pytestmark = pytest.mark.qemu
MiB = 1 << 20


@dataclass
class AgentRig:
    workdir: Path
    vm: QemuProcess
    db: Database
    clock: Clock
    store: ReplicaStore
    protection: EmbeddedAgent

    @property
    def qga(self) -> Path:
        return self.vm.spec.qga_path

    def agent(self) -> GuestAgent:
        return GuestAgent.connect(self.qga)

    def guest_sh(self, script: str) -> bytes:
        with self.agent() as agent:
            result = agent.run(["/bin/sh", "-c", script])
        assert result.exitcode == 0, result
        return result.stdout

    def restored_fs(self) -> Path:
        latest = points.latest_point(self.db, vm="g1")
        assert latest is not None
        point = self.store.load_point("g1", latest.point_id)
        dest = self.workdir / f"fs-{point.point_id}.raw"
        self.store.restore_disk(point, "fs", dest, overwrite=True)
        return dest


def _vault(workdir: Path, app_h: int) -> tuple[Database, Clock, ReplicaStore, EmbeddedAgent]:
    clock = Clock()
    # The vault clock is simulated; point times are the wall clock: not bounded by skew.
    db = open_database(f"sqlite:///{workdir / 'vault.db'}", clock=clock, clock_skew_s=None)
    service.ensure_site(db, name="primary", role=SiteRole.PRIMARY)
    service.ensure_host(db, name="h1", site="primary")
    service.create_policy(
        db, name="app", copy_frequency_s=30, retention_h=24, app_consistent_h=app_h
    )
    store = ReplicaStore.init(f"file://{workdir / 'store'}", StoreKeys.generate())
    return db, clock, store, EmbeddedAgent(db, store, workdir / "run")


def _wait_agent(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            GuestAgent.connect(path, timeout=2).close()
            return
        except GuestAgentUnavailable:
            assert time.monotonic() < deadline, "the guest agent never answered"
            time.sleep(0.5)


@pytest.fixture
def agent_rig(tmp_path: Path) -> Iterator[AgentRig]:
    image = build_guest(guest_cache(), agent=True)
    make_disk(tmp_path / "sys.qcow2", 4 * MiB)
    make_ext4_disk(tmp_path / "fs.qcow2", 32 * MiB)
    spec = VmProcessSpec(
        name="g1", workdir=tmp_path, kernel=image.kernel, initrd=image.initrd,
        drives=[DriveSpec("sys", tmp_path / "sys.qcow2"), DriveSpec("fs", tmp_path / "fs.qcow2")],
        append=guest_cmdline("idle", fs="vdb"), accel=probe_accel(), guest_agent=True,
    )  # fmt: skip
    vm = QemuProcess.start(spec)
    db, clock, store, protection = _vault(tmp_path, app_h=1)
    try:
        vm.wait_serial("^SR-AGENT-STARTED", 90)
        vm.wait_serial("^SR-FS-MOUNTED vdb", 5)
        _wait_agent(spec.qga_path)
        protection.register_vm(
            host="h1", name="g1", qmp_path=vm.qmp_path, config={}, qga_path=spec.qga_path
        )
        yield AgentRig(tmp_path, vm, db, clock, store, protection)
    finally:
        vm.stop()
        db.close()


def _fs_features(image: Path) -> str:
    out = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    return next(line for line in out.splitlines() if line.startswith("Filesystem features"))


def _fs_file(image: Path, name: str) -> bytes:
    return subprocess.run(["debugfs", "-R", f"cat /{name}", str(image)], capture_output=True,
                          check=True).stdout  # fmt: skip


@pytest.mark.slow
def test_app_consistent_points_freeze_the_guest_filesystem(
    agent_rig: AgentRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = agent_rig
    rig.guest_sh("echo written-before-the-freeze > /mnt/note")  # no sync: in the page cache
    _job, initial = rig.protection.enable_protection("g1", "app")
    assert initial.consistency == Consistency.APP
    assert 0 < initial.quiesced_s < 5  # frozen only around the transaction
    fs = rig.restored_fs()
    assert "needs_recovery" not in _fs_features(fs)  # frozen: a clean filesystem
    assert _fs_file(fs, "note") == b"written-before-the-freeze\n"
    with rig.agent() as agent:
        assert agent.fsfreeze_status() == "thawed"

    rig.guest_sh("echo second > /mnt/note2")
    rig.clock.advance(minutes=30)
    crash = rig.protection.replicate("g1")
    assert crash.consistency == Consistency.CRASH and crash.warnings == ()
    assert "needs_recovery" in _fs_features(rig.restored_fs())  # a mounted ext4, as is

    rig.clock.advance(minutes=31)  # an hour since the last app-consistent point
    app = rig.protection.replicate("g1")
    assert app.consistency == Consistency.APP
    recorded = [p.consistency for p in points.list_points(rig.db, vm="g1")]
    assert recorded == [Consistency.APP, Consistency.CRASH, Consistency.APP]

    # The transaction fails while the guest is frozen: the guest is thawed all the same.
    rig.clock.advance(hours=2)

    def failing(self: ChangeTracker, *args: object, **kwargs: object) -> object:
        raise QmpError("the transaction failed (test)")

    monkeypatch.setattr(ChangeTracker, "_transaction", failing)
    with pytest.raises(QmpError, match="transaction failed"):
        rig.protection.replicate("g1")
    monkeypatch.undo()
    with rig.agent() as agent:
        assert agent.fsfreeze_status() == "thawed"
    assert rig.guest_sh("echo alive > /mnt/after; cat /mnt/after") == b"alive\n"


def test_guest_without_agent_gets_crash_points_and_a_warning(tmp_path: Path) -> None:
    # A paused VM has the agent's port but nobody answers on it.
    make_disk(tmp_path / "d0.qcow2", 4 * MiB)
    spec = VmProcessSpec(
        name="g0", workdir=tmp_path, drives=[DriveSpec("d0", tmp_path / "d0.qcow2")],
        extra_args=["-S"], guest_agent=True,
    )  # fmt: skip
    vm = QemuProcess.start(spec)
    db, _clock, _store, protection = _vault(tmp_path, app_h=1)
    try:
        protection.register_vm(
            host="h1", name="g0", qmp_path=vm.qmp_path, config={}, qga_path=spec.qga_path
        )
        _job, result = protection.enable_protection("g0", "app")
        assert result.consistency == Consistency.CRASH
        (warning,) = result.warnings
        assert warning.startswith("guest agent unavailable")
        figures = points.latest_point(db, vm="g0").figures  # type: ignore[union-attr]
        assert figures["consistency"] == "crash" and figures["warnings"] == [warning]
        assert service.get_protection(db, vm="g0").last_error is None
    finally:
        vm.stop()
        db.close()
