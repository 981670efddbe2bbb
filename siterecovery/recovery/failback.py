"""Failback (DESIGN §5): bring a committed VM home from its replica to the original VM's disks.

The replicated VM's state follows DESIGN §4::

    committed → failing back → failed back → committed back → (reverse replication) → protected

Two methods, as in the seed:

- **minimize downtime**: while the replica VM keeps running, a fleecing view of its disks
  (:class:`~siterecovery.hypervisor.tracking.ChangeTracker`, which also starts a change log)
  is compared block by block (64 KiB, BLAKE3) with the primary disks, and only differing
  blocks are written to them. Then the replica is paused (the downtime starts), the blocks
  its change log marked since the first view are copied, and the primary VM starts.
- **full download**: the replica is paused and its disks are copied whole.

The primary VM must be stopped; its images (paths from the vault's VM record) are opened by
``qemu-storage-daemon`` and written through a writable NBD export. The primary VM starts again
as the machine the vault's :class:`~siterecovery.domain.VmConfig` describes (its QMP socket
path, machine type, CPUs and model, memory, disks' devices, boot), within what this host runs
(warnings in the *start primary VM* task); the replica VM is quit only once the primary runs.

Files: the primary VM's QMP socket is created at the path the vault recorded (the operator's,
so protection finds the VM again) and nothing else is put beside it: its QEMU log, pidfile
and console are in ``RUN_DIR/primary/VM/`` (:func:`primary_dir`), 0600 in 0700 directories.
The storage daemon runs in the replica's slot (``RECOVERY_DIR/VM/failover/fbq``).

Contract: every check runs before the state changes. A failure after *failing back* resumes
the replica (still the VM), returns the state to *committed* and says to run failback again:
the primary disks may be half written, which the next failback repairs (it compares them).
"""

from __future__ import annotations

import contextlib
import enum
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import blake3

from siterecovery.domain import ReplicationState, VmConfig
from siterecovery.errors import HypervisorError, InputError, SiteRecoveryError
from siterecovery.fsutil import private_dir
from siterecovery.hypervisor.machine import honour, host_capabilities, supports_direct_io
from siterecovery.hypervisor.nbd import NbdClient
from siterecovery.hypervisor.process import (
    DriveSpec,
    QemuProcess,
    StorageDaemon,
    check_socket_slot,
    qmp_execute,
)
from siterecovery.hypervisor.tracking import GRANULARITY, ChangeTracker, CycleView, discover_disks
from siterecovery.recovery import instant
from siterecovery.recovery.errors import FailoverError
from siterecovery.recovery.replica import ReplicaRecord, machine_spec, remove_slot, stop_replica
from siterecovery.replication.jobrun import JobListener, JobRun
from siterecovery.vault import jobs, service
from siterecovery.vault.db import Database
from siterecovery.vault.records import JobRecord, VmRecord

S = ReplicationState
#: Names the replica's change-tracking bitmaps during a failback (never a protection's id).
FAILBACK_RELATIONSHIP = "fa11bac0"
READ_RANGE = 4 << 20
HYDRATION_TIMEOUT_S = 3600.0
RETRY_HINT = (
    "the replica VM runs again and the VM is committed: fix the cause, then run "
    "`siterecovery failback VM` again (it compares the primary disks, so nothing is lost)"
)


class FailbackMethod(enum.StrEnum):
    """How the data comes home: only differing blocks while the replica runs, or everything."""

    MINIMIZE_DOWNTIME = "minimize-downtime"
    FULL_DOWNLOAD = "full-download"


@dataclass
class DiskCopy:
    """One disk's figures for one pass: 64 KiB blocks compared and copied, bytes written."""

    disk: str
    size: int
    blocks_compared: int = 0
    blocks_copied: int = 0
    bytes_copied: int = 0


@dataclass
class FailbackOutcome:
    """What a failback did: its job, both passes' figures, downtime, the primary VM."""

    job: JobRecord
    method: FailbackMethod
    first_pass: list[DiskCopy]
    final_pass: list[DiskCopy]
    downtime_s: float
    primary: QemuProcess
    figures: dict[str, Any] = field(default_factory=dict)


class ReplicaLookup(Protocol):
    """Where the replicas of this recovery host are (the failover door), and the run
    directory the restarted primary keeps its files in."""

    run_dir: Path

    def replica(self, vm: str, *, test: bool = False) -> ReplicaRecord | None: ...


