"""An operator cancels an open job: the job ends cancelled, its lease ends, and its VM goes where
the job's kind leaves it safely (vault.operations.cancel_job)."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from siterecovery.domain import JobState, ReplicationState
from siterecovery.vault import jobs, operations, service, work
from siterecovery.vault.auth_models import WorkLease
from siterecovery.vault.db import Database
from siterecovery.vault.errors import InvalidJobState, VmNotProtected

S = ReplicationState
SESSION = str(uuid.uuid4())


def leases(db: Database) -> list[tuple[str, str | None]]:
    with db.transaction(write=False) as session:
        return [(lease.kind, lease.job_id) for lease in session.scalars(select(WorkLease))]


def claimed(db: Database) -> str:
    """The id of the one job kvm1's agent claims now."""
    (item,) = work.claim_work(db, host="kvm1", session=SESSION)
    assert item.job_id is not None
    return item.job_id


def protect(db: Database) -> None:
    job = service.protect(db, vm="web1", policy="gold").job
    service.transition(db, vm="web1", to_state=S.INITIAL_REPLICATION, reason="copy")
    service.transition(db, vm="web1", to_state=S.PROTECTED, reason="done")
    jobs.cancel_job(db, job=job.id, reason="set up")  # the setup's own job, job only


def test_a_pending_enable_protection_leaves_the_vm_unprotected(inventory: Database) -> None:
    db = inventory
    job = service.protect(db, vm="web1", policy="gold").job
    assert claimed(db) == job.id and leases(db) == [("enable protection", job.id)]
    done = operations.cancel_job(db, job=job.id, reason="wrong policy")
    assert (done.state, done.error) == (JobState.CANCELLED, "cancelled: wrong policy")
    assert {t.state for t in done.tasks} == {JobState.SKIPPED}
    assert leases(db) == []
    with pytest.raises(VmNotProtected):
        service.get_protection(db, vm="web1")
    service.protect(db, vm="web1", policy="gold")  # and it can be protected again


def test_a_running_enable_protection_leaves_the_vm_in_error(inventory: Database) -> None:
    db = inventory
    job = service.protect(db, vm="web1", policy="gold").job
    claimed(db)
    jobs.start_task(db, job=job.id, name="check prerequisites")
    service.transition(db, vm="web1", to_state=S.INITIAL_REPLICATION, reason="copy")
    done = operations.cancel_job(db, job=job.id, reason="taking too long")
    assert [t.state for t in done.tasks][:2] == [JobState.CANCELLED, JobState.SKIPPED]
    record = service.get_protection(db, vm="web1")
    assert record.state == S.ERROR and "cancelled: taking too long" in record.state_reason
    assert leases(db) == []
    with pytest.raises(InvalidJobState, match="already ended 'cancelled'"):
        jobs.start_task(db, job=job.id, name="create replication relationship")
    with pytest.raises(InvalidJobState, match="already ended"):
        operations.cancel_job(db, job=job.id, reason="again")


def test_a_running_resync_goes_back_to_resync_required(inventory: Database) -> None:
    db = inventory
    protect(db)
    job = operations.request_resync(db, vm="web1", reason="bitmap lost")
    assert claimed(db) == job.id
    jobs.start_task(db, job=job.id, name="prepare resync")
    service.transition(db, vm="web1", to_state=S.RESYNCING, reason="resync")
    operations.cancel_job(db, job=job.id, reason="later")
    assert service.get_protection(db, vm="web1").state == S.RESYNC_REQUIRED
    assert leases(db) == []


def test_a_running_failover_is_not_cancelled(inventory: Database) -> None:
    db = inventory
    protect(db)
    job = operations.request_failover(db, vm="web1", kind="planned", point=None)
    assert claimed(db) == job.id
    jobs.start_task(db, job=job.id, name="check prerequisites")
    with pytest.raises(InvalidJobState, match="is running: it cannot be cancelled"):
        operations.cancel_job(db, job=job.id, reason="no")
    assert jobs.get_job(db, job=job.id).state == JobState.RUNNING  # nothing changed
    assert leases(db) == [("planned failover", job.id)]
    assert service.get_protection(db, vm="web1").state == S.PROTECTED


def test_a_pending_failover_is_cancelled_and_the_vm_stays(inventory: Database) -> None:
    db = inventory
    protect(db)
    job = operations.request_failover(db, vm="web1", kind="test", point=None)
    done = operations.cancel_job(db, job=job.id, reason="drill moved")
    assert done.state == JobState.CANCELLED
    assert service.get_protection(db, vm="web1").state == S.PROTECTED
    assert operations.request_failover(db, vm="web1", kind="test", point=None)  # not blocked
