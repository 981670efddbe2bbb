"""The vault port's conformance suite: every adapter behaves the same (DESIGN §2).

Each test runs twice, against :class:`LocalVaultPort` (the vault database in this process) and
:class:`RemoteVaultPort` (the agents' API of a real ``vault serve`` over TLS, with the host's
own credential). Both act as host ``kvm1`` of site ``dc1``; the operator's side of each
scenario is set up on the vault database directly. Run on PostgreSQL too by ``make test``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from siterecovery.api.port import RemoteVaultPort
from siterecovery.domain import Consistency, DiskSpec, JobState
from siterecovery.domain import ReplicationState as S
from siterecovery.policies.states import ErrorClass
from siterecovery.vault import jobs, networks, operations, service
from siterecovery.vault.db import Database, open_database
from siterecovery.vault.errors import InvalidJobState, InvalidTransition, UnknownVm
from siterecovery.vault.port import (
    DiscoveredVm,
    FailureReport,
    LocalVaultPort,
    PointReport,
    VaultPort,
)

from .test_http import register_host
from .vaultproc import VaultProcess

DISK = DiskSpec("vda", 1 << 20, node_name="n", path="/img/web1.qcow2")


@dataclass
class Side:
    """One adapter under test, and the vault database to set up the operator's side."""

    port: VaultPort
    db: Database

    def protect(self, vm: str = "web1", policy: str = "gold") -> str:
        """Report and protect ``vm`` as an operator would; its enable protection job id."""
        self.port.report_vms([DiscoveredVm(vm, {"qmp": f"/run/{vm}.qmp"}, (DISK,))])
        if policy not in {p.name for p in service.list_policies(self.db)}:
            service.create_policy(self.db, name=policy, copy_frequency_s=30, retention_h=24)
        return service.protect(self.db, vm=vm, policy=policy).job.id

    def protected(self, vm: str = "web1") -> None:
        """``vm`` protected with a first point, its enable protection job done."""
        job = self.protect(vm)
        (item,) = self.port.claim(limit=1, lease_s=60)
        for task in service.ENABLE_PROTECTION_TASKS:
            self.port.start_task(job, task)
            if task == "start initial replication":
                self.port.transition(vm, S.INITIAL_REPLICATION, "copy")
                self.port.record_point(vm, point("p0"), release=False)
            self.port.finish_task(job, task, {})
        self.port.transition(vm, S.PROTECTED, "done")
        self.port.finish_job(item.job_id or "")


def point(point_id: str, consistency: Consistency = Consistency.CRASH) -> PointReport:
    return PointReport(point_id, datetime.now(UTC), consistency,
                       f"points/web1/{point_id}.json", 4096, {"duration_s": 1.0})  # fmt: skip


@pytest.fixture(params=["local", "remote"])
def side(request: pytest.FixtureRequest, vault: VaultProcess) -> Iterator[Side]:
    credential = register_host(vault, "kvm1")
    db = open_database(vault.settings.vault_url)
    session = str(uuid.uuid4())
    if request.param == "local":
        yield Side(LocalVaultPort(db, host="kvm1", session=session), db)
    else:
        with vault.client(credential) as client:
            yield Side(RemoteVaultPort(client, host="kvm1", session=session), db)
    db.close()


def test_discovery_records_own_vms_and_refuses_others(side: Side, vault: VaultProcess) -> None:
    register_host(vault, "kvm2")
    service.upsert_vm(side.db, host="kvm2", name="db1", config={}, disks=[DISK])
    done = side.port.report_vms([DiscoveredVm("web1", {"qmp": "/run/web1.qmp"}, (DISK,)),
                                 DiscoveredVm("db1", {}, (DISK,))])  # fmt: skip
    assert done.registered == ("web1",) and "kvm2" in done.refused["db1"]
    record = side.port.vm("web1")
    assert (record.host, record.state, record.config["qmp"]) == ("kvm1", S.UNPROTECTED,
                                                                 "/run/web1.qmp")
    assert [(d.name, d.size, d.path) for d in record.disks] == [("vda", 1 << 20, DISK.path)]


def test_a_protected_vm_is_not_repointed(side: Side) -> None:
    side.protect()
    done = side.port.report_vms([DiscoveredVm("web1", {"qmp": "/run/other.qmp"}, (DISK,))])
    assert done.registered == () and "re-pointed" in done.refused["web1"]
    assert side.port.vm("web1").config["qmp"] == "/run/web1.qmp"


def test_claims_lease_once_and_leases_can_be_kept_and_ended(side: Side) -> None:
    job = side.protect()
    (item,) = side.port.claim(limit=4, lease_s=60)
    assert (item.kind, item.vm, item.job_id) == ("enable protection", "web1", job)
    assert item.relationship_id == side.port.protection("web1").relationship_id
    assert side.port.claim(limit=4, lease_s=60) == []
    assert side.port.extend_lease("web1", lease_s=60) is True
    side.port.release_lease("web1")
    (again,) = side.port.claim(limit=4, lease_s=60)
    assert again.job_id == job


