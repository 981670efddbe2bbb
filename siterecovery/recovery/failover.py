"""Failover (DESIGN §5): drills, planned and unplanned failover, change point, commit.

Every operation is a vault job with named tasks; the replicated VM's state follows DESIGN §4::

    protected → test failover running → (cleanup) → protected       replication keeps running
    protected → failing over → failed over → (change point)* → committed

Contracts:
- everything that can be checked is checked **before** the state changes (state, recovery
  point, its verification, network mappings, room on the recovery host): a failover refused
  there changes nothing but its failed job;
- a failover that fails after *failing over* stops what it started, returns the VM to
  *protected* and, for a planned failover, resumes the source VM: the source stays protected;
- a planned failover pauses the source VM (no write after that), ships a final cycle, starts
  the replica from that point and only then quits the source: every write the guest saw
  acknowledged is in the replica;
- the replica VM is the same machine: CPUs, memory, disks in order, MACs and boot come from
  the configuration stored in the point; NICs attach to mapped networks (see network.py);
- instant recovery (the default when the store's key file is known) serves the point over NBD
  and hydrates in the background; ``mode=FULL`` materializes every disk first.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from siterecovery.domain import Consistency, FailoverKind, ReplicationState
from siterecovery.errors import HypervisorError, InputError, SiteRecoveryError
from siterecovery.fsutil import private_dir
from siterecovery.hypervisor.process import QemuProcess, qmp_execute
from siterecovery.recovery import instant, network
from siterecovery.recovery.errors import FailoverError
from siterecovery.recovery.replica import (
    DiskProgress,
    Probe,
    RecoveryHost,
    RecoveryMode,
    ReplicaRecord,
    StartRequest,
    boot,
    check_room,
    disk_need,
    disk_order,
    prepare_disks,
    remove_slot,
    replica_spec,
    run_probe,
    stop_replica,
    verify_point,
)
from siterecovery.replication.engine import CycleResult
from siterecovery.replication.jobrun import JobListener, JobRun
from siterecovery.store.manifest import PointManifest
from siterecovery.store.repository import ReplicaStore
from siterecovery.vault import jobs, points, service
from siterecovery.vault.db import Database
from siterecovery.vault.records import JobRecord

S = ReplicationState
TEST_SLOT, FAILOVER_SLOT = "test", "failover"
PREPARE_TASKS = ("check prerequisites", "prepare disks", "start replica VM")
KIND_JOB = {FailoverKind.TEST: "test failover", FailoverKind.PLANNED: "planned failover",
            FailoverKind.UNPLANNED: "unplanned failover"}  # fmt: skip


@dataclass(frozen=True)
class FailoverOptions:
    """How to fail over: point (id, ``latest`` or ``latest-app``), recovery mode, kernel
    command line override, ports to expose (``HOST:GUEST``), a drill check, hydration."""

    point: str = "latest"
    mode: RecoveryMode | None = None
    append: str | None = None
    expose: tuple[str, ...] = ()
    probe: Probe | None = None
    hydrate: bool = True


@dataclass
class FailoverOutcome:
    """What a failover made: its job, the point, the running replica and its timings."""

    job: JobRecord
    point: PointManifest
    process: QemuProcess
    record: ReplicaRecord
    seconds_to_start: float
    started_at: float = 0.0
    evidence: dict[str, object] = field(default_factory=dict)


class FailoverService:
    """Fails protected VMs over to this recovery host, as vault jobs."""

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
        self.recovery_dir = recovery_dir
        self.key_file = key_file
        self.run_dir = run_dir or recovery_dir.parent / "run"
        self.host = host or RecoveryHost.detect()
        self.accel = accel
        self.on_job = on_job
        self.progress = progress
        self._processes: dict[tuple[str, str], QemuProcess] = {}
        self._room = threading.Lock()

    # -- the operations ----------------------------------------------------------------------

    def test(self, vm: str, options: FailoverOptions | None = None) -> FailoverOutcome:
        """A drill: the replica starts on a throw-away overlay in the isolated network.

        Replication keeps running. A failed check fails the job but leaves the drill for
        inspection; :meth:`cleanup` removes everything either way.
        """
        return self._failover(vm, FailoverKind.TEST, options or FailoverOptions())

    def planned(self, vm: str, options: FailoverOptions | None = None) -> FailoverOutcome:
        """Pause the source, ship a final cycle, start the replica from it: zero data loss."""
        opts = replace(options or FailoverOptions(), point="final")
        return self._failover(vm, FailoverKind.PLANNED, opts)

    def unplanned(
        self,
        vm: str,
        *,
        point_id: str | None = None,
        append: str | None = None,
        options: FailoverOptions | None = None,
    ) -> FailoverOutcome:
        """The primary is lost: start the replica from ``point_id`` (default: the newest)."""
        opts = options or FailoverOptions()
        opts = replace(opts, point=point_id or opts.point, append=append or opts.append)
        return self._failover(vm, FailoverKind.UNPLANNED, opts)

    def failover_many(
        self, vms: Sequence[str], kind: FailoverKind, options: FailoverOptions | None = None
    ) -> dict[str, FailoverOutcome | SiteRecoveryError]:
        """Fail several VMs over in parallel, at most ``host.max_parallel`` at a time.

        Each VM is its own job; one VM's failure does not stop the others.
        """
        opts = options or FailoverOptions()

        def one(vm: str) -> FailoverOutcome | SiteRecoveryError:
            try:
                if kind == FailoverKind.PLANNED:
                    return self.planned(vm, opts)
                return self._failover(vm, kind, opts)
            except SiteRecoveryError as exc:
                return exc

        with ThreadPoolExecutor(max_workers=max(1, self.host.max_parallel)) as pool:
            return dict(zip(vms, pool.map(one, vms), strict=True))

    def cleanup(self, vm: str) -> JobRecord:
        """End the drill of ``vm``: stop its replica, remove its files, back to protected."""
        job = jobs.create_job(self.db, kind="test failover cleanup", vm=vm,
                              tasks=("stop replica VM", "remove drill data"))  # fmt: skip
        run = JobRun(self.db, job.id, on_change=self.on_job)
        state = service.get_protection(self.db, vm=vm).state
        workdir = self._slot_dir(vm, TEST_SLOT)
        with run.task("stop replica VM") as task:
            if state != S.TEST_FAILOVER_RUNNING:
                raise InputError(f"VM {vm} has no drill running (it is {state})")
            record = ReplicaRecord.load(workdir)
            if record is not None:
                stop_replica(record, self._processes.pop((vm, TEST_SLOT), None))
            task.progress(100, {"stopped": record is not None})
        with run.task("remove drill data") as task:
            remove_slot(workdir)
            service.transition(self.db, vm=vm, to_state=S.PROTECTED, reason="drill cleaned up")
            task.progress(100, {"removed": str(workdir)})
        return run.finish()

    def change_point(self, vm: str, point: str) -> FailoverOutcome:
        """Restart the failed-over ``vm`` from another point; allowed until commit."""
        record = self._failed_over_record(vm, "change the recovery point")
        opts = FailoverOptions(point=point, mode=RecoveryMode(record.mode),
                               expose=tuple(record.forwards), append=record.append)  # fmt: skip
        job = jobs.create_job(self.db, kind="change recovery point", vm=vm,
                              tasks=("select recovery point", "stop replica VM",
                                     *PREPARE_TASKS[1:]),
                              details={"from": record.point_id, "to": point})  # fmt: skip
        run = JobRun(self.db, job.id, on_change=self.on_job)
        started = time.monotonic()
        with run.task("select recovery point") as task:
            manifest = self._select(vm, point)
            verify_point(self.store, manifest)
            task.progress(100, {"point": manifest.point_id})
        with run.task("stop replica VM"):
            stop_replica(record, self._processes.pop((vm, FAILOVER_SLOT), None))
            remove_slot(Path(record.workdir))
        return self._start(run, vm, FailoverKind(record.kind), manifest, opts, started)

    def commit(self, vm: str) -> JobRecord:
        """Commit the failover: the replica is the VM now; its point can no longer change."""
        record = self._failed_over_record(vm, "commit the failover")
        job = jobs.create_job(self.db, kind="commit failover", vm=vm,
                              tasks=("check replica VM", "commit"))  # fmt: skip
        run = JobRun(self.db, job.id, on_change=self.on_job)
        with run.task("check replica VM") as task:
            if not instant.pid_alive(record.pid):
                raise FailoverError(
                    f"the replica VM of {vm} is not running",
                    hint="run `siterecovery failover change-point VM --point ID` to start it "
                    "again, then commit",
                )
            if record.mode == RecoveryMode.INSTANT and not record.hydrating:
                instant.start_hydration(Path(record.qmp), record.disks)
                record.hydrating = True
            task.progress(100, {"point": record.point_id, "pid": record.pid})
        with run.task("commit") as task:
            service.transition(self.db, vm=vm, to_state=S.COMMITTED,
                               reason=f"failover committed at point {record.point_id}")  # fmt: skip
            record.committed = True
            record.save()
            task.progress(100, {"point": record.point_id})
        return run.finish()

    def replica(self, vm: str, *, test: bool = False) -> ReplicaRecord | None:
        """The record of ``vm``'s replica (its drill with ``test``), if any."""
        return ReplicaRecord.load(self._slot_dir(vm, TEST_SLOT if test else FAILOVER_SLOT))

    # -- the common path ---------------------------------------------------------------------

    def _failover(
        self, vm: str, kind: FailoverKind, opts: FailoverOptions
    ) -> FailoverOutcome:
        started = time.monotonic()
        tasks = ["check prerequisites"]
        if kind == FailoverKind.PLANNED:
            tasks += ["shut down source VM", "replicate final changes"]
        tasks += ["select recovery point", *PREPARE_TASKS[1:]]
        if kind == FailoverKind.TEST and opts.probe is not None:
            tasks.append("run drill check")
        job = jobs.create_job(self.db, kind=KIND_JOB[kind], vm=vm, tasks=tasks,
                              details={"point": opts.point, "mode": str(self._mode(opts))})
        run = JobRun(self.db, job.id, on_change=self.on_job)
        target = S.TEST_FAILOVER_RUNNING if kind == FailoverKind.TEST else S.FAILING_OVER
        with run.task("check prerequisites") as task:
            task.progress(100, self._prerequisites(vm, kind, opts))
        if kind == FailoverKind.PLANNED:
            return self._planned_source(run, vm, opts, started)
        with run.task("select recovery point") as task:
            point = self._checked_point(vm, kind, opts)
            task.progress(100, {"point": point.point_id, "consistency": point.consistency})
        service.transition(self.db, vm=vm, to_state=target, reason=f"{KIND_JOB[kind]} started")
        return self._start_or_undo(run, vm, kind, point, opts, started)

    def _planned_source(
        self, run: JobRun, vm: str, opts: FailoverOptions, started: float
    ) -> FailoverOutcome:
        qmp = self._source_qmp(vm)
        with run.task("shut down source VM") as task:
            _qmp(qmp, "stop", f"pause the source VM {vm}")
            task.progress(100, {"paused": True})
        try:
            with run.task("replicate final changes") as task:
                cycle = self._final_cycle(vm)
                task.progress(100, {"point": cycle.point.point_id, **cycle.figures()})
            with run.task("select recovery point") as task:
                point = self._checked_point(vm, FailoverKind.PLANNED,
                                            replace(opts, point=cycle.point.point_id))  # fmt: skip
                task.progress(100, {"point": point.point_id})
            service.transition(self.db, vm=vm, to_state=S.FAILING_OVER, reason="planned failover")
            outcome = self._start_or_undo(run, vm, FailoverKind.PLANNED, point, opts, started)
        except BaseException:
            _resume_source(qmp)
            raise
        _quit_source(qmp)
        return outcome

    def _final_cycle(self, vm: str) -> CycleResult:
        """The planned failover's last cycle, run as the embedded agent runs any cycle."""
        from siterecovery.agent.embedded import EmbeddedAgent  # the embedded door (for now)

        return EmbeddedAgent(self.db, self.store, self.run_dir).replicate(vm)

    def _start_or_undo(
        self, run: JobRun, vm: str, kind: FailoverKind, point: PointManifest,
        opts: FailoverOptions, started: float,
    ) -> FailoverOutcome:  # fmt: skip
        try:
            return self._start(run, vm, kind, point, opts, started)
        except FailoverError as exc:
            if kind == FailoverKind.TEST and exc.message.startswith("the drill check failed"):
                raise  # the drill stays for inspection; cleanup removes it
            self._undo(vm, kind)
            raise
        except BaseException:
            self._undo(vm, kind)
            raise

    def _start(
        self, run: JobRun, vm: str, kind: FailoverKind, point: PointManifest,
        opts: FailoverOptions, started: float,
    ) -> FailoverOutcome:  # fmt: skip
        slot = TEST_SLOT if kind == FailoverKind.TEST else FAILOVER_SLOT
        workdir = self._slot_dir(vm, slot)
        remove_slot(workdir)
        private_dir(workdir)
        forwards = [network.PortForward.parse(f) for f in opts.expose]
        nics = network.plan_nics(vm, point.vm_config, network.list_mappings(self.db),
                                 test=kind == FailoverKind.TEST)  # fmt: skip
        if forwards and not nics:
            raise FailoverError(f"VM {vm} has no NIC: no port can be exposed")
        req = StartRequest(vm, slot, str(kind), point, self._mode(opts), workdir,
                           network.nic_args(nics, forwards), opts.append, self.accel,
                           list(opts.expose))  # fmt: skip
        record: ReplicaRecord | None = None
        with run.task("prepare disks") as task:
            drives, disk_args, server_pid = prepare_disks(self.store, self._key(req), req,
                                                          self.progress)  # fmt: skip
            task.progress(100, {"mode": str(req.mode), "nbd_server_pid": server_pid,
                                "seconds": round(time.monotonic() - started, 3)})  # fmt: skip
        with run.task("start replica VM") as task:
            spec = replica_spec(req, drives, disk_args)
            record = ReplicaRecord(vm, slot, str(kind), point.point_id, str(req.mode),
                                   str(workdir), spec.name, 0, str(workdir / f"{spec.name}.qmp"),
                                   str(workdir / f"{spec.name}.serial.log"),
                                   [*point.disks], server_pid, spec.memory_mib,
                                   forwards=list(opts.expose), append=opts.append)  # fmt: skip
            record.save()
            process = boot(spec)
            record.pid = process.pid
            record.disks = [d.name for d in drives] or _disk_names(disk_args)
            self._processes[(vm, slot)] = process
            seconds = time.monotonic() - started
            hydrate = req.mode == RecoveryMode.INSTANT and kind != FailoverKind.TEST
            if hydrate and opts.hydrate:
                instant.start_hydration(process.qmp_path, record.disks)
                record.hydrating = True
            record.save()
            task.progress(100, {"pid": process.pid, "qmp": str(process.qmp_path),
                                "seconds_to_start": round(seconds, 3),
                                "networks": [n.network.name for n in nics],
                                "hydrating": record.hydrating})  # fmt: skip
        outcome = FailoverOutcome(run.finish() if kind != FailoverKind.TEST or opts.probe is None
                                  else jobs.get_job(self.db, job=run.job_id),
                                  point, process, record, seconds, started)  # fmt: skip
        if kind != FailoverKind.TEST and _state(self.db, vm) == S.FAILING_OVER:
            service.transition(self.db, vm=vm, to_state=S.FAILED_OVER,
                               reason=f"running from point {point.point_id}")  # fmt: skip
        elif opts.probe is not None:
            with run.task("run drill check") as task:
                outcome.evidence = run_probe(opts.probe, process)
                task.progress(100, {"evidence": outcome.evidence})
            outcome.job = run.finish()
        return outcome

    def _undo(self, vm: str, kind: FailoverKind) -> None:
        """Stop what a failed failover started; the VM returns to protected."""
        slot = TEST_SLOT if kind == FailoverKind.TEST else FAILOVER_SLOT
        workdir = self._slot_dir(vm, slot)
        record = ReplicaRecord.load(workdir)
        if record is not None:
            stop_replica(record, self._processes.pop((vm, slot), None))
        remove_slot(workdir)
        state = service.get_protection(self.db, vm=vm).state
        if state in (S.FAILING_OVER, S.TEST_FAILOVER_RUNNING):
            service.transition(self.db, vm=vm, to_state=S.PROTECTED,
                               reason=f"{KIND_JOB[kind]} failed; the source is untouched")

    # -- checks ------------------------------------------------------------------------------

    def _prerequisites(
        self, vm: str, kind: FailoverKind, opts: FailoverOptions
    ) -> dict[str, object]:
        state = service.get_protection(self.db, vm=vm).state
        allowed = {FailoverKind.TEST: {S.PROTECTED},
                   FailoverKind.PLANNED: {S.PROTECTED},
                   FailoverKind.UNPLANNED: {S.PROTECTED, S.RESYNC_REQUIRED, S.ERROR}}[kind]
        if state not in allowed:
            raise InputError(
                f"VM {vm} is {state}: a {KIND_JOB[kind]} needs it "
                + " or ".join(sorted(str(s) for s in allowed)),
                hint="see `siterecovery status VM`; a drill in progress ends with "
                "`siterecovery failover cleanup VM`",
            )
        if self._mode(opts) == RecoveryMode.INSTANT and self.key_file is None:
            raise InputError("instant recovery needs the store's key file")
        details: dict[str, object] = {"state_before": str(state)}
        if kind == FailoverKind.PLANNED:
            qmp = self._source_qmp(vm)
            _qmp(qmp, "query-status", f"reach the source VM {vm}")
            details["source_qmp"] = str(qmp)
        return details

    def _checked_point(self, vm: str, kind: FailoverKind, opts: FailoverOptions) -> PointManifest:
        point = self._select(vm, opts.point)
        try:
            verify_point(self.store, point)
        except SiteRecoveryError as exc:
            raise FailoverError(
                f"recovery point {point.point_id} of VM {vm} failed verification: {exc}",
                hint="choose another point with --point, and run `siterecovery store verify`",
            ) from exc
        network.plan_nics(vm, point.vm_config, network.list_mappings(self.db),
                          test=kind == FailoverKind.TEST)  # fmt: skip
        memory = int(point.vm_config.get("memory_mib", 256))
        with self._room:
            check_room(self.host, self.recovery_dir, memory,
                       disk_need(self.store, point, self._mode(opts)), vm)  # fmt: skip
        return point

    def _select(self, vm: str, point: str) -> PointManifest:
        records = points.list_points(self.db, vm=vm)
        if point in ("latest", "latest-app"):
            if point == "latest-app":
                records = [p for p in records if p.consistency == Consistency.APP]
            if not records:
                what = "app-consistent " if point == "latest-app" else ""
                raise FailoverError(f"VM {vm} has no {what}recovery point to fail over to",
                                    hint="choose a point from `siterecovery points VM`")
            point = records[-1].point_id
        elif point not in {p.point_id for p in records}:
            raise InputError(f"VM {vm} has no recovery point {point!r}",
                             hint="choose one from `siterecovery points VM`")
        return self.store.load_point(vm, point)

    def _failed_over_record(self, vm: str, what: str) -> ReplicaRecord:
        state = service.get_protection(self.db, vm=vm).state
        if state != S.FAILED_OVER:
            extra = " (the point cannot change after commit)" if state == S.COMMITTED else ""
            raise InputError(f"cannot {what}: VM {vm} is {state}, not failed over{extra}")
        record = ReplicaRecord.load(self._slot_dir(vm, FAILOVER_SLOT))
        if record is None:
            raise FailoverError(f"no replica of VM {vm} on this recovery host")
        return record

    # -- small helpers -----------------------------------------------------------------------

    def _mode(self, opts: FailoverOptions) -> RecoveryMode:
        if opts.mode is not None:
            return opts.mode
        return RecoveryMode.INSTANT if self.key_file is not None else RecoveryMode.FULL

    def _key(self, req: StartRequest) -> Path:
        if self.key_file is None:
            return Path("/nonexistent")  # only full restores get here; the key is not read
        return self.key_file

    def _slot_dir(self, vm: str, slot: str) -> Path:
        return self.recovery_dir / vm / slot

    def _source_qmp(self, vm: str) -> Path:
        qmp = service.get_vm(self.db, name=vm).config.get("qmp")
        if not qmp:
            raise FailoverError(f"VM {vm} has no QMP socket recorded: it cannot be shut down")
        return Path(str(qmp))


