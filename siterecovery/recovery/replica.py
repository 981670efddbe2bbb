"""Replica VMs on this recovery host: how they start (instant or full restore), the record
of what runs, capacity checks, probes, and teardown.

Files of a replica of VM ``V`` (``SLOT`` is ``test`` for a drill, ``failover`` otherwise)::

    RECOVERY_DIR/V/SLOT/replica.json        the ReplicaRecord (temp file + rename)
    RECOVERY_DIR/V/SLOT/replica.qmp|.serial.log|.log|.pid QEMU files (process.py)
    RECOVERY_DIR/V/SLOT/<disk>.overlay.qcow2 instant recovery: local writes and hydrated data
    RECOVERY_DIR/V/SLOT/nbd.sock, nbd.log    instant recovery: the store's NBD server
    RECOVERY_DIR/V/SLOT/<point>/<disk>.qcow2 full restore: the materialized disks

The record holds pids, so a later command (cleanup, change-point, commit) finds the VM and
its NBD server even from another process; removing SLOT removes everything a replica made.

The replica is the machine the point records (:func:`point_config`): machine type, vCPUs and
CPU model, memory, disks on their device models with their serials, discard and cache modes,
the guest agent port and the boot configuration; NICs come in through the request's extra
arguments (network.py). What this host cannot honour is changed to the closest setting it
can (``hypervisor/machine.py``) and said in the warnings :func:`replica_spec` returns.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from siterecovery.domain import VmConfig
from siterecovery.errors import HypervisorError, InputError
from siterecovery.fsutil import private_dir, write_private
from siterecovery.hypervisor.machine import (
    Honoured,
    honour,
    host_capabilities,
    supports_direct_io,
)
from siterecovery.hypervisor.process import DriveSpec, QemuProcess, VmProcessSpec, qmp_execute
from siterecovery.recovery import instant
from siterecovery.recovery.errors import DrillCheckFailed, FailoverError
from siterecovery.store.manifest import PointManifest
from siterecovery.store.repository import ReplicaStore

RECORD_NAME = "replica.json"
#: Free space kept back on the recovery host's disk for logs and overlays' first writes.
DISK_RESERVE = 256 << 20

DiskProgress = Callable[[str, int, int], None]
"""progress(disk, bytes_done, bytes_total)"""


class RecoveryMode(enum.StrEnum):
    """How the replica's disks are made: served from the store at once, or copied first."""

    INSTANT = "instant"
    FULL = "full"


@dataclass
class ReplicaRecord:
    """What runs for one replica VM; stored as JSON in its slot directory."""

    vm: str
    slot: str
    kind: str
    point_id: str
    mode: str
    workdir: str
    name: str
    pid: int
    qmp: str
    serial: str
    disks: list[str]
    server_pid: int = 0
    memory_mib: int = 0
    committed: bool = False
    hydrating: bool = False
    forwards: list[str] = field(default_factory=list)
    append: str | None = None

    def save(self) -> None:
        path = Path(self.workdir) / RECORD_NAME
        write_private(path, (json.dumps(asdict(self), indent=2) + "\n").encode())

    @classmethod
    def load(cls, workdir: Path) -> ReplicaRecord | None:
        path = workdir / RECORD_NAME
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))


# ---------------------------------------------------------------------------------------------
# Capacity


@dataclass(frozen=True)
class RecoveryHost:
    """What this recovery host may give replica VMs: memory, parallel starts, disk space."""

    memory_mib: int
    max_parallel: int = 2

    @classmethod
    def detect(cls) -> RecoveryHost:
        """From /proc/meminfo's MemAvailable; parallel starts bounded by the CPU count."""
        available = 0
        with contextlib.suppress(OSError):
            match = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
            available = int(match[1]) // 1024 if match else 0
        return cls(memory_mib=max(0, available - 512), max_parallel=max(1, os.cpu_count() or 1))


def running_memory(recovery_dir: Path) -> int:
    """MiB of memory held by replica VMs that run now (from their records)."""
    total = 0
    for path in recovery_dir.glob(f"*/*/{RECORD_NAME}"):
        record = ReplicaRecord.load(path.parent)
        if record is not None and instant.pid_alive(record.pid):
            total += record.memory_mib
    return total


