"""The vault's operations: inventory, policies, protection state, recovery points, jobs.

Every function takes the open :class:`~siterecovery.vault.db.Database` as its only positional
argument and everything else by keyword, validates its input, runs in **one transaction** and
returns frozen records (:mod:`siterecovery.vault.records`), never ORM rows. A call that raises
has changed nothing. Times come from the database's injectable clock. Example::

    db = open_database("sqlite:///vault.db")
    service.ensure_site(db, name="dc1", role=SiteRole.PRIMARY)
    service.ensure_host(db, name="kvm1", site="dc1")
    service.upsert_vm(db, host="kvm1", name="web1", config={}, disks=[DiskSpec("vda", 1 << 30)])
    service.create_policy(db, name="gold", copy_frequency_s=30, retention_h=24)
    protection = service.protect(db, vm="web1", policy="gold")
    service.start_task(db, job=protection.job.id, name="check prerequisites")

Errors: :class:`InputError` (bad argument), the ``Unknown*`` NotFound errors,
:class:`VmNotProtected`, :class:`Conflict`, :class:`InvalidTransition`, :class:`InvalidJobState`.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from siterecovery.domain import (
    COPY_FREQUENCIES_S,
    DiskSpec,
    JobState,
    ReplicationState,
    validate_name,
)
from siterecovery.errors import InputError
from siterecovery.policies.states import (
    ErrorClass,
    allowed_transitions,
    compute_health,
    parse_window,
    sources_of,
)
from siterecovery.vault import checks, rows
from siterecovery.vault.db import Database
from siterecovery.vault.errors import Conflict, InvalidTransition
from siterecovery.vault.jobs import (
    add_job,
    cancel_job,
    create_job,
    fail_task,
    finish_job,
    finish_task,
    get_job,
    job_progress,
    list_jobs,
    start_task,
    update_task,
)
from siterecovery.vault.models import (
    Disk,
    Host,
    Job,
    Policy,
    RecoveryPoint,
    ReplicatedVm,
    Site,
    SiteRole,
    Vm,
)
from siterecovery.vault.points import (
    forget_points,
    latest_point,
    list_points,
    record_failure,
    record_point,
    refresh_health,
    rpo_seconds,
    update_health,
)
from siterecovery.vault.records import (
    HostRecord,
    JobRecord,
    PolicyRecord,
    Protection,
    ReplicatedVmRecord,
    SiteRecord,
    VmRecord,
)

__all__ = [
    "DISABLE_PROTECTION",
    "DISABLE_PROTECTION_TASKS",
    "ENABLE_PROTECTION",
    "ENABLE_PROTECTION_TASKS",
    "ErrorClass",
    "abandon_protection",
    "allowed_transitions",
    "cancel_job",
    "compute_health",
    "create_job",
    "create_policy",
    "ensure_host",
    "ensure_site",
    "fail_task",
    "finish_job",
    "finish_task",
    "forget_points",
    "get_job",
    "get_policy",
    "get_protection",
    "get_vm",
    "job_progress",
    "latest_point",
    "list_jobs",
    "list_points",
    "list_policies",
    "list_protected",
    "list_vms",
    "move",
    "protect",
    "record_failure",
    "record_heartbeat",
    "record_point",
    "rpo_seconds",
    "set_host_credential",
    "start_task",
    "transition",
    "unprotect",
    "update_health",
    "update_task",
    "upsert_vm",
]

ENABLE_PROTECTION = "enable protection"
ENABLE_PROTECTION_TASKS = (
    "check prerequisites",
    "create replication relationship",
    "start initial replication",
    "finalize protection",
)
DISABLE_PROTECTION = "disable protection"
DISABLE_PROTECTION_TASKS = (
    "stop replication",
    "remove replication relationship",
    "remove replica data",
)

DEFAULT_RESYNC_WINDOW = "18:30-06:00"
MAX_RETENTION_H = 24 * 365
MAX_APP_CONSISTENT_H = 12


# ---- sites, hosts, VMs ---------------------------------------------------------------------


def ensure_site(db: Database, /, *, name: str, role: SiteRole | str) -> SiteRecord:
    """The site ``name``, created with ``role`` if missing; Conflict if it has another role."""
    validate_name("site", name)
    wanted = checks.member("site role", SiteRole, role)
    with db.transaction() as session:
        row = session.scalars(select(Site).where(Site.name == name)).one_or_none()
        if row is None:
            row = Site(name=name, role=wanted, created_at=db.now())
            session.add(row)
        elif row.role != wanted:
            raise Conflict(f"site {name!r} exists with role '{row.role}', not '{wanted}'")
        return SiteRecord.of(row)


def ensure_host(db: Database, /, *, name: str, site: str) -> HostRecord:
    """The host ``name`` in ``site``, created if missing; Conflict if it is in another site."""
    validate_name("host", name)
    with db.transaction() as session:
        site_row = rows.site(session, site)
        row = session.scalars(select(Host).where(Host.name == name)).one_or_none()
        if row is None:
            row = Host(name=name, site=site_row, created_at=db.now())
            session.add(row)
        elif row.site_id != site_row.id:
            raise Conflict(f"host {name!r} is registered in site {row.site.name!r}, not {site!r}")
        return HostRecord.of(row)


def record_heartbeat(db: Database, /, *, host: str) -> HostRecord:
    """Note that ``host``'s agent is alive now."""
    with db.transaction() as session:
        row = rows.host(session, host)
        row.last_heartbeat = db.now()
        return HostRecord.of(row)


