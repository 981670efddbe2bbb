"""Operations operators ask for through the API and agents run: failover, its follow-ups, resync.

Each request creates a pending **job**; an agent claims it (:mod:`siterecovery.vault.work`)
and runs its tasks, reporting through the agents' API. Who claims a job is decided here:

==========================  ====================  ==========================================
job kind                    phase                 claimed by
==========================  ====================  ==========================================
resynchronize               —                     the VM's host (primary site)
test / unplanned failover   ``recovery``          any host of a recovery site
planned failover            ``source``            the VM's host: pause the source VM, ship
                                                  the final cycle, then **hand off**
planned failover            ``recovery``          a recovery host: select the final point,
                                                  start the replica, then hand off back
planned failover            ``source-finish``     the VM's host: quit the source (replica
                                                  runs) or resume it (the replica failed)
failover cleanup / change   —                     the recovery host that ran the failover
recovery point / commit                           (``details["recovery_host"]``)
==========================  ====================  ==========================================

The phase is kept in the job's ``details["phase"]``; :func:`hand_off` moves it and ends the
claimer's lease in one transaction, so the next claim of the other side gets the job. A
recovery host that claims a failover is recorded in ``details["recovery_host"]``: the replica
runs there, so cleanup, change point and commit go to it.

While a *planned failover* or a *resynchronize* job is open, the VM gets no cycle: the source
is paused (planned) or the resync owns the change log.

An operator may **cancel** an open job (:func:`cancel_job`): its lease ends and its VM goes
where the job's kind leaves it safely:

==========================  ===============================================================
job kind                    the VM after a cancel
==========================  ===============================================================
enable protection           pending: *unprotected* again (nothing was done on the host);
                            running: *error* (unprotect cleans up, resync repairs)
resynchronize               *resync required* (its window, or ``resync``, runs it again)
disable protection,         unchanged (unprotected; cleanup, drill, failed over): the
cleanup, change point,      operation can be asked for again
commit
test / unplanned / planned  pending: unchanged; running: refused, since a replica may be
failover                    starting or the source VM is paused (the job ends by itself)
==========================  ===============================================================
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from siterecovery.domain import FailoverKind, JobKind, JobState, ReplicationState
from siterecovery.errors import InputError
from siterecovery.vault import checks, rows
from siterecovery.vault.auth_models import WorkLease
from siterecovery.vault.db import Database
from siterecovery.vault.errors import Conflict, InvalidJobState, InvalidTransition
from siterecovery.vault.jobs import add_job, cancel_row
from siterecovery.vault.models import Host, Job, ReplicatedVm, SiteRole
from siterecovery.vault.records import JobRecord
from siterecovery.vault.service import DISABLE_PROTECTION, ENABLE_PROTECTION, move, transition

S = ReplicationState

RESYNC = "resynchronize"
RESYNC_TASKS = ("prepare resync", "compare and send blocks", "finalize resync")
FAILOVER_JOB = {FailoverKind.TEST: "test failover", FailoverKind.PLANNED: "planned failover",
                FailoverKind.UNPLANNED: "unplanned failover"}  # fmt: skip
CLEANUP, CHANGE_POINT, COMMIT = "test failover cleanup", "change recovery point", "commit failover"
FOLLOW_UP_TASKS = {
    CLEANUP: ("stop replica VM", "remove drill data"),
    CHANGE_POINT: ("select recovery point", "stop replica VM", "prepare disks",
                   "start replica VM"),
    COMMIT: ("check replica VM", "commit"),
}  # fmt: skip
SOURCE, RECOVERY, SOURCE_FINISH = "source", "recovery", "source-finish"
PLANNED_SOURCE_TASKS = ("check prerequisites", "shut down source VM", "replicate final changes")
RECOVERY_TASKS = ("select recovery point", "prepare disks", "start replica VM")
RELEASE_SOURCE = "release source VM"

REVERSE = JobKind.REVERSE_REPLICATION.value
REVERSE_TASKS = ("prepare reverse replication", "compare and send blocks", "finalize protection")

#: Job kinds the VM's own (primary) host runs.
PRIMARY_KINDS = frozenset({ENABLE_PROTECTION, DISABLE_PROTECTION, RESYNC, REVERSE})
#: Job kinds a recovery host runs (planned failover: only in its recovery phase).
RECOVERY_KINDS = frozenset({*FAILOVER_JOB.values(), CLEANUP, CHANGE_POINT, COMMIT})
ALL_KINDS = PRIMARY_KINDS | RECOVERY_KINDS
#: While one of these is open the VM gets no cycle.
BLOCKING_KINDS = frozenset({FAILOVER_JOB[FailoverKind.PLANNED], RESYNC, ENABLE_PROTECTION,
                            DISABLE_PROTECTION, REVERSE})  # fmt: skip
OPEN = (JobState.PENDING, JobState.RUNNING)
OPTION_KEYS = frozenset({"mode", "expose", "append", "check", "hydrate"})
CHECK_KEYS = frozenset({"kind", "pattern", "port", "http", "timeout_s"})
DRILL_CHECK = "run drill check"


def claimable(job: Job, host: Host) -> bool:
    """Whether ``host`` may claim the open ``job`` now (see the module table)."""
    owner = job.vm is not None and job.vm.host_id == host.id
    phase = job.details.get("phase")
    if job.kind == FAILOVER_JOB[FailoverKind.PLANNED]:
        if phase in (SOURCE, SOURCE_FINISH):
            return owner
        return phase == RECOVERY and _recovery_host(host, job)
    if job.kind in PRIMARY_KINDS:
        return owner
    return job.kind in RECOVERY_KINDS and _recovery_host(host, job)


def _recovery_host(host: Host, job: Job) -> bool:
    wanted = job.details.get("recovery_host")
    return host.site.role == SiteRole.RECOVERY and wanted in (None, host.name)


def on_claim(job: Job, host: Host) -> None:
    """Record the recovery host that claims a failover: its follow-ups go to it."""
    if job.kind in FAILOVER_JOB.values() and job.details.get("phase") == RECOVERY:
        job.details = {**job.details, "recovery_host": host.name}


# ---- operators' requests -------------------------------------------------------------------


def request_failover(
    db: Database, /, *, vm: str, kind: FailoverKind | str, point: str | None,
    options: dict[str, Any] | None = None,
) -> JobRecord:  # fmt: skip
    """A pending failover job of ``vm`` for a recovery agent (planned: for the VM's agent
    first). Refused (nothing changes) unless the VM's state allows that kind."""
    kind = checks.member("failover kind", FailoverKind, kind)
    opts = _options(options or {})
    target = point or "latest"
    if kind == FailoverKind.PLANNED and point not in (None, "latest"):
        raise InputError("a planned failover always uses the final cycle's point",
                         hint="leave out the point")  # fmt: skip
    with db.transaction() as txn:
        row = rows.replicated(txn, vm, for_update=True)
        _require_state(vm, row.state, _FAILOVER_FROM[kind], f"start a {FAILOVER_JOB[kind]}")
        _require_no_open_job(txn, row.vm_id, vm)
        tasks: tuple[str, ...] = ("check prerequisites", *RECOVERY_TASKS)
        if kind == FailoverKind.TEST and "check" in opts:
            tasks = (*tasks, DRILL_CHECK)
        phase = RECOVERY
        if kind == FailoverKind.PLANNED:
            tasks, phase = (*PLANNED_SOURCE_TASKS, *RECOVERY_TASKS, RELEASE_SOURCE), SOURCE
        details = {"point": target, "phase": phase, "options": opts, "failover": str(kind)}
        job = add_job(txn, db.now(), kind=FAILOVER_JOB[kind], vm=row.vm, tasks=tasks,
                      details=details)  # fmt: skip
        txn.flush()
        return JobRecord.of(job)


