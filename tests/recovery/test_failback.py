"""Failback and reverse replication against real QEMU (TCG): a protected VM fails over
unplanned, is committed, the replica writes new data, and the data comes home with the
*minimize downtime* method; the failback is committed and reverse replication makes the VM
protected again with a point equal to the primary disks."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from siterecovery.domain import ReplicationState
from siterecovery.errors import InputError
from siterecovery.hypervisor.errors import ProcessError
from siterecovery.hypervisor.process import QemuProcess, qmp_execute
from siterecovery.recovery import instant
from siterecovery.recovery.errors import FailoverError
from siterecovery.recovery.failback import FailbackMethod, FailbackService
from siterecovery.recovery.failover import FailoverOptions
from siterecovery.recovery.replica import RecoveryMode
from siterecovery.vault import jobs, points, service
from siterecovery.vault.errors import InvalidTransition
from siterecovery.vault.records import JobRecord

from .conftest import Site

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
S = ReplicationState
DISKS = ("system", "data")
BLOCKS = (16 + 32) * 16  # 64 KiB blocks of the 16 MiB system and 32 MiB data disks


def _write(qmp: Path, disk: str, pattern: int, offset: str, length: str) -> None:
    """Write through the running QEMU's disk device (no guest needed), then flush."""
    for io in (f"write -P {pattern} {offset} {length}", "flush"):
        device = f"/machine/peripheral/{disk}-dev/virtio-backend"
        line = f'qemu-io -d {device} "{io}"'
        said = qmp_execute(qmp, "human-monitor-command", {"command-line": line})
        assert not str(said).strip(), said  # qemu-io's own output goes to QEMU's log


def _identical(a: Path, b: Path) -> bool:
    done = subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode in (0, 1), done.stderr
    return done.returncode == 0


def _state(site: Site, vm: str) -> ReplicationState:
    return service.get_protection(site.db, vm=vm).state


def test_failback_minimize_downtime_then_reverse_replication(
    site: Site, protected_vm: Callable[..., QemuProcess]
) -> None:
    primary = protected_vm("vm-fb", paused=True)
    _write(primary.qmp_path, "data", 0x11, "0", "1M")
    site.protection.replicate("vm-fb")
    primary.kill()  # the primary site is lost

    site.failover.unplanned("vm-fb", options=FailoverOptions(mode=RecoveryMode.FULL))
    fb = FailbackService(site.db, site.failover)
    with pytest.raises(InputError, match="committed failover"):
        fb.failback("vm-fb", FailbackMethod.MINIMIZE_DOWNTIME)  # not committed yet
    assert _state(site, "vm-fb") == S.FAILED_OVER
    site.failover.commit("vm-fb")
    record = site.failover.replica("vm-fb")
    assert record is not None
    replica_qmp = Path(record.qmp)
    # the replica runs the workload now: 8 + 1 blocks of new data
    _write(replica_qmp, "data", 0x5A, "2M", "512k")
    _write(replica_qmp, "system", 0x33, "64k", "64k")

    late: list[str] = []

    def write_between_passes(job: JobRecord) -> None:
        # 2 more blocks written after the first pass: only the final pass can bring them
        if job.kind == "failback" and not late:
            task = job.task("synchronize while replica runs")
            if str(task.state) == "succeeded":
                late.append("written")
                _write(replica_qmp, "data", 0x77, "8M", "128k")

    fb = FailbackService(site.db, site.failover, on_job=write_between_passes)
    outcome = fb.failback("vm-fb", FailbackMethod.MINIMIZE_DOWNTIME)
    site.primaries["vm-fb-back"] = outcome.primary
    assert late and _state(site, "vm-fb") == S.FAILED_BACK
    first, final = outcome.figures["first_pass"], outcome.figures["final_pass"]
    assert first["blocks_compared"] == BLOCKS
    assert 9 <= first["blocks_copied"] <= 16  # only the differing blocks
    assert 2 <= final["blocks_copied"] == final["blocks_compared"] < 16  # the change log only
    assert outcome.job.state == "succeeded" and 0 < outcome.downtime_s < 30
    assert outcome.job.task("start primary VM").details["downtime_s"] == round(
        outcome.downtime_s, 3
    )

    # both stopped: the primary disks equal the replica's byte for byte
    outcome.primary.stop()
    workdir = site.root / "primary" / "vm-fb"
    replica_disks = Path(record.workdir) / record.point_id
    for disk in DISKS:
        assert _identical(replica_disks / f"{disk}.qcow2", workdir / f"{disk}.qcow2"), disk
    restarted = QemuProcess.start(outcome.primary.spec)
    site.primaries["vm-fb-again"] = restarted

    fb.commit("vm-fb")
    assert _state(site, "vm-fb") == S.COMMITTED_BACK
    assert not Path(record.workdir).exists()

    job, result = site.protection.reverse_replicate("vm-fb")
    assert job.state == "succeeded" and _state(site, "vm-fb") == S.PROTECTED
    assert result.blocks_compared == BLOCKS
    assert 11 <= result.blocks_sent <= 20  # what changed since the last point only
    restarted.stop()
    latest = points.latest_point(site.db, vm="vm-fb")
    assert latest is not None and latest.point_id == result.point.point_id
    for disk in DISKS:
        dest = site.root / f"restored-{disk}.raw"
        site.store.restore_disk(result.point, disk, dest)
        assert _identical(dest, workdir / f"{disk}.qcow2"), disk