def set_host_credential(db: Database, /, *, host: str, credential_hash: str) -> HostRecord:
    """Store the hash of ``host``'s credential (made at registration), replacing any other."""
    checks.text("credential hash", credential_hash, max_len=255)
    with db.transaction() as session:
        row = rows.host(session, host)
        row.credential_hash = credential_hash
        return HostRecord.of(row)


def upsert_vm(
    db: Database,
    /,
    *,
    host: str,
    name: str,
    config: Mapping[str, Any],
    disks: Sequence[DiskSpec],
) -> VmRecord:
    """Create or update the VM ``name`` on ``host`` as its agent reports it.

    ``disks`` replaces the VM's disk set (matched by name). VM names are unique in the vault:
    a VM of that name on another host is a Conflict. A **protected** VM is never re-pointed at
    another VM: a different QMP socket (``config["qmp"]``), or a disk set none of whose image
    paths was recorded, is a Conflict (an added, removed or resized disk is not: the next
    cycle finds the change and resyncs).
    """
    validate_name("VM", name)
    config_json = checks.json_object("VM config", config)
    specs = _check_disks(disks)
    with db.transaction() as session:
        host_row = rows.host(session, host)
        row = session.scalars(select(Vm).where(Vm.name == name).with_for_update()).one_or_none()
        now = db.now()
        if row is None:
            row = Vm(name=name, host=host_row, config=config_json, created_at=now, updated_at=now)
            session.add(row)
        elif row.host_id != host_row.id:
            raise Conflict(
                f"VM {name!r} is registered on host {row.host.name!r}, not {host!r}",
                hint="VM names are unique in the vault: rename one of the VMs",
            )
        if row.replicated is not None:
            _refuse_repointing(row, config_json, specs)
        row.config, row.updated_at = config_json, now
        _replace_disks(row, specs)
        session.flush()
        return VmRecord.of(row)


def _refuse_repointing(row: Vm, config: Mapping[str, Any], specs: list[DiskSpec]) -> None:
    old_paths = {d.path for d in row.disks if d.path}
    new_paths = {d.path for d in specs if d.path}
    other_socket = "qmp" in row.config and config.get("qmp") != row.config["qmp"]
    other_disks = bool(old_paths and new_paths) and not old_paths & new_paths
    if other_socket or other_disks:
        what = "QMP socket" if other_socket else "disks"
        raise Conflict(
            f"VM {row.name!r} is {row.replicated.state if row.replicated else 'protected'}: "
            f"it cannot be re-pointed at another {what} (its recovery points and change log "
            "describe the recorded VM)",
            hint="unprotect it first (`siterecovery unprotect VM`), or register the other VM "
            "under another name",
        )


