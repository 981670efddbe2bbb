"""The agents' API (``/v1/agent``): registration, heartbeats, discovered VMs, claimed work.

Every call but ``register`` authenticates with the host's own credential and may read or
change only that host's VMs and their jobs (403 otherwise). Agents never reach the vault's
database: everything they learn or report goes through these views.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Request
from pydantic import BaseModel

from siterecovery.api.deps import AGENT, DB, OPTIONS, PATH_PARAMS, VaultOptions, require_own_vm
from siterecovery.api.schemas import (
    ClaimRequest,
    CycleReport,
    DiscoveryReport,
    HandOffRequest,
    HeartbeatRequest,
    LeaseRequest,
    RegisterRequest,
    TaskEvent,
    TransitionRequest,
)
from siterecovery.domain import DiskSpec
from siterecovery.errors import InputError
from siterecovery.policies.states import ErrorClass
from siterecovery.vault import access, jobs, networks, operations, points, port, service, work
from siterecovery.vault.access import PermissionDenied
from siterecovery.vault.db import Database
from siterecovery.vault.networks import MappingRecord
from siterecovery.vault.port import DiscoveredVm, FailureReport, PointReport
from siterecovery.vault.records import JobRecord, PointRecord, ReplicatedVmRecord, VmRecord
from siterecovery.vault.work import WorkItem

router = APIRouter(prefix="/v1/agent", tags=["agent"], dependencies=[PATH_PARAMS])


class Registered(BaseModel):
    host: str
    site: str
    credential: str
    store_url: str
    replaced: bool = False


class Heartbeat(BaseModel):
    host: str
    now: datetime
    heartbeat_timeout_s: float


class Discovered(BaseModel):
    registered: list[str]
    refused: dict[str, str]


class LeaseState(BaseModel):
    held: bool
    expires_at: datetime | None


class CycleRecorded(BaseModel):
    protection: ReplicatedVmRecord


@router.post("/register", response_model=Registered, status_code=201)
def register(body: RegisterRequest, request: Request, db: Database = DB) -> Registered:
    """Join a host with a one-time registration key; answers its credential (shown once)."""
    done = access.register_host(db, key=body.key, host=body.host)
    store_url = request.app.state.store_url
    return Registered(host=done.host, site=done.site, credential=done.credential,
                      store_url=str(store_url), replaced=done.replaced)  # fmt: skip


@router.post("/heartbeat", response_model=Heartbeat)
def heartbeat(
    body: HeartbeatRequest, db: Database = DB, opts: VaultOptions = OPTIONS, host: str = AGENT
) -> Heartbeat:
    record = service.record_heartbeat(db, host=host)
    assert record.last_heartbeat is not None
    return Heartbeat(host=host, now=record.last_heartbeat,
                     heartbeat_timeout_s=opts.heartbeat_timeout_s)  # fmt: skip


@router.put("/vms", response_model=Discovered)
def report_vms(body: DiscoveryReport, db: Database = DB, host: str = AGENT) -> Discovered:
    """Record the VMs the host's hypervisor driver sees; a VM owned elsewhere is refused."""
    found = [
        DiscoveredVm(vm.name, vm.config, tuple(
            DiskSpec(d.name, d.size, node_name=d.node_name, path=d.path, fmt=d.fmt)
            for d in vm.disks))
        for vm in body.vms
    ]  # fmt: skip
    done = port.report_vms(db, host=host, vms=found)
    return Discovered(registered=list(done.registered), refused=dict(done.refused))


@router.post("/claims", response_model=list[WorkItem])
def claim(body: ClaimRequest, db: Database = DB, host: str = AGENT) -> list[WorkItem]:
    """Lease due work of this host (jobs first, then due cycles)."""
    return work.claim_work(db, host=host, session=body.session, limit=body.limit,
                           lease_s=body.lease_s)  # fmt: skip


@router.post("/vms/{vm}/lease", response_model=LeaseState)
def extend_lease(vm: str, body: LeaseRequest, db: Database = DB, host: str = AGENT) -> LeaseState:
    """Keep a long piece of work leased; ``held: false`` means it was taken away."""
    require_own_vm(db, host, vm)
    until = work.extend_lease(db, host=host, session=body.session, vm=vm, lease_s=body.lease_s)
    return LeaseState(held=until is not None, expires_at=until)


@router.post("/vms/{vm}/release", response_model=LeaseState)
def release_lease(
    vm: str, body: HeartbeatRequest, db: Database = DB, host: str = AGENT
) -> LeaseState:
    """End this session's lease of ``vm`` (work abandoned or done without a report)."""
    require_own_vm(db, host, vm)
    work.release_lease(db, host=host, session=body.session, vm=vm)
    return LeaseState(held=False, expires_at=None)


@router.get("/vms/{vm}", response_model=VmRecord)
def get_vm(vm: str, db: Database = DB, host: str = AGENT) -> VmRecord:
    require_own_vm(db, host, vm)
    return service.get_vm(db, name=vm)


@router.get("/vms/{vm}/protection", response_model=ReplicatedVmRecord)
def get_protection(vm: str, db: Database = DB, host: str = AGENT) -> ReplicatedVmRecord:
    require_own_vm(db, host, vm)
    return service.get_protection(db, vm=vm)


