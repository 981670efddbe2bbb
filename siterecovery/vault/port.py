"""The vault port: what a host's work needs from the vault, typed, reachable two ways.

Every operation (enable protection, cycle, resync, reverse replication, disable protection,
failover and its follow-ups) is written once, as a service against :class:`VaultPort`
(DESIGN §2, "one core, two doors"). Two adapters implement it, and one conformance suite
(``tests/vault/test_port_conformance.py``) runs against both:

- :class:`LocalVaultPort` — the vault database opened in this process (the embedded default,
  and the vault's own tests);
- :class:`siterecovery.api.port.RemoteVaultPort` — the agents' API (``/v1/agent``) over
  pinned TLS with the host's credential.

A port is bound to one **host** and one agent **session** (a UUID naming this agent
process): leases are taken, extended and released under that session. Every method returns
the frozen records of :mod:`siterecovery.vault.records` (never JSON or ORM rows) and raises
the vault's errors (:mod:`siterecovery.vault.errors`, ``InputError``) the same way through
either adapter: a remote call rebuilds the error from the API's error body.

Reports the services send are small frozen types here: :class:`PointReport` (a recovery point
the store has published) and :class:`FailureReport` (a failed cycle or job step, already
classified by :func:`siterecovery.policies.retry.diagnose`). Where a failure moves the VM,
and when it is retried, is decided by the vault (:func:`record_failure`), never the caller.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from siterecovery.domain import Consistency, DiskSpec, ReplicationState
from siterecovery.errors import InputError, SiteRecoveryError
from siterecovery.policies.retry import Diagnosis, next_retry_at, state_after
from siterecovery.policies.states import ErrorClass
from siterecovery.vault import jobs, operations, points, service, work
from siterecovery.vault.db import Database
from siterecovery.vault.errors import Conflict
from siterecovery.vault.networks import MappingRecord, list_mappings
from siterecovery.vault.records import JobRecord, PointRecord, ReplicatedVmRecord, VmRecord
from siterecovery.vault.work import WorkItem

S = ReplicationState


@dataclass(frozen=True)
class PointReport:
    """A recovery point the replica store has published (its manifest is written)."""

    point_id: str
    created_at: datetime
    consistency: Consistency
    manifest_key: str
    bytes_shipped: int
    figures: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FailureReport:
    """A failed cycle or job step: the error text and its diagnosis (class, cause, resync)."""

    message: str
    error_class: ErrorClass
    cause: str
    resync: bool = False

    @classmethod
    def of(cls, diagnosis: Diagnosis, message: str) -> FailureReport:
        return cls(message[:4000], diagnosis.error_class, diagnosis.cause, diagnosis.resync)

    @property
    def diagnosis(self) -> Diagnosis:
        return Diagnosis(self.error_class, self.cause, self.resync)


@dataclass(frozen=True)
class DiscoveredVm:
    """A VM the host's hypervisor driver sees: its config (host-local keys included) and disks."""

    name: str
    config: Mapping[str, Any]
    disks: tuple[DiskSpec, ...]


@dataclass(frozen=True)
class Discovery:
    """What the vault did with a discovery report: VMs recorded, and refused ones with why."""

    registered: tuple[str, ...]
    refused: Mapping[str, str]