def _check_disks(disks: Sequence[DiskSpec]) -> list[DiskSpec]:
    if isinstance(disks, str | bytes) or not all(isinstance(d, DiskSpec) for d in disks):
        raise InputError("disks must be a list of DiskSpec")
    for disk in disks:
        validate_name("disk", disk.name)
        checks.integer(f"size of disk {disk.name!r}", disk.size, low=1)
        if len(disk.node_name) > 255 or len(disk.path) > 4096:
            raise InputError(f"node name or path of disk {disk.name!r} is too long")
    names = [d.name for d in disks]
    if len(set(names)) != len(names):
        raise InputError(f"disk names of a VM must be unique, got {names}")
    return list(disks)


def _replace_disks(row: Vm, specs: list[DiskSpec]) -> None:
    current = {d.name: d for d in row.disks}
    wanted = {s.name for s in specs}
    row.disks = [d for d in row.disks if d.name in wanted]
    for spec in specs:
        disk = current.get(spec.name)
        if disk is None:
            disk = Disk(name=spec.name)
            row.disks.append(disk)
        disk.size, disk.node_name, disk.path = spec.size, spec.node_name, spec.path


def get_vm(db: Database, /, *, name: str) -> VmRecord:
    """The VM ``name`` with its disks and protection state; UnknownVm if missing."""
    with db.transaction(write=False) as session:
        return VmRecord.of(rows.vm(session, name))


def list_vms(db: Database, /, *, host: str | None = None) -> list[VmRecord]:
    """All VMs (or those of ``host``), by name."""
    with db.transaction(write=False) as session:
        query = select(Vm).order_by(Vm.name)
        if host is not None:
            query = query.where(Vm.host_id == rows.host(session, host).id)
        return [VmRecord.of(r) for r in session.scalars(query)]


# ---- policies ------------------------------------------------------------------------------


def create_policy(
    db: Database,
    /,
    *,
    name: str,
    copy_frequency_s: int,
    retention_h: int,
    app_consistent_h: int = 0,
    resync_window: str = DEFAULT_RESYNC_WINDOW,
    encryption: bool = False,
    bandwidth_work_mbps: int | None = None,
    bandwidth_offhours_mbps: int | None = None,
) -> PolicyRecord:
    """Create a replication policy; Conflict if the name exists. See :class:`models.Policy`.

    ``copy_frequency_s`` is 30, 300 or 900; ``retention_h`` 1-8760; ``app_consistent_h``
    0 (off) to 12 and not above the retention; bandwidths are positive Mbit/s or None.
    """
    validate_name("policy", name)
    check_policy(copy_frequency_s, retention_h, app_consistent_h)
    parse_window(resync_window)
    if not isinstance(encryption, bool):
        raise InputError(f"encryption must be true or false, got {encryption!r}")
    for label, value in (("work", bandwidth_work_mbps), ("off-hours", bandwidth_offhours_mbps)):
        if value is not None:
            checks.integer(f"{label} bandwidth limit (Mbit/s)", value, low=1)
    with db.transaction() as session:
        if session.scalars(select(Policy.id).where(Policy.name == name)).first() is not None:
            raise Conflict(f"policy {name!r} already exists")
        row = Policy(
            name=name,
            copy_frequency_s=copy_frequency_s,
            retention_h=retention_h,
            app_consistent_h=app_consistent_h,
            resync_window=resync_window,
            encryption=encryption,
            bandwidth_work_mbps=bandwidth_work_mbps,
            bandwidth_offhours_mbps=bandwidth_offhours_mbps,
            created_at=db.now(),
        )
        session.add(row)
        return PolicyRecord.of(row)


def check_policy(copy_frequency_s: int, retention_h: int, app_consistent_h: int) -> None:
    if isinstance(copy_frequency_s, bool) or copy_frequency_s not in COPY_FREQUENCIES_S:
        raise InputError(
            f"unknown copy frequency {copy_frequency_s!r}: "
            "use 30s, 5m or 15m (30, 300 or 900 seconds)",
            hint="the copy frequency is one of 30s, 5m or 15m",
        )
    checks.integer("retention (hours)", retention_h, low=1, high=MAX_RETENTION_H)
    checks.integer(
        "app-consistent frequency (hours)", app_consistent_h, low=0, high=MAX_APP_CONSISTENT_H
    )
    if app_consistent_h > retention_h:
        raise InputError(
            f"app-consistent frequency {app_consistent_h}h exceeds the retention {retention_h}h",
            hint="keep points at least as long as the app-consistent interval",
        )


