"""The operators' API (``/v1``): inventory, policies, protection, status, points, jobs, access.

Thin views: each checks the caller's role (reader < operator < admin), calls one vault
service and returns its frozen record; every error is mapped by the app in one place.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, status
from pydantic import BaseModel
from sqlalchemy import select

from siterecovery.api import deps
from siterecovery.api.deps import (
    ADMIN,
    DB,
    OPERATOR,
    OPTIONS,
    PATH_PARAMS,
    READER,
    VaultOptions,
)
from siterecovery.api.schemas import (
    NAME_PATTERN,
    AssignPolicy,
    CancelRequest,
    ChangePointRequest,
    FailoverRequest,
    NetworkCreate,
    NetworkMap,
    PolicyCreate,
    PolicySettings,
    ProtectRequest,
    RegistrationKeyCreate,
    ResyncRequest,
    SiteCreate,
    TokenCreate,
)
from siterecovery.domain import JobState
from siterecovery.recovery import network
from siterecovery.recovery.network import MappingRecord, NetworkRecord
from siterecovery.vault import access, jobs, operations, points, service, work
from siterecovery.vault.access import Principal, TokenRecord
from siterecovery.vault.db import Database
from siterecovery.vault.models import Site
from siterecovery.vault.records import (
    JobRecord,
    PointRecord,
    PolicyRecord,
    ReplicatedVmRecord,
    SiteRecord,
    VmRecord,
)
from siterecovery.vault.work import HostStatus, VmStatus

router = APIRouter(prefix="/v1", dependencies=[PATH_PARAMS])
VmName = Annotated[str, Query(pattern=NAME_PATTERN, max_length=63)]


class CreatedSecret(BaseModel):
    """A secret shown once: a new API token or registration key."""

    name: str
    secret: str
    expires_at: datetime | None


@router.get("/sites", response_model=list[SiteRecord], tags=["inventory"])
def list_sites(db: Database = DB, _: Principal = READER) -> list[SiteRecord]:
    with db.transaction(write=False) as txn:
        return [SiteRecord.of(s) for s in txn.scalars(select(Site).order_by(Site.name))]


@router.post("/sites", response_model=SiteRecord, status_code=201, tags=["inventory"])
def create_site(body: SiteCreate, db: Database = DB, _: Principal = ADMIN) -> SiteRecord:
    return service.ensure_site(db, name=body.name, role=body.role)


@router.get("/hosts", response_model=list[HostStatus], tags=["inventory"])
def list_hosts(
    db: Database = DB, opts: VaultOptions = OPTIONS, _: Principal = READER
) -> list[HostStatus]:
    return work.list_hosts(db, heartbeat_timeout_s=opts.heartbeat_timeout_s)


@router.get("/vms", response_model=list[VmRecord], tags=["inventory"])
def list_vms(
    host: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=63)] = None,
    db: Database = DB,
    _: Principal = READER,
) -> list[VmRecord]:
    return service.list_vms(db, host=host)


@router.get("/vms/{vm}", response_model=VmRecord, tags=["inventory"])
def get_vm(vm: str, db: Database = DB, _: Principal = READER) -> VmRecord:
    return service.get_vm(db, name=vm)


@router.get("/policies", response_model=list[PolicyRecord], tags=["policies"])
def list_policies(db: Database = DB, _: Principal = READER) -> list[PolicyRecord]:
    return service.list_policies(db)


@router.get("/policies/{name}", response_model=PolicyRecord, tags=["policies"])
def get_policy(name: str, db: Database = DB, _: Principal = READER) -> PolicyRecord:
    return service.get_policy(db, name=name)


@router.post("/policies", response_model=PolicyRecord, status_code=201, tags=["policies"])
def create_policy(body: PolicyCreate, db: Database = DB, _: Principal = OPERATOR) -> PolicyRecord:
    return service.create_policy(db, **body.model_dump())


@router.patch("/policies/{name}", response_model=PolicyRecord, tags=["policies"])
def update_policy(
    name: str, body: PolicySettings, db: Database = DB, _: Principal = OPERATOR
) -> PolicyRecord:
    return work.update_policy(db, name=name, changes=body.model_dump(exclude_unset=True))


@router.put("/vms/{vm}/policy", response_model=ReplicatedVmRecord, tags=["protection"])
def assign_policy(
    vm: str, body: AssignPolicy, db: Database = DB, _: Principal = OPERATOR
) -> ReplicatedVmRecord:
    return work.assign_policy(db, vm=vm, policy=body.policy)


@router.post("/vms/{vm}/protect", response_model=JobRecord, status_code=202, tags=["protection"])
def protect(vm: str, body: ProtectRequest, db: Database = DB, _: Principal = OPERATOR) -> JobRecord:
    """Enable protection: answers with the pending job, which the VM's agent runs."""
    return service.protect(db, vm=vm, policy=body.policy).job