class VaultPort(Protocol):
    """The vault as one host's agent session sees it. See the module docstring."""

    host: str
    session: str

    def now(self) -> datetime:
        """The vault's clock (recorded with the heartbeat)."""
        ...

    def heartbeat(self) -> datetime:
        """Note that this host's agent is alive; the vault's time."""
        ...

    def report_vms(self, vms: Sequence[DiscoveredVm]) -> Discovery:
        """Record the VMs this host runs; a VM of another host is refused, not raised."""
        ...

    def claim(self, *, limit: int, lease_s: int) -> list[WorkItem]:
        """Lease up to ``limit`` pieces of due work of this host to this session."""
        ...

    def extend_lease(self, vm: str, *, lease_s: int) -> bool:
        """Keep this session's lease of ``vm``; False when it was lost (stop the work)."""
        ...

    def release_lease(self, vm: str) -> None:
        """End this session's lease of ``vm`` (nothing if it holds none)."""
        ...

    def vm(self, name: str) -> VmRecord:
        """The VM ``name`` of this host (or one it runs a failover of)."""
        ...

    def protection(self, vm: str) -> ReplicatedVmRecord:
        """The replicated VM of ``vm``; VmNotProtected when it is not protected."""
        ...

    def points(self, vm: str) -> list[PointRecord]:
        """Recorded recovery points of ``vm``, oldest first."""
        ...

    def latest_point(self, vm: str) -> PointRecord | None:
        """The newest recorded point of ``vm``, or None."""
        ...

    def network_mappings(self) -> list[MappingRecord]:
        """Source network → recovery and test networks."""
        ...

    def transition(self, vm: str, to_state: ReplicationState, reason: str) -> ReplicatedVmRecord:
        """Move ``vm`` to ``to_state``; InvalidTransition when the state machine forbids it."""
        ...

    def record_point(self, vm: str, point: PointReport, *, release: bool) -> ReplicatedVmRecord:
        """Record a published point of ``vm`` (a successful cycle); ``release`` ends the lease.

        Idempotent: a point recorded before (an answer lost to a restart) is not an error.
        """
        ...

    def record_failure(
        self, vm: str, failure: FailureReport, *, release: bool
    ) -> ReplicatedVmRecord:
        """Record a failure of ``vm``; the vault sets the retry time and moves the state."""
        ...

    def job(self, job_id: str) -> JobRecord:
        """The job ``job_id`` (of a VM of this host, or one it runs)."""
        ...

    def start_task(self, job_id: str, task: str) -> JobRecord: ...

    def update_task(
        self, job_id: str, task: str, *, progress: int, details: Mapping[str, Any]
    ) -> JobRecord: ...

    def finish_task(self, job_id: str, task: str, details: Mapping[str, Any]) -> JobRecord: ...

    def fail_task(self, job_id: str, task: str, error: str) -> JobRecord: ...

    def finish_job(self, job_id: str) -> JobRecord:
        """Mark the job succeeded and end this session's lease of its VM."""
        ...

    def release_job(self, job_id: str) -> JobRecord:
        """End this session's lease of a job's VM (its failure is already recorded)."""
        ...

    def hand_off(self, job_id: str, phase: str, details: Mapping[str, Any]) -> JobRecord:
        """Hand a planned failover to the other site's agent and end this session's lease."""
        ...


# ---- the vault's side of reports (shared by both doors) -----------------------------------


def record_failure(db: Database, /, *, vm: str, failure: FailureReport) -> ReplicatedVmRecord:
    """Record ``failure`` of ``vm``: error, class, one more attempt, the next retry time of
    the seed's backoff (recoverable, not resync), and the state it leads to
    (:func:`siterecovery.policies.retry.state_after`)."""
    current = service.get_protection(db, vm=vm)
    diagnosis = failure.diagnosis
    retry_at = None
    if diagnosis.recoverable and not diagnosis.resync:
        retry_at = next_retry_at(db.now(), current.attempts + 1)
    text = f"{failure.cause}: {failure.message}"[:4000]
    record = points.record_failure(
        db, vm=vm, error=text, error_class=failure.error_class, next_retry_at=retry_at
    )
    target = state_after(record.state, diagnosis)
    if target is None:
        return record
    return service.transition(db, vm=vm, to_state=target, reason=text[:500])


def record_point(db: Database, /, *, vm: str, point: PointReport) -> ReplicatedVmRecord:
    """Record ``point`` of ``vm`` unless it is recorded already (a retried report).

    An app-consistent point gets ``figures["app_consistent_at"]``, the vault's time, which
    the scheduler compares with the policy's app-consistent frequency.
    """
    latest = points.latest_point(db, vm=vm)
    if latest is not None and latest.point_id == point.point_id:
        return service.get_protection(db, vm=vm)
    figures = dict(point.figures)
    if point.consistency == Consistency.APP:
        figures["app_consistent_at"] = db.now().isoformat()
    with contextlib.suppress(Conflict):  # recorded by an earlier report whose answer was lost
        points.record_point(
            db, vm=vm, point_id=point.point_id, created_at=point.created_at,
            consistency=point.consistency, manifest_key=point.manifest_key,
            figures=figures, bytes_shipped=point.bytes_shipped,
        )  # fmt: skip
    return service.get_protection(db, vm=vm)


# ---- the local adapter ---------------------------------------------------------------------