class FailbackService:
    """Fails committed VMs back from this recovery host to their primary disks, as jobs.

    ``detach`` lets the started primary VM outlive this process (the CLI's case).
    """

    def __init__(
        self,
        db: Database,
        failover: ReplicaLookup,
        *,
        accel: str = "tcg",
        on_job: JobListener | None = None,
        detach: bool = False,
    ) -> None:
        self.db = db
        self.failover = failover
        self.accel = accel
        self.on_job = on_job
        self.detach = detach

    def failback(self, vm: str, method: FailbackMethod) -> FailbackOutcome:
        """Copy the replica's disks to the primary VM's and start it there; see the module."""
        minimize = method == FailbackMethod.MINIMIZE_DOWNTIME
        tasks = ["check prerequisites", "open primary disks"]
        tasks += ["synchronize while replica runs", "stop replica VM", "copy final changes"] \
            if minimize else ["stop replica VM", "download whole disks"]  # fmt: skip
        tasks.append("start primary VM")
        job = jobs.create_job(self.db, kind="failback", vm=vm, tasks=tasks,
                              details={"method": str(method)})  # fmt: skip
        run = JobRun(self.db, job.id, on_change=self.on_job)
        with run.task("check prerequisites") as task:
            record, primary = self._prerequisites(vm)
            task.progress(100, {"replica_pid": record.pid, "point": record.point_id,
                                "disks": [d.name for d in primary.disks]})  # fmt: skip
        service.transition(self.db, vm=vm, to_state=S.FAILING_BACK,
                           reason=f"failback ({method}) started")  # fmt: skip
        try:
            return self._run(run, vm, method, record, primary)
        except SiteRecoveryError as exc:
            self._undo(vm, record)
            raise FailoverError(f"failback of VM {vm} failed: {exc.message}",
                                hint=RETRY_HINT) from exc  # fmt: skip
        except BaseException:
            self._undo(vm, record)
            raise

    def commit(self, vm: str) -> JobRecord:
        """Commit the failback: the primary VM is the VM again; the replica's files go."""
        state = service.get_protection(self.db, vm=vm).state
        job = jobs.create_job(self.db, kind="commit failback", vm=vm,
                              tasks=("check primary VM", "remove replica", "commit"))  # fmt: skip
        run = JobRun(self.db, job.id, on_change=self.on_job)
        with run.task("check primary VM") as task:
            if state != S.FAILED_BACK:
                raise InputError(
                    f"cannot commit the failback: VM {vm} is {state}, not failed back",
                    hint="run `siterecovery failback VM` first",
                )
            qmp = _primary_qmp(service.get_vm(self.db, name=vm))
            status = _status(qmp)
            if status is None:
                raise FailoverError(
                    f"the primary VM {vm} does not answer on {qmp}",
                    hint="start it again, then commit the failback",
                )
            task.progress(100, {"status": status})
        with run.task("remove replica") as task:
            record = self.failover.replica(vm)
            if record is not None:
                stop_replica(record, None)
                remove_slot(Path(record.workdir))
            task.progress(100, {"removed": record.workdir if record else None})
        with run.task("commit") as task:
            service.transition(self.db, vm=vm, to_state=S.COMMITTED_BACK,
                               reason="failback committed")  # fmt: skip
            task.progress(100, {})
        return run.finish()

    # -- the passes ------------------------------------------------------------------------

    def _run(
        self, run: JobRun, vm: str, method: FailbackMethod, record: ReplicaRecord,
        primary: VmRecord,
    ) -> FailbackOutcome:  # fmt: skip
        qmp = Path(record.qmp)
        tracker = ChangeTracker(qmp, Path(record.workdir) / "fb", FAILBACK_RELATIONSHIP)
        first: list[DiskCopy] = []
        workdir = private_dir(Path(record.workdir) / "fbq")
        with contextlib.ExitStack() as stack:
            with run.task("open primary disks") as task:
                target = stack.enter_context(_primary_disks(primary, workdir))
                task.progress(100, {"nbd": str(target)})
            try:
                if method == FailbackMethod.MINIMIZE_DOWNTIME:
                    with run.task("synchronize while replica runs") as task:
                        first = _pass(tracker, tracker.begin(initial=True), target, compare=True)
                        task.progress(100, _figures(first))
                with run.task("stop replica VM") as task:
                    qmp_execute(qmp, "stop")
                    paused_at = time.monotonic()
                    task.progress(100, {"paused": True})
                name = "copy final changes" if first else "download whole disks"
                with run.task(name) as task:
                    view = tracker.begin(initial=not first)
                    final = _pass(tracker, view, target, compare=False)
                    task.progress(100, _figures(final))
            finally:
                with contextlib.suppress(HypervisorError):
                    tracker.stop_tracking()
        with run.task("start primary VM") as task:
            process, warnings = self._start_primary(primary)
            downtime = time.monotonic() - paused_at
            task.progress(100, {"pid": process.pid, "downtime_s": round(downtime, 3),
                                "warnings": warnings})  # fmt: skip
        stop_replica(record, None)
        service.transition(self.db, vm=vm, to_state=S.FAILED_BACK,
                           reason=f"running on the primary again ({method})")  # fmt: skip
        figures = {"first_pass": _figures(first), "final_pass": _figures(final),
                   "downtime_s": round(downtime, 3)}  # fmt: skip
        return FailbackOutcome(run.finish(), method, first, final, downtime, process, figures)

    def _start_primary(self, record: VmRecord) -> tuple[QemuProcess, list[str]]:
        """Start the primary VM as the vault describes it; what this host changed, as warnings."""
        qmp = _primary_qmp(record)
        workdir = private_dir(primary_dir(self.failover.run_dir, record.name))
        honoured = honour(
            VmConfig.from_json(record.config, name=record.name),
            host_capabilities(self.accel),
            direct_io=supports_direct_io(workdir),
        )
        config = honoured.config
        drives = [DriveSpec(d.name, Path(d.path), _fmt(record, d.name), disk=config.disk(d.name))
                  for d in record.disks]  # fmt: skip
        spec = machine_spec(config, name=record.name, workdir=workdir, qmp=qmp, drives=drives,
                            accel=self.accel)  # fmt: skip
        process = QemuProcess.start(spec)
        if self.detach:
            process.detach()
        return process, list(honoured.warnings)

    def _undo(self, vm: str, record: ReplicaRecord) -> None:
        """The replica stays the VM: resume it; back to committed."""
        with contextlib.suppress(HypervisorError):
            qmp_execute(Path(record.qmp), "cont")
        if service.get_protection(self.db, vm=vm).state == S.FAILING_BACK:
            service.transition(self.db, vm=vm, to_state=S.COMMITTED,
                               reason="failback failed; the replica VM runs on")  # fmt: skip

    # -- checks ----------------------------------------------------------------------------

    def _prerequisites(self, vm: str) -> tuple[ReplicaRecord, VmRecord]:
        state = service.get_protection(self.db, vm=vm).state
        if state != S.COMMITTED:
            raise InputError(
                f"VM {vm} is {state}: failback needs a committed failover",
                hint="commit the failover first: `siterecovery failover commit VM`",
            )
        record = self.failover.replica(vm)
        if record is None or not instant.pid_alive(record.pid):
            raise FailoverError(f"the replica VM of {vm} is not running on this recovery host",
                                hint="failback copies from the running replica; start it again "
                                "with the recovery host that runs it")  # fmt: skip
        primary = service.get_vm(self.db, name=vm)
        VmConfig.from_json(primary.config, name=vm)  # a malformed description fails here
        qmp = _primary_qmp(primary)
        if _status(qmp) is not None:
            raise InputError(
                f"the primary VM {vm} is running ({qmp} answers)",
                hint="shut the primary VM down: failback overwrites its disks",
            )
        check_socket_slot(qmp)  # the primary's socket goes there; no file is ever replaced
        for disk in primary.disks:
            if not disk.path or not Path(disk.path).is_file():
                raise InputError(f"the primary disk {disk.name} image {disk.path!r} of VM {vm} "
                                 "does not exist", hint="restore or recreate the image "
                                 "(same size), then run failback again")  # fmt: skip
        replica = _replica_sizes(record)
        ours = {d.name: d.size for d in primary.disks}
        if replica != ours:
            raise InputError(
                f"the replica's disks {replica} of VM {vm} do not match the primary's {ours}",
                hint="resize the primary images to match",
            )
        if record.mode == "instant" and record.hydrating:
            # the copy reads the replica's own images, not the store behind them
            instant.wait_hydrated(Path(record.qmp), record.disks, HYDRATION_TIMEOUT_S)
        return record, primary


