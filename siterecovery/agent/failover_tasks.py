"""Failover work of agents, reported through the vault API (DESIGN §5).

A **recovery host's** agent runs the failover jobs an operator asks for with ``POST
/v1/vms/{vm}/failover`` and their follow-ups (cleanup, change point, commit), with the same
steps and contracts as :class:`~siterecovery.recovery.failover.FailoverService` (which runs
them against the vault database on one host): checks before the state changes, a verified
point, NICs through the network mappings, room on the host, instant or full restore, and an
undo (replica stopped, VM back to *protected*) when a started failover fails.

A **planned failover** is handed between the two sites through its job
(:mod:`siterecovery.vault.operations`):

1. ``source`` phase, the VM's own (primary) agent: *check prerequisites* (QMP answers),
   *shut down source VM* (paused: no write after that), *replicate final changes* (one last
   cycle, recorded as a point), then hand-off with ``final_point``;
2. ``recovery`` phase, a recovery agent: *select recovery point* (exactly ``final_point``),
   *prepare disks*, *start replica VM*, then hand-off back; on failure the replica is undone
   and the error is handed back instead (``replica_error``, ``failed_task``);
3. ``source-finish`` phase, the primary agent again: *release source VM* — QEMU quits when the
   replica runs; when it does not, the source is resumed and the failed task is failed with
   the recovery host's error, so the job ends failed and the source stays protected.

Replica VMs outlive the agent process (their records hold the pids, as with the CLI).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from siterecovery.domain import Consistency, ReplicationState
from siterecovery.errors import HypervisorError, InputError, SiteRecoveryError
from siterecovery.fsutil import private_dir
from siterecovery.hypervisor.process import QemuProcess, qmp_execute
from siterecovery.recovery import instant, network
from siterecovery.recovery.errors import FailoverError
from siterecovery.recovery.replica import (
    RecoveryHost,
    RecoveryMode,
    ReplicaRecord,
    StartRequest,
    boot,
    check_room,
    disk_need,
    prepare_disks,
    remove_slot,
    replica_spec,
    stop_replica,
    verify_point,
)
from siterecovery.replication.jobrun import JobDriver, TaskHandle
from siterecovery.store.manifest import PointManifest
from siterecovery.store.repository import ReplicaStore
from siterecovery.vault.port import VaultPort
from siterecovery.vault.work import WorkItem

log = logging.getLogger("siterecovery.agent")
S = ReplicationState
TEST_SLOT, FAILOVER_SLOT = "test", "failover"
_FROM = {"test": {S.PROTECTED}, "planned": {S.PROTECTED},
         "unplanned": {S.PROTECTED, S.RESYNC_REQUIRED, S.ERROR}}  # fmt: skip


class RecoveryWork:
    """Runs failover jobs on this recovery host; replicas live under ``recovery_dir``."""

    def __init__(
        self, vault: VaultPort, store: ReplicaStore, recovery_dir: Path, *,
        key_file: Path | None, accel: str = "tcg", host: RecoveryHost | None = None,
    ) -> None:  # fmt: skip
        self.vault = vault
        self.store = store
        self.recovery_dir = recovery_dir
        self.key_file = key_file
        self.accel = accel
        self.host = host or RecoveryHost.detect()
        self._processes: dict[tuple[str, str], QemuProcess] = {}

    # -- failover ------------------------------------------------------------------------

    def failover(self, item: WorkItem, job: JobDriver) -> None:
        """A test, unplanned, or (recovery phase of a) planned failover of ``item.vm``."""
        kind = str(item.details.get("failover", "unplanned"))
        if kind == "planned":
            return self._planned(item, job)
        job.run("check prerequisites", lambda _: self._prerequisites(item.vm, kind))
        point = self._checked(job, item, kind, str(item.details.get("point") or "latest"))
        target = S.TEST_FAILOVER_RUNNING if kind == "test" else S.FAILING_OVER
        self._move(item.vm, target, f"{kind} failover started")
        try:
            self._start(job, item, kind, point)
        except SiteRecoveryError:
            self._undo(item.vm, kind)
            job.release()
            raise
        job.finish()

    def _planned(self, item: WorkItem, job: JobDriver) -> None:
        failed: list[str] = []
        try:
            point = self._checked(job, item, "planned", str(item.details["final_point"]),
                                  failed=failed)  # fmt: skip
            self._move(item.vm, S.FAILING_OVER, "planned failover")
            self._start(job, item, "planned", point, failed=failed)
        except SiteRecoveryError as exc:
            self._undo(item.vm, "planned")
            job.hand_off("source-finish", {"replica_error": exc.describe()[:4000],
                                           "failed_task": failed[-1] if failed else
                                           "select recovery point"})  # fmt: skip
            raise
        job.hand_off("source-finish", {"replica": "running"})

    def _checked(
        self, job: JobDriver, item: WorkItem, kind: str, wanted: str,
        failed: list[str] | None = None,
    ) -> PointManifest:  # fmt: skip
        chosen: list[PointManifest] = []

        mode = self._mode(dict(item.details.get("options") or {}))

        def select(_: TaskHandle) -> dict[str, Any]:
            chosen.append(self._select(item.vm, wanted, kind, mode))
            return {"point": chosen[0].point_id, "consistency": str(chosen[0].consistency)}

        job.run("select recovery point", select, fail=failed is None, failed=failed)
        # resumed after the task succeeded: select again (the same point, checked again)
        return chosen[0] if chosen else self._select(item.vm, wanted, kind, mode)

    def _start(
        self, job: JobDriver, item: WorkItem, kind: str, point: PointManifest,
        failed: list[str] | None = None,
    ) -> None:  # fmt: skip
        started = time.monotonic()
        opts: dict[str, Any] = dict(item.details.get("options") or {})
        slot = TEST_SLOT if kind == "test" else FAILOVER_SLOT
        workdir = self._slot_dir(item.vm, slot)
        remove_slot(workdir)
        private_dir(workdir)
        forwards = [network.PortForward.parse(f) for f in opts.get("expose", [])]
        nics = network.plan_nics(item.vm, point.vm_config, self.vault.network_mappings(),
                                 test=kind == "test")  # fmt: skip
        if forwards and not nics:
            raise FailoverError(f"VM {item.vm} has no NIC: no port can be exposed")
        req = StartRequest(item.vm, slot, kind, point, self._mode(opts), workdir,
                           network.nic_args(nics, forwards), opts.get("append"), self.accel,
                           list(opts.get("expose", [])))  # fmt: skip
        made: dict[str, Any] = {}

        def prepare(_: TaskHandle) -> dict[str, Any]:
            if req.mode == RecoveryMode.INSTANT and self.key_file is None:
                raise InputError("instant recovery needs the store's key file on this host",
                                 hint="choose --mode full, or give the agent the key file")
            made["disks"] = prepare_disks(self.store, self.key_file or Path("/nonexistent"),
                                          req, None)  # a full restore never reads the key
            return {"mode": str(req.mode), "nbd_server_pid": made["disks"][2],
                    "seconds": round(time.monotonic() - started, 3)}  # fmt: skip

        def start(_: TaskHandle) -> dict[str, Any]:
            return self._boot(req, made["disks"], nics, started)

        job.run("prepare disks", prepare, fail=failed is None, failed=failed)
        job.run("start replica VM", start, fail=failed is None, failed=failed)
        if kind != "test" and self._state(item.vm) == S.FAILING_OVER:  # not on change point
            self._move(item.vm, S.FAILED_OVER, f"running from point {point.point_id}")

    def _boot(
        self, req: StartRequest, disks: Any, nics: list[Any], started: float
    ) -> dict[str, Any]:
        drives, disk_args, server_pid = disks
        spec = replica_spec(req, drives, disk_args)
        record = ReplicaRecord(req.vm, req.slot, req.kind, req.point.point_id, str(req.mode),
                               str(req.workdir), spec.name, 0,
                               str(req.workdir / f"{spec.name}.qmp"),
                               str(req.workdir / f"{spec.name}.serial.log"), [*req.point.disks],
                               server_pid, spec.memory_mib, forwards=req.forwards,
                               append=req.append)  # fmt: skip
        record.save()
        process = boot(spec)
        process.detach()  # the replica outlives this agent process
        self._processes[(req.vm, req.slot)] = process
        record.pid = process.pid
        record.disks = [d.name for d in drives] or _disk_names(disk_args)
        if req.mode == RecoveryMode.INSTANT and req.kind != "test":
            instant.start_hydration(process.qmp_path, record.disks)
            record.hydrating = True
        record.save()
        return {"pid": process.pid, "qmp": str(process.qmp_path),
                "seconds_to_start": round(time.monotonic() - started, 3),
                "networks": [n.network.name for n in nics], "hydrating": record.hydrating,
                "recovery_host_dir": str(req.workdir)}  # fmt: skip

    def _undo(self, vm: str, kind: str) -> None:
        """Stop what a failed failover started; the VM returns to protected."""
        workdir = self._slot_dir(vm, TEST_SLOT if kind == "test" else FAILOVER_SLOT)
        record = ReplicaRecord.load(workdir)
        if record is not None:
            stop_replica(record, self._processes.pop((vm, record.slot), None))
        remove_slot(workdir)
        with contextlib.suppress(SiteRecoveryError):
            state = self._state(vm)
            if state in (S.FAILING_OVER, S.TEST_FAILOVER_RUNNING):
                self._move(vm, S.PROTECTED, f"{kind} failover failed; the source is untouched")

    # -- follow-ups ----------------------------------------------------------------------

    def cleanup(self, item: WorkItem, job: JobDriver) -> None:
        """End the drill: stop its replica, remove its files, back to protected."""
        workdir = self._slot_dir(item.vm, TEST_SLOT)

        def stop(_: TaskHandle) -> dict[str, Any]:
            record = ReplicaRecord.load(workdir)
            if record is not None:
                stop_replica(record, self._processes.pop((item.vm, TEST_SLOT), None))
            return {"stopped": record is not None}

        def remove(_: TaskHandle) -> dict[str, Any]:
            remove_slot(workdir)
            self._move(item.vm, S.PROTECTED, "drill cleaned up")
            return {"removed": str(workdir)}

        self._run_all(job, [("stop replica VM", stop), ("remove drill data", remove)])

    def change_point(self, item: WorkItem, job: JobDriver) -> None:
        """Restart the failed-over VM from ``details["point"]`` (before commit)."""
        record = self._replica(item.vm)
        chosen: list[PointManifest] = []

        def select(_: TaskHandle) -> dict[str, Any]:
            wanted = str(item.details["point"])
            chosen.append(self._select(item.vm, wanted, record.kind, RecoveryMode(record.mode)))
            return {"point": chosen[0].point_id}

        def stop(_: TaskHandle) -> dict[str, Any]:
            stop_replica(record, self._processes.pop((item.vm, FAILOVER_SLOT), None))
            remove_slot(Path(record.workdir))
            return {"stopped": record.point_id}

        self._run_all(job, [("select recovery point", select), ("stop replica VM", stop)],
                      finish=False)  # fmt: skip
        options = {"mode": record.mode, "expose": record.forwards, "append": record.append}
        moved = dataclasses.replace(item, details={**item.details, "options": options})
        try:
            self._start(job, moved, record.kind, chosen[0])
        except SiteRecoveryError:
            job.release()
            raise
        job.finish()

    def commit(self, item: WorkItem, job: JobDriver) -> None:
        """Commit the failover: the point can no longer change; hydration goes on."""
        record = self._replica(item.vm)

        def check(_: TaskHandle) -> dict[str, Any]:
            if not instant.pid_alive(record.pid):
                raise FailoverError(
                    f"the replica VM of {item.vm} is not running",
                    hint="change the point to start it again, then commit",
                )
            if record.mode == RecoveryMode.INSTANT and not record.hydrating:
                instant.start_hydration(Path(record.qmp), record.disks)
                record.hydrating = True
            return {"point": record.point_id, "pid": record.pid}

        def commit(_: TaskHandle) -> dict[str, Any]:
            self._move(item.vm, S.COMMITTED, f"failover committed at point {record.point_id}")
            record.committed = True
            record.save()
            return {"point": record.point_id}

        self._run_all(job, [("check replica VM", check), ("commit", commit)])

    # -- helpers -------------------------------------------------------------------------

    def _run_all(self, job: JobDriver, steps: list[Any], *, finish: bool = True) -> None:
        try:
            for name, body in steps:
                job.run(name, body)
        except SiteRecoveryError:
            job.release()
            raise
        if finish:
            job.finish()

    def _prerequisites(self, vm: str, kind: str) -> dict[str, Any]:
        state = self._state(vm)
        if state not in _FROM[kind]:
            raise InputError(f"VM {vm} is {state}: a {kind} failover needs it "
                             + " or ".join(sorted(_FROM[kind])))  # fmt: skip
        return {"state_before": str(state), "recovery_dir": str(self.recovery_dir)}

    def _select(self, vm: str, wanted: str, kind: str, mode: RecoveryMode) -> PointManifest:
        records = self.vault.points(vm)
        if wanted in ("latest", "latest-app"):
            if wanted == "latest-app":
                records = [p for p in records if p.consistency == Consistency.APP]
            if not records:
                raise FailoverError(f"VM {vm} has no recovery point to fail over to")
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
                hint="choose another point, and run `siterecovery store verify`",
            ) from exc
        network.plan_nics(vm, point.vm_config, self.vault.network_mappings(), test=kind == "test")
        memory = int(point.vm_config.get("memory_mib", 256))
        check_room(self.host, self.recovery_dir, memory, disk_need(self.store, point, mode), vm)
        return point

    def _mode(self, opts: dict[str, Any]) -> RecoveryMode:
        """The mode asked for; by default instant recovery when the store's key file is
        known here (the store's NBD server needs it), else a full restore."""
        default = RecoveryMode.INSTANT if self.key_file is not None else RecoveryMode.FULL
        return RecoveryMode(opts.get("mode") or default)

    def _state(self, vm: str) -> S:
        return self.vault.protection(vm).state

    def _move(self, vm: str, state: S, reason: str) -> None:
        self.vault.transition(vm, state, reason)

    def _replica(self, vm: str) -> ReplicaRecord:
        record = ReplicaRecord.load(self._slot_dir(vm, FAILOVER_SLOT))
        if record is None:
            raise FailoverError(f"no replica of VM {vm} on this recovery host")
        return record

    def _slot_dir(self, vm: str, slot: str) -> Path:
        return self.recovery_dir / vm / slot


# ---- the source side of a planned failover -------------------------------------------------


def source_phase(job: JobDriver, item: WorkItem, qmp: Path, final_cycle: Any) -> None:
    """Phase ``source``: pause the VM, ship the final cycle (``final_cycle()`` returns the
    recorded point id), hand off to the recovery site. The source is resumed on failure."""
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
    except SiteRecoveryError:
        if paused:
            _resume(qmp)
        job.release()
        raise
    job.hand_off("recovery", {"final_point": str(done["point"])})


def source_finish(job: JobDriver, item: WorkItem, qmp: Path) -> None:
    """Phase ``source-finish``: quit the source when the replica runs; else resume it and
    fail the job with the recovery host's error."""
    error = item.details.get("replica_error")
    if error:
        _resume(qmp)
        task = str(item.details.get("failed_task") or "select recovery point")
        job.fail(task, f"{error}; the source VM {item.vm} was resumed and stays protected")
        job.release()
        return

    def release(_: TaskHandle) -> dict[str, Any]:
        with contextlib.suppress(HypervisorError):  # already gone: nothing left to stop
            qmp_execute(qmp, "quit")
        return {"source": "stopped"}

    job.run("release source VM", release)
    job.finish()


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


def _disk_names(disk_args: list[str]) -> list[str]:
    return [a.split("drive=")[1].split(",")[0] for a in disk_args if a.startswith("virtio-blk")]