def check_room(
    host: RecoveryHost, recovery_dir: Path, memory_mib: int, disk_bytes: int, vm: str
) -> None:
    """Raise FailoverError unless ``memory_mib`` and ``disk_bytes`` fit on this host now."""
    used = running_memory(recovery_dir)
    if used + memory_mib > host.memory_mib:
        raise FailoverError(
            f"the recovery host has no room for VM {vm}: it needs {memory_mib} MiB of memory, "
            f"{host.memory_mib - used} MiB are free for replica VMs",
            hint="stop or commit-and-move other replica VMs, or fail over to a larger host",
        )
    private_dir(recovery_dir)
    free = shutil.disk_usage(recovery_dir).free
    if disk_bytes + DISK_RESERVE > free:
        raise FailoverError(
            f"the recovery host has no room for VM {vm}: its disks need "
            f"{(disk_bytes + DISK_RESERVE) >> 20} MiB, {free >> 20} MiB are free in {recovery_dir}",
            hint="free space on the recovery host, or use instant recovery",
        )


def disk_need(store: ReplicaStore, point: PointManifest, mode: RecoveryMode) -> int:
    """Bytes of local disk the replica needs at start: all data for a full restore."""
    if mode == RecoveryMode.INSTANT:
        return 0
    total = 0
    for disk in point.disks:
        reader = store.open_disk(point, disk)
        blocks = sum(1 for i in range(reader.block_count) if reader.index.chunk_hex(i))
        total += blocks * reader.block_size + sum(r.size for r in point.disks[disk].segments)
    return total


def verify_point(store: ReplicaStore, point: PointManifest) -> dict[str, Any]:
    """Check the point's manifest, indexes and segment headers (every read is verified).

    Data blocks are verified when read (instant recovery) or copied (full restore).
    """
    sizes = {}
    for disk in point.disks:
        reader = store.open_disk(point, disk)
        reader.block(0)
        sizes[disk] = reader.size
    return {"disks": sizes, "segments": sum(len(c.segments) for c in point.disks.values())}


# ---------------------------------------------------------------------------------------------
# Starting and stopping


def point_config(point: PointManifest) -> VmConfig:
    """The machine ``point`` records; VmConfigError (an InputError) when it is malformed."""
    return VmConfig.from_json(point.vm_config, name=point.vm)


def disk_order(point: PointManifest) -> list[str]:
    """The point's disks in the source VM's device order (config order, then by name)."""
    configured = [d.name for d in point_config(point).disks]
    rest = sorted(set(point.disks) - set(configured))
    return [d for d in configured if d in point.disks] + rest


@dataclass(frozen=True)
class StartRequest:
    """Everything needed to start one replica VM."""

    vm: str
    slot: str
    kind: str
    point: PointManifest
    mode: RecoveryMode
    workdir: Path
    extra_args: list[str]
    append: str | None
    accel: str
    forwards: list[str]

    @functools.cached_property
    def honoured(self) -> Honoured:
        """The point's machine within what this host runs under ``accel`` (the host's QEMU
        is probed once per process), with a warning per setting that had to change."""
        config = point_config(self.point)
        caps = host_capabilities(self.accel)
        return honour(config, caps, direct_io=supports_direct_io(self.workdir))


class ReplicaLaunch(NamedTuple):
    """What :func:`replica_spec` gives: the QEMU spec, and what this host could not honour."""

    spec: VmProcessSpec
    warnings: list[str]


def prepare_disks(
    store: ReplicaStore,
    key_file: Path,
    req: StartRequest,
    progress: DiskProgress | None,
) -> tuple[list[DriveSpec], list[str], int]:
    """Make the disks: (drives, extra QEMU args, NBD server pid or 0)."""
    disks = disk_order(req.point)
    config = req.honoured.config
    if req.mode == RecoveryMode.INSTANT:
        server = instant.start_server(
            store_url=store.url, key_file=key_file, vm=req.vm,
            point_id=req.point.point_id, workdir=req.workdir,
        )  # fmt: skip
        shapes = [config.disk(d) for d in disks]
        return [], instant.overlay_args(req.point, shapes, req.workdir), server.pid
    dest = private_dir(req.workdir / req.point.point_id)
    drives = []
    for disk in disks:
        path = dest / f"{disk}.qcow2"
        callback = None if progress is None else _bind(progress, disk)
        store.restore_disk(req.point, disk, path, fmt="qcow2", progress=callback, overwrite=True)
        drives.append(DriveSpec(disk, path, "qcow2", disk=config.disk(disk)))
    return drives, [], 0


def _bind(progress: DiskProgress, disk: str) -> Callable[[int, int], None]:
    return lambda done, total: progress(disk, done, total)