class LocalVaultPort:
    """:class:`VaultPort` over the vault database opened in this process."""

    def __init__(self, db: Database, *, host: str, session: str) -> None:
        self.db = db
        self.host = host
        self.session = session

    def now(self) -> datetime:
        return self.db.now()

    def heartbeat(self) -> datetime:
        record = service.record_heartbeat(self.db, host=self.host)
        assert record.last_heartbeat is not None
        return record.last_heartbeat

    def report_vms(self, vms: Sequence[DiscoveredVm]) -> Discovery:
        return report_vms(self.db, host=self.host, vms=vms)

    def claim(self, *, limit: int, lease_s: int) -> list[WorkItem]:
        return work.claim_work(self.db, host=self.host, session=self.session, limit=limit,
                               lease_s=lease_s)  # fmt: skip

    def extend_lease(self, vm: str, *, lease_s: int) -> bool:
        until = work.extend_lease(self.db, host=self.host, session=self.session, vm=vm,
                                  lease_s=lease_s)  # fmt: skip
        return until is not None

    def release_lease(self, vm: str) -> None:
        work.release_lease(self.db, host=self.host, session=self.session, vm=vm)

    def vm(self, name: str) -> VmRecord:
        return service.get_vm(self.db, name=name)

    def protection(self, vm: str) -> ReplicatedVmRecord:
        return service.get_protection(self.db, vm=vm)

    def points(self, vm: str) -> list[PointRecord]:
        return points.list_points(self.db, vm=vm)

    def latest_point(self, vm: str) -> PointRecord | None:
        return points.latest_point(self.db, vm=vm)

    def network_mappings(self) -> list[MappingRecord]:
        return list_mappings(self.db)

    def transition(self, vm: str, to_state: ReplicationState, reason: str) -> ReplicatedVmRecord:
        return service.transition(self.db, vm=vm, to_state=to_state, reason=reason)

    def record_point(self, vm: str, point: PointReport, *, release: bool) -> ReplicatedVmRecord:
        record = record_point(self.db, vm=vm, point=point)
        if release:
            self.release_lease(vm)
        return record

    def record_failure(
        self, vm: str, failure: FailureReport, *, release: bool
    ) -> ReplicatedVmRecord:
        record = record_failure(self.db, vm=vm, failure=failure)
        if release:
            self.release_lease(vm)
        return record

    def job(self, job_id: str) -> JobRecord:
        return jobs.get_job(self.db, job=job_id)

    def start_task(self, job_id: str, task: str) -> JobRecord:
        return jobs.start_task(self.db, job=job_id, name=task)

    def update_task(
        self, job_id: str, task: str, *, progress: int, details: Mapping[str, Any]
    ) -> JobRecord:
        return jobs.update_task(self.db, job=job_id, name=task, progress=progress,
                                details=details)  # fmt: skip

    def finish_task(self, job_id: str, task: str, details: Mapping[str, Any]) -> JobRecord:
        return jobs.finish_task(self.db, job=job_id, name=task, details=details)

    def fail_task(self, job_id: str, task: str, error: str) -> JobRecord:
        return fail_task(self.db, job=job_id, task=task, error=error)

    def finish_job(self, job_id: str) -> JobRecord:
        done = jobs.finish_job(self.db, job=job_id)
        self._release_of(done)
        return done

    def release_job(self, job_id: str) -> JobRecord:
        record = jobs.get_job(self.db, job=job_id)
        self._release_of(record)
        return record

    def hand_off(self, job_id: str, phase: str, details: Mapping[str, Any]) -> JobRecord:
        done = operations.hand_off(self.db, job=job_id, phase=phase, details=dict(details))
        self._release_of(done)
        return done

    def _release_of(self, record: JobRecord) -> None:
        if record.vm is not None:
            self.release_lease(record.vm)


def fail_task(db: Database, /, *, job: str, task: str, error: str) -> JobRecord:
    """Fail ``task`` of ``job`` (the job fails). A failed *check prerequisites* of an enable
    protection job leaves the VM *unprotected* again: nothing was replicated yet, and
    ``protect`` works once the cause is fixed (DESIGN §4: every state has a way out)."""
    record = jobs.fail_task(db, job=job, name=task, error=error)
    vm = record.vm
    if record.kind == service.ENABLE_PROTECTION and vm is not None and (
        service.get_vm(db, name=vm).state == S.ENABLING_PROTECTION
    ):
        service.abandon_protection(db, vm=vm, reason=error)
    return record


def report_vms(db: Database, /, *, host: str, vms: Sequence[DiscoveredVm]) -> Discovery:
    """Record each VM ``host`` reports; an input or conflict error refuses that VM only."""
    registered: list[str] = []
    refused: dict[str, str] = {}
    for vm in vms:
        try:
            service.upsert_vm(db, host=host, name=vm.name, config=vm.config, disks=vm.disks)
            registered.append(vm.name)
        except SiteRecoveryError as exc:
            if not isinstance(exc, InputError) and exc.recoverable:
                raise
            refused[vm.name] = exc.message
    return Discovery(tuple(registered), refused)
