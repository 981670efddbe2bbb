"""Protection of a VM: the seed's *enable protection* job, then delta replication cycles.

This is the agent-side work of the primary host, bookkept in the vault:

``enable_protection(vm, policy)``
    runs the *enable protection* job and its four tasks, as in the seed: **check
    prerequisites** (QMP reachable, every disk can hold a persistent bitmap, the replica store
    answers), **create replication relationship** (the vault's relationship id names the
    VM's bitmaps), **start initial replication** (a full, point-in-time copy of every disk,
    while the changes made meanwhile are tracked for the first delta) and **finalize
    protection** (state *protected*).

``replicate(vm)``
    one delta cycle on top of the newest recovery point, recorded in the vault. A change log
    that cannot be trusted moves the VM to *resync required*; any other failure is recorded
    with its class (recoverable or not) and re-raised.

The VM's QMP socket path is host-local configuration kept in the vault's VM record under
``config["qmp"]``; everything else in ``config`` is the machine's description, replicated
into every recovery point so the recovery site can start the same machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from siterecovery.domain import DiskSpec, ReplicationState, validate_name
from siterecovery.errors import InputError, SiteRecoveryError
from siterecovery.hypervisor.errors import BitmapError
from siterecovery.hypervisor.tracking import ChangeTracker, discover_disks
from siterecovery.replication.engine import CycleResult, Progress, Replicator
from siterecovery.replication.jobrun import JobListener, JobRun
from siterecovery.store.manifest import PointManifest
from siterecovery.store.repository import ReplicaStore
from siterecovery.vault import points, service
from siterecovery.vault.db import Database
from siterecovery.vault.records import JobRecord, VmRecord
from siterecovery.vault.states import ErrorClass

S = ReplicationState
HOST_LOCAL_KEYS = ("qmp",)


class ProtectionService:
    """Enables protection and runs cycles for the VMs of one primary host."""

    def __init__(
        self,
        db: Database,
        store: ReplicaStore,
        run_dir: Path,
        *,
        on_job: JobListener | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.db = db
        self.store = store
        self.run_dir = run_dir
        self.on_job = on_job
        self.progress = progress

    # -- inventory -------------------------------------------------------------------------

    def register_vm(
        self, *, host: str, name: str, qmp_path: Path, config: dict[str, Any]
    ) -> VmRecord:
        """Record the VM reachable at ``qmp_path`` and its disks (as QEMU reports them)."""
        validate_name("VM", name)
        disks = [
            DiskSpec(d.name, d.size, node_name=d.node, path=d.filename, fmt=d.fmt)
            for d in discover_disks(qmp_path)
        ]
        if not disks:
            raise InputError(f"VM {name} has no writable disk to protect")
        full = {**config, "qmp": str(qmp_path)}
        full.setdefault("disks", [{"name": d.name, "size": d.size, "fmt": d.fmt} for d in disks])
        return service.upsert_vm(self.db, host=host, name=name, config=full, disks=disks)

    # -- protection ------------------------------------------------------------------------

    def enable_protection(self, vm: str, policy: str) -> tuple[JobRecord, CycleResult]:
        """Run the *enable protection* job; return the finished job and the initial cycle."""
        protection = service.protect(self.db, vm=vm, policy=policy)
        run = JobRun(self.db, protection.job.id, on_change=self.on_job)
        record = service.get_vm(self.db, name=vm)
        relationship = protection.replicated.relationship_id.replace("-", "")
        try:
            with run.task("check prerequisites") as task:
                task.progress(100, self._check_prerequisites(record))
            with run.task("create replication relationship") as task:
                tracker = self._tracker(record, relationship)
                task.progress(100, {"relationship_id": protection.replicated.relationship_id})
            service.transition(
                self.db, vm=vm, to_state=S.INITIAL_REPLICATION, reason="initial copy started"
            )
            with run.task("start initial replication") as task:
                result = self._run_cycle(record, tracker, None)
                task.progress(100, result.figures())
            with run.task("finalize protection"):
                service.transition(
                    self.db, vm=vm, to_state=S.PROTECTED, reason="initial replication complete"
                )
        except SiteRecoveryError as exc:
            self._fail(vm, exc)
            raise
        return run.finish(), result

    def replicate(self, vm: str) -> CycleResult:
        """Run one delta cycle of the protected ``vm`` and record its recovery point."""
        record = service.get_vm(self.db, name=vm)
        protection = service.get_protection(self.db, vm=vm)
        if protection.state != S.PROTECTED:
            raise InputError(
                f"VM {vm} is {protection.state}, not protected: no cycle runs",
                hint="see `siterecovery status VM` for what it needs",
            )
        latest = points.latest_point(self.db, vm=vm)
        if latest is None:
            raise InputError(f"VM {vm} has no recovery point to continue from")
        previous = self.store.load_point(vm, latest.point_id)
        tracker = self._tracker(record, protection.relationship_id.replace("-", ""))
        try:
            return self._run_cycle(record, tracker, previous)
        except SiteRecoveryError as exc:
            self._fail(vm, exc)
            raise

    # -- internals -------------------------------------------------------------------------

    def _tracker(self, record: VmRecord, relationship: str) -> ChangeTracker:
        return ChangeTracker(_qmp_path(record), self.run_dir / record.name, relationship)

    def _run_cycle(
        self, record: VmRecord, tracker: ChangeTracker, previous: PointManifest | None
    ) -> CycleResult:
        replicator = Replicator(
            tracker, self.store, record.name,
            vm_config=replica_config(record.config), progress=self.progress,
        )  # fmt: skip
        result = replicator.run_cycle(previous)
        points.record_point(
            self.db,
            vm=record.name,
            point_id=result.point.point_id,
            created_at=result.point.created_at,
            consistency=result.point.consistency,
            manifest_key=result.point.key,
            figures=result.figures(),
            bytes_shipped=result.bytes_shipped,
        )
        return result

    def _check_prerequisites(self, record: VmRecord) -> dict[str, Any]:
        disks = discover_disks(_qmp_path(record))
        unsupported = [d.name for d in disks if d.fmt != "qcow2"]
        if unsupported:
            raise InputError(
                f"disks {unsupported} of VM {record.name} are not qcow2: persistent change "
                "tracking needs qcow2 images",
                hint="convert them with `qemu-img convert -O qcow2` while the VM is off",
            )
        self.store.list_points(record.name)  # the store answers and its points load
        return {"disks": [d.name for d in disks], "store": self.store.url}

    def _fail(self, vm: str, exc: SiteRecoveryError) -> None:
        """Record a failure with its class; an untrusted change log means resync."""
        kind = ErrorClass.RECOVERABLE if exc.recoverable else ErrorClass.NON_RECOVERABLE
        points.record_failure(self.db, vm=vm, error=exc.describe(), error_class=kind)
        state = service.get_protection(self.db, vm=vm).state
        if isinstance(exc, BitmapError) and state == S.PROTECTED:
            service.transition(self.db, vm=vm, to_state=S.RESYNC_REQUIRED, reason=str(exc))
        elif state in (S.ENABLING_PROTECTION, S.INITIAL_REPLICATION) and not exc.recoverable:
            service.transition(self.db, vm=vm, to_state=S.ERROR, reason=str(exc))


def replica_config(config: dict[str, Any]) -> dict[str, Any]:
    """The VM description stored in recovery points: the config without host-local keys."""
    return {k: v for k, v in config.items() if k not in HOST_LOCAL_KEYS}


def _qmp_path(record: VmRecord) -> Path:
    qmp = record.config.get("qmp")
    if not qmp:
        raise InputError(
            f"VM {record.name} has no QMP socket recorded",
            hint="register the VM again with its QMP socket path",
        )
    return Path(str(qmp))

