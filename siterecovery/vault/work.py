"""What agents do for the vault: claiming due work under leases, and what the vault shows back.

The vault decides when work is due; agents claim it (DESIGN §2):

- a pending or running job is due at once, for the host that runs its kind (the VM's own
  host, or a recovery host: :mod:`~siterecovery.vault.operations`);
- otherwise :func:`siterecovery.policies.schedule.decide` says what is due for a VM of
  the host: a **cycle** one copy interval after its last cycle (at once if it never had one),
  not before ``next_retry_at`` after a recoverable failure (the backoff of
  :mod:`siterecovery.policies.retry`), nothing after a non-recoverable one; a **resync**
  for a VM in *resync required* once inside its policy's resync window (handed out as a
  *resynchronize* job, as an operator's ``POST /v1/vms/{vm}/resync`` is at once).

A claim takes a :class:`WorkLease` on the VM, so no VM is ever worked on twice at a time; the
lease ends when the agent reports the outcome, or expires after ``lease_s`` (an agent that
died). Since the next cycle is due one interval after the *end* of the last one, a slow cycle
delays the next instead of piling cycles up. On PostgreSQL the candidates are read with
``FOR UPDATE SKIP LOCKED``, so several vault processes hand out each VM once; on SQLite the
claim's write transaction (``BEGIN IMMEDIATE``) serializes claims.

When an agent restarts it claims with a new ``session``: leases its host held under another
session are stale and handed back at once, marked ``resumed`` so the agent cleans up first.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, and_, delete, or_, select
from sqlalchemy.orm import Session

from siterecovery.domain import Consistency, Health, ReplicationState
from siterecovery.errors import InputError
from siterecovery.policies.schedule import (
    CYCLING_STATES,
    Action,
    VmSchedule,
    app_consistent_due,
    bandwidth_limit,
    decide,
)
from siterecovery.policies.states import (
    REPLICATING_STATES,
    ErrorClass,
    compute_health,
    default_rpo_threshold_s,
    parse_window,
)
from siterecovery.vault import checks, operations, rows
from siterecovery.vault.auth_models import WorkLease
from siterecovery.vault.db import Database
from siterecovery.vault.errors import Conflict, InvalidJobState
from siterecovery.vault.models import Host, Job, Policy, RecoveryPoint, ReplicatedVm, SiteRole, Vm
from siterecovery.vault.records import HostRecord, PolicyRecord, ReplicatedVmRecord
from siterecovery.vault.service import check_policy

CYCLE = "cycle"
RESYNC_WORK = "resync"
JOB_KINDS = tuple(sorted(operations.ALL_KINDS))
MAX_CLAIM = 64
DEFAULT_LEASE_S = 300
S = ReplicationState


@dataclass(frozen=True)
class WorkItem:
    """One piece of claimed work. ``job_id``/``details`` are set for job kinds."""

    kind: str
    vm: str
    relationship_id: str | None
    policy: str | None
    job_id: str | None
    latest_point_id: str | None
    resumed: bool
    lease_expires_at: datetime
    details: dict[str, Any]
    app_consistent: bool = False
    """Quiesce the guest for this cycle (the policy's app-consistent frequency is due)."""
    limit_bps: int | None = None
    """The policy's bandwidth limit at claim time (work or off-hours), bytes/s; None: none."""
    retry: bool = False
    """A cycle that retries a failed attempt (the seed's backoff), not a scheduled one."""


def claim_work(
    db: Database, /, *, host: str, session: str, limit: int = 4, lease_s: int = DEFAULT_LEASE_S
) -> list[WorkItem]:
    """Lease up to ``limit`` due pieces of work of ``host`` to the agent ``session``.

    Jobs first (see :mod:`~siterecovery.vault.operations` for which host runs which kind),
    then, for hosts of a primary site, what :func:`scheduler.decide` says is due: a cycle
    (or its retry), or a resync inside the policy's window, made a *resynchronize* job.
    """
    checks.uuid_text("agent session", session)
    checks.integer("claim limit", limit, low=1, high=MAX_CLAIM)
    checks.integer("lease (seconds)", lease_s, low=5, high=86400)
    with db.transaction() as txn:
        host_row = rows.host(txn, host)
        now = db.now()
        items: list[WorkItem] = []
        for job in _due_jobs(txn, host_row, now, session):
            if len(items) < limit and job.vm is not None and job.vm.name not in _names(items):
                operations.on_claim(job, host_row)
                _take(txn, items, host_row, job.vm, now, session, lease_s, job=job)
        if host_row.site.role == SiteRole.RECOVERY:
            return items  # recovery hosts replicate nothing (until reverse replication)
        for row, action in _due_replication(txn, host_row, now, session):
            if len(items) >= limit or row.vm.name in _names(items):
                continue
            if action == Action.RESYNC:
                reason = row.resync_required_reason or "resync required"
                job = operations.new_resync_job(txn, db, row_vm=row.vm, reason=reason,
                                                trigger="resync window")  # fmt: skip
                _take(txn, items, host_row, row.vm, now, session, lease_s, job=job)
            else:
                _take(txn, items, host_row, row.vm, now, session, lease_s, replicated=row,
                      retry=action == Action.RETRY)  # fmt: skip
        return items


def _names(items: list[WorkItem]) -> set[str]:
    return {i.vm for i in items}


def _not_leased(query: Select[Any], host: Host, now: datetime, session: str) -> Select[Any]:
    """Leave out VMs leased to someone else: a live lease of another host, or of this same
    session (work in progress). A live lease of this host under another session is a
    previous agent process's, handed back (resumed)."""
    return query.outerjoin(WorkLease, WorkLease.vm_id == Vm.id).where(
        or_(
            WorkLease.vm_id.is_(None),
            WorkLease.expires_at <= now,
            and_(WorkLease.host_id == host.id, WorkLease.session != session),
        )
    )


def _due_jobs(txn: Session, host: Host, now: datetime, session: str) -> list[Job]:
    query = _not_leased(select(Job).join(Vm, Job.vm_id == Vm.id), host, now, session)
    mine = Vm.host_id == host.id
    if host.site.role == SiteRole.RECOVERY:
        mine = or_(mine, Job.kind.in_(sorted(operations.RECOVERY_KINDS)))
    query = (
        query.where(mine, Job.kind.in_(JOB_KINDS), Job.state.in_(operations.OPEN))
        .order_by(Job.created_at, Job.id)
        .with_for_update(skip_locked=True, of=Job)
    )
    return [job for job in txn.scalars(query) if operations.claimable(job, host)]


def _due_replication(
    txn: Session, host: Host, now: datetime, session: str
) -> list[tuple[ReplicatedVm, Action]]:
    """Protected or resync-required VMs of ``host`` with a cycle, retry or resync due now."""
    blocked = select(Job.id).where(
        Job.vm_id == ReplicatedVm.vm_id, Job.state.in_(operations.OPEN),
        Job.kind.in_(sorted(operations.BLOCKING_KINDS)),
    )  # fmt: skip
    query = _not_leased(
        select(ReplicatedVm).join(Vm, ReplicatedVm.vm_id == Vm.id), host, now, session
    )
    query = (
        query
        .where(Vm.host_id == host.id, ReplicatedVm.state.in_(_SCHEDULED))
        .where(or_(ReplicatedVm.next_retry_at.is_(None), ReplicatedVm.next_retry_at <= now))
        .where(~blocked.exists())
        .order_by(ReplicatedVm.last_cycle_at.is_not(None), ReplicatedVm.last_cycle_at)
        .with_for_update(skip_locked=True, of=ReplicatedVm)
    )  # fmt: skip
    due: list[tuple[ReplicatedVm, Action]] = []
    for row in txn.scalars(query):
        decision = decide(_schedule_of(row), now)
        if decision.ready(now) and decision.action != Action.NONE:
            due.append((row, decision.action))
    return due


#: States the scheduler looks at: cycles, a retried initial copy, resyncs in the window.
_SCHEDULED = [*sorted(CYCLING_STATES), S.INITIAL_REPLICATION, S.RESYNC_REQUIRED]


def _schedule_of(row: ReplicatedVm) -> VmSchedule:
    return VmSchedule(
        state=row.state, copy_frequency_s=row.policy.copy_frequency_s,
        resync_window=row.policy.resync_window, last_cycle_at=row.last_cycle_at,
        error_class=row.error_class, next_retry_at=row.next_retry_at,
    )  # fmt: skip


def _take(
    txn: Session,
    items: list[WorkItem],
    host: Host,
    vm: Vm,
    now: datetime,
    session: str,
    lease_s: int,
    *,
    job: Job | None = None,
    replicated: ReplicatedVm | None = None,
    force: bool = False,
    retry: bool = False,
) -> None:
    lease = txn.get(WorkLease, vm.id)
    if not force and lease is not None and lease.session == session and lease.expires_at > now:
        return  # this agent is working on it right now
    resumed = lease is not None and lease.host_id == host.id
    if lease is None:
        lease = WorkLease(vm=vm, host=host, session=session)
        txn.add(lease)
    lease.host = host
    kind = job.kind if job is not None else CYCLE
    lease.session, lease.kind, lease.job_id = session, kind, job.id if job else None
    lease.claimed_at, lease.expires_at = now, now + timedelta(seconds=lease_s)
    replicated = replicated or vm.replicated
    quiesce, limit = _cycle_plan(txn, replicated, now)
    items.append(
        WorkItem(
            kind=kind,
            vm=vm.name,
            relationship_id=replicated.relationship_id if replicated else None,
            policy=replicated.policy.name if replicated else None,
            job_id=job.id if job else None,
            latest_point_id=replicated.last_point_id if replicated else None,
            resumed=resumed,
            lease_expires_at=lease.expires_at,
            details=checks.stored_json(f"details of job {job.id}", job.details) if job else {},
            app_consistent=quiesce,
            limit_bps=limit,
            retry=retry,
        )
    )


def _cycle_plan(txn: Session, row: ReplicatedVm | None, now: datetime) -> tuple[bool, int | None]:
    """Whether a cycle run now should be app-consistent, and the bandwidth limit now."""
    if row is None:
        return False, None
    policy = row.policy
    limit = bandwidth_limit(policy.resync_window, policy.bandwidth_work_mbps,
                            policy.bandwidth_offhours_mbps, now)  # fmt: skip
    if policy.app_consistent_h == 0:
        return False, limit
    last = txn.scalars(
        select(RecoveryPoint).where(RecoveryPoint.vm_id == row.vm_id,
                                    RecoveryPoint.consistency == Consistency.APP)
        .order_by(RecoveryPoint.created_at.desc()).limit(1)
    ).first()  # fmt: skip
    return app_consistent_due(policy.app_consistent_h, _app_time(last), now), limit


def _app_time(point: RecoveryPoint | None) -> datetime | None:
    """When an app-consistent point was taken, on the vault's clock (see ``record_point``)."""
    if point is None:
        return None
    raw = point.figures.get("app_consistent_at")
    return datetime.fromisoformat(raw) if isinstance(raw, str) else point.created_at


def lease_vm(
    db: Database, /, *, host: str, session: str, vm: str, job_id: str | None = None,
    lease_s: int = DEFAULT_LEASE_S,
) -> WorkItem:  # fmt: skip
    """Lease ``vm`` to ``session`` of ``host`` for its open job ``job_id``, or for a cycle now.

    The embedded door runs work this way, in the operator's own process; the scheduler is not
    asked (the operator asked). Conflict, naming the holder, when another session holds a
    live lease of the VM; InvalidJobState when the job is not open or not the VM's.
    """
    checks.uuid_text("agent session", session)
    with db.transaction() as txn:
        host_row = rows.host(txn, host)
        vm_row = rows.vm(txn, vm, for_update=True)
        now = db.now()
        lease = txn.get(WorkLease, vm_row.id)
        if lease is not None and lease.expires_at > now and lease.session != session:
            raise Conflict(
                f"VM {vm!r} is busy: host {lease.host.name!r} is running its {lease.kind}",
                hint="wait for that work to end (`siterecovery jobs --watch`), or for its "
                "lease to expire if that agent is gone",
            )
        job = None
        if job_id is not None:
            job = rows.job(txn, job_id, for_update=True)
            if job.vm_id != vm_row.id or job.state not in operations.OPEN:
                raise InvalidJobState(f"job {job_id} is not an open job of VM {vm!r}")
        items: list[WorkItem] = []
        _take(txn, items, host_row, vm_row, now, session, lease_s, job=job, force=True)
        return items[0]


def holds_lease(db: Database, /, *, host: str, vm: str) -> bool:
    """Whether ``host`` holds a live lease on ``vm`` (it may then touch the VM's records)."""
    with db.transaction(write=False) as txn:
        lease = txn.get(WorkLease, rows.vm(txn, vm).id)
        return lease is not None and lease.host.name == host and lease.expires_at > db.now()


def extend_lease(
    db: Database, /, *, host: str, session: str, vm: str, lease_s: int = DEFAULT_LEASE_S
) -> datetime | None:
    """Push the lease of ``vm`` held by ``session`` to now + ``lease_s``; None if not held."""
    checks.integer("lease (seconds)", lease_s, low=5, high=86400)
    with db.transaction() as txn:
        lease = _lease(txn, host, session, vm)
        if lease is None:
            return None
        lease.expires_at = db.now() + timedelta(seconds=lease_s)
        return lease.expires_at


def release_lease(db: Database, /, *, host: str, session: str, vm: str) -> bool:
    """End the lease of ``vm`` if ``session`` holds it; whether it did."""
    with db.transaction() as txn:
        lease = _lease(txn, host, session, vm)
        if lease is None:
            return False
        txn.execute(delete(WorkLease).where(WorkLease.vm_id == lease.vm_id))
        return True


def _lease(txn: Session, host: str, session: str, vm: str) -> WorkLease | None:
    checks.uuid_text("agent session", session)
    vm_row = rows.vm(txn, vm)
    lease = txn.get(WorkLease, vm_row.id, with_for_update=True)
    if lease is None or lease.session != session or lease.host.name != host:
        return None
    return lease


# ---- policies: update and assign -----------------------------------------------------------


_POLICY_FIELDS = (
    "copy_frequency_s", "retention_h", "app_consistent_h", "resync_window", "encryption",
    "bandwidth_work_mbps", "bandwidth_offhours_mbps",
)  # fmt: skip


def update_policy(db: Database, /, *, name: str, changes: dict[str, Any]) -> PolicyRecord:
    """Change some settings of the policy ``name`` (keys of :data:`_POLICY_FIELDS`).

    The result is validated like :func:`service.create_policy`; VMs using the policy follow
    it from their next cycle. Encryption cannot change once set (existing data stays as it
    was written), so changing it is refused.
    """
    unknown = sorted(set(changes) - set(_POLICY_FIELDS))
    if unknown:
        raise InputError(f"unknown policy settings {unknown}")
    with db.transaction() as txn:
        row = rows.policy(txn, name)
        merged = {f: getattr(row, f) for f in _POLICY_FIELDS} | changes
        check_policy(merged["copy_frequency_s"], merged["retention_h"],
                      merged["app_consistent_h"])  # fmt: skip
        parse_window(merged["resync_window"])
        if merged["encryption"] != row.encryption:
            raise InputError(
                f"policy {name!r}: encryption cannot be changed after creation",
                hint="create a new policy with the encryption you want and assign it",
            )
        for label in ("bandwidth_work_mbps", "bandwidth_offhours_mbps"):
            if merged[label] is not None:
                checks.integer(label, merged[label], low=1)
        for field, value in merged.items():
            setattr(row, field, value)
        return PolicyRecord.of(row)


def assign_policy(db: Database, /, *, vm: str, policy: str) -> ReplicatedVmRecord:
    """Replicate the protected ``vm`` under ``policy`` from its next cycle on."""
    with db.transaction() as txn:
        row = rows.replicated(txn, vm, for_update=True)
        row.policy = rows.policy(txn, policy)
        return ReplicatedVmRecord.of(row)


# ---- hosts and status ----------------------------------------------------------------------


@dataclass(frozen=True)
class HostStatus:
    host: HostRecord
    connected: bool
    seconds_since_heartbeat: float | None


@dataclass(frozen=True)
class VmStatus:
    """What `siterecovery status` shows of a replicated VM, health computed at ``now``."""

    vm: str
    host: str
    host_connected: bool
    policy: str
    state: ReplicationState
    health: Health
    health_reasons: tuple[str, ...]
    rpo_s: float | None
    rpo_threshold_s: float
    last_point_id: str | None
    last_cycle_at: datetime | None
    last_cycle: dict[str, Any]
    throughput_bps: float | None
    last_error: str | None
    error_class: ErrorClass | None = None
    attempts: int = 0
    next_retry_at: datetime | None = None


def list_hosts(db: Database, /, *, heartbeat_timeout_s: float) -> list[HostStatus]:
    """Every host with whether it heartbeated within ``heartbeat_timeout_s``."""
    with db.transaction(write=False) as txn:
        now = db.now()
        found = txn.scalars(select(Host).order_by(Host.name))
        return [_host_status(h, now, heartbeat_timeout_s) for h in found]


def _host_status(row: Host, now: datetime, timeout_s: float | None) -> HostStatus:
    age = None if row.last_heartbeat is None else (now - row.last_heartbeat).total_seconds()
    connected = timeout_s is None or (age is not None and age <= timeout_s)
    return HostStatus(HostRecord.of(row), connected, age)


def status(
    db: Database, /, *, vm: str | None = None, heartbeat_timeout_s: float | None
) -> list[VmStatus]:
    """Replicated VMs (all, or ``vm``) with live RPO, health and the last cycle's figures.

    ``heartbeat_timeout_s`` None: hosts are not judged by heartbeats (the embedded vault,
    where no agent reports)."""
    with db.transaction(write=False) as txn:
        now = db.now()
        query = select(ReplicatedVm).join(Vm, ReplicatedVm.vm_id == Vm.id).order_by(Vm.name)
        if vm is not None:
            query = query.where(ReplicatedVm.id == rows.replicated(txn, vm).id)
        return [_vm_status(txn, r, now, heartbeat_timeout_s) for r in txn.scalars(query)]


def _vm_status(txn: Session, row: ReplicatedVm, now: datetime, timeout_s: float | None) -> VmStatus:
    point = txn.scalars(
        select(RecoveryPoint).where(RecoveryPoint.vm_id == row.vm_id)
        .order_by(RecoveryPoint.created_at.desc()).limit(1)
    ).first()  # fmt: skip
    rpo = None if point is None else max(0.0, (now - point.created_at).total_seconds())
    threshold = float(default_rpo_threshold_s(_policy(row).copy_frequency_s))
    health, reason = compute_health(row.state, rpo, threshold, row.error_class)
    reasons = [reason]
    host = _host_status(row.vm.host, now, timeout_s)
    if not host.connected and row.state in REPLICATING_STATES:
        health = Health.CRITICAL
        seen = (
            "never"
            if host.seconds_since_heartbeat is None
            else (f"{host.seconds_since_heartbeat:.0f}s ago")
        )
        reasons.append(f"host {host.host.name!r} disconnected: last heartbeat {seen}")
    figures = {}
    if point is not None:
        figures = checks.stored_json(f"figures of point {point.point_id!r}", point.figures)
    duration = figures.get("duration_s")
    throughput = None
    if isinstance(duration, int | float) and duration > 0 and point is not None:
        throughput = point.bytes_shipped / duration
    return VmStatus(
        vm=row.vm.name, host=host.host.name, host_connected=host.connected,
        policy=row.policy.name, state=row.state, health=health, health_reasons=tuple(reasons),
        rpo_s=rpo, rpo_threshold_s=threshold, last_point_id=point.point_id if point else None,
        last_cycle_at=row.last_cycle_at, last_cycle=figures, throughput_bps=throughput,
        last_error=row.last_error, error_class=row.error_class, attempts=row.attempts,
        next_retry_at=row.next_retry_at,
    )  # fmt: skip


def _policy(row: ReplicatedVm) -> Policy:
    return row.policy
