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

from siterecovery.errors import InputError
from siterecovery.hypervisor.process import DriveSpec, QemuProcess, VmProcessSpec
from siterecovery.recovery.errors import FailoverError
from siterecovery.store.manifest import PointManifest
from siterecovery.store.repository import ReplicaStore

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
