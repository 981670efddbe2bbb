"""A drill (replication keeps running, the check passes, cleanup leaves nothing) and a planned
failover with writes right up to the shutdown (nothing acknowledged is lost)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest

from siterecovery.domain import ReplicationState
from siterecovery.hypervisor.guest import expected_record, guest_cmdline, parse_console
from siterecovery.hypervisor.process import QemuProcess
from siterecovery.recovery import instant
from siterecovery.recovery.failover import FailoverOptions
from siterecovery.recovery.replica import Probe
from siterecovery.vault import points, service

from .conftest import Site

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
S = ReplicationState


def test_drill_boots_checks_and_cleans_up(
    site: Site, protected_vm: Callable[..., QemuProcess]
) -> None:
    primary = protected_vm("vm-d", append=guest_cmdline("writer", seed=3, interval_ms=200))
    before = len(points.list_points(site.db, vm="vm-d"))
    probe = Probe("serial", pattern=r"^SR-VERIFY-DONE [1-9]", timeout_s=120)
    drill = site.failover.test("vm-d", FailoverOptions(append=guest_cmdline("verify", seed=3),
                                                       probe=probe))  # fmt: skip
    assert service.get_protection(site.db, vm="vm-d").state == S.TEST_FAILOVER_RUNNING
    assert drill.job.state == "succeeded"
    assert drill.job.task("run drill check").details["evidence"]["kind"] == "serial"
    # replication continues during the drill
    cycle = site.protection.replicate("vm-d")
    assert len(points.list_points(site.db, vm="vm-d")) == before + 1
    assert cycle.bytes_read > 0 and primary.alive()

    slot = site.root / "recovery" / "vm-d" / "test"
    assert (slot / "replica.json").exists()
    job = site.failover.cleanup("vm-d")
    assert job.state == "succeeded"
    assert not slot.exists()
    assert not instant.pid_alive(drill.record.pid)
    assert not instant.pid_alive(drill.record.server_pid)
    assert service.get_protection(site.db, vm="vm-d").state == S.PROTECTED
    site.protection.replicate("vm-d")  # and after it


def test_planned_failover_loses_nothing(
    site: Site, protected_vm: Callable[..., QemuProcess]
) -> None:
    primary = protected_vm("vm-p", append=guest_cmdline("writer", seed=5, interval_ms=50))
    primary.wait_serial(r"^SR-WROTE 5 ", 60)
    site.protection.replicate("vm-p")
    primary.wait_serial(r"^SR-WROTE 15 ", 60)
    outcome = site.failover.planned("vm-p", FailoverOptions(append=guest_cmdline("verify",
                                                                                 seed=5)))
    acked = parse_console(primary.serial_text()).wrote  # every write the guest saw complete
    assert primary.wait(30) == 0 or not primary.alive()  # the source was shut down
    outcome.process.wait_serial(r"^SR-VERIFY-DONE", 120)
    have = parse_console(outcome.process.serial_text()).have
    assert len(acked) >= 16
    for i, digest in acked.items():
        assert have.get(i) == digest == hashlib.sha256(expected_record(5, i)).hexdigest()
    assert service.get_protection(site.db, vm="vm-p").state == S.FAILED_OVER
    job = outcome.job
    assert [t.name for t in job.tasks][:3] == [
        "check prerequisites", "shut down source VM", "replicate final changes"]
