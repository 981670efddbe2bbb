"""Retention: which recovery points of a VM expire, and pruning their manifests.

The policy (a pure function, :func:`select_expired`, with the clock passed in):

1. the **newest** point is never expired, whatever its age;
2. every point younger than ``keep_all_hours`` is kept (points dated in the future too);
3. every other point older than ``retention_hours`` expires;
4. between the two, one point per **UTC clock hour** survives: the newest app-consistent
   point of that hour, or, when none in the hour is app-consistent, the newest point of the
   hour (a crash-consistent point beats a one-hour gap in the recovery timeline). The choice
   is made among all unexpired points of the hour, so a point of the keep-all window can be
   the hour's survivor and an older one of the same hour then goes.

Ages are ``now - created_at``: a point exactly ``keep_all_hours`` old is in the thinning
window; exactly ``retention_hours`` old has expired.

:func:`prune` deletes the manifests of expired points only. Their chunks, indexes and
segments stay until garbage collection, and a ``retired`` lease pins the chains they named
for the safety delay so a restore that already loaded one of them can finish.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from siterecovery.domain import Consistency, validate_name
from siterecovery.store.errors import MaintenanceRefused, StoreInputError
from siterecovery.store.leases import acquire_lease, retire_roots
from siterecovery.store.manifest import PointManifest

if TYPE_CHECKING:
    from siterecovery.store.repository import ReplicaStore

__all__ = [
    "MaintenanceRefused",
    "PointInfo",
    "PruneReport",
    "RetentionPolicy",
    "prune",
    "select_expired",
]

#: Default safety delay before unlinked objects may be collected.
DEFAULT_SAFETY_DELAY = timedelta(hours=1)


@dataclass(frozen=True)
class PointInfo:
    """What retention needs to know about a recovery point."""

    point_id: str
    created_at: datetime
    consistency: Consistency

    @classmethod
    def of(cls, point: PointManifest) -> PointInfo:
        return cls(point.point_id, point.created_at, point.consistency)


@dataclass(frozen=True)
class RetentionPolicy:
    """Keep everything for ``keep_all_hours``, then one point per hour up to
    ``retention_hours`` (see the module docstring)."""

    retention_hours: float
    keep_all_hours: float = 1.0

    def __post_init__(self) -> None:
        r, k = self.retention_hours, self.keep_all_hours
        if not isinstance(r, int | float) or not math.isfinite(r) or r <= 0:
            raise StoreInputError(
                f"invalid retention {r!r} hours", hint="use a positive number of hours, e.g. 24"
            )
        if not isinstance(k, int | float) or not math.isfinite(k) or not 0 <= k <= r:
            raise StoreInputError(
                f"invalid keep-all window {k!r} hours",
                hint=f"use 0 to {r} hours (at most the retention)",
            )


def _hour(when: datetime) -> datetime:
    return when.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _hour_survivors(candidates: Sequence[PointInfo]) -> set[str]:
    """Per clock hour: the newest app-consistent point, else the newest point."""
    best: dict[datetime, PointInfo] = {}
    for p in sorted(candidates, key=lambda p: (p.created_at, p.point_id)):
        hour = _hour(p.created_at)
        current = best.get(hour)
        app = p.consistency == Consistency.APP
        if current is None or app or current.consistency != Consistency.APP:
            best[hour] = p
    return {p.point_id for p in best.values()}


def select_expired(
    points: Sequence[PointInfo], policy: RetentionPolicy, now: datetime
) -> list[str]:
    """Ids of the points the policy expires at ``now`` (aware), oldest first."""
    if now.tzinfo is None:
        raise StoreInputError("now must be timezone-aware (UTC)")
    if not points:
        return []
    newest = max(points, key=lambda p: (p.created_at, p.point_id)).point_id
    keep_all = timedelta(hours=policy.keep_all_hours)
    retention = timedelta(hours=policy.retention_hours)
    alive = [p for p in points if now - p.created_at < retention or p.point_id == newest]
    survivors = _hour_survivors(alive)
    expired = [
        p
        for p in points
        if p.point_id != newest
        and now - p.created_at >= keep_all
        and (now - p.created_at >= retention or p.point_id not in survivors)
    ]
    return [p.point_id for p in sorted(expired, key=lambda p: (p.created_at, p.point_id))]


@dataclass
class PruneReport:
    """What :func:`prune` did (or, with ``dry_run``, would do)."""

    vm: str
    dry_run: bool
    kept: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    retired_lease: str | None = None


def prune(
    store: ReplicaStore,
    vm: str,
    policy: RetentionPolicy,
    now: datetime | None = None,
    *,
    dry_run: bool = False,
    safety_delay: timedelta = DEFAULT_SAFETY_DELAY,
) -> PruneReport:
    """Delete the manifests of ``vm``'s expired points (data is left for GC).

    Refuses with :class:`MaintenanceRefused` (nothing deleted) if any manifest of ``vm`` is
    damaged: the policy cannot be applied to points it cannot read. Holds an exclusive
    ``prune`` lease for the VM (``LeaseConflict`` while a compaction or prune of it runs).
    """
    validate_name("VM", vm)
    when = now if now is not None else datetime.now(UTC)
    with acquire_lease(store.backend, "prune", vm=vm, clock=lambda: when):
        scan = store.scan_points(vm)
        if scan.damaged:
            raise MaintenanceRefused(
                f"not pruning VM {vm}: {len(scan.damaged)} recovery point manifest(s) are "
                f"damaged (first: {scan.damaged[0].problem})"
            )
        by_id = {p.point_id: p for p in scan.ok}
        expired = select_expired([PointInfo.of(p) for p in scan.ok], policy, when)
        report = PruneReport(vm, dry_run, sorted(set(by_id) - set(expired)), expired)
        if dry_run or not expired:
            return report
        roots = [ref.key for pid in expired for c in by_id[pid].disks.values() for ref in c.refs()]
        lease = retire_roots(store.backend, roots, delay=safety_delay, clock=lambda: when, vm=vm)
        report.retired_lease = lease.key if lease else None
        for pid in expired:
            store.backend.delete(by_id[pid].key)
            report.deleted.append(pid)
        return report