@router.post("/vms/{vm}/unprotect", response_model=JobRecord, status_code=202, tags=["protection"])
def unprotect(vm: str, db: Database = DB, _: Principal = OPERATOR) -> JobRecord:
    """Disable protection: answers with the pending job, which the VM's agent runs."""
    return service.unprotect(db, vm=vm)


@router.post("/vms/{vm}/reverse-replicate", response_model=JobRecord, status_code=202,
             tags=["protection"])  # fmt: skip
def reverse_replicate(vm: str, db: Database = DB, _: Principal = OPERATOR) -> JobRecord:
    """Protect a failed-back VM again (its failback committed): the pending job, which the
    VM's agent runs (only the blocks that differ from the newest point are sent)."""
    return operations.request_reverse(db, vm=vm)


@router.post("/vms/{vm}/failover", response_model=JobRecord, status_code=202, tags=["recovery"])
def failover(
    vm: str, body: FailoverRequest, db: Database = DB, _: Principal = OPERATOR
) -> JobRecord:
    """Fail a VM over: answers with the pending job, which a recovery site's agent runs (a
    planned failover starts on the VM's own agent: pause, final cycle, hand-off)."""
    options = body.options.model_dump(exclude_defaults=True)
    return operations.request_failover(db, vm=vm, kind=body.kind, point=body.point,
                                       options=options)  # fmt: skip


@router.post("/vms/{vm}/failover/cleanup", response_model=JobRecord, status_code=202,
             tags=["recovery"])  # fmt: skip
def failover_cleanup(vm: str, db: Database = DB, _: Principal = OPERATOR) -> JobRecord:
    """End a drill: the recovery host that runs it stops and removes the replica."""
    return operations.request_follow_up(db, vm=vm, kind=operations.CLEANUP)


@router.post("/vms/{vm}/failover/change-point", response_model=JobRecord, status_code=202,
             tags=["recovery"])  # fmt: skip
def failover_change_point(
    vm: str, body: ChangePointRequest, db: Database = DB, _: Principal = OPERATOR
) -> JobRecord:
    """Restart the failed-over VM from another recovery point (before commit)."""
    return operations.request_follow_up(db, vm=vm, kind=operations.CHANGE_POINT,
                                        point=body.point)  # fmt: skip


@router.post("/vms/{vm}/failover/commit", response_model=JobRecord, status_code=202,
             tags=["recovery"])  # fmt: skip
def failover_commit(vm: str, db: Database = DB, _: Principal = OPERATOR) -> JobRecord:
    """Commit the failover: the point can no longer change."""
    return operations.request_follow_up(db, vm=vm, kind=operations.COMMIT)


@router.post("/vms/{vm}/resync", response_model=JobRecord, status_code=202, tags=["protection"])
def resync(vm: str, body: ResyncRequest, db: Database = DB, _: Principal = OPERATOR) -> JobRecord:
    """Resynchronize now: the VM is marked *resync required* and its agent runs the job."""
    reason = body.reason or "requested by the operator"
    return operations.request_resync(db, vm=vm, reason=reason, full=body.full)


@router.get("/status", response_model=list[VmStatus], tags=["status"])
def get_status(
    vm: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=63)] = None,
    db: Database = DB,
    opts: VaultOptions = OPTIONS,
    _: Principal = READER,
) -> list[VmStatus]:
    """Replicated VMs with state, health and reasons, RPO, last cycle and throughput."""
    return work.status(db, vm=vm, heartbeat_timeout_s=opts.heartbeat_timeout_s)