def get_policy(db: Database, /, *, name: str) -> PolicyRecord:
    """The policy ``name``; UnknownPolicy if missing."""
    with db.transaction(write=False) as session:
        return PolicyRecord.of(rows.policy(session, name))


def list_policies(db: Database, /) -> list[PolicyRecord]:
    """All policies, by name."""
    with db.transaction(write=False) as session:
        return [PolicyRecord.of(r) for r in session.scalars(select(Policy).order_by(Policy.name))]


# ---- protection and the state machine ------------------------------------------------------


def protect(db: Database, /, *, vm: str, policy: str) -> Protection:
    """Enable protection of ``vm`` with ``policy``.

    Creates the replicated VM (state *enabling protection*, a new relationship UUID) and a
    pending *enable protection* job with the tasks :data:`ENABLE_PROTECTION_TASKS`; the job's
    details hold ``relationship_id`` and ``policy``. InvalidTransition if already protected.
    """
    with db.transaction() as session:
        vm_row = rows.vm(session, vm, for_update=True)
        if vm_row.replicated is not None:
            raise InvalidTransition(
                vm=vm,
                current=vm_row.replicated.state,
                operation="protect it",
                required={ReplicationState.UNPROTECTED},
            )
        policy_row = rows.policy(session, policy)
        now = db.now()
        row = ReplicatedVm(
            vm=vm_row,
            policy=policy_row,
            relationship_id=str(uuid.uuid4()),
            state=ReplicationState.ENABLING_PROTECTION,
            state_reason=f"protection enabled with policy {policy!r}",
            state_changed_at=now,
            attempts=0,
            created_at=now,
        )
        refresh_health(session, row, now)
        session.add(row)
        details = {"relationship_id": row.relationship_id, "policy": policy}
        job = add_job(
            session,
            now,
            kind=ENABLE_PROTECTION,
            vm=vm_row,
            tasks=ENABLE_PROTECTION_TASKS,
            details=details,
        )
        session.flush()
        return Protection(replicated=ReplicatedVmRecord.of(row), job=JobRecord.of(job))


def unprotect(db: Database, /, *, vm: str) -> JobRecord:
    """Disable protection of ``vm``: its replicated VM and recovery point records are removed.

    Allowed when no recovery operation runs (see :data:`states.UNPROTECTABLE_STATES`) and no
    job of the VM is open (Conflict naming it). Returns
    a pending *disable protection* job (tasks :data:`DISABLE_PROTECTION_TASKS`) whose details
    carry what the agent needs to clean up: ``relationship_id``, ``policy``, ``disks``.
    """
    with db.transaction() as session:
        row = rows.replicated(session, vm, for_update=True)
        _require_transition(vm, row.state, ReplicationState.UNPROTECTED, "unprotect it")
        running = session.scalars(
            select(Job).where(Job.vm_id == row.vm_id,
                              Job.state.in_([JobState.PENDING, JobState.RUNNING])).limit(1)
        ).first()  # fmt: skip
        if running is not None:
            raise Conflict(
                f"VM {vm!r} has an open {running.kind} job {running.id}: it cannot be "
                "unprotected while it runs",
                hint=f"wait for it to end (`siterecovery job {running.id[:8]}`), then unprotect",
            )
        details = {
            "relationship_id": row.relationship_id,
            "policy": row.policy.name,
            "disks": [d.name for d in row.vm.disks],
        }
        vm_row = row.vm
        session.execute(delete(RecoveryPoint).where(RecoveryPoint.vm_id == vm_row.id))
        session.delete(row)
        job = add_job(
            session,
            db.now(),
            kind=DISABLE_PROTECTION,
            vm=vm_row,
            tasks=DISABLE_PROTECTION_TASKS,
            details=details,
        )
        session.flush()
        return JobRecord.of(job)


