"""The agent's worker: a claimed piece of work → the one service that does it → the report.

The worker is thin on purpose (DESIGN §2, "one core, two doors"): it picks the service method
for the work's kind, keeps the work's lease alive while it runs, and makes sure every outcome
reaches the vault. The services (:class:`~siterecovery.replication.protection.ProtectionService`,
:class:`~siterecovery.recovery.failover.FailoverService`) do the work and report through the
same :class:`~siterecovery.vault.port.VaultPort` whichever door leased it: ``agent run`` over
the API, or the embedded commands over the local database.

=============================  =============================================================
work kind                      service
=============================  =============================================================
cycle                          ``protection.cycle`` (or the retried initial copy)
enable / disable protection    ``protection.enable_protection`` / ``disable_protection``
resynchronize                  ``protection.resync``
reverse replication            ``protection.reverse_replicate``
planned failover, source       ``recovery.source`` with ``protection.final_cycle``, then
phases                         ``recovery.source_finish`` (the VM's own host)
test / planned / unplanned     ``recovery.failover`` (recovery hosts)
failover
cleanup, change point, commit  ``recovery.cleanup`` / ``change_point`` / ``commit``
=============================  =============================================================

A lease the vault no longer confirms (it expired, or another session took the VM) cancels the
job at its next task (:class:`~siterecovery.replication.jobrun.LeaseLost`) instead of racing
the new holder.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from siterecovery.domain import JobKind
from siterecovery.errors import InputError, SiteRecoveryError
from siterecovery.recovery.failover import FailoverService
from siterecovery.recovery.replica import DiskProgress, RecoveryHost
from siterecovery.replication.engine import Progress
from siterecovery.replication.jobrun import JobDriver, JobListener
from siterecovery.replication.protection import ProtectionService
from siterecovery.store.repository import ReplicaStore
from siterecovery.vault.port import VaultPort
from siterecovery.vault.work import CYCLE, WorkItem

log = logging.getLogger("siterecovery.agent")

FAILOVER_KINDS = frozenset({JobKind.TEST_FAILOVER, JobKind.PLANNED_FAILOVER,
                            JobKind.UNPLANNED_FAILOVER})  # fmt: skip


class Worker:
    """Runs the work one agent session claimed (or the embedded door leased)."""

    def __init__(
        self,
        vault: VaultPort,
        store: ReplicaStore,
        run_dir: Path,
        *,
        lease_s: int,
        key_file: Path | None = None,
        recovery_dir: Path | None = None,
        accel: str = "tcg",
        on_job: JobListener | None = None,
        progress: Progress | None = None,
        recovery_host: RecoveryHost | None = None,
        disk_progress: DiskProgress | None = None,
        detach: bool = True,
    ) -> None:
        self.vault = vault
        self.lease_s = lease_s
        self.on_job = on_job
        self.protection = ProtectionService(vault, store, run_dir, on_job=on_job,
                                            progress=progress)  # fmt: skip
        # Any host can be given failover work: the vault gives it only to recovery hosts.
        self.recovery = FailoverService(vault, store, recovery_dir or run_dir.parent / "recovery",
                                        key_file=key_file, host=recovery_host,
                                        accel=accel, progress=disk_progress,
                                        detach=detach)  # fmt: skip

    def run(self, item: WorkItem) -> None:
        """Run ``item`` to its end; every outcome is reported to the vault, none raised."""
        try:
            self.run_or_raise(item)
        except SiteRecoveryError as exc:
            log.warning("%s of VM %s failed: %s", item.kind, item.vm, exc.describe())
        except Exception:  # a bug: logged with its traceback; the agent goes on
            log.exception("%s of VM %s failed unexpectedly", item.kind, item.vm)

    def run_or_raise(self, item: WorkItem) -> None:
        """Run ``item``; its failure (already reported to the vault) is raised to the caller.
        The lease ends either way."""
        with self.leased(item) as job:
            self._dispatch(item, job)

    @contextmanager
    def leased(self, item: WorkItem) -> Iterator[JobDriver | None]:
        """The item's job driver (None for a cycle) while its lease is kept alive; on a
        failure the lease is ended before the error propagates."""
        job = None if item.job_id is None else JobDriver(self.vault, item.job_id,
                                                         on_change=self.on_job)  # fmt: skip
        with self._keep_lease(item, job):
            try:
                yield job
            except BaseException:
                self._release(item)
                raise

    def _dispatch(self, item: WorkItem, job: JobDriver | None) -> None:
        if item.kind == CYCLE or job is None:
            self.protection.cycle(item)
            return
        handler = self._handlers().get(JobKind(item.kind))
        if handler is None:
            raise InputError(f"this agent does not run {item.kind!r} work",
                             hint="upgrade the agent to the vault's version")  # fmt: skip
        handler(item, job)

    def _handlers(self) -> dict[JobKind, Callable[[WorkItem, JobDriver], object]]:
        p, r = self.protection, self.recovery
        return {
            JobKind.ENABLE_PROTECTION: p.enable_protection,
            JobKind.DISABLE_PROTECTION: p.disable_protection,
            JobKind.RESYNC: p.resync,
            JobKind.REVERSE_REPLICATION: p.reverse_replicate,
            JobKind.TEST_FAILOVER: self._failover,
            JobKind.PLANNED_FAILOVER: self._failover,
            JobKind.UNPLANNED_FAILOVER: self._failover,
            JobKind.FAILOVER_CLEANUP: r.cleanup,
            JobKind.CHANGE_POINT: r.change_point,
            JobKind.COMMIT_FAILOVER: r.commit,
        }

    def _failover(self, item: WorkItem, job: JobDriver) -> object:
        """A failover job: its source phases here (planned), the rest on a recovery host."""
        phase = item.details.get("phase")
        if phase == "source-finish":
            return self.recovery.source_finish(item, job)
        if phase == "source":
            self.recovery.source(item, job,
                                 lambda: self.protection.final_cycle(item).point.point_id)
            return None
        return self.recovery.failover(item, job)

    def _release(self, item: WorkItem) -> None:
        """End the lease after a failure (idempotent: a report may have ended it)."""
        with contextlib.suppress(SiteRecoveryError):
            if item.job_id is not None:
                self.vault.release_job(item.job_id)
            else:
                self.vault.release_lease(item.vm)

    @contextmanager
    def _keep_lease(self, item: WorkItem, job: JobDriver | None) -> Iterator[None]:
        """Extend the VM's lease every third of its length while the work runs; a lease the
        vault does not confirm cancels the job at its next task."""
        done = threading.Event()

        def keep() -> None:
            while not done.wait(self.lease_s / 3):
                try:
                    held = self.vault.extend_lease(item.vm, lease_s=self.lease_s)
                except SiteRecoveryError as exc:
                    log.warning("could not extend the lease of VM %s: %s", item.vm, exc)
                    continue
                if not held:
                    log.error("the lease of VM %s was lost: its %s stops at the next task",
                              item.vm, item.kind)  # fmt: skip
                    if job is not None:
                        job.cancel()
                    return

        thread = threading.Thread(target=keep, name=f"lease-{item.vm}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