@router.get("/vms/{vm}/points", response_model=list[PointRecord], tags=["status"])
def list_points(vm: str, db: Database = DB, _: Principal = READER) -> list[PointRecord]:
    return points.list_points(db, vm=vm)


@router.get("/jobs", response_model=list[JobRecord], tags=["jobs"])
def list_jobs(
    vm: VmName | None = None,
    state: JobState | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    db: Database = DB,
    _: Principal = READER,
) -> list[JobRecord]:
    return jobs.list_jobs(db, vm=vm, state=state, limit=limit)


@router.get("/jobs/{job_id}", response_model=JobRecord, tags=["jobs"])
def get_job(job_id: str, db: Database = DB, _: Principal = READER) -> JobRecord:
    return jobs.get_job(db, job=job_id)


@router.post("/jobs/{job_id}/cancel", response_model=JobRecord, tags=["jobs"])
def cancel_job(
    job_id: str, body: CancelRequest, db: Database = DB, who: Principal = OPERATOR
) -> JobRecord:
    """Cancel an open job: its lease ends and its VM goes where the job's kind leaves it
    safely (409 for a job that ended, or a failover that is running)."""
    reason = f"{body.reason or 'no reason given'} (by {who.label})"
    return operations.cancel_job(db, job=job_id, reason=reason)


@router.get("/tokens", response_model=list[TokenRecord], tags=["access"])
def list_tokens(db: Database = DB, _: Principal = ADMIN) -> list[TokenRecord]:
    return access.list_tokens(db)


@router.post("/tokens", response_model=CreatedSecret, status_code=201, tags=["access"])
def create_token(body: TokenCreate, db: Database = DB, _: Principal = ADMIN) -> CreatedSecret:
    record, secret = access.create_token(db, name=body.name, role=body.role, ttl_s=body.ttl_s)
    return CreatedSecret(name=record.name, secret=secret, expires_at=record.expires_at)


@router.delete("/tokens/{name}", response_model=TokenRecord, tags=["access"])
def revoke_token(name: str, db: Database = DB, _: Principal = ADMIN) -> TokenRecord:
    return access.revoke_token(db, name=name)


@router.post("/registration-keys", response_model=CreatedSecret, status_code=201, tags=["access"])
def create_registration_key(
    body: RegistrationKeyCreate, db: Database = DB, who: Principal = ADMIN
) -> CreatedSecret:
    """A one-time key for one named host (``name`` in the answer is that host)."""
    secret, expires = access.create_registration_key(
        db, site=body.site, host=body.host, role=body.site_role, ttl_s=body.ttl_s,
        replace=body.replace, by=who.label,
    )  # fmt: skip
    return CreatedSecret(name=body.host, secret=secret, expires_at=expires)


@router.get("/whoami", tags=["access"], status_code=status.HTTP_200_OK)
def whoami(who: Principal = Depends(deps.caller)) -> dict[str, str | None]:
    """The caller as the vault sees it."""
    return {"name": who.name, "role": who.role, "host": who.host}


class Networks(BaseModel):
    """Recovery networks and the mappings of source networks to them."""

    networks: list[NetworkRecord]
    mappings: list[MappingRecord]


@router.get("/networks", response_model=Networks, tags=["recovery"])
def list_networks(db: Database = DB, _: Principal = READER) -> Networks:
    return Networks(networks=network.list_networks(db), mappings=network.list_mappings(db))


@router.post("/networks", response_model=NetworkRecord, status_code=201, tags=["recovery"])
def create_network(
    body: NetworkCreate, db: Database = DB, _: Principal = OPERATOR
) -> NetworkRecord:
    return network.create_network(db, name=body.name, kind=body.kind, subnet=body.subnet)


@router.post("/network-mappings", response_model=MappingRecord, status_code=201,
             tags=["recovery"])  # fmt: skip
def map_network(body: NetworkMap, db: Database = DB, _: Principal = OPERATOR) -> MappingRecord:
    return network.map_network(db, source=body.source, recovery=body.recovery, test=body.test)