def abandon_protection(db: Database, /, *, vm: str, reason: str) -> VmRecord:
    """Return ``vm`` to *unprotected* when its enable protection failed before anything was
    replicated (state *enabling protection*): ``protect`` may be run again once the cause
    (``reason``, kept in the job) is fixed. InvalidTransition from any other state."""
    checks.text("reason", reason)
    with db.transaction() as session:
        row = rows.replicated(session, vm, for_update=True)
        if row.state != ReplicationState.ENABLING_PROTECTION:
            raise InvalidTransition(
                vm=vm, current=row.state, operation="abandon its protection",
                required={ReplicationState.ENABLING_PROTECTION},
            )  # fmt: skip
        vm_row = row.vm
        session.delete(row)
        session.flush()
        session.refresh(vm_row)
        return VmRecord.of(vm_row)


def transition(
    db: Database, /, *, vm: str, to_state: ReplicationState, reason: str
) -> ReplicatedVmRecord:
    """Move the protected ``vm`` to ``to_state`` for ``reason`` (stored with the state).

    Raises InvalidTransition (naming the current state and the states required) if the table
    forbids it. Entering *resync required* stores ``reason`` as the resync reason; entering
    *error* stores it as the last error; entering *protected* clears both. Health is
    recomputed. Use :func:`protect` / :func:`unprotect` to enter or leave *unprotected*.
    """
    target = checks.member("replication state", ReplicationState, to_state)
    checks.text("reason", reason)
    if target in (ReplicationState.UNPROTECTED, ReplicationState.ENABLING_PROTECTION):
        raise InputError(
            f"VM {vm!r} cannot be moved to '{target}' by a transition",
            hint="use protect or unprotect",
        )
    with db.transaction() as session:
        row = rows.vm(session, vm, for_update=True).replicated
        current = row.state if row else ReplicationState.UNPROTECTED
        _require_transition(vm, current, target, f"move it to '{target}'")
        if row is None:  # unreachable: unprotected only leads to protect()
            raise InvalidTransition(
                vm=vm, current=current, operation="transition it", required=set()
            )
        move(session, row, target, reason, db.now())
        return ReplicatedVmRecord.of(row)


def move(
    session: Session, row: ReplicatedVm, target: ReplicationState, reason: str, now: datetime
) -> None:
    """Move ``row`` to ``target`` inside the caller's transaction, as :func:`transition`
    does (InvalidTransition unless the table allows it; health recomputed)."""
    _require_transition(row.vm.name, row.state, target, f"move it to '{target}'")
    _enter_state(row, target, reason, now)
    refresh_health(session, row, now)


def _require_transition(
    vm: str, current: ReplicationState, target: ReplicationState, operation: str
) -> None:
    if target not in allowed_transitions(current):
        raise InvalidTransition(
            vm=vm, current=current, operation=operation, required=sources_of(target)
        )


def _enter_state(row: ReplicatedVm, target: ReplicationState, reason: str, now: datetime) -> None:
    row.state, row.state_reason, row.state_changed_at = target, reason, now
    if target == ReplicationState.RESYNC_REQUIRED:
        row.resync_required_reason = reason
    elif target == ReplicationState.ERROR:
        row.last_error = reason
    elif target == ReplicationState.PROTECTED:
        row.resync_required_reason = None
        row.last_error, row.error_class, row.attempts, row.next_retry_at = None, None, 0, None


def get_protection(db: Database, /, *, vm: str) -> ReplicatedVmRecord:
    """The replicated VM of ``vm``; UnknownVm or VmNotProtected."""
    with db.transaction(write=False) as session:
        return ReplicatedVmRecord.of(rows.replicated(session, vm))


def list_protected(db: Database, /) -> list[ReplicatedVmRecord]:
    """Every replicated VM, by VM name."""
    with db.transaction(write=False) as session:
        query = select(ReplicatedVm).join(ReplicatedVm.vm).order_by(Vm.name)
        return [ReplicatedVmRecord.of(r) for r in session.scalars(query)]
