"""Failover (DESIGN §5), written once: drills, planned and unplanned failover, change point,
commit — the recovery host's work, against the vault port.

Every method takes the :class:`~siterecovery.vault.work.WorkItem` leased to this host's agent
session (claimed by ``agent run`` on a recovery host, or leased by the embedded door,
:mod:`siterecovery.agent.embedded`) and its job, and reports through the
:class:`~siterecovery.vault.port.VaultPort`. The replicated VM's state follows DESIGN §4::

    protected → test failover running → (cleanup) → protected       replication keeps running
    protected → failing over → failed over → (change point)* → committed

Contracts:

- everything that can be checked is checked **before** the state changes (state, recovery
  point, its verification, network mappings, room on the recovery host): a failover refused
  there changes nothing but its failed job;
- a failover that fails after *failing over* stops what it started and returns the VM to
  *protected*; a drill whose **check** fails (:class:`DrillCheckFailed`) keeps its replica for
  inspection (cleanup removes it);
- a **planned failover** is handed between the two sites through its job
  (:mod:`siterecovery.vault.operations`): phase ``source`` on the VM's own host (:meth:`source`:
  pause the VM, ship the final cycle, hand off), ``recovery`` here (start the replica from
  exactly that point, hand back), ``source-finish`` on the VM's host again
  (:meth:`source_finish`: quit the source when the replica runs, else resume it and fail the
  job). Every write the guest saw acknowledged is in the replica;
- the replica VM is the same machine: CPUs, memory, disks in order, MACs and boot come from
  the configuration stored in the point; NICs attach to mapped networks (``network.py``);
- instant recovery (the default when the store's key file is known here) serves the point
  over NBD and hydrates in the background; ``mode=full`` materializes every disk first;
- replica VMs outlive the agent process: their records (``replica.py``) hold the pids.

Options travel in the job's details (``details["options"]``, :meth:`FailoverOptions.details`),
so the same failover is asked for through the API or by the embedded CLI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from siterecovery.domain import Consistency, FailoverKind, ReplicationState
from siterecovery.errors import HypervisorError, InputError, SiteRecoveryError
from siterecovery.fsutil import private_dir
from siterecovery.hypervisor.process import QemuProcess, qmp_execute
from siterecovery.recovery import instant, network
from siterecovery.recovery.errors import DrillCheckFailed, FailoverError
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
    point_config,
    prepare_disks,
    remove_slot,
    replica_spec,
    run_probe,
    stop_replica,
    verify_point,
)
from siterecovery.replication.jobrun import JobDriver, TaskHandle
from siterecovery.store.manifest import PointManifest
from siterecovery.store.repository import ReplicaStore
from siterecovery.vault.port import VaultPort
from siterecovery.vault.records import JobRecord
from siterecovery.vault.work import WorkItem

S = ReplicationState
TEST_SLOT, FAILOVER_SLOT = "test", "failover"
DRILL_CHECK = "run drill check"
_FROM = {FailoverKind.TEST: {S.PROTECTED}, FailoverKind.PLANNED: {S.PROTECTED},
         FailoverKind.UNPLANNED: {S.PROTECTED, S.RESYNC_REQUIRED, S.ERROR}}  # fmt: skip


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

    def details(self) -> dict[str, Any]:
        """The options as the job's ``details["options"]`` (JSON)."""
        doc: dict[str, Any] = {"expose": list(self.expose)}
        if self.mode is not None:
            doc["mode"] = str(self.mode)
        if self.append is not None:
            doc["append"] = self.append
        if self.probe is not None:
            doc["check"] = dataclasses.asdict(self.probe)
        if not self.hydrate:
            doc["hydrate"] = False
        return doc

    @classmethod
    def of(cls, details: Mapping[str, Any]) -> FailoverOptions:
        """The options of a failover job (its ``details``); InputError when malformed."""
        opts = details.get("options") or {}
        if not isinstance(opts, Mapping):
            raise InputError("failover options must be an object")
        check = opts.get("check")
        try:
            probe = Probe(**check) if isinstance(check, Mapping) else None
        except TypeError as exc:
            raise InputError(f"invalid drill check {check!r}: {exc}") from None
        mode = opts.get("mode")
        return cls(point=str(details.get("point") or "latest"),
                   mode=RecoveryMode(mode) if mode else None, append=opts.get("append"),
                   expose=tuple(str(e) for e in opts.get("expose") or ()), probe=probe,
                   hydrate=bool(opts.get("hydrate", True)))  # fmt: skip


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
    """Fails protected VMs over to this recovery host (see the module docstring).

    ``detach`` (an agent's case) lets replicas outlive this process; without it they are
    stopped with it unless the caller detaches the outcome's process (the embedded CLI does
    once the command succeeded)."""

    def __init__(
        self,
        vault: VaultPort,
        store: ReplicaStore,
        recovery_dir: Path,
        *,
        key_file: Path | None = None,
        host: RecoveryHost | None = None,
        accel: str = "tcg",
        progress: DiskProgress | None = None,
        detach: bool = True,
    ) -> None:
        self.vault = vault
        self.store = store
        self.recovery_dir = recovery_dir
        self.key_file = key_file
        self.host = host or RecoveryHost.detect()
        self.accel = accel
        self.progress = progress
        self.detach = detach
        self._processes: dict[tuple[str, str], QemuProcess] = {}
        self._room = threading.Lock()

    # -- failover ------------------------------------------------------------------------

    def failover(self, item: WorkItem, job: JobDriver) -> FailoverOutcome | None:
        """A test, unplanned, or (the recovery phase of a) planned failover of ``item.vm``.

        The outcome (for a planned failover its job goes on at the source: see
        :meth:`source_finish`); None when a resumed job had started the replica already."""
        kind = FailoverKind(str(item.details.get("failover", FailoverKind.UNPLANNED)))
        opts = FailoverOptions.of(item.details)
        if kind == FailoverKind.PLANNED:
            return self._planned(item, job, opts)
        started = time.monotonic()
        job.run("check prerequisites", lambda _: self._prerequisites(item.vm, kind, opts))
        point = self._checked(job, item.vm, kind, opts.point, opts)
        target = S.TEST_FAILOVER_RUNNING if kind == FailoverKind.TEST else S.FAILING_OVER
        self._move(item.vm, target, f"{kind} failover started")
        try:
            outcome = self._start(job, item.vm, kind, point, opts, started)
        except DrillCheckFailed:
            raise  # the drill stays for inspection; cleanup removes it
        except BaseException:
            self._undo(item.vm, kind)
            raise
        done = job.finish()
        if outcome is not None:
            outcome.job = done
        return outcome

    def _planned(
        self, item: WorkItem, job: JobDriver, opts: FailoverOptions
    ) -> FailoverOutcome | None:
        failed: list[str] = []
        started = time.monotonic()
        try:
            final = str(item.details["final_point"])
            point = self._checked(job, item.vm, FailoverKind.PLANNED, final, opts, failed)
            self._move(item.vm, S.FAILING_OVER, "planned failover")
            outcome = self._start(job, item.vm, FailoverKind.PLANNED, point, opts, started,
                                  failed)  # fmt: skip
        except SiteRecoveryError as exc:
            self._undo(item.vm, FailoverKind.PLANNED)
            job.hand_off("source-finish", {"replica_error": exc.describe()[:4000],
                                           "failed_task": failed[-1] if failed else
                                           "select recovery point"})  # fmt: skip
            raise
        job.hand_off("source-finish", {"replica": "running"})
        return outcome

    def _checked(
        self, job: JobDriver, vm: str, kind: FailoverKind, wanted: str, opts: FailoverOptions,
        failed: list[str] | None = None,
    ) -> PointManifest:  # fmt: skip
        chosen: list[PointManifest] = []

        def select(_: TaskHandle) -> dict[str, Any]:
            chosen.append(self._select(vm, wanted, kind, self._mode(opts)))
            return {"point": chosen[0].point_id, "consistency": str(chosen[0].consistency)}

        job.run("select recovery point", select, fail=failed is None, failed=failed)
        # resumed after the task succeeded: select again (the same point, checked again)
        return chosen[0] if chosen else self._select(vm, wanted, kind, self._mode(opts))

    def _start(
        self, job: JobDriver, vm: str, kind: FailoverKind, point: PointManifest,
        opts: FailoverOptions, started: float, failed: list[str] | None = None,
    ) -> FailoverOutcome | None:  # fmt: skip
        """Prepare the disks and start the replica (and run the drill's check); the outcome,
        or None when a resumed job had started the replica in an earlier agent process."""
        slot = TEST_SLOT if kind == FailoverKind.TEST else FAILOVER_SLOT
        workdir = self._slot_dir(vm, slot)
        remove_slot(workdir)
        private_dir(workdir)
        forwards = [network.PortForward.parse(f) for f in opts.expose]
        nics = network.plan_nics(vm, point.vm_config, self.vault.network_mappings(),
                                 test=kind == FailoverKind.TEST)  # fmt: skip
        if forwards and not nics:
            raise FailoverError(f"VM {vm} has no NIC: no port can be exposed")
        req = StartRequest(vm, slot, str(kind), point, self._mode(opts), workdir,
                           network.nic_args(nics, forwards), opts.append, self.accel,
                           list(opts.expose))  # fmt: skip
        made: dict[str, Any] = {}
        fail = failed is None

        def prepare(_: TaskHandle) -> dict[str, Any]:
            made["disks"] = self._prepare(req)
            return {"mode": str(req.mode), "nbd_server_pid": made["disks"][2],
                    "seconds": round(time.monotonic() - started, 3)}  # fmt: skip

        def start(_: TaskHandle) -> dict[str, Any]:
            disks = made.get("disks") or self._prepare(req)  # resumed after prepare
            made["outcome"], details = self._boot(req, disks, nics, opts, job, started)
            return details

        job.run("prepare disks", prepare, fail=fail, failed=failed)
        job.run("start replica VM", start, fail=fail, failed=failed)
        outcome: FailoverOutcome | None = made.get("outcome")
        if kind != FailoverKind.TEST and self._state(vm) == S.FAILING_OVER:  # not change point
            self._move(vm, S.FAILED_OVER, f"running from point {point.point_id}")
        if kind == FailoverKind.TEST and opts.probe is not None:
            evidence = self._drill_check(job, opts.probe, outcome)
            if outcome is not None:
                outcome.evidence = evidence
        if outcome is not None:
            outcome.job = job.record
        return outcome

    def _drill_check(
        self, job: JobDriver, probe: Probe, outcome: FailoverOutcome | None
    ) -> dict[str, object]:
        def check(_: TaskHandle) -> dict[str, Any]:
            if outcome is None:  # the replica was started by an earlier agent process
                raise DrillCheckFailed("the drill check cannot resume after an agent restart",
                                       hint="clean the drill up and run it again")
            return {"evidence": run_probe(probe, outcome.process)}

        return dict(job.run(DRILL_CHECK, check).get("evidence") or {})

    def _prepare(self, req: StartRequest) -> tuple[Any, list[str], int]:
        if req.mode == RecoveryMode.INSTANT and self.key_file is None:
            raise InputError("instant recovery needs the store's key file on this host",
                             hint="use a full restore (--full-restore / mode full), or give "
                             "the agent the store's key file")  # fmt: skip
        # A full restore never reads the key file.
        return prepare_disks(self.store, self.key_file or Path("/nonexistent"), req,
                             self.progress)  # fmt: skip

    def _boot(
        self, req: StartRequest, disks: Any, nics: list[Any], opts: FailoverOptions,
        job: JobDriver, started: float,
    ) -> tuple[FailoverOutcome, dict[str, Any]]:  # fmt: skip
        drives, disk_args, server_pid = disks
        spec, warnings = replica_spec(req, drives, disk_args)
        record = ReplicaRecord(req.vm, req.slot, req.kind, req.point.point_id, str(req.mode),
                               str(req.workdir), spec.name, 0,
                               str(req.workdir / f"{spec.name}.qmp"),
                               str(req.workdir / f"{spec.name}.serial.log"), [*req.point.disks],
                               server_pid, spec.memory_mib, forwards=req.forwards,
                               append=req.append)  # fmt: skip
        record.save()
        process = boot(spec)
        if self.detach:
            process.detach()  # the replica outlives the agent that started it
        self._processes[(req.vm, req.slot)] = process
        record.pid = process.pid
        record.disks = [d.name for d in drives] or _disk_names(disk_args)
        seconds = time.monotonic() - started
        if req.mode == RecoveryMode.INSTANT and req.kind != FailoverKind.TEST and opts.hydrate:
            instant.start_hydration(process.qmp_path, record.disks)
            record.hydrating = True
        record.save()
        details = {"pid": process.pid, "qmp": str(process.qmp_path),
                   "seconds_to_start": round(seconds, 3),
                   "networks": [n.network.name for n in nics], "hydrating": record.hydrating,
                   "recovery_host_dir": str(req.workdir), "warnings": warnings}  # fmt: skip
        return FailoverOutcome(job.record, req.point, process, record, seconds,
                               started), details  # fmt: skip

    def _undo(self, vm: str, kind: FailoverKind) -> None:
        """Stop what a failed failover started; the VM returns to protected."""
        workdir = self._slot_dir(vm, TEST_SLOT if kind == FailoverKind.TEST else FAILOVER_SLOT)
        record = ReplicaRecord.load(workdir)
        if record is not None:
            stop_replica(record, self._processes.pop((vm, record.slot), None))
        remove_slot(workdir)
        with contextlib.suppress(SiteRecoveryError):
            if self._state(vm) in (S.FAILING_OVER, S.TEST_FAILOVER_RUNNING):
                self._move(vm, S.PROTECTED, f"{kind} failover failed; the source is untouched")

    # -- follow-ups ----------------------------------------------------------------------

    def cleanup(self, item: WorkItem, job: JobDriver) -> JobRecord:
        """End the drill: stop its replica, remove its files, back to protected."""
        workdir = self._slot_dir(item.vm, TEST_SLOT)

        def stop(_: TaskHandle) -> dict[str, Any]:
            state = self._state(item.vm)
            if state != S.TEST_FAILOVER_RUNNING:
                raise InputError(f"VM {item.vm} has no drill running (it is {state})")
            record = ReplicaRecord.load(workdir)
            if record is not None:
                stop_replica(record, self._processes.pop((item.vm, TEST_SLOT), None))
            return {"stopped": record is not None}

        def remove(_: TaskHandle) -> dict[str, Any]:
            remove_slot(workdir)
            self._move(item.vm, S.PROTECTED, "drill cleaned up")
            return {"removed": str(workdir)}

        job.run("stop replica VM", stop)
        job.run("remove drill data", remove)
        return job.finish()

    def change_point(self, item: WorkItem, job: JobDriver) -> FailoverOutcome | None:
        """Restart the failed-over VM from ``details["point"]`` (before commit)."""
        record = self._failed_over(item.vm, "change the recovery point")
        kind = FailoverKind(record.kind)
        opts = FailoverOptions(point=str(item.details["point"]), mode=RecoveryMode(record.mode),
                               expose=tuple(record.forwards), append=record.append)  # fmt: skip
        started = time.monotonic()
        chosen: list[PointManifest] = []

        def select(_: TaskHandle) -> dict[str, Any]:
            chosen.append(self._select(item.vm, opts.point, kind, self._mode(opts)))
            return {"point": chosen[0].point_id}

        def stop(_: TaskHandle) -> dict[str, Any]:
            stop_replica(record, self._processes.pop((item.vm, FAILOVER_SLOT), None))
            remove_slot(Path(record.workdir))
            return {"stopped": record.point_id}

        job.run("select recovery point", select)
        job.run("stop replica VM", stop)
        point = chosen[0] if chosen else self._select(item.vm, opts.point, kind, self._mode(opts))
        outcome = self._start(job, item.vm, kind, point, opts, started)
        done = job.finish()
        if outcome is not None:
            outcome.job = done
        return outcome

    def commit(self, item: WorkItem, job: JobDriver) -> JobRecord:
        """Commit the failover: the point can no longer change; hydration goes on."""
        record = self._failed_over(item.vm, "commit the failover")

        def check(_: TaskHandle) -> dict[str, Any]:
            if not instant.pid_alive(record.pid):
                raise FailoverError(
                    f"the replica VM of {item.vm} is not running",
                    hint="run `siterecovery failover change-point VM --point ID` to start it "
                    "again, then commit",
                )
            if record.mode == RecoveryMode.INSTANT and not record.hydrating:
                instant.start_hydration(Path(record.qmp), record.disks)
                record.hydrating = True
                record.save()
            return {"point": record.point_id, "pid": record.pid}

        def commit(_: TaskHandle) -> dict[str, Any]:
            self._move(item.vm, S.COMMITTED, f"failover committed at point {record.point_id}")
            record.committed = True
            record.save()
            return {"point": record.point_id}

        job.run("check replica VM", check)
        job.run("commit", commit)
        return job.finish()

    def replica(self, vm: str, *, test: bool = False) -> ReplicaRecord | None:
        """The record of ``vm``'s replica (its drill with ``test``) on this host, if any."""
        return ReplicaRecord.load(self._slot_dir(vm, TEST_SLOT if test else FAILOVER_SLOT))

    # -- the source side of a planned failover -------------------------------------------

    def source(self, item: WorkItem, job: JobDriver, final_cycle: Callable[[], str]) -> None:
        """Phase ``source``: pause the VM, ship the final cycle (``final_cycle()`` returns the
        recorded point id), hand off to the recovery site. The source is resumed on failure."""
        qmp = self._source_qmp(item.vm)
        paused = False

        def pause(_: TaskHandle) -> dict[str, Any]:
            nonlocal paused
            _qmp(qmp, "stop", f"pause the source VM {item.vm}")
            paused = True
            return {"paused": True}

        try:
            job.run("check prerequisites",
                    lambda _: {"source_qmp": str(qmp), **_status(qmp, item.vm)})  # fmt: skip
            job.run("shut down source VM", pause)
            # Resumed after the final cycle was shipped: its point is in the task's details.
            done = job.run("replicate final changes", lambda _: {"point": final_cycle()})
        except BaseException:
            if paused:
                _resume(qmp)
            raise
        job.hand_off("recovery", {"final_point": str(done["point"])})

    def source_finish(self, item: WorkItem, job: JobDriver) -> JobRecord:
        """Phase ``source-finish``: quit the source when the replica runs; else resume it and
        fail the job with the recovery host's error."""
        qmp = self._source_qmp(item.vm)
        error = item.details.get("replica_error")
        if error:
            _resume(qmp)
            task = str(item.details.get("failed_task") or "select recovery point")
            job.fail(task, f"{error}; the source VM {item.vm} was resumed and stays protected")
            raise FailoverError(f"the planned failover of {item.vm} failed on the recovery "
                                f"host: {error}", hint="the source VM runs again; see the job")
        job.run("release source VM", lambda _: _quit(qmp))
        return job.finish()

    # -- checks --------------------------------------------------------------------------

    def _prerequisites(
        self, vm: str, kind: FailoverKind, opts: FailoverOptions
    ) -> dict[str, Any]:
        state = self._state(vm)
        if state not in _FROM[kind]:
            raise InputError(
                f"VM {vm} is {state}: a {kind} failover needs it "
                + " or ".join(sorted(str(s) for s in _FROM[kind])),
                hint="see `siterecovery status VM`; a drill in progress ends with "
                "`siterecovery failover cleanup VM`",
            )
        if self._mode(opts) == RecoveryMode.INSTANT and self.key_file is None:
            raise InputError("instant recovery needs the store's key file on this host",
                             hint="use a full restore, or give the agent the key file")
        return {"state_before": str(state), "recovery_dir": str(self.recovery_dir)}

    def _select(self, vm: str, wanted: str, kind: FailoverKind, mode: RecoveryMode
                ) -> PointManifest:  # fmt: skip
        records = self.vault.points(vm)
        if wanted in ("latest", "latest-app"):
            if wanted == "latest-app":
                records = [p for p in records if p.consistency == Consistency.APP]
            if not records:
                what = "app-consistent " if wanted == "latest-app" else ""
                raise FailoverError(f"VM {vm} has no {what}recovery point to fail over to",
                                    hint="choose a point from `siterecovery points VM`")
            wanted = records[-1].point_id
        elif wanted not in {p.point_id for p in records}:
            raise InputError(f"VM {vm} has no recovery point {wanted!r}",
                             hint="choose one from `siterecovery points VM`")  # fmt: skip
        point = self.store.load_point(vm, wanted)
        try:
            verify_point(self.store, point)
        except SiteRecoveryError as exc:
            raise FailoverError(
                f"recovery point {point.point_id} of VM {vm} failed verification: {exc}",
                hint="choose another point with --point, and run `siterecovery store verify`",
            ) from exc
        network.plan_nics(vm, point.vm_config, self.vault.network_mappings(),
                          test=kind == FailoverKind.TEST)  # fmt: skip
        memory = point_config(point).memory_mib
        with self._room:
            check_room(self.host, self.recovery_dir, memory, disk_need(self.store, point, mode),
                       vm)  # fmt: skip
        return point

    def _failed_over(self, vm: str, what: str) -> ReplicaRecord:
        state = self._state(vm)
        if state != S.FAILED_OVER:
            extra = " (the point cannot change after commit)" if state == S.COMMITTED else ""
            raise InputError(f"cannot {what}: VM {vm} is {state}, not failed over{extra}")
        record = ReplicaRecord.load(self._slot_dir(vm, FAILOVER_SLOT))
        if record is None:
            raise FailoverError(f"no replica of VM {vm} on this recovery host")
        return record

    # -- small helpers -------------------------------------------------------------------

    def _mode(self, opts: FailoverOptions) -> RecoveryMode:
        """The mode asked for; by default instant recovery when the store's key file is
        known here (the store's NBD server needs it), else a full restore."""
        if opts.mode is not None:
            return opts.mode
        return RecoveryMode.INSTANT if self.key_file is not None else RecoveryMode.FULL

    def _state(self, vm: str) -> ReplicationState:
        return self.vault.protection(vm).state

    def _move(self, vm: str, state: ReplicationState, reason: str) -> None:
        self.vault.transition(vm, state, reason)

    def _slot_dir(self, vm: str, slot: str) -> Path:
        return self.recovery_dir / vm / slot

    def _source_qmp(self, vm: str) -> Path:
        qmp = self.vault.vm(vm).config.get("qmp")
        if not qmp:
            raise FailoverError(f"VM {vm} has no QMP socket recorded: it cannot be shut down")
        return Path(str(qmp))


def _status(qmp: Path, vm: str) -> dict[str, Any]:
    status = _qmp(qmp, "query-status", f"reach the source VM {vm}")
    return {"source_status": status.get("status") if isinstance(status, dict) else None}


def _qmp(path: Path, command: str, what: str) -> Any:
    try:
        return qmp_execute(path, command)
    except HypervisorError as exc:
        raise FailoverError(
            f"cannot {what}: {exc}",
            hint="if the primary site is down, run an unplanned failover instead",
        ) from exc


def _resume(qmp: Path) -> None:
    with contextlib.suppress(HypervisorError):  # the error that got us here is the one to report
        qmp_execute(qmp, "cont")


def _quit(qmp: Path) -> dict[str, Any]:
    with contextlib.suppress(HypervisorError):  # already gone: nothing left to stop
        qmp_execute(qmp, "quit")
    return {"source": "stopped"}


def _disk_names(disk_args: list[str]) -> list[str]:
    return [a.split("drive=")[1].split(",")[0] for a in disk_args if ",drive=" in a]


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