def test_failed_failback_keeps_the_replica_then_full_download(
    site: Site, protected_vm: Callable[..., QemuProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    primary = protected_vm("vm-ff", paused=True)
    primary.kill()
    site.failover.unplanned("vm-ff", options=FailoverOptions(mode=RecoveryMode.FULL))
    site.failover.commit("vm-ff")
    record = site.failover.replica("vm-ff")
    assert record is not None
    _write(Path(record.qmp), "data", 0x42, "4M", "1M")
    fb = FailbackService(site.db, site.failover)

    def broken(_: object) -> QemuProcess:
        raise ProcessError("VM vm-ff did not start: no such machine")

    monkeypatch.setattr(fb, "_start_primary", broken)
    with pytest.raises(FailoverError, match="failback of VM vm-ff failed") as raised:
        fb.failback("vm-ff", FailbackMethod.MINIMIZE_DOWNTIME)
    assert "runs again" in raised.value.hint
    # the replica is the VM again: committed, running (resumed after its pause)
    assert _state(site, "vm-ff") == S.COMMITTED
    assert qmp_execute(Path(record.qmp), "query-status")["status"] == "running"
    failed = jobs.list_jobs(site.db, vm="vm-ff", limit=1)[0]
    assert failed.kind == "failback" and failed.state == "failed"
    assert failed.task("start primary VM").state == "failed"

    monkeypatch.undo()
    outcome = fb.failback("vm-ff", FailbackMethod.FULL_DOWNLOAD)
    site.primaries["vm-ff-back"] = outcome.primary
    assert outcome.first_pass == [] and outcome.figures["final_pass"]["blocks_copied"] == BLOCKS
    assert _state(site, "vm-ff") == S.FAILED_BACK and not instant.pid_alive(record.pid)
    outcome.primary.stop()
    workdir = site.root / "primary" / "vm-ff"
    for disk in DISKS:
        replica = Path(record.workdir) / record.point_id / f"{disk}.qcow2"
        assert _identical(replica, workdir / f"{disk}.qcow2"), disk


def test_failback_from_an_instant_replica(
    site: Site, protected_vm: Callable[..., QemuProcess]
) -> None:
    primary = protected_vm("vm-fi", paused=True)
    primary.kill()
    site.failover.unplanned("vm-fi")  # instant: served by the store, hydrating after commit
    site.failover.commit("vm-fi")
    record = site.failover.replica("vm-fi")
    assert record is not None and record.mode == "instant" and record.hydrating
    _write(Path(record.qmp), "data", 0x24, "12M", "256k")
    outcome = FailbackService(site.db, site.failover).failback(
        "vm-fi", FailbackMethod.MINIMIZE_DOWNTIME
    )
    site.primaries["vm-fi-back"] = outcome.primary
    assert outcome.figures["first_pass"]["blocks_copied"] == 4
    assert not instant.pid_alive(record.server_pid)  # the store's NBD server is gone too
    outcome.primary.stop()
    workdir = site.root / "primary" / "vm-fi"
    for disk in DISKS:
        overlay = Path(record.workdir) / f"{disk}.overlay.qcow2"
        assert _identical(overlay, workdir / f"{disk}.qcow2"), disk


def test_failback_refusals_change_nothing(
    site: Site, protected_vm: Callable[..., QemuProcess]
) -> None:
    primary = protected_vm("vm-fr", paused=True)
    fb = FailbackService(site.db, site.failover)
    with pytest.raises(InputError, match="needs a committed failover"):
        fb.failback("vm-fr", FailbackMethod.FULL_DOWNLOAD)
    assert _state(site, "vm-fr") == S.PROTECTED
    with pytest.raises(InputError, match="not failed back"):
        fb.commit("vm-fr")
    with pytest.raises(InvalidTransition, match="reverse replication"):
        site.protection.reverse_replicate("vm-fr")
    assert _state(site, "vm-fr") == S.PROTECTED and primary.alive()
