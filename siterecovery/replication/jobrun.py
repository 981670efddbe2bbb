"""Run a vault job's named tasks from code, recording each task's start, progress and end.

Usage::

    run = JobRun(db, job.id, on_change=show)
    with run.task("check prerequisites") as task:
        ...
        task.progress(50, {"disks": 2})
    run.finish()

Contract: a task that raises is recorded as failed with the error's message (and hint), the
job fails and its remaining tasks are skipped; the exception then propagates unchanged. Every
change is reported to ``on_change`` with the job's fresh record, so a CLI can draw progress.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from siterecovery.errors import SiteRecoveryError
from siterecovery.vault import jobs
from siterecovery.vault.db import Database
from siterecovery.vault.records import JobRecord

JobListener = Callable[[JobRecord], None]


class TaskHandle:
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
    def task(self, name: str) -> Iterator[TaskHandle]:
        """Run the task ``name``: started on entry, succeeded on exit, failed on error."""
        self.notify(jobs.start_task(self.db, job=self.job_id, name=name))
        handle = TaskHandle(self, name)
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