def replica_spec(req: StartRequest, drives: list[DriveSpec], disk_args: list[str]) -> ReplicaLaunch:
    """The QEMU spec of the replica: the point's machine as this host can run it, and one
    warning per setting it could not honour (the job records them)."""
    honoured = req.honoured
    spec = machine_spec(
        honoured.config,
        name="replica",  # short: QMP socket paths are limited to 107 bytes
        workdir=req.workdir, drives=drives, accel=req.accel,
        extra_args=[*disk_args, *req.extra_args], append=req.append,
    )  # fmt: skip
    return ReplicaLaunch(spec, list(honoured.warnings))


def machine_spec(
    config: VmConfig,
    *,
    name: str,
    workdir: Path,
    drives: list[DriveSpec],
    accel: str,
    qmp: Path | None = None,
    extra_args: list[str] | None = None,
    append: str | None = None,
) -> VmProcessSpec:
    """The spec that starts ``config`` (already honoured: see ``hypervisor/machine.py``) as
    VM ``name`` in ``workdir`` (its QMP socket at ``qmp`` if given); ``append`` replaces the
    recorded kernel command line."""
    boot = config.boot
    return VmProcessSpec(
        name=name, workdir=workdir, drives=drives, accel=accel, qmp=qmp,
        memory_mib=config.memory_mib, cpus=config.cpus, cpu_model=config.cpu_model,
        machine=config.machine, guest_agent=config.guest_agent, boot_order=boot.order,
        kernel=Path(boot.kernel) if boot.kernel else None,
        initrd=Path(boot.initrd) if boot.initrd else None,
        append=append if append is not None else boot.append,
        extra_args=list(extra_args or []),
    )  # fmt: skip


def boot(spec: VmProcessSpec) -> QemuProcess:
    """Start the replica VM; FailoverError with QEMU's log when it does not start."""
    try:
        return QemuProcess.start(spec)
    except (HypervisorError, InputError) as exc:
        raise FailoverError(f"the replica VM {spec.name} did not start: {exc}") from exc


def stop_replica(record: ReplicaRecord, process: QemuProcess | None) -> None:
    """Stop the replica VM (QMP quit, then signals) and its NBD server."""
    if process is not None:
        process.stop()
    elif instant.pid_alive(record.pid):
        with contextlib.suppress(HypervisorError):
            qmp_execute(Path(record.qmp), "quit", timeout=2.0)
        instant.stop_pid(record.pid)
    if record.server_pid:
        instant.stop_pid(record.server_pid)


def remove_slot(workdir: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Drill checks


@dataclass(frozen=True)
class Probe:
    """A drill check: a console line (``serial``) or a TCP port answering (``port``).

    ``pattern`` is a regex searched in the console, or in the port's first answer (to an
    HTTP GET when ``http``); an empty pattern for a port only needs the connection.
    """

    kind: str
    pattern: str = ""
    port: int = 0
    http: bool = True
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.kind not in ("serial", "port"):
            raise InputError(f"unknown check kind {self.kind!r}", hint="use serial or port")
        if self.kind == "port" and not 0 < self.port < 65536:
            raise InputError("a port check needs the exposed host port")
        re.compile(self.pattern)


def run_probe(probe: Probe, process: QemuProcess) -> dict[str, Any]:
    """Run ``probe``; return its evidence, or raise FailoverError with what was seen."""
    started = time.monotonic()
    if probe.kind == "serial":
        try:
            match = process.wait_serial(probe.pattern, probe.timeout_s)
        except HypervisorError as exc:
            raise DrillCheckFailed(f"the drill check failed: {exc}") from exc
        return {"kind": "serial", "matched": match.group(0),
                "seconds": round(time.monotonic() - started, 3)}  # fmt: skip
    answer = _poll_port(probe, started)
    return {"kind": "port", "port": probe.port, "answer": answer[:200],
            "seconds": round(time.monotonic() - started, 3)}  # fmt: skip


def _poll_port(probe: Probe, started: float) -> str:
    last = ""
    while time.monotonic() - started < probe.timeout_s:
        try:
            with socket.create_connection(("127.0.0.1", probe.port), timeout=3) as sock:
                if probe.http:
                    sock.sendall(b"GET / HTTP/1.0\r\nHost: drill\r\n\r\n")
                answer = _read_some(sock)
            if re.search(probe.pattern, answer):
                return answer
            last = answer
        except OSError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise DrillCheckFailed(
        f"the drill check failed: port {probe.port} did not answer {probe.pattern!r} within "
        f"{probe.timeout_s:g} s (last: {last[:200]!r})"
    )


def _read_some(sock: socket.socket) -> str:
    chunks: list[bytes] = []
    with contextlib.suppress(OSError):
        while len(chunks) < 64:
            data = sock.recv(4096)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks).decode(errors="replace")
