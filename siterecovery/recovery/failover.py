"""Recovery on the recovery site: materialize a recovery point's disks and boot the replica VM.

The replica VM is the same machine as the source: CPUs, memory, disks in the same order and
boot configuration come from the ``vm_config`` stored in the recovery point manifest, so the
recovery site needs nothing but the replica store and its key.

Contract:
- :func:`materialize` writes each disk of the point under ``dest_dir`` through a temporary
  file renamed when complete and verified (every chunk and segment is checked on read), so a
  failover interrupted midway leaves no disk that looks finished.
- :func:`boot_replica` starts QEMU on those disks and returns the running process; the caller
  owns it (stop it, or keep it running after commit).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from siterecovery.domain import ReplicationState
from siterecovery.errors import InputError
from siterecovery.hypervisor.process import DriveSpec, QemuProcess, VmProcessSpec
from siterecovery.recovery.errors import FailoverError
from siterecovery.replication.jobrun import JobListener, JobRun
from siterecovery.store.manifest import PointManifest
from siterecovery.store.repository import ReplicaStore
from siterecovery.vault import jobs, points, service
from siterecovery.vault.db import Database
from siterecovery.vault.records import JobRecord

S = ReplicationState

DiskProgress = Callable[[str, int, int], None]
"""progress(disk, bytes_done, bytes_total)"""


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
    """Restore every disk of ``point`` into ``dest_dir`` as ``<disk>.<fmt>``, verified."""
    if fmt not in ("raw", "qcow2"):
        raise InputError(f"unknown disk format {fmt!r}", hint="use raw or qcow2")
    dest_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    paths: dict[str, Path] = {}
    for disk in disk_order(point):
        dest = dest_dir / f"{disk}.{fmt}"
        callback = _bind(progress, disk)
        store.restore_disk(point, disk, dest, fmt=fmt, progress=callback)
        paths[disk] = dest
    return MaterializedDisks(point.point_id, paths, time.monotonic() - started)


def disk_order(point: PointManifest) -> list[str]:
    """The point's disks in the source VM's device order (config order, then by name)."""
    configured = [str(d["name"]) for d in point.vm_config.get("disks", []) if "name" in d]
    rest = sorted(set(point.disks) - set(configured))
    return [d for d in configured if d in point.disks] + rest


def replica_spec(
    point: PointManifest,
    disks: MaterializedDisks,
    workdir: Path,
    *,
    name: str | None = None,
    append: str | None = None,
    accel: str = "tcg",
) -> VmProcessSpec:
    """The QEMU process spec of the replica VM, from the configuration stored in the point.

    ``append`` replaces the kernel command line (a drill may boot into a check mode).
    """
    config: Mapping[str, Any] = point.vm_config
    boot: Mapping[str, Any] = config.get("boot", {})
    fmt = "qcow2" if all(p.suffix == ".qcow2" for p in disks.paths.values()) else "raw"
    return VmProcessSpec(
        name=name or f"{point.vm}-replica",
        workdir=workdir,
        drives=[DriveSpec(disk, path, fmt) for disk, path in disks.paths.items()],
        memory_mib=int(config.get("memory_mib", 256)),
        cpus=int(config.get("cpus", 1)),
        kernel=Path(boot["kernel"]) if boot.get("kernel") else None,
        initrd=Path(boot["initrd"]) if boot.get("initrd") else None,
        append=append if append is not None else str(boot.get("append", "")),
        accel=accel,
    )


def boot_replica(spec: VmProcessSpec) -> QemuProcess:
    """Start the replica VM; raise :class:`FailoverError` with the QEMU log when it fails."""
    for drive in spec.drives:
        if not drive.path.exists():
            raise FailoverError(f"disk {drive.name} was not materialized at {drive.path}")
    try:
        return QemuProcess.start(spec)
    except Exception as exc:
        raise FailoverError(f"the replica VM {spec.name} did not start: {exc}") from exc


def _bind(progress: DiskProgress | None, disk: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    bound = progress

    def callback(done: int, total: int) -> None:
        bound(disk, done, total)

    return callback


FAILOVER_TASKS = (
    "check prerequisites",
    "select recovery point",
    "materialize disks",
    "start replica VM",
)


@dataclass
class FailoverOutcome:
    """What a failover made: the job, the point used, the running replica and its timings."""

    job: JobRecord
    point: PointManifest
    process: QemuProcess
    disks: MaterializedDisks
    seconds_to_start: float


class FailoverService:
    """Fails protected VMs over to this recovery host (DESIGN §5), as vault jobs."""

    def __init__(
        self,
        db: Database,
        store: ReplicaStore,
        recovery_dir: Path,
        *,
        accel: str = "tcg",
        on_job: JobListener | None = None,
        progress: DiskProgress | None = None,
    ) -> None:
        self.db = db
        self.store = store
        self.recovery_dir = recovery_dir
        self.accel = accel
        self.on_job = on_job
        self.progress = progress

    def unplanned(
        self, vm: str, *, point_id: str | None = None, append: str | None = None
    ) -> FailoverOutcome:
        """Fail ``vm`` over to ``point_id`` (default: the newest point) with the primary lost.

        The VM goes *failing over* → *failed over*; if a step fails it returns to *protected*
        (or the state it had), the replica's leftovers are removed, and the error propagates.
        """
        started = time.monotonic()
        before = service.get_protection(self.db, vm=vm).state
        job = jobs.create_job(
            self.db, kind="unplanned failover", vm=vm, tasks=FAILOVER_TASKS,
            details={"point": point_id or "latest"},
        )  # fmt: skip
        run = JobRun(self.db, job.id, on_change=self.on_job)
        with run.task("check prerequisites") as task:
            service.transition(self.db, vm=vm, to_state=S.FAILING_OVER, reason="unplanned failover")
            task.progress(100, {"state_before": str(before)})
        try:
            return self._recover(vm, run, point_id, append, started)
        except BaseException:
            service.transition(
                self.db, vm=vm, to_state=S.PROTECTED, reason="failover failed; source untouched"
            )
            raise

    def _recover(
        self, vm: str, run: JobRun, point_id: str | None, append: str | None, started: float
    ) -> FailoverOutcome:
        with run.task("select recovery point") as task:
            point = self._select(vm, point_id)
            task.progress(100, {"point": point.point_id, "consistency": str(point.consistency)})
        workdir = self.recovery_dir / vm
        with run.task("materialize disks") as task:
            disks = materialize(self.store, point, workdir / point.point_id, progress=self.progress)
            task.progress(100, {"seconds": round(disks.seconds, 3)})
        with run.task("start replica VM") as task:
            spec = replica_spec(point, disks, workdir, append=append, accel=self.accel)
            process = boot_replica(spec)
            task.progress(100, {"pid": process.pid, "qmp": str(process.qmp_path)})
        seconds = time.monotonic() - started
        service.transition(
            self.db, vm=vm, to_state=S.FAILED_OVER, reason=f"running from point {point.point_id}"
        )
        return FailoverOutcome(run.finish(), point, process, disks, seconds)

    def _select(self, vm: str, point_id: str | None) -> PointManifest:
        if point_id is None:
            latest = points.latest_point(self.db, vm=vm)
            if latest is None:
                raise FailoverError(f"VM {vm} has no recovery point to fail over to")
            point_id = latest.point_id
        return self.store.load_point(vm, point_id)
