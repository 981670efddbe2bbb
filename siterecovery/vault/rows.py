"""Row lookups inside a session: validate the name, load the row or raise the NotFound error.

``for_update=True`` takes a row lock on PostgreSQL, where several vault processes may change
the same row; on SQLite the write transaction already holds the database's write lock.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from siterecovery.domain import validate_name
from siterecovery.vault import checks
from siterecovery.vault.errors import (
    UnknownHost,
    UnknownJob,
    UnknownPolicy,
    UnknownSite,
    UnknownVm,
    VmNotProtected,
)
from siterecovery.vault.models import Host, Job, Policy, ReplicatedVm, Site, Vm


def site(session: Session, name: str) -> Site:
    validate_name("site", name)
    row = session.scalars(select(Site).where(Site.name == name)).one_or_none()
    if row is None:
        raise UnknownSite(f"no site {name!r} in the vault")
    return row


def host(session: Session, name: str) -> Host:
    validate_name("host", name)
    row = session.scalars(select(Host).where(Host.name == name)).one_or_none()
    if row is None:
        raise UnknownHost(f"no host {name!r} in the vault")
    return row


def vm(session: Session, name: str, *, for_update: bool = False) -> Vm:
    validate_name("VM", name)
    query = select(Vm).where(Vm.name == name)
    row = session.scalars(query.with_for_update() if for_update else query).one_or_none()
    if row is None:
        raise UnknownVm(f"no VM {name!r} in the vault")
    return row


def policy(session: Session, name: str) -> Policy:
    validate_name("policy", name)
    row = session.scalars(select(Policy).where(Policy.name == name)).one_or_none()
    if row is None:
        raise UnknownPolicy(f"no policy {name!r} in the vault")
    return row


def replicated(session: Session, vm_name: str, *, for_update: bool = False) -> ReplicatedVm:
    """The replicated VM of ``vm_name``; UnknownVm or VmNotProtected when there is none."""
    vm_row = vm(session, vm_name)
    query = select(ReplicatedVm).where(ReplicatedVm.vm_id == vm_row.id)
    row = session.scalars(query.with_for_update() if for_update else query).one_or_none()
    if row is None:
        raise VmNotProtected(f"VM {vm_name!r} is not protected")
    return row


def job(session: Session, job_id: str, *, for_update: bool = False) -> Job:
    key = checks.uuid_text("job id", job_id)
    row = session.get(Job, key, with_for_update=for_update, options=[selectinload(Job.tasks)])
    if row is None:
        raise UnknownJob(f"no job {key} in the vault")
    return row