# ---------------------------------------------------------------------------------------------
# Copying


@contextmanager
def _primary_disks(record: VmRecord, workdir: Path) -> Iterator[Path]:
    """The primary images behind a storage daemon, each exported writable under its disk name;
    yields the NBD socket. The daemon is stopped cleanly (images flushed and closed)."""
    drives = [DriveSpec(f"d{i}", Path(d.path), _fmt(record, d.name)) for i, d in
              enumerate(record.disks)]  # fmt: skip
    daemon = StorageDaemon.start(workdir, drives)
    try:
        for disk, drive in zip(record.disks, drives, strict=True):
            qmp_execute(daemon.qmp_path, "block-export-add", {
                "type": "nbd", "id": f"fb-{drive.name}", "node-name": drive.name,
                "name": disk.name, "writable": True})  # fmt: skip
        yield daemon.nbd_path
    finally:
        daemon.stop()


def _pass(
    tracker: ChangeTracker, view: CycleView, target: Path, *, compare: bool
) -> list[DiskCopy]:
    """Copy every disk of ``view`` to the primary at ``target``; end the view (shipped).

    ``compare``: read every block of both sides and write the differing ones. Otherwise a
    view with a change log copies its dirty blocks, one without copies every block.
    """
    try:
        return [_copy_disk(view.nbd_socket, d.export, d.bitmap_context, target, compare)
                for d in view.disks]  # fmt: skip
    finally:
        tracker.end(view, shipped=True)


