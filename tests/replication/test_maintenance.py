"""Scheduled store maintenance in the agent loop: prune per policy, compact, collect garbage."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from siterecovery.domain import DiskSpec
from siterecovery.domain import ReplicationState as S
from siterecovery.replication.maintenance import Maintenance, MaintenancePlan, is_due
from siterecovery.store.keys import StoreKeys
from siterecovery.store.manifest import DiskChain
from siterecovery.store.repository import ReplicaStore
from siterecovery.vault import points, service
from siterecovery.vault.db import Database, open_database
from siterecovery.vault.models import SiteRole

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
AGES_MIN = (300, 180, 100, 80, 30, 10)  # minutes before now of each recovery point


@dataclass
class Clock:
    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now


def test_is_due_table() -> None:
    hour = timedelta(hours=1)
    assert is_due(None, hour, T0)
    assert not is_due(T0, hour, T0 + timedelta(minutes=59))
    assert is_due(T0, hour, T0 + hour)


def _vault_with_points(tmp_path: Path) -> tuple[Database, ReplicaStore, Clock, list[str]]:
    clock = Clock()
    # The vault clock is simulated; point times are the wall clock: not bounded by skew.
    db = open_database(f"sqlite:///{tmp_path / 'vault.db'}", clock=clock, clock_skew_s=None)
    service.ensure_site(db, name="dc1", role=SiteRole.PRIMARY)
    service.ensure_host(db, name="h1", site="dc1")
    service.upsert_vm(db, host="h1", name="vm1", config={}, disks=[DiskSpec("d0", 1 << 20)])
    service.create_policy(db, name="gold", copy_frequency_s=30, retention_h=2)
    service.protect(db, vm="vm1", policy="gold")
    service.transition(db, vm="vm1", to_state=S.INITIAL_REPLICATION, reason="test")
    service.transition(db, vm="vm1", to_state=S.PROTECTED, reason="test")
    store = ReplicaStore.init(f"memory://{uuid.uuid4().hex}", StoreKeys.generate())
    writer = store.begin_base("vm1", "d0", 1 << 20)
    writer.write(0, random.Random(1).randbytes(1 << 20))
    chain = DiskChain(1 << 20, writer.commit())
    ids = []
    for age in AGES_MIN:
        at = T0 - timedelta(minutes=age)
        point = store.publish_point("vm1", {"d0": chain}, consistency="crash", vm_config={},
                                    created_at=at)  # fmt: skip
        points.record_point(db, vm="vm1", point_id=point.point_id, created_at=at,
                            consistency=point.consistency, manifest_key=point.key,
                            figures={})  # fmt: skip
        ids.append(point.point_id)
    return db, store, clock, ids


def test_a_pass_prunes_by_policy_forgets_in_the_vault_and_runs_gc(tmp_path: Path) -> None:
    db, store, clock, ids = _vault_with_points(tmp_path)
    upkeep = Maintenance(db, store, MaintenancePlan(gc_min_age=timedelta(0)))
    outcomes = upkeep.run_due(["vm1"])
    assert [(o.operation, o.vm, o.ok) for o in outcomes] == [
        ("prune", "vm1", True), ("compact", "vm1", True), ("gc", None, True),
    ]  # fmt: skip
    # Retention 2 h: the 300- and 180-minute points expire; between 1 h and 2 h one point
    # per clock hour survives: 100 and 80 minutes ago are 10:20 and 10:40, the same hour,
    # so only the newer is kept; the last hour keeps every point.
    survivors = [p.point_id for p in store.list_points("vm1")]
    assert survivors == [ids[3], ids[4], ids[5]]
    assert [p.point_id for p in points.list_points(db, vm="vm1")] == survivors
    assert upkeep.run_due(["vm1"]) == []  # nothing is due again at once
    clock.now += timedelta(hours=1)
    assert [o.operation for o in upkeep.run_due(["vm1"])] == ["prune", "compact"]


def test_a_failure_is_an_outcome_not_an_exception(tmp_path: Path) -> None:
    db, store, _, _ = _vault_with_points(tmp_path)
    upkeep = Maintenance(db, store, MaintenancePlan())
    outcomes = upkeep.run_due(["ghost"])
    failed = [o for o in outcomes if not o.ok]
    assert [(o.operation, o.vm) for o in failed] == [("prune", "ghost")]  # no such VM
    assert "ghost" in failed[0].summary
