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
    larger than the resync threshold, or one that cannot be trusted, moves the VM to *resync
    required*.

``resync(vm)``
    the *resynchronize* job: compare every block with the checksums the store holds, send
    the differing ones, publish a point, back to *protected* with a fresh change log.

Every failure goes through :meth:`ProtectionService.handle_failure`, the one place that
applies :func:`siterecovery.replication.retry.diagnose`: recoverable errors are recorded with
their attempt count and the next retry time of the backoff schedule (health *warning*);
non-recoverable ones move the VM to *error* (health *critical*, no retry); errors only a
resync can fix move it to *resync required*. The error is then re-raised. Times come from the
vault's clock (``db.now()``), which tests inject.

The VM's QMP socket path is host-local configuration kept in the vault's VM record under
``config["qmp"]``, and so is its guest agent socket (``config["qga"]``, optional); everything
else in ``config`` is the machine's description, replicated into every recovery point so the
recovery site can start the same machine.

Per cycle, from the VM's policy:

- **consistency**: when :func:`~siterecovery.replication.scheduler.app_consistent_due` says so
  (no app-consistent point in the last ``app_consistent_h`` hours) the guest's filesystems are
  frozen through its agent around the freezing transaction; a guest without an agent gets a
  crash-consistent point and a warning (in the point's figures and the log), not an error;
- **bandwidth**: the store is wrapped (``wrap_backend``) with the policy's work-hours or
  off-hours limit, whichever applies when the cycle starts;
- **powered-off VMs**: when the QMP monitor does not answer and the VM was shut down cleanly,
  its images are opened offline (:mod:`siterecovery.replication.offline`) for the cycle;
- **stale tracking**: the bitmap generation each point recorded must not go backwards.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from siterecovery.domain import Consistency, DiskSpec, ReplicationState, validate_name
from siterecovery.errors import InputError, SiteRecoveryError
from siterecovery.hypervisor.errors import QmpError, VmNotFound
from siterecovery.hypervisor.qmp import QmpSession
from siterecovery.hypervisor.tracking import ChangeTracker, Quiesce, discover_disks
from siterecovery.replication.engine import (
    CycleResult,
    Progress,
    Replicator,
    agent_quiesce,
    check_layout,
)
from siterecovery.replication.errors import ChangeLogTooLarge
from siterecovery.replication.jobrun import JobListener, JobRun, TaskHandle
from siterecovery.replication.offline import offline_tracker, powered_off
from siterecovery.replication.resync import Resyncer, ResyncResult
from siterecovery.replication.retry import Diagnosis, diagnose, next_retry_at
from siterecovery.replication.scheduler import (
    RESYNC_THRESHOLD,
    app_consistent_due,
    bandwidth_limit,
    over_threshold,
)
from siterecovery.store.manifest import PointManifest
from siterecovery.store.repair import DAMAGE_REASON
from siterecovery.store.repository import ReplicaStore
from siterecovery.store.wrappers import wrap_backend
from siterecovery.vault import jobs, points, service
from siterecovery.vault.db import Database
from siterecovery.vault.records import (
    JobRecord,
    PointRecord,
    PolicyRecord,
    ReplicatedVmRecord,
    VmRecord,
)
from siterecovery.vault.states import REPLICATING_STATES

S = ReplicationState
HOST_LOCAL_KEYS = ("qmp", "qga")

RESYNC = "resynchronize"
RESYNC_TASKS = ("prepare resync", "compare and send blocks", "finalize resync")
REVERSE = "reverse replication"
REVERSE_TASKS = ("prepare reverse replication", "compare and send blocks", "finalize protection")


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
        resync_threshold: float = RESYNC_THRESHOLD,
    ) -> None:
        if not 0 < resync_threshold <= 1:
            raise InputError(
                f"resync threshold {resync_threshold!r} is out of range",
                hint="give a fraction of the disk size in (0, 1], e.g. 0.5",
            )
        self.db = db
        self.store = store
        self.run_dir = run_dir
        self.on_job = on_job
        self.progress = progress
        self.resync_threshold = resync_threshold

    # -- inventory -------------------------------------------------------------------------

    def register_vm(
        self,
        *,
        host: str,
        name: str,
        qmp_path: Path,
        config: dict[str, Any],
        qga_path: Path | None = None,
    ) -> VmRecord:
        """Record the VM reachable at ``qmp_path`` and its disks (as QEMU reports them).

        ``qga_path`` is the host side of its guest agent port, if it has one (app-consistent
        points need it).
        """
        validate_name("VM", name)
        disks = [
            DiskSpec(d.name, d.size, node_name=d.node, path=d.filename, fmt=d.fmt)
            for d in discover_disks(qmp_path)
        ]
        if not disks:
            raise InputError(f"VM {name} has no writable disk to protect")
        full = {**config, "qmp": str(qmp_path)}
        if qga_path is not None:
            full["qga"] = str(qga_path)
        full.setdefault("disks", [{"name": d.name, "size": d.size, "fmt": d.fmt} for d in disks])
        return service.upsert_vm(self.db, host=host, name=name, config=full, disks=disks)

    # -- protection ------------------------------------------------------------------------

    def enable_protection(self, vm: str, policy: str) -> tuple[JobRecord, CycleResult]:
        """Run the *enable protection* job; return the finished job and the initial cycle."""
        protection = service.protect(self.db, vm=vm, policy=policy)
        run = JobRun(self.db, protection.job.id, on_change=self.on_job)
        record = service.get_vm(self.db, name=vm)
        relationship = protection.replicated.relationship_id.replace("-", "")
        with self._task(run, "check prerequisites", vm) as task:
            task.progress(100, self._check_prerequisites(record))
        with self._task(run, "create replication relationship", vm) as task:
            tracker = self._tracker(record, relationship)
            task.progress(100, {"relationship_id": protection.replicated.relationship_id})
        with self._task(run, "start initial replication", vm) as task:
            service.transition(
                self.db, vm=vm, to_state=S.INITIAL_REPLICATION, reason="initial copy started"
            )
            result = self._run_cycle(record, tracker, None, policy=protection.replicated.policy)
            task.progress(100, result.figures())
        with self._task(run, "finalize protection", vm):
            service.transition(
                self.db, vm=vm, to_state=S.PROTECTED, reason="initial replication complete"
            )
        return run.finish(), result

    def retry_initial(self, vm: str) -> CycleResult:
        """Retry the initial copy of a VM whose *enable protection* job failed recoverably."""
        record = service.get_vm(self.db, name=vm)
        protection = self._require_state(vm, {S.INITIAL_REPLICATION}, "retry its initial copy")
        tracker = self._tracker(record, protection.relationship_id.replace("-", ""))
        try:
            result = self._run_cycle(record, tracker, None, policy=protection.policy)
            service.transition(
                self.db, vm=vm, to_state=S.PROTECTED, reason="initial replication complete"
            )
        except Exception as exc:
            self.handle_failure(vm, exc)
            raise
        return result

    def replicate(self, vm: str) -> CycleResult:
        """Run one delta cycle of the protected ``vm`` and record its recovery point."""
        record = service.get_vm(self.db, name=vm)
        # Replication never stops for a drill (DESIGN §5): cycles run during a test failover.
        protection = self._require_state(vm, {S.PROTECTED, S.TEST_FAILOVER_RUNNING}, "run a cycle")
        latest = points.latest_point(self.db, vm=vm)
        if latest is None:
            raise InputError(f"VM {vm} has no recovery point to continue from")
        try:
            previous = self.store.load_point(vm, latest.point_id)
            relationship = protection.relationship_id.replace("-", "")
            generation = latest.figures.get("generation")
            with self._open_tracker(record, relationship) as tracker:
                check_layout(tracker.disks(), previous)  # before the change log: a new disk
                self._check_change_log(tracker)  # has none, which is not a lost one
                return self._run_cycle(
                    record, tracker, previous, policy=protection.policy,
                    min_generation=generation if isinstance(generation, int) else None,
                )  # fmt: skip
        except Exception as exc:
            self.handle_failure(vm, exc)
            raise

    # -- resync ----------------------------------------------------------------------------

    def require_resync(self, vm: str, reason: str) -> ReplicatedVmRecord:
        """Mark ``vm`` *resync required* (e.g. ``store verify`` found damage); idempotent.

        Allowed from *protected*, *error* and *resync required*; the resync then runs in the
        policy's window (or now with :meth:`resync`).
        """
        current = service.get_protection(self.db, vm=vm)
        if current.state == S.RESYNC_REQUIRED:
            return current
        return service.transition(self.db, vm=vm, to_state=S.RESYNC_REQUIRED, reason=reason)

    def resync(
        self, vm: str, *, full: bool = False, reason: str = "requested by the operator"
    ) -> tuple[JobRecord, ResyncResult]:
        """Run the *resynchronize* job now; return the finished job and the resync figures.

        A *protected* or *error* VM is first marked *resync required* with ``reason``; an
        interrupted resync (state *resyncing*) is started again. ``full`` ignores the
        checksums the store holds and copies every disk into a new base (use it when the
        replica data itself is damaged).
        """
        self._enter_resync_required(vm, reason)
        pending = service.get_protection(self.db, vm=vm).resync_required_reason or reason
        full = full or pending.startswith(DAMAGE_REASON)  # damaged replica: copy whole
        record = service.get_vm(self.db, name=vm)
        job = jobs.create_job(
            self.db, kind=RESYNC, vm=vm, tasks=RESYNC_TASKS, details={"reason": reason}
        )
        run = JobRun(self.db, job.id, on_change=self.on_job)
        with self._task(run, "prepare resync", vm) as task:
            protection = service.get_protection(self.db, vm=vm)
            relationship = protection.relationship_id.replace("-", "")
            previous = None if full else self._previous_point(vm)
            service.transition(self.db, vm=vm, to_state=S.RESYNCING, reason=reason)
            task.progress(100, {
                "compare_with": previous.point_id if previous else None, "full": previous is None,
            })  # fmt: skip
        with self._task(run, "compare and send blocks", vm) as task:
            store = self._store_for(service.get_policy(self.db, name=protection.policy))
            with self._open_tracker(record, relationship, resync=True) as tracker:
                record = self._refresh_disks(record, tracker)
                resyncer = Resyncer(
                    tracker, store, vm,
                    vm_config=replica_config(record.config), progress=self.progress,
                )  # fmt: skip
                result = resyncer.run(previous)
            task.progress(100, result.figures())
        with self._task(run, "finalize resync", vm):
            self._record(vm, result.point, result.figures(), result.bytes_stored)
            service.transition(self.db, vm=vm, to_state=S.PROTECTED, reason="resync complete")
        return run.finish(), result

    def reverse_replicate(self, vm: str) -> tuple[JobRecord, ResyncResult]:
        """Run the *reverse replication* job of a VM whose failback is committed.

        The primary VM runs again on disks that now hold the replica's data; its old change
        log cannot describe that, so tracking starts afresh (a new bitmap, as a resync does)
        and every block is compared with the checksums of the newest recovery point: only
        differences ship. The new point is recorded and the VM is *protected* again.
        """
        self._require_state(vm, {S.COMMITTED_BACK}, "start reverse replication")
        record = service.get_vm(self.db, name=vm)
        job = jobs.create_job(self.db, kind=REVERSE, vm=vm, tasks=REVERSE_TASKS)
        run = JobRun(self.db, job.id, on_change=self.on_job)
        with self._task(run, "prepare reverse replication", vm) as task:
            protection = service.get_protection(self.db, vm=vm)
            relationship = protection.relationship_id.replace("-", "")
            previous = self._previous_point(vm)
            service.transition(
                self.db, vm=vm, to_state=S.REVERSE_REPLICATING, reason="failback committed"
            )
            task.progress(100, {"compare_with": previous.point_id if previous else None})
        with self._task(run, "compare and send blocks", vm) as task:
            store = self._store_for(service.get_policy(self.db, name=protection.policy))
            with self._open_tracker(record, relationship, resync=True) as tracker:
                record = self._refresh_disks(record, tracker)
                resyncer = Resyncer(
                    tracker, store, vm,
                    vm_config=replica_config(record.config), progress=self.progress,
                )  # fmt: skip
                result = resyncer.run(previous)
            task.progress(100, result.figures())
        with self._task(run, "finalize protection", vm):
            self._record(vm, result.point, result.figures(), result.bytes_stored)
            service.transition(
                self.db, vm=vm, to_state=S.PROTECTED, reason="reverse replication complete"
            )
        return run.finish(), result

    def _enter_resync_required(self, vm: str, reason: str) -> None:
        state = service.get_protection(self.db, vm=vm).state
        if state in (S.PROTECTED, S.ERROR, S.RESYNCING):
            service.transition(self.db, vm=vm, to_state=S.RESYNC_REQUIRED, reason=reason)
        elif state != S.RESYNC_REQUIRED:
            raise InputError(
                f"VM {vm} is {state}: it cannot be resynchronized now",
                hint="resync a VM that is protected, in error or resync required",
            )

    def _previous_point(self, vm: str) -> PointManifest | None:
        """The newest recovery point to compare with, or None (full copy) if there is none."""
        latest = points.latest_point(self.db, vm=vm)
        return None if latest is None else self.store.load_point(vm, latest.point_id)

    # -- failures --------------------------------------------------------------------------

    def handle_failure(self, vm: str, exc: BaseException) -> Diagnosis:
        """Record ``exc`` for ``vm`` as the retry rules say, and move its state if needed.

        Recoverable: one more attempt, next retry on the backoff schedule. Resync: *resync
        required*. Non-recoverable: *error* (from a replicating state). Returns the diagnosis.
        """
        diagnosis = diagnose(exc)
        current = service.get_protection(self.db, vm=vm)
        text = _error_text(diagnosis, exc)
        retry_at = None
        if diagnosis.recoverable and not diagnosis.resync:
            retry_at = next_retry_at(self.db.now(), current.attempts + 1)
        points.record_failure(
            self.db, vm=vm, error=text, error_class=diagnosis.error_class, next_retry_at=retry_at
        )
        target = _state_after(current.state, diagnosis)
        if target is not None:
            service.transition(self.db, vm=vm, to_state=target, reason=text)
        return diagnosis

    @contextmanager
    def _task(self, run: JobRun, name: str, vm: str) -> Iterator[TaskHandle]:
        """A job task whose failure is handled (and shown in the task) before it propagates."""
        with run.task(name) as task:
            try:
                yield task
            except Exception as exc:
                diagnosis = self.handle_failure(vm, exc)
                after = service.get_protection(self.db, vm=vm)
                task.progress(0, {
                    "error_class": str(diagnosis.error_class), "cause": diagnosis.cause,
                    "attempts": after.attempts, "next_retry_at": _iso(after.next_retry_at),
                    "state": str(after.state),
                })  # fmt: skip
                raise

    # -- internals -------------------------------------------------------------------------

    def _tracker(self, record: VmRecord, relationship: str) -> ChangeTracker:
        qmp = _qmp_path(record)
        if not qmp.exists():
            raise self._missing(record, qmp)
        return ChangeTracker(qmp, self.run_dir / record.name, relationship)

    @contextmanager
    def _open_tracker(
        self, record: VmRecord, relationship: str, *, resync: bool = False
    ) -> Iterator[ChangeTracker]:
        """The VM's tracker: over its running QEMU, or over its images when it is powered
        off cleanly (:mod:`~siterecovery.replication.offline`). A resync of a powered-off VM
        needs no clean bitmap (it starts a new one), only images nobody has open.

        Raises the QMP error ("VM not reachable", retried) when QEMU does not answer and the
        VM was not shut down cleanly, VmNotFound when neither QEMU nor its images are there.
        """
        qmp = _qmp_path(record)
        try:
            QmpSession.connect(qmp).close()
        except QmpError:
            # powered_off raises VmNotFound when the images are gone too (a deleted VM).
            if not (resync or powered_off(record, relationship)):
                if not qmp.exists():
                    raise self._missing(record, qmp) from None
                raise
            with offline_tracker(record, relationship, self.run_dir / record.name) as tracker:
                yield tracker
            return
        yield ChangeTracker(qmp, self.run_dir / record.name, relationship)

    def _refresh_disks(self, record: VmRecord, tracker: ChangeTracker) -> VmRecord:
        """Record the disks the running VM has now (added, removed or resized ones), in the
        vault's disk list and in the machine description the recovery points carry."""
        if tracker.nodes is not None:
            return record  # offline: the images are the recorded ones
        found = tracker.disks()
        now = {d.name: d.size for d in found}
        if now == {d.name: d.size for d in record.disks}:
            return record
        config = dict(record.config)
        config["disks"] = [{"name": d.name, "size": d.size, "fmt": d.fmt} for d in found]
        specs = [DiskSpec(d.name, d.size, node_name=d.node, path=d.filename, fmt=d.fmt)
                 for d in found]  # fmt: skip
        return service.upsert_vm(
            self.db, host=record.host, name=record.name, config=config, disks=specs
        )

    @staticmethod
    def _missing(record: VmRecord, qmp: Path) -> VmNotFound:
        return VmNotFound(
            f"VM {record.name} not found on this host: its QMP socket {qmp} does not exist",
            hint="if the VM was deleted, disable protection; if it was moved or only shut "
            "down, start it (or register it again), then run `siterecovery resync VM`",
        )

    def _run_cycle(
        self,
        record: VmRecord,
        tracker: ChangeTracker,
        previous: PointManifest | None,
        *,
        policy: str,
        min_generation: int | None = None,
    ) -> CycleResult:
        rules = service.get_policy(self.db, name=policy)
        warnings: list[str] = []
        store = self._store_for(rules)
        replicator = Replicator(
            tracker, store, record.name,
            vm_config=replica_config(record.config), progress=self.progress,
        )  # fmt: skip
        quiesce = self._quiesce(record, rules, warnings)
        result = replicator.run_cycle(previous, quiesce=quiesce, min_generation=min_generation)
        result = dataclasses.replace(result, warnings=tuple(warnings))
        figures = {**result.figures(), "bandwidth_limit_bps": _limit_of(store, self.store)}
        if result.consistency == Consistency.APP:
            # On the vault's clock, which app_consistent_due compares with (tests inject it).
            figures["app_consistent_at"] = self.db.now().isoformat()
        self._record(record.name, result.point, figures, result.bytes_shipped)
        return result

    def _quiesce(
        self, record: VmRecord, policy: PolicyRecord, warnings: list[str]
    ) -> Quiesce | None:
        """The guest agent's freeze when the policy wants an app-consistent point now."""
        last_app = max(
            (_app_time(p) for p in points.list_points(self.db, vm=record.name)
             if p.consistency == Consistency.APP),
            default=None,
        )  # fmt: skip
        if not app_consistent_due(policy.app_consistent_h, last_app, self.db.now()):
            return None
        qga = record.config.get("qga")
        return agent_quiesce(Path(str(qga)) if qga else None, warnings)

    def _store_for(self, policy: PolicyRecord) -> ReplicaStore:
        """The store, throttled to the policy's bandwidth limit for this time of day."""
        limit = bandwidth_limit(
            policy.resync_window, policy.bandwidth_work_mbps, policy.bandwidth_offhours_mbps,
            self.db.now(),
        )  # fmt: skip
        return self.store if limit is None else throttled_store(self.store, limit)

    def _record(
        self, vm: str, point: PointManifest, figures: dict[str, Any], bytes_shipped: int
    ) -> None:
        points.record_point(
            self.db, vm=vm, point_id=point.point_id, created_at=point.created_at,
            consistency=point.consistency, manifest_key=point.key, figures=figures,
            bytes_shipped=bytes_shipped,
        )  # fmt: skip

    def _check_change_log(self, tracker: ChangeTracker) -> None:
        """Raise :class:`ChangeLogTooLarge` when a disk's pending change passes the threshold."""
        sizes = {d.name: d.size for d in tracker.disks()}
        pending = tracker.pending_bytes()
        over = over_threshold(pending, sizes, self.resync_threshold)
        if over:
            shares = ", ".join(f"{d} {pending[d] / sizes[d]:.0%}" for d in over)
            raise ChangeLogTooLarge(
                f"pending change over {self.resync_threshold:.0%} of the disk size: {shares}"
            )

    def _require_state(
        self, vm: str, states: set[ReplicationState], operation: str
    ) -> ReplicatedVmRecord:
        protection = service.get_protection(self.db, vm=vm)
        if protection.state not in states:
            raise InputError(
                f"VM {vm} is {protection.state}: cannot {operation}",
                hint="see `siterecovery status VM` for what it needs",
            )
        return protection

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


