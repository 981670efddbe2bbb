"""Scheduled store maintenance in the agent loop: retention, compaction, garbage collection.

Every ``every`` (default 1 h), for each protected VM: **prune** the recovery points its
policy's retention lets expire (every point of the last ``keep_all_hours``, then one per hour,
up to ``retention_h``; see :mod:`siterecovery.store.retention`), forget them in the vault, and
**compact** its chains so a restore reads at most ``max_chain`` segments. Every ``gc_every``
(default 24 h): **collect garbage** older than ``gc_min_age`` (the safety delay).

These are the same operations as ``siterecovery store prune/compact/gc``, under the same
leases, so they are safe beside running cycles, restores and other hosts. Times are kept in
memory: an agent that restarts runs a pass at its first tick, which is harmless (each
operation is idempotent). A failure is reported as a failed outcome and retried at the next
pass; it never stops replication.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial

from siterecovery.errors import SiteRecoveryError
from siterecovery.store.compaction import CompactionPolicy, compact
from siterecovery.store.gc import collect_garbage
from siterecovery.store.repository import ReplicaStore
from siterecovery.store.retention import RetentionPolicy, prune
from siterecovery.vault import points, service
from siterecovery.vault.db import Database


def is_due(last: datetime | None, every: timedelta, now: datetime) -> bool:
    """True when a pass last run at ``last`` (None: never) is due again at ``now``."""
    return last is None or now - last >= every


@dataclass(frozen=True)
class MaintenancePlan:
    """How often each maintenance operation runs, and with what limits."""

    every: timedelta = timedelta(hours=1)
    gc_every: timedelta = timedelta(hours=24)
    gc_min_age: timedelta = timedelta(hours=1)
    keep_all_hours: float = 1.0
    compaction: CompactionPolicy = field(default_factory=CompactionPolicy)


@dataclass(frozen=True)
class MaintenanceOutcome:
    """One maintenance operation: what it was, on which VM (None for GC), and its result."""

    operation: str
    vm: str | None
    ok: bool
    summary: str


class Maintenance:
    """Runs :class:`MaintenancePlan` for the VMs the caller names, when due."""

    def __init__(self, db: Database, store: ReplicaStore, plan: MaintenancePlan) -> None:
        self.db = db
        self.store = store
        self.plan = plan
        self.last_pass: datetime | None = None
        self.last_gc: datetime | None = None

    def run_due(self, vms: Sequence[str]) -> list[MaintenanceOutcome]:
        """Run whatever is due now (vault clock) for ``vms``; never raises for a failure."""
        now = self.db.now()
        outcomes: list[MaintenanceOutcome] = []
        if is_due(self.last_pass, self.plan.every, now):
            for vm in vms:
                outcomes.append(self._guard("prune", vm, partial(self._prune, vm, now)))
                outcomes.append(self._guard("compact", vm, partial(self._compact, vm)))
            self.last_pass = now
        if is_due(self.last_gc, self.plan.gc_every, now):
            outcomes.append(self._guard("gc", None, self._gc))
            self.last_gc = now
        return outcomes

    def _prune(self, vm: str, now: datetime) -> str:
        policy = service.get_policy(self.db, name=service.get_protection(self.db, vm=vm).policy)
        retention = RetentionPolicy(
            retention_hours=policy.retention_h,
            keep_all_hours=min(self.plan.keep_all_hours, policy.retention_h),
        )
        report = prune(self.store, vm, retention, now)
        if report.deleted:
            points.forget_points(self.db, vm=vm, point_ids=report.deleted)
        return f"{len(report.deleted)} expired, {len(report.kept)} kept"

    def _compact(self, vm: str) -> str:
        report = compact(self.store, vm, self.plan.compaction)
        return (
            f"{len(report.bases_written)} bases written, longest chain "
            f"{report.longest_chain_before} -> {report.longest_chain_after}"
        )

    def _gc(self) -> str:
        report = collect_garbage(self.store, min_age=self.plan.gc_min_age)
        return f"{report.deleted} objects deleted, {report.bytes_freed} bytes freed"

    @staticmethod
    def _guard(operation: str, vm: str | None, run: Callable[[], str]) -> MaintenanceOutcome:
        try:
            return MaintenanceOutcome(operation, vm, True, run())
        except SiteRecoveryError as exc:
            return MaintenanceOutcome(operation, vm, False, exc.describe())
