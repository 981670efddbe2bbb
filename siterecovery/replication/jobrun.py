"""Drive a vault job's named tasks from a service, through the vault port, resumably.

Usage::

    job = JobDriver(vault, item.job_id, on_change=show)
    details = job.run("check prerequisites", lambda task: {"disks": 2})
    job.run("start initial replication", copy, on_error=record_failure)
    job.finish()

Contract of :meth:`JobDriver.run`:

- a task the vault already shows *succeeded* (or *skipped*) is not run again: its recorded
  details are returned, so a job claimed again after an agent restart resumes where it
  stopped; a task left *running* by an earlier agent process is run again without a second
  start (every task body is safe to repeat: a recovery point exists only once its manifest is
  written, and state moves check the current state first);
- the body gets a :class:`TaskHandle` for progress, and returns the task's details;
- when the body raises, ``on_error(exc)`` (if given) runs first and may return details to
  show in the task (the error's class, attempts, next retry); then the task is failed with the
  error's message and hint, the job fails (remaining tasks skipped), and the exception
  propagates unchanged. With ``fail=False`` the task is left *running* with the error in its
  details instead (the hand-off of a planned failover: the other site fails it);
- every change is reported to ``on_change`` with the job's fresh record (a CLI draws it);
- before a task starts, a lost work lease (:meth:`cancel`) raises :class:`LeaseLost`: work
  whose lease was taken away stops at the next task boundary instead of racing the next holder.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from siterecovery.domain import JobState
from siterecovery.errors import SiteRecoveryError, VaultError
from siterecovery.vault import jobs
from siterecovery.vault.db import Database
from siterecovery.vault.port import VaultPort
from siterecovery.vault.records import JobRecord

JobListener = Callable[[JobRecord], None]
TaskBody = Callable[["TaskHandle"], Mapping[str, Any] | None]
ErrorHook = Callable[[BaseException], Mapping[str, Any] | None]
_DONE = frozenset({JobState.SUCCEEDED, JobState.SKIPPED})


class LeaseLost(VaultError):
    """The work's lease was taken away (it expired, or another session holds it)."""

    recoverable = True
    hint = "the vault hands the work out again; check the agent's connection to the vault"


class TaskHandle:
    """The running task, for progress reports."""

    def __init__(self, job: JobDriver, name: str) -> None:
        self._job = job
        self.name = name

    def progress(self, percent: int, details: Mapping[str, Any] | None = None) -> None:
        """Record ``percent`` (0-100, clamped) and merge ``details`` into the task's details."""
        record = self._job.vault.update_task(
            self._job.job_id, self.name, progress=max(0, min(100, int(percent))),
            details=dict(details or {}),
        )  # fmt: skip
        self._job.notify(record)


