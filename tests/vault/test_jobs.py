"""Jobs and tasks: protect's job, task lifecycle, progress, failure, restart."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from siterecovery.domain import JobState, ReplicationState
from siterecovery.errors import InputError
from siterecovery.vault import service
from siterecovery.vault.db import Database, open_database
from siterecovery.vault.errors import InvalidJobState, UnknownJob, UnknownVm
from siterecovery.vault.records import JobRecord

from .conftest import START, FakeClock

TASKS = [
    "check prerequisites",
    "create replication relationship",
    "start initial replication",
    "finalize protection",
]
P, R, OK, FAIL, SKIP = (
    JobState.PENDING,
    JobState.RUNNING,
    JobState.SUCCEEDED,
    JobState.FAILED,
    JobState.SKIPPED,
)


def states(job: JobRecord) -> list[JobState]:
    return [t.state for t in job.tasks]


def test_protect_creates_the_enable_protection_job(inventory: Database) -> None:
    made = service.protect(inventory, vm="web1", policy="gold")
    job = made.job
    assert job.kind == "enable protection"
    assert job.vm == "web1"
    assert (job.state, job.progress, job.created_at) == (P, 0, START)
    assert [t.name for t in job.tasks] == TASKS
    assert [t.seq for t in job.tasks] == [0, 1, 2, 3]
    assert states(job) == [P, P, P, P]
    assert made.replicated.state == ReplicationState.ENABLING_PROTECTION
    assert str(uuid.UUID(made.replicated.relationship_id)) == made.replicated.relationship_id
    assert job.details == {"relationship_id": made.replicated.relationship_id, "policy": "gold"}
    assert service.get_job(inventory, job=job.id) == job


def test_each_protection_gets_a_new_relationship(inventory: Database) -> None:
    made = service.protect(inventory, vm="web1", policy="gold")
    first = made.replicated.relationship_id
    service.cancel_job(inventory, job=made.job.id, reason="no agent runs it")
    service.unprotect(inventory, vm="web1")
    second = service.protect(inventory, vm="web1", policy="gold").replicated.relationship_id
    assert first != second


def test_task_lifecycle_and_progress(inventory: Database, clock: FakeClock) -> None:
    db = inventory
    job_id = service.protect(db, vm="web1", policy="gold").job.id
    clock.advance(10)
    job = service.start_task(db, job=job_id, name=TASKS[0])
    assert (job.state, job.started_at) == (R, START + timedelta(seconds=10))
    assert states(job) == [R, P, P, P]
    job = service.update_task(db, job=job_id, name=TASKS[0], progress=50, details={"a": 1})
    assert job.progress == 12  # (50 + 0 + 0 + 0) / 4, rounded down
    job = service.update_task(db, job=job_id, name=TASKS[0], progress=60, details={"b": 2})
    assert job.task(TASKS[0]).details == {"a": 1, "b": 2}
    clock.advance(5)
    job = service.finish_task(db, job=job_id, name=TASKS[0])
    first = job.task(TASKS[0])
    assert (first.state, first.progress) == (OK, 100)
    assert first.ended_at == START + timedelta(seconds=15)
    assert job.progress == 25
    service.start_task(db, job=job_id, name=TASKS[1])
    job = service.update_task(db, job=job_id, name=TASKS[1], progress=100)
    assert job.progress == 50
    for name in TASKS[1:]:
        if name != TASKS[1]:
            service.start_task(db, job=job_id, name=name)
        job = service.finish_task(db, job=job_id, name=name)
    assert (job.state, job.progress) == (R, 100)
    clock.advance(1)
    job = service.finish_job(db, job=job_id)
    assert (job.state, job.progress, job.ended_at) == (OK, 100, clock.now)
    assert states(job) == [OK, OK, OK, OK]


def test_fail_task_skips_the_rest_and_fails_the_job(inventory: Database) -> None:
    db = inventory
    job_id = service.protect(db, vm="web1", policy="gold").job.id
    service.start_task(db, job=job_id, name=TASKS[0])
    service.finish_task(db, job=job_id, name=TASKS[0])
    service.start_task(db, job=job_id, name=TASKS[1])
    service.update_task(db, job=job_id, name=TASKS[1], progress=40)
    job = service.fail_task(db, job=job_id, name=TASKS[1], error="bitmap add refused")
    assert job.state == FAIL
    assert job.error == "task 'create replication relationship' failed: bitmap add refused"
    assert states(job) == [OK, FAIL, SKIP, SKIP]
    assert job.task(TASKS[1]).error == "bitmap add refused"
    assert job.progress == 35  # (100 + 40 + 0 + 0) / 4
    assert job.ended_at is not None
    with pytest.raises(InvalidJobState, match="already ended 'failed'"):
        service.start_task(db, job=job_id, name=TASKS[2])
    with pytest.raises(InvalidJobState, match="already ended"):
        service.finish_job(db, job=job_id)
    assert service.get_job(db, job=job_id) == job


def test_tasks_run_in_order_and_states_are_enforced(inventory: Database) -> None:
    db = inventory
    job_id = service.protect(db, vm="web1", policy="gold").job.id
    before = service.get_job(db, job=job_id)
    with pytest.raises(InvalidJobState, match=r"earlier tasks \['check prerequisites'\]"):
        service.start_task(db, job=job_id, name=TASKS[1])
    with pytest.raises(InvalidJobState, match="the task is 'pending', it must be 'running'"):
        service.finish_task(db, job=job_id, name=TASKS[0])
    with pytest.raises(InvalidJobState, match="must be 'running'"):
        service.update_task(db, job=job_id, name=TASKS[0], progress=5)
    with pytest.raises(InvalidJobState, match=r"tasks \[.*\] have not succeeded"):
        service.finish_job(db, job=job_id)
    assert service.get_job(db, job=job_id) == before
    service.start_task(db, job=job_id, name=TASKS[0])
    with pytest.raises(InvalidJobState, match="the task is 'running', it must be 'pending'"):
        service.start_task(db, job=job_id, name=TASKS[0])


@pytest.mark.parametrize("progress", [-1, 101, 50.5, True, "10"])
def test_bad_progress(inventory: Database, progress: object) -> None:
    job_id = service.protect(inventory, vm="web1", policy="gold").job.id
    service.start_task(inventory, job=job_id, name=TASKS[0])
    with pytest.raises(InputError, match="progress"):
        service.update_task(inventory, job=job_id, name=TASKS[0], progress=progress)  # type: ignore[arg-type]
    assert service.get_job(inventory, job=job_id).task(TASKS[0]).progress == 0


def test_bad_task_details_and_names(inventory: Database) -> None:
    job_id = service.protect(inventory, vm="web1", policy="gold").job.id
    service.start_task(inventory, job=job_id, name=TASKS[0])
    with pytest.raises(InputError, match="JSON"):
        service.update_task(inventory, job=job_id, name=TASKS[0], progress=1, details={"x": {1}})
    with pytest.raises(InputError, match="has no task 'nope'"):
        service.start_task(inventory, job=job_id, name="nope")
    with pytest.raises(UnknownJob):
        service.get_job(inventory, job=str(uuid.uuid4()))
    with pytest.raises(InputError, match="UUID"):
        service.get_job(inventory, job="not-a-uuid")


def test_create_job_validates_everything(inventory: Database) -> None:
    db = inventory
    with pytest.raises(InputError, match="unique"):
        service.create_job(db, kind="failover", vm="web1", tasks=["a", "a"])
    with pytest.raises(InputError, match="one or more"):
        service.create_job(db, kind="failover", vm="web1", tasks=[])
    with pytest.raises(InputError, match="task name"):
        service.create_job(db, kind="failover", vm="web1", tasks=["ok", ""])
    with pytest.raises(InputError, match="job kind"):
        service.create_job(db, kind="bad\nkind", vm="web1", tasks=["a"])
    with pytest.raises(UnknownVm):
        service.create_job(db, kind="failover", vm="ghost", tasks=["a"])
    assert service.list_jobs(db) == []
    job = service.create_job(db, kind="store gc", vm=None, tasks=["scan", "delete"])
    assert (job.vm, [t.name for t in job.tasks]) == (None, ["scan", "delete"])


def test_cancel_job(inventory: Database) -> None:
    db = inventory
    job_id = service.protect(db, vm="web1", policy="gold").job.id
    service.start_task(db, job=job_id, name=TASKS[0])
    job = service.cancel_job(db, job=job_id, reason="operator stopped it")
    assert job.state == JobState.CANCELLED
    assert job.error == "cancelled: operator stopped it"
    assert states(job) == [JobState.CANCELLED, SKIP, SKIP, SKIP]


def test_list_jobs_newest_first_with_filters(inventory: Database, clock: FakeClock) -> None:
    db = inventory
    ids = []
    for n in range(3):
        clock.advance(1)
        ids.append(service.create_job(db, kind=f"kind {n}", vm="web1", tasks=["a"]).id)
    clock.advance(1)
    other = service.create_job(db, kind="store gc", vm=None, tasks=["a"]).id
    assert [j.id for j in service.list_jobs(db)] == [other, *reversed(ids)]
    assert [j.id for j in service.list_jobs(db, vm="web1", limit=2)] == [ids[2], ids[1]]
    service.fail_task(db, job=ids[0], name="a", error="boom")
    assert [j.id for j in service.list_jobs(db, state=JobState.FAILED)] == [ids[0]]
    with pytest.raises(InputError, match="limit"):
        service.list_jobs(db, limit=0)


def test_jobs_and_states_survive_a_restart(database_url: str, clock: FakeClock) -> None:
    db = open_database(database_url, clock=clock)
    service.ensure_site(db, name="dc1", role="primary")
    service.ensure_host(db, name="kvm1", site="dc1")
    service.upsert_vm(db, host="kvm1", name="web1", config={"cpus": 2}, disks=[])
    service.create_policy(db, name="gold", copy_frequency_s=300, retention_h=12)
    made = service.protect(db, vm="web1", policy="gold")
    service.start_task(db, job=made.job.id, name=TASKS[0])
    service.update_task(db, job=made.job.id, name=TASKS[0], progress=70, details={"ok": True})
    service.transition(db, vm="web1", to_state=ReplicationState.INITIAL_REPLICATION, reason="r")
    job_before = service.get_job(db, job=made.job.id)
    protection_before = service.get_protection(db, vm="web1")
    db.close()

    reopened = open_database(database_url, clock=clock)
    try:
        assert service.get_job(reopened, job=made.job.id) == job_before
        assert service.get_protection(reopened, vm="web1") == protection_before
        assert protection_before.state == ReplicationState.INITIAL_REPLICATION
        job = service.finish_task(reopened, job=made.job.id, name=TASKS[0])
        assert job.task(TASKS[0]).details == {"ok": True}
        assert job.progress == 25
    finally:
        reopened.close()


def test_unprotect_creates_the_disable_job(inventory: Database, clock: FakeClock) -> None:
    db = inventory
    made = service.protect(db, vm="web1", policy="gold")
    service.cancel_job(db, job=made.job.id, reason="no agent runs it")  # unprotect: no open job
    clock.advance(1)
    job = service.unprotect(db, vm="web1")
    assert job.kind == "disable protection"
    assert [t.name for t in job.tasks] == [
        "stop replication",
        "remove replication relationship",
        "remove replica data",
    ]
    assert job.details == {
        "relationship_id": made.replicated.relationship_id,
        "policy": "gold",
        "disks": ["vda", "vdb"],
    }
    assert service.get_vm(db, name="web1").state == ReplicationState.UNPROTECTED
    assert [j.kind for j in service.list_jobs(db, vm="web1")] == [
        "disable protection",
        "enable protection",
    ]