def _state(db: Database, vm: str) -> ReplicationState:
    return service.get_protection(db, vm=vm).state


def _qmp(path: Path, command: str, what: str) -> object:
    try:
        return qmp_execute(path, command)
    except HypervisorError as exc:
        raise FailoverError(
            f"cannot {what}: {exc}",
            hint="if the primary site is down, run an unplanned failover instead",
        ) from exc


def _resume_source(qmp: Path) -> None:
    # the source may be gone; the error that got us here is the one to report
    with contextlib.suppress(HypervisorError):
        qmp_execute(qmp, "cont")


def _quit_source(qmp: Path) -> None:
    with contextlib.suppress(HypervisorError):  # already gone: nothing left to stop
        qmp_execute(qmp, "quit")


def _disk_names(disk_args: list[str]) -> list[str]:
    return [a.split("drive=")[1].split(",")[0] for a in disk_args if a.startswith("virtio-blk")]


@dataclass(frozen=True)
class MaterializedDisks:
    """Disks of a recovery point written to local images, in the VM's device order."""

    point_id: str
    paths: dict[str, Path]
    seconds: float


def materialize(
    store: ReplicaStore,
    point: PointManifest,
    dest_dir: Path,
    *,
    fmt: str = "qcow2",
    progress: DiskProgress | None = None,
) -> MaterializedDisks:
    """Restore every disk of ``point`` into ``dest_dir`` as ``<disk>.<fmt>``, verified; each
    image appears only when complete (temporary file + rename), 0600.

    ``dest_dir`` must be new (it is made 0700, with any missing parents) or empty: InputError
    otherwise, before anything is written.
    """
    if fmt not in ("raw", "qcow2"):
        raise InputError(f"unknown disk format {fmt!r}", hint="use raw or qcow2")
    check_restore_dir(dest_dir)
    private_dir(dest_dir)
    started = time.monotonic()
    paths: dict[str, Path] = {}
    for disk in disk_order(point):
        dest = dest_dir / f"{disk}.{fmt}"
        bound = None if progress is None else _bind(progress, disk)
        store.restore_disk(point, disk, dest, fmt=fmt, progress=bound)
        paths[disk] = dest
    return MaterializedDisks(point.point_id, paths, time.monotonic() - started)


def check_restore_dir(dest_dir: Path) -> None:
    """InputError unless ``dest_dir`` is an empty directory or can be made as a new one.

    A restore writes only new files: it never replaces, truncates or mixes into what is
    already at the destination.
    """
    hint = "name a new directory (it is created) or an empty one; nothing was written"
    at = dest_dir
    while not at.exists() and not at.is_symlink() and at.parent != at:
        at = at.parent
    if not at.is_dir():
        raise InputError(f"cannot restore into {dest_dir}: {at} exists and is not a directory",
                         hint=hint)  # fmt: skip
    if at == dest_dir and any(dest_dir.iterdir()):
        raise InputError(f"cannot restore into {dest_dir}: the directory is not empty",
                         hint=hint)  # fmt: skip


def _bind(progress: DiskProgress, disk: str) -> Callable[[int, int], None]:
    return lambda done, total: progress(disk, done, total)