_FAILOVER_FROM = {
    FailoverKind.TEST: {S.PROTECTED},
    FailoverKind.PLANNED: {S.PROTECTED},
    FailoverKind.UNPLANNED: {S.PROTECTED, S.RESYNC_REQUIRED, S.ERROR},
}


def request_follow_up(
    db: Database, /, *, vm: str, kind: str, point: str | None = None
) -> JobRecord:
    """A pending cleanup / change point / commit job for the host that runs the replica."""
    if kind not in FOLLOW_UP_TASKS:
        raise InputError(f"unknown failover operation {kind!r}")
    needs = {CLEANUP: {S.TEST_FAILOVER_RUNNING}, CHANGE_POINT: {S.FAILED_OVER},
             COMMIT: {S.FAILED_OVER}}[kind]  # fmt: skip
    if kind == CHANGE_POINT and not point:
        raise InputError("say which recovery point to change to")
    with db.transaction() as txn:
        row = rows.replicated(txn, vm, for_update=True)
        _require_state(vm, row.state, needs, f"run a {kind}")
        _require_no_open_job(txn, row.vm_id, vm)
        host = _last_recovery_host(txn, row.vm_id)
        details: dict[str, Any] = {"recovery_host": host}
        if point:
            details["point"] = checks.label("recovery point", point)
        job = add_job(txn, db.now(), kind=kind, vm=row.vm, tasks=FOLLOW_UP_TASKS[kind],
                      details=details)  # fmt: skip
        txn.flush()
        return JobRecord.of(job)