class JobDriver:
    """Drives one job of the vault through its tasks (see the module docstring)."""

    def __init__(
        self, vault: VaultPort, job_id: str, *, on_change: JobListener | None = None
    ) -> None:
        self.vault = vault
        self.job_id = job_id
        self.on_change = on_change
        self.record = vault.job(job_id)
        self._lost = threading.Event()

    def notify(self, record: JobRecord) -> None:
        self.record = record
        if self.on_change is not None:
            self.on_change(record)

    def cancel(self) -> None:
        """The lease was lost: the next task will not start (:class:`LeaseLost`)."""
        self._lost.set()

    def state_of(self, name: str) -> JobState:
        return self.record.task(name).state

    def run(
        self,
        name: str,
        body: TaskBody,
        *,
        on_error: ErrorHook | None = None,
        fail: bool = True,
        failed: list[str] | None = None,
    ) -> dict[str, Any]:
        """Run task ``name`` with ``body``; its details. See the module docstring."""
        task = self.record.task(name)
        if task.state in _DONE:
            return dict(task.details)
        if self._lost.is_set():
            raise LeaseLost(f"the lease of job {self.job_id} was lost before task {name!r}")
        if task.state == JobState.PENDING:
            self._start(name)
        try:
            details = dict(body(TaskHandle(self, name)) or {})
        except Exception as exc:
            self._failed(name, exc, on_error, fail=fail, failed=failed)
            raise
        self.notify(self.vault.finish_task(self.job_id, name, details))
        return details

    def fail(self, name: str, error: str) -> JobRecord:
        """Fail task ``name`` (pending or running): the job fails with ``error``."""
        self.notify(self.vault.fail_task(self.job_id, name, error))
        return self.record

    def finish(self) -> JobRecord:
        """Mark the job succeeded (every task must have succeeded) and end its lease."""
        self.notify(self.vault.finish_job(self.job_id))
        return self.record

    def release(self) -> JobRecord:
        """End the job's lease after a failure (already recorded on a task)."""
        return self.vault.release_job(self.job_id)

    def hand_off(self, phase: str, details: Mapping[str, Any]) -> JobRecord:
        """Hand the job to the other site's agent (``recovery`` / ``source-finish``)."""
        self.notify(self.vault.hand_off(self.job_id, phase, details))
        return self.record

    def _start(self, name: str) -> None:
        """Start task ``name``; tolerate a start the vault recorded but whose answer was lost
        (a client retrying through a vault restart sends it twice: the second finds it
        running)."""
        try:
            self.notify(self.vault.start_task(self.job_id, name))
        except SiteRecoveryError:
            self.record = self.vault.job(self.job_id)
            if self.state_of(name) != JobState.RUNNING:
                raise

    def _failed(
        self, name: str, exc: Exception, on_error: ErrorHook | None, *, fail: bool,
        failed: list[str] | None,
    ) -> None:  # fmt: skip
        extra = dict(on_error(exc) or {}) if on_error is not None else {}
        message = exc.describe() if isinstance(exc, SiteRecoveryError) else repr(exc)
        if not fail:
            extra["error"] = message[:4000]
            if failed is not None:
                failed.append(name)
        if extra:
            self.notify(self.vault.update_task(self.job_id, name, progress=0, details=extra))
        if fail:
            self.notify(self.vault.fail_task(self.job_id, name, message[:10_000]))


# ---- over the database directly (transitional) ------------------------------------------------
# The embedded failover and failback services still drive their jobs on the vault database;
# they move onto JobDriver and the port when they become the one recovery service.


class DbTaskHandle:
    """The running task, for progress reports and details."""

    def __init__(self, run: JobRun, name: str) -> None:
        self._run = run
        self.name = name
        self.details: dict[str, Any] = {}

    def progress(self, percent: int, details: Mapping[str, Any] | None = None) -> None:
        """Record ``percent`` (0-100, clamped) and merge ``details`` into the task's details."""
        self.details.update(details or {})
        record = jobs.update_task(
            self._run.db,
            job=self._run.job_id,
            name=self.name,
            progress=max(0, min(100, int(percent))),
            details=details,
        )
        self._run.notify(record)


class JobRun:
    """Drives one job of the vault through its tasks."""

    def __init__(self, db: Database, job_id: str, *, on_change: JobListener | None = None) -> None:
        self.db = db
        self.job_id = job_id
        self.on_change = on_change

    def notify(self, record: JobRecord) -> None:
        if self.on_change is not None:
            self.on_change(record)

    @contextmanager
    def task(self, name: str) -> Iterator[DbTaskHandle]:
        """Run the task ``name``: started on entry, succeeded on exit, failed on error."""
        self.notify(jobs.start_task(self.db, job=self.job_id, name=name))
        handle = DbTaskHandle(self, name)
        try:
            yield handle
        except BaseException as exc:
            message = exc.describe() if isinstance(exc, SiteRecoveryError) else repr(exc)
            self.notify(jobs.fail_task(self.db, job=self.job_id, name=name, error=message))
            raise
        self.notify(jobs.finish_task(self.db, job=self.job_id, name=name, details=handle.details))

    def finish(self) -> JobRecord:
        """Mark the job succeeded (every task must have succeeded)."""
        record = jobs.finish_job(self.db, job=self.job_id)
        self.notify(record)
        return record
