"""The embedded default's door: an operator's command runs the agent's own code, in-process.

With no vault API configured, siterecovery opens the vault database of the work directory
directly. Each operator verb then does exactly what the two processes of service mode would
do, in one process and through the same code:

1. the **vault side** records the request (``service.protect``, ``operations.request_resync``,
   ``operations.request_reverse``, ``service.unprotect``) — the function behind the API's
   operator route;
2. the work is **leased** to this process's agent session for the VM's own host
   (:func:`siterecovery.vault.work.lease_vm`), so a running ``agent run``/``up`` on the
   same vault never works on the VM at the same time;
3. the **agent side** runs it: the same service method the worker calls for claimed work
   (:class:`~siterecovery.replication.protection.ProtectionService` through a
   :class:`~siterecovery.vault.port.LocalVaultPort`), under the worker's lease keeping.

Only the door is local: there is no second implementation of any operation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from siterecovery.agent.worker import Worker
from siterecovery.domain import FailoverKind, ReplicationState
from siterecovery.errors import InputError, SiteRecoveryError
from siterecovery.policies.schedule import RESYNC_THRESHOLD
from siterecovery.recovery.errors import FailoverError
from siterecovery.recovery.failover import FailoverOptions, FailoverOutcome
from siterecovery.recovery.replica import DiskProgress, RecoveryHost, ReplicaRecord
from siterecovery.replication.engine import CycleResult, Progress
from siterecovery.replication.jobrun import JobDriver, JobListener
from siterecovery.replication.protection import discovered_vm
from siterecovery.replication.resync import ResyncResult
from siterecovery.store.repository import ReplicaStore
from siterecovery.vault import operations, service, work
from siterecovery.vault.db import Database
from siterecovery.vault.port import LocalVaultPort
from siterecovery.vault.records import JobRecord, ReplicatedVmRecord, VmRecord
from siterecovery.vault.work import WorkItem

S = ReplicationState
T = TypeVar("T")
#: The embedded door's lease: long enough that a slow initial copy is not handed to an agent
#: that runs beside it; the worker extends it every third of its length anyway.
LEASE_S = 600


class EmbeddedAgent:
    """Runs operator verbs in this process against the local vault (see the module doc)."""

    def __init__(
        self,
        db: Database,
        store: ReplicaStore,
        run_dir: Path,
        *,
        recovery_dir: Path | None = None,
        key_file: Path | None = None,
        accel: str = "tcg",
        on_job: JobListener | None = None,
        progress: Progress | None = None,
        resync_threshold: float = RESYNC_THRESHOLD,
        recovery_host: RecoveryHost | None = None,
    ) -> None:
        self.db = db
        self.store = store
        self.run_dir = run_dir
        self.recovery_dir = recovery_dir
        self.key_file = key_file
        self.accel = accel
        self.on_job = on_job
        self.progress = progress
        self.resync_threshold = resync_threshold
        self.recovery_host = recovery_host
        self.session = str(uuid.uuid4())
        self._workers: dict[str, Worker] = {}

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
        """Record the VM reachable at ``qmp_path`` on ``host`` (as its agent's discovery would).

        Refused by the vault (Conflict, nothing changes) when the VM is protected and this
        would re-point it at another VM (:func:`siterecovery.vault.service.upsert_vm`).
        """
        found = discovered_vm(name, qmp_path, config, qga_path)
        return service.upsert_vm(self.db, host=host, name=found.name, config=found.config,
                                 disks=found.disks)  # fmt: skip

    # -- protection ------------------------------------------------------------------------

    def enable_protection(self, vm: str, policy: str) -> tuple[JobRecord, CycleResult]:
        """Request protection of ``vm`` and run the enable protection job now; the finished
        job and the initial copy."""
        job = service.protect(self.db, vm=vm, policy=policy).job
        worker, item = self.lease(vm, job.id)
        with worker.leased(item) as driver:
            assert driver is not None
            result = worker.protection.enable_protection(item, driver)
        assert result is not None  # a new job always makes its initial copy
        return driver.record, result

    def replicate(self, vm: str) -> CycleResult:
        """One cycle of ``vm`` now (or the retried initial copy)."""
        worker, item = self.lease(vm, None)
        with worker.leased(item):
            return worker.protection.cycle(item)

    def require_resync(self, vm: str, reason: str) -> ReplicatedVmRecord:
        """Mark ``vm`` *resync required* (``store verify`` found damage); idempotent. The
        resync then runs in the policy's window, or now with :meth:`resync`."""
        current = service.get_protection(self.db, vm=vm)
        if current.state == S.RESYNC_REQUIRED:
            return current
        return service.transition(self.db, vm=vm, to_state=S.RESYNC_REQUIRED, reason=reason)

    def resync(
        self, vm: str, *, full: bool = False, reason: str = "requested by the operator"
    ) -> tuple[JobRecord, ResyncResult | None]:
        """Request a resync of ``vm`` and run it now; the finished job and its figures.

        An interrupted resync job is resumed instead; its result is None when that job had
        sent the blocks already (its figures are in the job's *compare and send blocks* task).
        """
        job = self._open_job(vm, operations.RESYNC)
        if job is None:
            job = operations.request_resync(self.db, vm=vm, reason=reason, full=full)
        worker, item = self.lease(vm, job.id)
        with worker.leased(item) as driver:
            assert driver is not None
            result = worker.protection.resync(item, driver)
        return driver.record, result

    def reverse_replicate(self, vm: str) -> tuple[JobRecord, ResyncResult]:
        """Request the reverse replication of ``vm`` (failback committed) and run it now."""
        job = operations.request_reverse(self.db, vm=vm)
        worker, item = self.lease(vm, job.id)
        with worker.leased(item) as driver:
            assert driver is not None
            result = worker.protection.reverse_replicate(item, driver)
        assert result is not None  # a new job always sends its blocks
        return driver.record, result

    def unprotect(self, vm: str) -> JobRecord:
        """Disable protection of ``vm`` and run the disable protection job now."""
        job = service.unprotect(self.db, vm=vm)
        worker, item = self.lease(vm, job.id)
        with worker.leased(item) as driver:
            assert driver is not None
            worker.protection.disable_protection(item, driver)
        return driver.record

    def run_job(self, job: JobRecord) -> JobRecord:
        """Run an open job of the vault (requested earlier) in this process to its end."""
        if job.vm is None:
            raise InputError(f"job {job.id} has no VM to run it for")
        worker, item = self.lease(job.vm, job.id)
        worker.run_or_raise(item)
        return JobDriver(worker.vault, job.id).record

    # -- internals -------------------------------------------------------------------------

    def worker_of(self, item: WorkItem) -> Worker:
        """The worker of the host of ``item``'s VM, on this process's agent session."""
        return self.worker_for(service.get_vm(self.db, name=item.vm).host)

    def lease(self, vm: str, job_id: str | None) -> tuple[Worker, WorkItem]:
        """Lease ``vm`` to this session for its open job ``job_id`` (or a cycle now); the
        worker of its host and the leased item."""
        host = service.get_vm(self.db, name=vm).host
        item = work.lease_vm(self.db, host=host, session=self.session, vm=vm, job_id=job_id,
                             lease_s=LEASE_S)  # fmt: skip
        return self.worker_for(host), item

    def worker_for(self, host: str) -> Worker:
        """The worker of ``host`` (one per host, kept: its failover service remembers the
        replica processes it started)."""
        worker = self._workers.get(host)
        if worker is None:
            port = LocalVaultPort(self.db, host=host, session=self.session)
            worker = self._workers[host] = Worker(
                port, self.store, self.run_dir, lease_s=LEASE_S, key_file=self.key_file,
                recovery_dir=self.recovery_dir, accel=self.accel, on_job=self.on_job,
                recovery_host=self.recovery_host, detach=False,
            )  # fmt: skip
        # What the door holds now (a caller may swap the store, e.g. new credentials).
        worker.protection.store = worker.recovery.store = self.store
        worker.protection.progress = self.progress
        worker.protection.resync_threshold = self.resync_threshold
        return worker

    def _open_job(self, vm: str, kind: str) -> JobRecord | None:
        """The open job of ``kind`` of ``vm`` (an interrupted one to finish), if any."""
        from siterecovery.vault import jobs

        for job in jobs.list_jobs(self.db, vm=vm, limit=20):
            if job.kind == kind and job.state in operations.OPEN:
                return job
        return None


class EmbeddedFailover:
    """Failover verbs of the embedded default: the request recorded in the local vault, then
    the recovery host's work (:class:`~siterecovery.recovery.failover.FailoverService`) run
    in this process, this host acting as the recovery host. A planned failover runs its
    three phases (source, recovery, source-finish) one after the other, as the two agents of
    service mode would."""

    def __init__(
        self,
        db: Database,
        store: ReplicaStore,
        recovery_dir: Path,
        *,
        key_file: Path | None = None,
        run_dir: Path | None = None,
        host: RecoveryHost | None = None,
        accel: str = "tcg",
        on_job: JobListener | None = None,
        progress: DiskProgress | None = None,
    ) -> None:
        self.db = db
        self.store = store
        self.progress = progress
        self.run_dir = run_dir or recovery_dir.parent / "run"
        self.agent = EmbeddedAgent(db, store, self.run_dir,
                                   recovery_dir=recovery_dir, key_file=key_file, accel=accel,
                                   on_job=on_job, recovery_host=host)  # fmt: skip
        self.host = self.agent.worker_for("embedded").recovery.host

    # -- the operations --------------------------------------------------------------------

    def test(self, vm: str, options: FailoverOptions | None = None) -> FailoverOutcome:
        """A drill: the replica starts on a throw-away overlay in the isolated network;
        replication keeps running. A failed check fails the job but keeps the drill for
        inspection (:class:`DrillCheckFailed`); :meth:`cleanup` removes it either way."""
        return self.failover(vm, FailoverKind.TEST, options or FailoverOptions())

    def planned(self, vm: str, options: FailoverOptions | None = None) -> FailoverOutcome:
        """Pause the source, ship a final cycle, start the replica from it: zero data loss."""
        return self.failover(vm, FailoverKind.PLANNED, options or FailoverOptions())

    def unplanned(
        self, vm: str, *, point_id: str | None = None, append: str | None = None,
        options: FailoverOptions | None = None,
    ) -> FailoverOutcome:  # fmt: skip
        """The primary is lost: start the replica from ``point_id`` (default: the newest)."""
        opts = options or FailoverOptions()
        opts = dataclasses.replace(opts, point=point_id or opts.point,
                                   append=append or opts.append)  # fmt: skip
        return self.failover(vm, FailoverKind.UNPLANNED, opts)

    def failover(self, vm: str, kind: FailoverKind, options: FailoverOptions) -> FailoverOutcome:
        """Request a failover of ``kind`` in the vault and run it here to its end."""
        point = None if kind == FailoverKind.PLANNED else options.point
        job = operations.request_failover(self.db, vm=vm, kind=kind, point=point,
                                          options=options.details())  # fmt: skip
        if kind != FailoverKind.PLANNED:
            outcome = self._run(vm, job.id, lambda w, i, d: w.recovery.failover(i, d))
            return _started(outcome, vm)
        self._run(vm, job.id, lambda w, i, d: w.recovery.source(
            i, d, lambda: w.protection.final_cycle(i).point.point_id))
        try:
            outcome = self._run(vm, job.id, lambda w, i, d: w.recovery.failover(i, d))
        except SiteRecoveryError:
            with contextlib.suppress(SiteRecoveryError):  # resumes the source, fails the job
                self._run(vm, job.id, lambda w, i, d: w.recovery.source_finish(i, d))
            raise
        finished = self._run(vm, job.id, lambda w, i, d: w.recovery.source_finish(i, d))
        started = _started(outcome, vm)
        started.job = finished
        return started

    def failover_many(
        self, vms: Sequence[str], kind: FailoverKind, options: FailoverOptions | None = None
    ) -> dict[str, FailoverOutcome | SiteRecoveryError]:
        """Fail several VMs over in parallel, at most ``host.max_parallel`` at a time. Each
        VM is its own job; one VM's failure does not stop the others."""
        opts = options or FailoverOptions()

        def one(vm: str) -> FailoverOutcome | SiteRecoveryError:
            try:
                return self.failover(vm, kind, opts)
            except SiteRecoveryError as exc:
                return exc

        with ThreadPoolExecutor(max_workers=max(1, self.host.max_parallel)) as pool:
            return dict(zip(vms, pool.map(one, vms), strict=True))

    def cleanup(self, vm: str) -> JobRecord:
        """End the drill of ``vm``: stop its replica, remove its files, back to protected."""
        job = operations.request_follow_up(self.db, vm=vm, kind=operations.CLEANUP)
        return self._run(vm, job.id, lambda w, i, d: w.recovery.cleanup(i, d))

    def change_point(self, vm: str, point: str) -> FailoverOutcome:
        """Restart the failed-over ``vm`` from another point; allowed until commit."""
        job = operations.request_follow_up(self.db, vm=vm, kind=operations.CHANGE_POINT,
                                           point=point)  # fmt: skip
        outcome = self._run(vm, job.id, lambda w, i, d: w.recovery.change_point(i, d))
        return _started(outcome, vm)

    def commit(self, vm: str) -> JobRecord:
        """Commit the failover: the replica is the VM now; its point can no longer change."""
        job = operations.request_follow_up(self.db, vm=vm, kind=operations.COMMIT)
        return self._run(vm, job.id, lambda w, i, d: w.recovery.commit(i, d))

    def replica(self, vm: str, *, test: bool = False) -> ReplicaRecord | None:
        """The record of ``vm``'s replica (its drill with ``test``), if any."""
        return self.agent.worker_for("embedded").recovery.replica(vm, test=test)

    def _run(self, vm: str, job_id: str, body: Callable[[Worker, WorkItem, JobDriver], T]) -> T:
        """Lease ``vm`` for its job ``job_id`` (its current phase) and run ``body``."""
        worker, item = self.agent.lease(vm, job_id)
        worker.recovery.progress = self.progress
        with worker.leased(item) as driver:
            assert driver is not None
            return body(worker, item, driver)


def _started(outcome: FailoverOutcome | None, vm: str) -> FailoverOutcome:
    if outcome is None:  # only a job resumed from another process has none
        raise FailoverError(f"the failover of VM {vm} was resumed: its replica was started "
                            "by another process", hint="see `siterecovery failover status VM`")
    return outcome