def request_resync(db: Database, /, *, vm: str, reason: str, full: bool = False) -> JobRecord:
    """Mark ``vm`` *resync required* (from protected or error) and queue a resync job now."""
    checks.text("reason", reason)
    with db.transaction(write=False) as txn:
        row = rows.replicated(txn, vm)
        state, vm_id = row.state, row.vm_id
        _require_state(vm, state, {S.PROTECTED, S.ERROR, S.RESYNC_REQUIRED}, "resync it")
        _require_no_open_job(txn, vm_id, vm)
    if state != S.RESYNC_REQUIRED:
        transition(db, vm=vm, to_state=S.RESYNC_REQUIRED, reason=reason)
    return add_resync_job(db, vm=vm, reason=reason, trigger="operator", full=full)


def request_reverse(db: Database, /, *, vm: str) -> JobRecord:
    """Queue the *reverse replication* job of ``vm`` (its failback committed) for its host."""
    with db.transaction() as txn:
        row = rows.replicated(txn, vm, for_update=True)
        _require_state(vm, row.state, {S.COMMITTED_BACK}, "start reverse replication")
        _require_no_open_job(txn, row.vm_id, vm)
        job = add_job(txn, db.now(), kind=REVERSE, vm=row.vm, tasks=REVERSE_TASKS)
        txn.flush()
        return JobRecord.of(job)


def add_resync_job(
    db: Database, /, *, vm: str, reason: str, trigger: str, full: bool = False
) -> JobRecord:
    """A pending *resynchronize* job of ``vm`` (details: reason, trigger, full)."""
    with db.transaction() as txn:
        row = rows.vm(txn, vm)
        job = new_resync_job(txn, db, row_vm=row, reason=reason, trigger=trigger, full=full)
        return JobRecord.of(job)


def new_resync_job(
    txn: Session, db: Database, *, row_vm: Any, reason: str, trigger: str, full: bool = False
) -> Job:
    """Add a resync job inside the caller's transaction."""
    details = {"reason": reason[:500], "trigger": trigger, "full": full}
    job = add_job(txn, db.now(), kind=RESYNC, vm=row_vm, tasks=RESYNC_TASKS, details=details)
    txn.flush()
    return job


# ---- agents' hand-off ----------------------------------------------------------------------


def hand_off(
    db: Database, /, *, job: str, phase: str, details: dict[str, Any] | None = None
) -> JobRecord:
    """Move the open planned failover ``job`` to ``phase`` and merge ``details`` into its
    details. The caller's lease is ended by the view in the same request."""
    if phase not in (RECOVERY, SOURCE_FINISH):
        raise InputError(f"unknown phase {phase!r}", hint=f"use {RECOVERY} or {SOURCE_FINISH}")
    extra = checks.json_object("hand-off details", details or {})
    with db.transaction() as txn:
        row = rows.job(txn, job, for_update=True)
        if row.state not in OPEN or row.kind != FAILOVER_JOB[FailoverKind.PLANNED]:
            raise InvalidJobState(
                f"job {row.id} ({row.kind}, {row.state}) cannot be handed off",
                hint="only an open planned failover is handed between sites",
            )
        expected = {RECOVERY: SOURCE, SOURCE_FINISH: RECOVERY}[phase]
        if row.details.get("phase") != expected:
            raise InvalidJobState(
                f"job {row.id} is in phase {row.details.get('phase')!r}, not {expected!r}"
            )
        row.details = checks.json_object("job details", {**row.details, **extra, "phase": phase})
        txn.flush()
        return JobRecord.of(row)


# ---- operators' cancel ----------------------------------------------------------------------


#: Kinds whose running job is not cancelled: a replica may be starting, or the source paused.
UNCANCELLABLE_WHILE_RUNNING = frozenset(FAILOVER_JOB.values())


