"""Recovery points, cycle bookkeeping, RPO and health of replicated VMs.

A recovery point is recorded after the replica store has committed its manifest; the vault
keeps its id (the store's), time, consistency, manifest key and the cycle's figures. The
newest point gives the RPO (its age); health follows :func:`states.compute_health` and is
recomputed whenever a point, an error or a state change is recorded.

Functions take the Database positionally, the rest by keyword; one transaction each.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from siterecovery.domain import Consistency, validate_name
from siterecovery.errors import InputError
from siterecovery.policies.states import ErrorClass, compute_health, default_rpo_threshold_s
from siterecovery.vault import checks, rows
from siterecovery.vault.db import Database
from siterecovery.vault.errors import Conflict, UnknownPoint
from siterecovery.vault.models import RecoveryPoint, ReplicatedVm
from siterecovery.vault.records import PointRecord, ReplicatedVmRecord


def record_point(
    db: Database,
    /,
    *,
    vm: str,
    point_id: str,
    created_at: datetime,
    consistency: Consistency,
    manifest_key: str,
    figures: Mapping[str, Any],
    bytes_shipped: int = 0,
) -> PointRecord:
    """Record a recovery point of the protected ``vm``: a successful cycle.

    Sets the VM's ``last_point_id`` (if this is its newest point) and ``last_cycle_at`` (now),
    clears the retry bookkeeping, recomputes health. Conflict if ``point_id`` is recorded;
    TimeOutOfRange if ``created_at`` is before the VM's protection started or after now,
    beyond the clock skew of :data:`limits.CLOCK_SKEW_S`; LimitExceeded for figures beyond
    the JSON bounds. Nothing is written when it raises.
    """
    validate_name("recovery point", point_id)
    moment = checks.utc("recovery point time", created_at)
    kind = checks.member("consistency", Consistency, consistency)
    checks.text("manifest key", manifest_key, max_len=1024)
    figures_json = checks.json_object("cycle figures", figures)
    checks.integer("bytes shipped", bytes_shipped, low=0)
    with db.transaction() as session:
        row = rows.replicated(session, vm, for_update=True)
        now = db.now()
        checks.within("recovery point time", moment, earliest=row.created_at, latest=now,
                      skew_s=db.clock_skew_s)  # fmt: skip
        if session.get(RecoveryPoint, (row.vm_id, point_id)) is not None:
            raise Conflict(f"recovery point {point_id!r} of VM {vm!r} is already recorded")
        point = RecoveryPoint(
            vm=row.vm,
            point_id=point_id,
            created_at=moment,
            consistency=kind,
            manifest_key=manifest_key,
            bytes_shipped=bytes_shipped,
            figures=figures_json,
        )
        session.add(point)
        session.flush()
        row.last_cycle_at = now
        row.last_error, row.error_class, row.attempts, row.next_retry_at = None, None, 0, None
        refresh_health(session, row, now)
        return PointRecord.of(point)


def list_points(db: Database, /, *, vm: str) -> list[PointRecord]:
    """The recorded points of ``vm``, oldest first (ties by id)."""
    with db.transaction(write=False) as session:
        vm_row = rows.vm(session, vm)
        query = (
            select(RecoveryPoint)
            .where(RecoveryPoint.vm_id == vm_row.id)
            .order_by(RecoveryPoint.created_at, RecoveryPoint.point_id)
        )
        return [PointRecord.of(p) for p in session.scalars(query)]


def latest_point(db: Database, /, *, vm: str) -> PointRecord | None:
    """The newest point of ``vm``, or None if it has none."""
    with db.transaction(write=False) as session:
        point = _latest(session, rows.vm(session, vm).id)
        return PointRecord.of(point) if point else None


def forget_points(db: Database, /, *, vm: str, point_ids: Sequence[str]) -> int:
    """Remove the records of points the store has expired; returns how many.

    UnknownPoint (and nothing removed) if any id is not recorded for ``vm``.
    """
    ids = {validate_name("recovery point", p) for p in point_ids}
    with db.transaction() as session:
        row = rows.replicated(session, vm, for_update=True)
        query = select(RecoveryPoint.point_id).where(RecoveryPoint.vm_id == row.vm_id)
        missing = ids - set(session.scalars(query.where(RecoveryPoint.point_id.in_(ids))))
        if missing:
            raise UnknownPoint(f"VM {vm!r} has no recovery points {sorted(missing)}")
        session.execute(
            delete(RecoveryPoint).where(
                RecoveryPoint.vm_id == row.vm_id, RecoveryPoint.point_id.in_(ids)
            )
        )
        refresh_health(session, row, db.now())
        return len(ids)


def record_failure(
    db: Database,
    /,
    *,
    vm: str,
    error: str,
    error_class: ErrorClass,
    next_retry_at: datetime | None = None,
) -> ReplicatedVmRecord:
    """Record a failed cycle attempt: the error, its class, one more attempt, the next retry.

    The state is not changed: the caller moves the VM to *error* or *resync required* with
    :func:`service.transition` when the failure calls for it.
    """
    checks.text("error", error)
    kind = checks.member("error class", ErrorClass, error_class)
    if next_retry_at is not None:
        next_retry_at = checks.utc("next retry time", next_retry_at)
    with db.transaction() as session:
        row = rows.replicated(session, vm, for_update=True)
        row.last_error, row.error_class, row.next_retry_at = error, kind, next_retry_at
        row.attempts += 1
        refresh_health(session, row, db.now())
        return ReplicatedVmRecord.of(row)


def rpo_seconds(db: Database, /, *, vm: str, now: datetime | None = None) -> float | None:
    """Age in seconds of ``vm``'s newest point at ``now`` (default: the clock); None if none.

    A point stamped in the future (clock skew) counts as age 0.
    """
    at = checks.aware("now", now) if now is not None else db.now()
    with db.transaction(write=False) as session:
        point = _latest(session, rows.vm(session, vm).id)
        return None if point is None else max(0.0, (at - point.created_at).total_seconds())


def update_health(
    db: Database, /, *, vm: str, threshold_s: float | None = None
) -> ReplicatedVmRecord:
    """Recompute and store the health of ``vm`` now (e.g. from a periodic RPO check).

    ``threshold_s`` defaults to :func:`states.default_rpo_threshold_s` of the VM's policy.
    """
    if threshold_s is not None and (isinstance(threshold_s, bool) or threshold_s <= 0):
        raise InputError(f"RPO threshold must be positive seconds, got {threshold_s!r}")
    with db.transaction() as session:
        row = rows.replicated(session, vm, for_update=True)
        refresh_health(session, row, db.now(), threshold_s=threshold_s)
        return ReplicatedVmRecord.of(row)


def refresh_health(
    session: Session, row: ReplicatedVm, now: datetime, *, threshold_s: float | None = None
) -> None:
    """Recompute ``row``'s health and newest point inside the caller's transaction."""
    with session.no_autoflush:
        point = _latest(session, row.vm.id) if row.vm.id is not None else None
    row.last_point_id = point.point_id if point else None
    rpo = None if point is None else max(0.0, (now - point.created_at).total_seconds())
    threshold = threshold_s or default_rpo_threshold_s(row.policy.copy_frequency_s)
    row.health, row.health_reason = compute_health(row.state, rpo, threshold, row.error_class)


def _latest(session: Session, vm_id: int) -> RecoveryPoint | None:
    query = (
        select(RecoveryPoint)
        .where(RecoveryPoint.vm_id == vm_id)
        .order_by(RecoveryPoint.created_at.desc(), RecoveryPoint.point_id.desc())
        .limit(1)
    )
    return session.scalars(query).first()