def test_tasks_run_in_order_and_a_failed_prerequisite_leaves_the_vm_unprotected(
    side: Side,
) -> None:
    job = side.protect()
    side.port.claim(limit=1, lease_s=60)
    with pytest.raises(InvalidJobState):  # tasks run in order
        side.port.start_task(job, "finalize protection")
    record = side.port.start_task(job, "check prerequisites")
    assert record.task("check prerequisites").state == JobState.RUNNING
    record = side.port.update_task(job, "check prerequisites", progress=50, details={"a": 1})
    assert record.task("check prerequisites").details == {"a": 1}
    record = side.port.fail_task(job, "check prerequisites", "QMP socket missing")
    assert record.state == JobState.FAILED
    assert side.port.vm("web1").state == S.UNPROTECTED  # protect works again
    side.port.release_job(job)
    service.protect(side.db, vm="web1", policy="gold")


def test_points_are_recorded_once_and_the_newest_is_known(side: Side) -> None:
    side.protected()
    assert side.port.latest_point("web1") is not None
    assert side.port.claim(limit=1, lease_s=60) == []  # the next cycle is 30 s away
    after = side.port.record_point("web1", point("p1"), release=False)
    assert after.last_point_id == "p1"
    side.port.record_point("web1", point("p1"), release=True)  # a report replayed
    assert [p.point_id for p in side.port.points("web1")] == ["p0", "p1"]
    latest = side.port.latest_point("web1")
    assert latest is not None and latest.point_id == "p1" and latest.bytes_shipped == 4096


def test_failures_are_classified_by_the_vault(side: Side) -> None:
    side.protected()
    recoverable = FailureReport("connection reset", ErrorClass.RECOVERABLE, "network error")
    after = side.port.record_failure("web1", recoverable, release=False)
    assert (after.state, after.attempts, after.error_class) == (S.PROTECTED, 1,
                                                               ErrorClass.RECOVERABLE)
    assert after.next_retry_at is not None and after.last_error is not None
    assert "network error" in after.last_error
    resync = FailureReport("bitmap gone", ErrorClass.RECOVERABLE, "change tracking lost", True)
    after = side.port.record_failure("web1", resync, release=False)
    assert after.state == S.RESYNC_REQUIRED and after.next_retry_at is None
    fatal = FailureReport("bad key", ErrorClass.NON_RECOVERABLE, "authentication failed")
    assert side.port.record_failure("web1", fatal, release=True).state == S.RESYNC_REQUIRED


def test_errors_come_back_as_the_same_classes(side: Side) -> None:
    side.protected()
    with pytest.raises(InvalidTransition, match="cannot move it to 'committed'"):
        side.port.transition("web1", S.COMMITTED, "no")
    with pytest.raises(UnknownVm):
        side.port.vm("nosuchvm")
    assert side.port.protection("web1").state == S.PROTECTED


def test_work_carries_the_policys_consistency_and_bandwidth(side: Side) -> None:
    side.port.report_vms([DiscoveredVm("web1", {"qmp": "/run/web1.qmp"}, (DISK,))])
    always = "00:00-23:59"
    service.create_policy(side.db, name="app", copy_frequency_s=30, retention_h=24,
                          app_consistent_h=1, resync_window=always, bandwidth_work_mbps=8,
                          bandwidth_offhours_mbps=2)  # fmt: skip
    service.protect(side.db, vm="web1", policy="app")
    (item,) = side.port.claim(limit=1, lease_s=60)
    assert item.app_consistent is True and item.limit_bps == 2 * 125_000


def test_network_mappings_and_the_planned_failover_hand_off(side: Side) -> None:
    networks.create_network(side.db, name="prod-dr", kind="user", subnet="10.1.0.0/24")
    networks.create_network(side.db, name="drill", kind="isolated", subnet="10.2.0.0/24")
    networks.map_network(side.db, source="prod", recovery="prod-dr", test="drill")
    (mapping,) = side.port.network_mappings()
    assert (mapping.source_network, mapping.recovery_network.name,
            mapping.test_network.kind) == ("prod", "prod-dr", "isolated")  # fmt: skip
    side.protected()
    job = operations.request_failover(side.db, vm="web1", kind="planned", point=None)
    (item,) = side.port.claim(limit=1, lease_s=60)
    assert item.job_id == job.id and item.details["phase"] == "source"
    handed = side.port.hand_off(job.id, "recovery", {"final_point": "p0"})
    assert handed.details["phase"] == "recovery" and handed.details["final_point"] == "p0"
    assert side.port.claim(limit=1, lease_s=60) == []  # the recovery site's now
    assert jobs.get_job(side.db, job=job.id).state in (JobState.PENDING, JobState.RUNNING)