def _copy_disk(
    source: Path, disk: str, context: str | None, target: Path, compare: bool
) -> DiskCopy:
    contexts = [context] if context and not compare else []
    with NbdClient.connect_unix(str(source), disk, contexts) as src, \
            NbdClient.connect_unix(str(target), disk) as dst:  # fmt: skip
        stats = DiskCopy(disk, src.size)
        if dst.size != src.size:
            raise FailoverError(f"disk {disk}: primary size {dst.size} != replica {src.size}")
        ranges = ([(0, src.size)] if compare or context is None
                  else src.dirty_extents(context))  # fmt: skip
        for offset, data in src.pread_many(_split(ranges)):
            old = dst.pread(offset, len(data)) if compare else b""
            for at in range(0, len(data), GRANULARITY):
                block = data[at : at + GRANULARITY]
                stats.blocks_compared += 1
                if compare and _same(block, old[at : at + GRANULARITY]):
                    continue
                dst.pwrite(offset + at, block)
                stats.blocks_copied += 1
                stats.bytes_copied += len(block)
        dst.flush()
    return stats


def _split(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for offset, length in ranges:
        for at in range(offset, offset + length, READ_RANGE):
            out.append((at, min(READ_RANGE, offset + length - at)))
    return out


def _same(a: bytes, b: bytes) -> bool:
    # checksums, not bytes: the primary side may be remote some day, then only digests travel
    return blake3.blake3(a).digest() == blake3.blake3(b).digest()


def _figures(copies: list[DiskCopy]) -> dict[str, Any]:
    return {
        "blocks_compared": sum(c.blocks_compared for c in copies),
        "blocks_copied": sum(c.blocks_copied for c in copies),
        "bytes_copied": sum(c.bytes_copied for c in copies),
        "disks": [asdict(c) for c in copies],
    }


# ---------------------------------------------------------------------------------------------
# Small helpers


def primary_dir(run_dir: Path, vm: str) -> Path:
    """Where a failed-back primary VM's QEMU files live (log, pidfile, console)."""
    return run_dir / "primary" / vm


def _primary_qmp(record: VmRecord) -> Path:
    qmp = record.config.get("qmp")
    if not qmp:
        raise InputError(f"VM {record.name} has no QMP socket recorded",
                         hint="register the VM again with its QMP socket path")  # fmt: skip
    return Path(str(qmp))


def _status(qmp: Path) -> str | None:
    """The VM's run status, or None when nothing answers on ``qmp``."""
    if not qmp.exists():
        return None
    try:
        answer = qmp_execute(qmp, "query-status", timeout=2.0)
    except HypervisorError:
        return None
    return str(answer.get("status")) if isinstance(answer, dict) else "unknown"


def _replica_sizes(record: ReplicaRecord) -> dict[str, int]:
    return {d.name: d.size for d in discover_disks(Path(record.qmp))}


def _fmt(record: VmRecord, disk: str) -> str:
    """The image format the VM's configuration records for ``disk`` (qcow2 by default)."""
    for entry in record.config.get("disks", []):
        if isinstance(entry, dict) and entry.get("name") == disk and entry.get("fmt"):
            return str(entry["fmt"])
    return "qcow2"
