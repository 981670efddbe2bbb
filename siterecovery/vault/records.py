"""What the vault service returns: frozen snapshots of its rows.

Callers (REST API, CLI, agents' handlers) never see ORM objects, so nothing they hold can
lazy-load or change the database. Times are aware UTC datetimes. JSON fields are copies made
by :func:`checks.stored_json` inside the service's transaction: the JSON an answer carries is
built before the commit, and a stored value beyond the vault's bounds is withheld rather than
breaking the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from siterecovery.domain import Consistency, Health, JobState, ReplicationState
from siterecovery.policies.states import ErrorClass
from siterecovery.vault import checks, models
from siterecovery.vault.models import SiteRole


@dataclass(frozen=True)
class SiteRecord:
    name: str
    role: SiteRole
    created_at: datetime

    @classmethod
    def of(cls, row: models.Site) -> SiteRecord:
        return cls(name=row.name, role=row.role, created_at=row.created_at)


@dataclass(frozen=True)
class HostRecord:
    name: str
    site: str
    last_heartbeat: datetime | None
    registered: bool
    """Whether the host holds a credential (the hash itself is never handed out)."""
    created_at: datetime

    @classmethod
    def of(cls, row: models.Host) -> HostRecord:
        return cls(
            name=row.name,
            site=row.site.name,
            last_heartbeat=row.last_heartbeat,
            registered=row.credential_hash is not None,
            created_at=row.created_at,
        )


@dataclass(frozen=True)
class DiskRecord:
    name: str
    size: int
    node_name: str
    path: str

    @classmethod
    def of(cls, row: models.Disk) -> DiskRecord:
        return cls(name=row.name, size=row.size, node_name=row.node_name, path=row.path)


@dataclass(frozen=True)
class VmRecord:
    """A VM, its disks (by name) and its protection state (*unprotected* if not protected)."""

    name: str
    host: str
    site: str
    config: dict[str, Any]
    disks: tuple[DiskRecord, ...]
    state: ReplicationState
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: models.Vm) -> VmRecord:
        state = row.replicated.state if row.replicated else ReplicationState.UNPROTECTED
        return cls(
            name=row.name,
            host=row.host.name,
            site=row.host.site.name,
            config=checks.stored_json(f"config of VM {row.name!r}", row.config),
            disks=tuple(DiskRecord.of(d) for d in sorted(row.disks, key=lambda d: d.name)),
            state=state,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )


@dataclass(frozen=True)
class PolicyRecord:
    name: str
    copy_frequency_s: int
    retention_h: int
    app_consistent_h: int
    resync_window: str
    encryption: bool
    bandwidth_work_mbps: int | None
    bandwidth_offhours_mbps: int | None
    created_at: datetime

    @classmethod
    def of(cls, row: models.Policy) -> PolicyRecord:
        return cls(
            name=row.name,
            copy_frequency_s=row.copy_frequency_s,
            retention_h=row.retention_h,
            app_consistent_h=row.app_consistent_h,
            resync_window=row.resync_window,
            encryption=row.encryption,
            bandwidth_work_mbps=row.bandwidth_work_mbps,
            bandwidth_offhours_mbps=row.bandwidth_offhours_mbps,
            created_at=row.created_at,
        )


@dataclass(frozen=True)
class ReplicatedVmRecord:
    """A protected VM: its state machine position, health and replication bookkeeping."""

    vm: str
    policy: str
    relationship_id: str
    state: ReplicationState
    state_reason: str
    state_changed_at: datetime
    health: Health
    health_reason: str
    last_point_id: str | None
    last_cycle_at: datetime | None
    last_error: str | None
    error_class: ErrorClass | None
    attempts: int
    next_retry_at: datetime | None
    resync_required_reason: str | None
    created_at: datetime

    @classmethod
    def of(cls, row: models.ReplicatedVm) -> ReplicatedVmRecord:
        return cls(
            vm=row.vm.name,
            policy=row.policy.name,
            relationship_id=row.relationship_id,
            state=row.state,
            state_reason=row.state_reason,
            state_changed_at=row.state_changed_at,
            health=row.health,
            health_reason=row.health_reason,
            last_point_id=row.last_point_id,
            last_cycle_at=row.last_cycle_at,
            last_error=row.last_error,
            error_class=row.error_class,
            attempts=row.attempts,
            next_retry_at=row.next_retry_at,
            resync_required_reason=row.resync_required_reason,
            created_at=row.created_at,
        )


@dataclass(frozen=True)
class TaskRecord:
    seq: int
    name: str
    state: JobState
    started_at: datetime | None
    ended_at: datetime | None
    progress: int
    error: str | None
    details: dict[str, Any]

    @classmethod
    def of(cls, row: models.JobTask) -> TaskRecord:
        return cls(
            seq=row.seq,
            name=row.name,
            state=row.state,
            started_at=row.started_at,
            ended_at=row.ended_at,
            progress=row.progress,
            error=row.error,
            details=checks.stored_json(f"details of task {row.name!r}", row.details),
        )


@dataclass(frozen=True)
class JobRecord:
    """A job and its tasks in run order. ``vm`` is None for jobs without a target VM."""

    id: str
    kind: str
    vm: str | None
    state: JobState
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    error: str | None
    progress: int
    details: dict[str, Any]
    tasks: tuple[TaskRecord, ...]

    def task(self, name: str) -> TaskRecord:
        """The task called ``name``; KeyError if the job has none."""
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(name)

    @classmethod
    def of(cls, row: models.Job) -> JobRecord:
        return cls(
            id=row.id,
            kind=row.kind,
            vm=row.vm.name if row.vm else None,
            state=row.state,
            created_at=row.created_at,
            started_at=row.started_at,
            ended_at=row.ended_at,
            error=row.error,
            progress=row.progress,
            details=checks.stored_json(f"details of job {row.id}", row.details),
            tasks=tuple(TaskRecord.of(t) for t in sorted(row.tasks, key=lambda t: t.seq)),
        )


@dataclass(frozen=True)
class PointRecord:
    """A recovery point of ``vm``; ``point_id`` is the replica store's id."""

    vm: str
    point_id: str
    created_at: datetime
    consistency: Consistency
    manifest_key: str
    bytes_shipped: int
    figures: dict[str, Any]

    @classmethod
    def of(cls, row: models.RecoveryPoint) -> PointRecord:
        return cls(
            vm=row.vm.name,
            point_id=row.point_id,
            created_at=row.created_at,
            consistency=row.consistency,
            manifest_key=row.manifest_key,
            bytes_shipped=row.bytes_shipped,
            figures=checks.stored_json(f"figures of point {row.point_id!r}", row.figures),
        )


@dataclass(frozen=True)
class Protection:
    """What :func:`siterecovery.vault.service.protect` made: the replicated VM and its job."""

    replicated: ReplicatedVmRecord
    job: JobRecord