@router.post("/vms/{vm}/transition", response_model=ReplicatedVmRecord)
def transition(
    vm: str, body: TransitionRequest, db: Database = DB, host: str = AGENT
) -> ReplicatedVmRecord:
    require_own_vm(db, host, vm)
    return service.transition(db, vm=vm, to_state=body.to_state, reason=body.reason)


@router.post("/vms/{vm}/cycles", response_model=CycleRecorded)
def report_cycle(vm: str, body: CycleReport, db: Database = DB, host: str = AGENT) -> CycleRecorded:
    """Record a claimed cycle's point (with its figures) or its failure; ends the lease
    unless ``release_lease`` is false (the initial copy inside an enable protection job).

    A point recorded before (a report retried after a lost answer) is not an error. A
    failure's retry time and the state it leads to are decided here (``port.record_failure``).
    """
    require_own_vm(db, host, vm)
    if (body.point is None) == (body.failure is None):
        raise InputError("report exactly one of point or failure")
    if body.point is not None:
        p = body.point
        report = PointReport(p.point_id, p.created_at, p.consistency, p.manifest_key,
                             p.bytes_shipped, p.figures)  # fmt: skip
        protection = port.record_point(db, vm=vm, point=report)
    else:
        assert body.failure is not None
        f = body.failure
        failure = FailureReport(f.message, ErrorClass(f.error_class), f.cause, f.resync)
        protection = port.record_failure(db, vm=vm, failure=failure)
    if body.release_lease:
        work.release_lease(db, host=host, session=body.session, vm=vm)
    return CycleRecorded(protection=protection)


def _own_job(db: Database, host: str, job_id: str) -> JobRecord:
    record = jobs.get_job(db, job=job_id)
    if record.vm is None:
        raise PermissionDenied(f"host {host!r} may not touch job {record.id}: it has no VM")
    require_own_vm(db, host, record.vm)
    return record


@router.get("/jobs/{job_id}", response_model=JobRecord)
def get_job(job_id: str, db: Database = DB, host: str = AGENT) -> JobRecord:
    return _own_job(db, host, job_id)


@router.post("/jobs/{job_id}/tasks/{task}", response_model=JobRecord)
def task_event(
    job_id: str, task: str, body: TaskEvent, db: Database = DB, host: str = AGENT
) -> JobRecord:
    """Start, update, finish or fail a task of one of this host's jobs."""
    _own_job(db, host, job_id)
    if body.action == "start":
        return jobs.start_task(db, job=job_id, name=task)
    if body.action == "progress":
        return jobs.update_task(db, job=job_id, name=task, progress=body.progress,
                                details=body.details)  # fmt: skip
    if body.action == "finish":
        return jobs.finish_task(db, job=job_id, name=task, details=body.details)
    if body.error is None:
        raise InputError("a failed task needs an error message")
    return port.fail_task(db, job=job_id, task=task, error=body.error)


@router.post("/jobs/{job_id}/finish", response_model=JobRecord)
def finish_job(job_id: str, body: LeaseRequest, db: Database = DB, host: str = AGENT) -> JobRecord:
    """Mark one of this host's jobs succeeded and end its lease."""
    record = _own_job(db, host, job_id)
    done = jobs.finish_job(db, job=job_id)
    if record.vm is not None:
        work.release_lease(db, host=host, session=body.session, vm=record.vm)
    return done


@router.post("/jobs/{job_id}/handoff", response_model=JobRecord)
def hand_off(job_id: str, body: HandOffRequest, db: Database = DB, host: str = AGENT) -> JobRecord:
    """Hand a planned failover to the other site (``recovery`` or ``source-finish``) and end
    this host's lease, so the other site's agent claims it next."""
    record = _own_job(db, host, job_id)
    done = operations.hand_off(db, job=job_id, phase=body.phase, details=body.details)
    if record.vm is not None:
        work.release_lease(db, host=host, session=body.session, vm=record.vm)
    return done


@router.get("/vms/{vm}/points", response_model=list[PointRecord])
def list_points(
    vm: str, latest: bool = False, db: Database = DB, host: str = AGENT
) -> list[PointRecord]:
    """Recovery points of a VM this host owns or runs a failover of, oldest first; with
    ``latest=true`` only the newest one (an empty list when there is none)."""
    require_own_vm(db, host, vm)
    if latest:
        newest = points.latest_point(db, vm=vm)
        return [] if newest is None else [newest]
    return points.list_points(db, vm=vm)


@router.get("/network-mappings", response_model=list[MappingRecord])
def network_mappings(db: Database = DB, _: str = AGENT) -> list[MappingRecord]:
    """Source network → recovery and drill networks, for the replica VMs' NICs."""
    return networks.list_mappings(db)


@router.post("/jobs/{job_id}/release", response_model=JobRecord)
def release_job(job_id: str, body: LeaseRequest, db: Database = DB, host: str = AGENT) -> JobRecord:
    """End the lease of a job that failed (its failure is already recorded on a task)."""
    record = _own_job(db, host, job_id)
    if record.vm is not None:
        work.release_lease(db, host=host, session=body.session, vm=record.vm)
    return record