def cancel_job(db: Database, /, *, job: str, reason: str) -> JobRecord:
    """Cancel the open ``job`` for an operator, in one transaction: its running task is
    cancelled and the pending ones skipped, the work lease it holds ends (the agent's next
    report is refused), and its VM goes where the job's kind leaves it safely (the table in
    the module docstring). InvalidJobState (nothing changes) if the job already ended, or is
    a running failover."""
    checks.text("reason", reason)
    with db.transaction() as txn:
        row = rows.job(txn, job, for_update=True)
        started = row.state == JobState.RUNNING
        if started and row.kind in UNCANCELLABLE_WHILE_RUNNING:
            raise InvalidJobState(
                f"job {row.id} ({row.kind}) is running: it cannot be cancelled",
                hint="a replica may be starting or the source VM is paused: wait for the job "
                "to end (a failed failover puts everything back)",
            )
        now = db.now()
        cancel_row(row, now, reason=reason)
        _end_job_lease(txn, row)
        if row.vm is not None and row.vm.replicated is not None:
            _settle(txn, row, rows.replicated(txn, row.vm.name, for_update=True), started, now)
        txn.flush()
        return JobRecord.of(row)


def _end_job_lease(txn: Session, job: Job) -> None:
    """Delete the work lease taken for ``job`` (a cycle's lease on the VM is left alone)."""
    lease = txn.get(WorkLease, job.vm_id, with_for_update=True) if job.vm_id else None
    if lease is not None and lease.job_id == job.id:
        txn.delete(lease)


def _settle(txn: Session, job: Job, row: ReplicatedVm, started: bool, now: datetime) -> None:
    """Put the VM of the cancelled ``job`` where its kind leaves it safely (a VM the job
    already brought to *protected* stays there)."""
    why = f"{job.kind} job {job.id} {job.error}"[:500]
    if job.kind == ENABLE_PROTECTION and not started:
        txn.delete(row)  # no task ran: the VM is as it was before protect
    elif job.kind == ENABLE_PROTECTION and row.state in _ENABLING:
        move(txn, row, S.ERROR, why, now)
    elif job.kind == RESYNC and row.state == S.RESYNCING:
        move(txn, row, S.RESYNC_REQUIRED, why, now)


_ENABLING = frozenset({S.ENABLING_PROTECTION, S.INITIAL_REPLICATION})


# ---- helpers -------------------------------------------------------------------------------


def _options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - OPTION_KEYS)
    if unknown:
        raise InputError(f"unknown failover options {unknown}", hint="use mode, expose, append")
    if options.get("mode") not in (None, "instant", "full"):
        raise InputError(f"unknown recovery mode {options['mode']!r}", hint="instant or full")
    if "check" in options:
        _check_probe(options["check"])
    return checks.json_object("failover options", options)


def _check_probe(check: Any) -> None:
    """A drill check's shape: ``{kind: serial|port, pattern, port, http, timeout_s}``."""
    if not isinstance(check, dict) or set(check) - CHECK_KEYS:
        raise InputError(f"invalid drill check {check!r}",
                         hint=f"give an object with some of {sorted(CHECK_KEYS)}")  # fmt: skip
    if check.get("kind") not in ("serial", "port"):
        raise InputError(f"unknown drill check kind {check.get('kind')!r}",
                         hint="use serial (a console pattern) or port (an exposed TCP port)")
    if check["kind"] == "port":
        checks.integer("drill check port", check.get("port"), low=1, high=65535)
    timeout = check.get("timeout_s", 60)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not (
        0 < timeout <= 3600
    ):
        raise InputError(f"drill check timeout {timeout!r} is out of range", hint="1-3600 s")


def _require_state(vm: str, state: S, allowed: set[S], what: str) -> None:
    if state not in allowed:
        raise InvalidTransition(vm=vm, current=state, operation=what, required=allowed)


def _require_no_open_job(txn: Session, vm_id: int, vm: str) -> None:
    query = select(Job).where(Job.vm_id == vm_id, Job.state.in_(OPEN), Job.kind.in_(ALL_KINDS))
    found = txn.scalars(query.limit(1)).first()
    if found is not None:
        raise Conflict(
            f"VM {vm!r} has an open {found.kind} job {found.id}",
            hint="wait for it to end (`siterecovery job show ID`)",
        )


def _last_recovery_host(txn: Session, vm_id: int) -> str | None:
    query = (
        select(Job)
        .where(Job.vm_id == vm_id, Job.kind.in_(list(FAILOVER_JOB.values())))
        .order_by(Job.created_at.desc())
        .limit(5)
    )
    for job in txn.scalars(query):
        host = job.details.get("recovery_host")
        if isinstance(host, str):
            return host
    return None
