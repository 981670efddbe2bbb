"""Inventory, policies, recovery points, RPO and health through the service functions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from siterecovery.domain import Consistency, DiskSpec, Health, ReplicationState
from siterecovery.errors import InputError, NotFoundError
from siterecovery.policies.states import ErrorClass
from siterecovery.vault import service
from siterecovery.vault.db import Database
from siterecovery.vault.errors import (
    Conflict,
    UnknownHost,
    UnknownPoint,
    UnknownPolicy,
    UnknownSite,
    UnknownVm,
    VmNotProtected,
)
from siterecovery.vault.models import SiteRole

from .conftest import START, FakeClock

S = ReplicationState


# ---- sites, hosts, VMs ---------------------------------------------------------------------


def test_ensure_site_and_host_are_idempotent(db: Database) -> None:
    first = service.ensure_site(db, name="dc1", role=SiteRole.PRIMARY)
    assert service.ensure_site(db, name="dc1", role="primary") == first
    with pytest.raises(Conflict, match="role 'primary', not 'recovery'"):
        service.ensure_site(db, name="dc1", role=SiteRole.RECOVERY)
    service.ensure_site(db, name="dr", role="recovery")
    host = service.ensure_host(db, name="kvm1", site="dc1")
    assert (host.site, host.registered, host.last_heartbeat) == ("dc1", False, None)
    assert service.ensure_host(db, name="kvm1", site="dc1") == host
    with pytest.raises(Conflict, match="site 'dc1', not 'dr'"):
        service.ensure_host(db, name="kvm1", site="dr")
    with pytest.raises(UnknownSite):
        service.ensure_host(db, name="kvm2", site="nowhere")
    with pytest.raises(InputError, match="site role"):
        service.ensure_site(db, name="dc3", role="sideways")
    with pytest.raises(InputError, match="invalid host name"):
        service.ensure_host(db, name="../etc", site="dc1")


def test_heartbeat_and_credential(db: Database, clock: FakeClock) -> None:
    service.ensure_site(db, name="dc1", role="primary")
    service.ensure_host(db, name="kvm1", site="dc1")
    clock.advance(30)
    assert service.record_heartbeat(db, host="kvm1").last_heartbeat == clock.now
    assert service.set_host_credential(db, host="kvm1", credential_hash="h$1").registered
    with pytest.raises(UnknownHost):
        service.record_heartbeat(db, host="kvm9")


def test_upsert_vm_creates_updates_and_replaces_disks(inventory: Database) -> None:
    db = inventory
    vm = service.get_vm(db, name="web1")
    assert (vm.host, vm.site, vm.state) == ("kvm1", "dc1", S.UNPROTECTED)
    assert vm.config == {"cpus": 1, "memory_mib": 256}
    assert [(d.name, d.size, d.node_name, d.path) for d in vm.disks] == [
        ("vda", 1 << 30, "drive-vda", "/img/web1.qcow2"),
        ("vdb", 4096, "", ""),
    ]
    updated = service.upsert_vm(
        db,
        host="kvm1",
        name="web1",
        config={"cpus": 2},
        disks=[DiskSpec("vda", 2 << 30, "drive-vda", "/img/web1.qcow2"), DiskSpec("vdc", 512)],
    )
    assert updated.config == {"cpus": 2}
    assert [(d.name, d.size) for d in updated.disks] == [("vda", 2 << 30), ("vdc", 512)]
    assert service.get_vm(db, name="web1") == updated
    assert [v.name for v in service.list_vms(db)] == ["web1"]
    assert service.list_vms(db, host="kvm1") == [updated]


BAD_VMS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"name": "bad name"}, InputError, "invalid VM name"),
    ({"host": "kvm9"}, UnknownHost, "kvm9"),
    ({"config": {"x": object()}}, InputError, "JSON"),
    ({"config": [1]}, InputError, "object"),
    ({"disks": [DiskSpec("vda", 0)]}, InputError, "out of range"),
    ({"disks": [DiskSpec("vda", 1), DiskSpec("vda", 2)]}, InputError, "unique"),
    ({"disks": [DiskSpec("a/b", 1)]}, InputError, "invalid disk name"),
    ({"disks": [{"name": "vda"}]}, InputError, "DiskSpec"),
]


@pytest.mark.parametrize(("change", "error", "words"), BAD_VMS)
def test_bad_vm_reports_change_nothing(
    inventory: Database, change: dict[str, Any], error: type[Exception], words: str
) -> None:
    before = service.list_vms(inventory)
    args: dict[str, Any] = {"host": "kvm1", "name": "web1", "config": {}, "disks": []}
    with pytest.raises(error, match=words):
        service.upsert_vm(inventory, **{**args, **change})
    assert service.list_vms(inventory) == before


def test_vm_names_are_unique_across_hosts(inventory: Database) -> None:
    service.ensure_host(inventory, name="kvm2", site="dc1")
    with pytest.raises(Conflict, match="registered on host 'kvm1', not 'kvm2'"):
        service.upsert_vm(inventory, host="kvm2", name="web1", config={}, disks=[])
    assert service.get_vm(inventory, name="web1").host == "kvm1"
    with pytest.raises(UnknownVm, match="ghost"):
        service.get_vm(inventory, name="ghost")


# ---- policies ------------------------------------------------------------------------------


def test_create_policy_stores_every_setting(db: Database) -> None:
    made = service.create_policy(
        db,
        name="silver",
        copy_frequency_s=900,
        retention_h=72,
        app_consistent_h=4,
        resync_window="22:00-04:00",
        encryption=True,
        bandwidth_work_mbps=100,
        bandwidth_offhours_mbps=None,
    )
    assert (made.copy_frequency_s, made.retention_h, made.app_consistent_h) == (900, 72, 4)
    assert (made.resync_window, made.encryption) == ("22:00-04:00", True)
    assert (made.bandwidth_work_mbps, made.bandwidth_offhours_mbps) == (100, None)
    assert service.get_policy(db, name="silver") == made
    default = service.create_policy(db, name="basic", copy_frequency_s=300, retention_h=1)
    assert (default.resync_window, default.app_consistent_h, default.encryption) == (
        "18:30-06:00",
        0,
        False,
    )
    assert [p.name for p in service.list_policies(db)] == ["basic", "silver"]


BAD_POLICIES: list[tuple[dict[str, Any], str]] = [
    ({"copy_frequency_s": 60}, "30s, 5m or 15m"),
    ({"copy_frequency_s": True}, "30s, 5m or 15m"),
    ({"retention_h": 0}, "retention"),
    ({"retention_h": -5}, "retention"),
    ({"retention_h": 1.5}, "retention"),
    ({"app_consistent_h": 13}, "app-consistent"),
    ({"app_consistent_h": 5, "retention_h": 4}, "exceeds the retention"),
    ({"resync_window": "18:30"}, "resync window"),
    ({"resync_window": "25:00-06:00"}, "resync window"),
    ({"encryption": "yes"}, "encryption"),
    ({"bandwidth_work_mbps": 0}, "bandwidth"),
    ({"name": "has space"}, "invalid policy name"),
]


@pytest.mark.parametrize(("change", "words"), BAD_POLICIES)
def test_policy_validation_errors_change_nothing(
    db: Database, change: dict[str, Any], words: str
) -> None:
    args: dict[str, Any] = {"name": "gold", "copy_frequency_s": 30, "retention_h": 24}
    with pytest.raises(InputError, match=words) as raised:
        service.create_policy(db, **{**args, **change})
    if "copy_frequency_s" in change:
        assert "30s, 5m or 15m" in raised.value.hint
    assert service.list_policies(db) == []


def test_duplicate_policy_is_a_conflict_and_changes_nothing(db: Database) -> None:
    first = service.create_policy(db, name="gold", copy_frequency_s=30, retention_h=24)
    with pytest.raises(Conflict, match="policy 'gold' already exists"):
        service.create_policy(db, name="gold", copy_frequency_s=900, retention_h=2)
    assert service.list_policies(db) == [first]
    with pytest.raises(UnknownPolicy):
        service.get_policy(db, name="platinum")


def test_protect_with_unknown_policy_changes_nothing(inventory: Database) -> None:
    with pytest.raises(UnknownPolicy):
        service.protect(inventory, vm="web1", policy="platinum")
    assert service.get_vm(inventory, name="web1").state == S.UNPROTECTED
    assert service.list_jobs(inventory) == []
    assert service.list_protected(inventory) == []


# ---- recovery points, RPO, health ----------------------------------------------------------


def protected(db: Database, vm: str = "web1") -> None:
    service.protect(db, vm=vm, policy="gold")
    service.transition(db, vm=vm, to_state=S.INITIAL_REPLICATION, reason="started")
    service.transition(db, vm=vm, to_state=S.PROTECTED, reason="initial copy done")


def point(db: Database, point_id: str, minutes: int, **extra: Any) -> None:
    service.record_point(
        db,
        vm="web1",
        point_id=point_id,
        created_at=START + timedelta(minutes=minutes),
        consistency=extra.pop("consistency", Consistency.CRASH),
        manifest_key=f"vms/web1/points/{point_id}.json",
        figures=extra.pop("figures", {"seconds": 1.5}),
        **extra,
    )


def test_record_and_list_points_in_time_order(inventory: Database, clock: FakeClock) -> None:
    db = inventory
    protected(db)
    assert service.latest_point(db, vm="web1") is None
    point(db, "p2", 2, consistency=Consistency.APP, bytes_shipped=4096)
    point(db, "p1", 1)
    point(db, "p3", 3, figures={"extents": [[0, 65536]]})
    listed = service.list_points(db, vm="web1")
    assert [p.point_id for p in listed] == ["p1", "p2", "p3"]
    assert [p.created_at for p in listed] == [START + timedelta(minutes=m) for m in (1, 2, 3)]
    assert (listed[1].consistency, listed[1].bytes_shipped) == (Consistency.APP, 4096)
    assert listed[2].figures == {"extents": [[0, 65536]]}
    assert listed[0].manifest_key == "vms/web1/points/p1.json"
    latest = service.latest_point(db, vm="web1")
    assert latest is not None and latest.point_id == "p3"
    record = service.get_protection(db, vm="web1")
    assert (record.last_point_id, record.last_cycle_at) == ("p3", clock.now)


def test_bad_points_change_nothing(inventory: Database) -> None:
    db = inventory
    with pytest.raises(VmNotProtected):
        point(db, "p1", 1)
    protected(db)
    point(db, "p1", 1)
    with pytest.raises(Conflict, match="'p1' of VM 'web1' is already recorded"):
        point(db, "p1", 5)
    with pytest.raises(InputError, match="timezone-aware"):
        service.record_point(
            db,
            vm="web1",
            point_id="p2",
            created_at=datetime(2025, 1, 1),
            consistency=Consistency.CRASH,
            manifest_key="k",
            figures={},
        )
    with pytest.raises(InputError, match="consistency"):
        point(db, "p2", 2, consistency="fuzzy")
    with pytest.raises(InputError, match="bytes shipped"):
        point(db, "p2", 2, bytes_shipped=-1)
    with pytest.raises(InputError, match="recovery point name"):
        point(db, "../p2", 2)
    assert [p.point_id for p in service.list_points(db, vm="web1")] == ["p1"]


def test_forget_points(inventory: Database) -> None:
    db = inventory
    protected(db)
    for n in (1, 2, 3):
        point(db, f"p{n}", n)
    with pytest.raises(UnknownPoint, match="p9"):
        service.forget_points(db, vm="web1", point_ids=["p1", "p9"])
    assert len(service.list_points(db, vm="web1")) == 3
    assert service.forget_points(db, vm="web1", point_ids=["p1", "p3"]) == 2
    assert [p.point_id for p in service.list_points(db, vm="web1")] == ["p2"]
    assert service.get_protection(db, vm="web1").last_point_id == "p2"


def test_rpo_and_health_follow_the_newest_point(inventory: Database, clock: FakeClock) -> None:
    db = inventory
    protected(db)
    assert service.rpo_seconds(db, vm="web1") is None
    assert service.get_protection(db, vm="web1").health == Health.WARNING  # no point yet
    clock.now = START + timedelta(minutes=10)
    point(db, "p1", 10)
    assert service.rpo_seconds(db, vm="web1") == 0.0
    assert service.get_protection(db, vm="web1").health == Health.NORMAL
    at = START + timedelta(minutes=30)
    assert service.rpo_seconds(db, vm="web1", now=at) == 1200.0
    clock.now = at  # threshold for 30 s copies is 900 s
    assert service.update_health(db, vm="web1").health == Health.WARNING
    clock.now = START + timedelta(minutes=41)
    record = service.update_health(db, vm="web1")
    assert (record.health, record.health_reason) == (
        Health.CRITICAL,
        "RPO 1860s exceeds 2x the threshold 900s",
    )
    assert service.update_health(db, vm="web1", threshold_s=3600).health == Health.NORMAL
    with pytest.raises(InputError, match="threshold"):
        service.update_health(db, vm="web1", threshold_s=0)


def test_record_failure_then_a_good_cycle_clears_it(inventory: Database, clock: FakeClock) -> None:
    db = inventory
    protected(db)
    point(db, "p1", 0)
    retry = clock.now + timedelta(minutes=1)
    failed = service.record_failure(
        db,
        vm="web1",
        error="connection reset",
        error_class=ErrorClass.RECOVERABLE,
        next_retry_at=retry,
    )
    assert (failed.attempts, failed.next_retry_at, failed.health) == (1, retry, Health.WARNING)
    again = service.record_failure(
        db,
        vm="web1",
        error="disk chain corrupted",
        error_class="non-recoverable",  # type: ignore[arg-type]
    )
    assert (again.attempts, again.error_class, again.health) == (
        2,
        ErrorClass.NON_RECOVERABLE,
        Health.CRITICAL,
    )
    assert again.state == S.PROTECTED  # the caller decides the transition
    point(db, "p2", 1)
    cleared = service.get_protection(db, vm="web1")
    assert (cleared.attempts, cleared.last_error, cleared.error_class) == (0, None, None)
    assert cleared.health == Health.NORMAL


def test_list_protected(inventory: Database) -> None:
    service.upsert_vm(inventory, host="kvm1", name="app1", config={}, disks=[])
    service.protect(inventory, vm="web1", policy="gold")
    service.protect(inventory, vm="app1", policy="gold")
    assert [r.vm for r in service.list_protected(inventory)] == ["app1", "web1"]
    assert all(r.policy == "gold" for r in service.list_protected(inventory))


def test_not_found_errors_are_not_found(inventory: Database) -> None:
    for call in (
        lambda: service.get_vm(inventory, name="ghost"),
        lambda: service.get_policy(inventory, name="ghost"),
        lambda: service.get_protection(inventory, vm="web1"),
        lambda: service.list_points(inventory, vm="ghost"),
    ):
        with pytest.raises(NotFoundError) as raised:
            call()
        assert raised.value.exit_code == 3
        assert raised.value.hint


def test_times_from_the_clock(inventory: Database, clock: FakeClock) -> None:
    clock.now = datetime(2030, 5, 5, 5, 5, tzinfo=UTC)
    made = service.protect(inventory, vm="web1", policy="gold")
    assert made.job.created_at == made.replicated.state_changed_at == clock.now
