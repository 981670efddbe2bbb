"""Jobs and their tasks (DESIGN §4): long operations made of named steps.

Lifecycle, enforced here::

    job:  pending → running (first task started) → succeeded (finish_job)
                                                 → failed    (fail_task)
                                                 → cancelled (cancel_job)
    task: pending → running → succeeded | failed;  pending → skipped (job failed or cancelled)

Tasks run one at a time in their order: a task starts only when every earlier task has
succeeded or was skipped. A job's ``progress`` is the mean of its tasks' progress (a finished
task counts 100), an integer 0-100. Everything is stored, so jobs survive restarts. Times come
from the database's clock.

Functions take the :class:`~siterecovery.vault.db.Database` positionally and everything else
by keyword; each runs in one transaction and returns a :class:`JobRecord`.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from siterecovery.domain import JobState
from siterecovery.errors import InputError
from siterecovery.vault import checks, rows
from siterecovery.vault.db import Database
from siterecovery.vault.errors import InvalidJobState
from siterecovery.vault.models import Job, JobTask, Vm
from siterecovery.vault.records import JobRecord

_ENDED = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.SKIPPED})
_DONE_FOR_ORDER = frozenset({JobState.SUCCEEDED, JobState.SKIPPED})
MAX_LIST = 1000


def create_job(
    db: Database,
    /,
    *,
    kind: str,
    vm: str | None,
    tasks: Sequence[str],
    details: Mapping[str, Any] | None = None,
) -> JobRecord:
    """Create a pending job of ``kind`` on ``vm`` (or no VM) with ``tasks`` in that order."""
    with db.transaction() as session:
        vm_row = rows.vm(session, vm) if vm is not None else None
        job = add_job(session, db.now(), kind=kind, vm=vm_row, tasks=tasks, details=details)
        session.flush()
        return JobRecord.of(job)


def add_job(
    session: Session,
    now: datetime,
    *,
    kind: str,
    vm: Vm | None,
    tasks: Sequence[str],
    details: Mapping[str, Any] | None = None,
) -> Job:
    """Add a pending job inside the caller's transaction (used by the service's operations)."""
    checks.label("job kind", kind)
    names = [checks.label("task name", t) for t in tasks]
    if not names or isinstance(tasks, str):
        raise InputError("a job needs a list of one or more task names")
    if len(set(names)) != len(names):
        raise InputError(f"task names of a job must be unique, got {names}")
    job = Job(
        id=str(uuid.uuid4()),
        kind=kind,
        vm=vm,
        state=JobState.PENDING,
        created_at=now,
        progress=0,
        details=checks.json_object("job details", details or {}),
    )
    job.tasks = [_new_task(seq, name) for seq, name in enumerate(names)]
    session.add(job)
    return job


def _new_task(seq: int, name: str) -> JobTask:
    return JobTask(seq=seq, name=name, state=JobState.PENDING, progress=0, details={})


def start_task(db: Database, /, *, job: str, name: str) -> JobRecord:
    """Start the pending task ``name``; the job becomes running if it was pending."""
    with db.transaction() as session:
        row = rows.job(session, job, for_update=True)
        task = _task(row, name)
        _require(row, task, "start", {JobState.PENDING})
        _require_previous_done(row, task)
        now = db.now()
        task.state, task.started_at = JobState.RUNNING, now
        if row.state == JobState.PENDING:
            row.state, row.started_at = JobState.RUNNING, now
        return _refresh(row)


def update_task(
    db: Database,
    /,
    *,
    job: str,
    name: str,
    progress: int,
    details: Mapping[str, Any] | None = None,
) -> JobRecord:
    """Set a running task's progress (0-100) and merge ``details`` into its details.

    The merged details are bounded like ``details`` (:func:`checks.json_object`)."""
    checks.integer("task progress", progress, low=0, high=100)
    extra = checks.json_object("task details", details or {})
    with db.transaction() as session:
        row = rows.job(session, job, for_update=True)
        task = _task(row, name)
        _require(row, task, "update", {JobState.RUNNING})
        task.progress = progress
        task.details = checks.json_object("task details", {**task.details, **extra})
        return _refresh(row)


def finish_task(
    db: Database, /, *, job: str, name: str, details: Mapping[str, Any] | None = None
) -> JobRecord:
    """Mark a running task succeeded (progress 100), merging ``details``."""
    extra = checks.json_object("task details", details or {})
    with db.transaction() as session:
        row = rows.job(session, job, for_update=True)
        task = _task(row, name)
        _require(row, task, "finish", {JobState.RUNNING})
        task.state, task.ended_at, task.progress = JobState.SUCCEEDED, db.now(), 100
        task.details = checks.json_object("task details", {**task.details, **extra})
        return _refresh(row)


def fail_task(db: Database, /, *, job: str, name: str, error: str) -> JobRecord:
    """Fail a pending or running task: the job fails with ``error``, later tasks are skipped."""
    checks.text("error", error)
    with db.transaction() as session:
        row = rows.job(session, job, for_update=True)
        task = _task(row, name)
        _require(row, task, "fail", {JobState.PENDING, JobState.RUNNING})
        now = db.now()
        task.state, task.ended_at, task.error = JobState.FAILED, now, error
        task.started_at = task.started_at or now
        _skip_pending(row, now)
        _end_job(row, JobState.FAILED, now, error=f"task {name!r} failed: {error}")
        return _refresh(row)


def finish_job(db: Database, /, *, job: str) -> JobRecord:
    """Mark a job succeeded; every task must have succeeded or been skipped."""
    with db.transaction() as session:
        row = rows.job(session, job, for_update=True)
        _require_job_open(row, "finish")
        unfinished = [t.name for t in row.tasks if t.state not in _DONE_FOR_ORDER]
        if unfinished:
            raise InvalidJobState(
                f"cannot finish job {row.id}: tasks {unfinished} have not succeeded",
                hint="finish or fail those tasks first",
            )
        _end_job(row, JobState.SUCCEEDED, db.now())
        return _refresh(row)


def cancel_job(db: Database, /, *, job: str, reason: str) -> JobRecord:
    """Cancel a pending or running job: the running task is cancelled, pending ones skipped.

    Only the job: :func:`siterecovery.vault.operations.cancel_job` also ends its lease and
    settles its VM, as an operator's cancel must."""
    checks.text("reason", reason)
    with db.transaction() as session:
        row = rows.job(session, job, for_update=True)
        cancel_row(row, db.now(), reason=reason)
        return _refresh(row)