def throttled_store(store: ReplicaStore, limit_bps: float) -> ReplicaStore:
    """A view of ``store`` whose backend is limited to ``limit_bps`` bytes per second.

    Shares everything else (codec, keys, parallelism, what the store already knows). The
    store has no public constructor from another opened store, so the copy swaps the backend
    of its context here.
    """
    backend = wrap_backend(store.backend, retry=None, limit_bps=limit_bps)
    view = copy.copy(store)
    view.backend = backend
    view._ctx = dataclasses.replace(store.context, backend=backend)
    return view


def _app_time(point: PointRecord) -> datetime:
    """When an app-consistent point was taken, on the vault's clock."""
    raw = point.figures.get("app_consistent_at")
    return datetime.fromisoformat(raw) if isinstance(raw, str) else point.created_at


def _limit_of(store: ReplicaStore, unthrottled: ReplicaStore) -> float | None:
    bucket = getattr(store.backend, "bucket", None)
    return None if store is unthrottled or bucket is None else float(bucket.rate)


def replica_config(config: dict[str, Any]) -> dict[str, Any]:
    """The VM description stored in recovery points: the config without host-local keys."""
    return {k: v for k, v in config.items() if k not in HOST_LOCAL_KEYS}


def _state_after(state: ReplicationState, diagnosis: Diagnosis) -> ReplicationState | None:
    """The state a failure moves a VM to (None: it stays), per the module docstring."""
    if diagnosis.resync and state in REPLICATING_STATES | {S.ERROR}:
        return S.RESYNC_REQUIRED
    if not diagnosis.recoverable and state in REPLICATING_STATES | {S.ENABLING_PROTECTION}:
        return S.ERROR
    if state == S.RESYNCING:
        return S.RESYNC_REQUIRED  # a recoverable resync failure: retried in the window
    return None


def _error_text(diagnosis: Diagnosis, exc: BaseException) -> str:
    detail = exc.describe() if isinstance(exc, SiteRecoveryError) else f"{exc!r}"
    return f"{diagnosis.cause}: {detail}"[:4000]


def _iso(value: Any) -> str | None:
    return None if value is None else str(value.isoformat())


def _qmp_path(record: VmRecord) -> Path:
    qmp = record.config.get("qmp")
    if not qmp:
        raise InputError(
            f"VM {record.name} has no QMP socket recorded",
            hint="register the VM again with its QMP socket path",
        )
    return Path(str(qmp))