def cancel_row(row: Job, now: datetime, *, reason: str) -> None:
    """Cancel the open job ``row`` inside the caller's transaction; InvalidJobState if it
    already ended."""
    _require_job_open(row, "cancel")
    for task in row.tasks:
        if task.state == JobState.RUNNING:
            task.state, task.ended_at = JobState.CANCELLED, now
    _skip_pending(row, now)
    _end_job(row, JobState.CANCELLED, now, error=f"cancelled: {reason}")
    row.progress = job_progress(row.tasks)


def get_job(db: Database, /, *, job: str) -> JobRecord:
    """The job with id ``job``; raises UnknownJob."""
    with db.transaction(write=False) as session:
        return JobRecord.of(rows.job(session, job))


def list_jobs(
    db: Database,
    /,
    *,
    vm: str | None = None,
    state: JobState | None = None,
    limit: int = 50,
) -> list[JobRecord]:
    """The newest ``limit`` jobs (1-1000), newest first, optionally of one VM or state."""
    checks.integer("limit", limit, low=1, high=MAX_LIST)
    query = select(Job).options(selectinload(Job.tasks), selectinload(Job.vm))
    if state is not None:
        query = query.where(Job.state == checks.member("job state", JobState, state))
    with db.transaction(write=False) as session:
        if vm is not None:
            query = query.where(Job.vm_id == rows.vm(session, vm).id)
        found = session.scalars(query.order_by(Job.created_at.desc(), Job.id).limit(limit))
        return [JobRecord.of(r) for r in found]


def job_progress(tasks: Sequence[JobTask]) -> int:
    """The mean progress of ``tasks`` (succeeded ones count 100), rounded down. Pure."""
    if not tasks:
        return 0
    total = sum(100 if t.state == JobState.SUCCEEDED else t.progress for t in tasks)
    return total // len(tasks)


def _refresh(row: Job) -> JobRecord:
    if row.state != JobState.SUCCEEDED:
        row.progress = job_progress(row.tasks)
    return JobRecord.of(row)


def _end_job(row: Job, state: JobState, now: datetime, *, error: str | None = None) -> None:
    row.state, row.ended_at, row.error = state, now, error
    row.started_at = row.started_at or now
    if state == JobState.SUCCEEDED:
        row.progress = 100


def _skip_pending(row: Job, now: datetime) -> None:
    for task in row.tasks:
        if task.state == JobState.PENDING:
            task.state, task.ended_at = JobState.SKIPPED, now


def _require(row: Job, task: JobTask, operation: str, states: set[JobState]) -> None:
    _require_job_open(row, f"{operation} task {task.name!r} of")
    if task.state not in states:
        wanted = " or ".join(sorted(f"'{s}'" for s in states))
        raise InvalidJobState(
            f"cannot {operation} task {task.name!r} of job {row.id}: "
            f"the task is '{task.state}', it must be {wanted}"
        )


def _require_job_open(row: Job, operation: str) -> None:
    if row.state in _ENDED:
        raise InvalidJobState(
            f"cannot {operation} job {row.id}: the job already ended '{row.state}'"
        )


def _require_previous_done(row: Job, task: JobTask) -> None:
    blocking = [t.name for t in row.tasks if t.seq < task.seq and t.state not in _DONE_FOR_ORDER]
    if blocking:
        raise InvalidJobState(
            f"cannot start task {task.name!r} of job {row.id}: "
            f"earlier tasks {blocking} have not finished",
            hint="tasks run in order: finish the earlier tasks first",
        )


def _task(row: Job, name: str) -> JobTask:
    checks.label("task name", name)
    for task in row.tasks:
        if task.name == name:
            return task
    names = [t.name for t in row.tasks]
    raise InputError(f"job {row.id} has no task {name!r}; its tasks are {names}")
