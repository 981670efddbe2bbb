"""Instant recovery: start the replica VM on the replica store itself, then hydrate.

Block graph of each disk ``D`` of the replica VM (QEMU ``-blockdev``)::

    D            qcow2, file D-file = WORKDIR/D.overlay.qcow2   (writes land here)
    └─ backing   D-nbd: nbd over unix socket WORKDIR/nbd.sock, export D, read-only
                 served by siterecovery.recovery.nbdserver from the recovery point

The backing is declared inline (not as a monitor-owned node), so when hydration —
QMP ``block-stream`` on ``D`` — has copied every block of the backing into the overlay, QEMU
drops the NBD node by itself, disconnects, and the server process (``--exit-when-idle``)
exits. The VM keeps running throughout: it is switched to local storage without a restart.

Contracts:
- :func:`start_server` returns once the server accepts connections (its socket appears by
  atomic rename) or raises :class:`FailoverError` with the server's log.
- :func:`overlay_args` creates empty overlays and returns the ``-blockdev``/``-device`` args
  in the given disk order, each disk on its recorded device model with its discard and
  cache options (``hypervisor/devices.py``); nothing is written to the store.
- :func:`start_hydration` / :func:`hydration_status` talk QMP to the running VM.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from siterecovery.domain import DiskConfig
from siterecovery.errors import HypervisorError
from siterecovery.fsutil import CHILD_UMASK, open_private
from siterecovery.hypervisor.devices import controller_args, device_args, node_options
from siterecovery.hypervisor.guest import make_disk
from siterecovery.hypervisor.process import qmp_execute
from siterecovery.recovery.errors import FailoverError
from siterecovery.store.manifest import PointManifest

SERVER_SOCKET = "nbd.sock"
SERVER_LOG = "nbd.log"
SERVER_START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ServerHandle:
    """A running NBD server process (it may outlive the Python process that started it)."""

    pid: int
    socket: Path
    log: Path

    def alive(self) -> bool:
        return pid_alive(self.pid)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL; idempotent."""
        stop_pid(self.pid, timeout)


#: Servers started by this process, kept so their Popen objects are not collected while they
#: run (they may outlive this process; they run in their own session).
_STARTED: dict[int, subprocess.Popen[bytes]] = {}


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie of ours (reaped here if it is)."""
    if pid <= 0:
        return False
    if pid in _STARTED:
        if _STARTED[pid].poll() is None:
            return True
        del _STARTED[pid]
        return False
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_pid(pid: int, timeout: float = 5.0) -> None:
    """End process ``pid``: SIGTERM, wait up to ``timeout``, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not pid_alive(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.05)


def start_server(
    *,
    store_url: str,
    key_file: Path,
    vm: str,
    point_id: str,
    workdir: Path,
    cache_mib: int = 256,
) -> ServerHandle:
    """Start the NBD server for ``point_id`` of ``vm`` in ``workdir`` (its own session)."""
    sock, log = workdir / SERVER_SOCKET, workdir / SERVER_LOG
    sock.unlink(missing_ok=True)
    argv = [
        sys.executable, "-m", "siterecovery.recovery.nbdserver",
        "--store-url", store_url, "--key-file", str(key_file), "--vm", vm,
        "--point", point_id, "--socket", str(sock), "--cache-mib", str(cache_mib),
        "--exit-when-idle",
    ]  # fmt: skip
    out = open_private(log)
    try:
        popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            close_fds=True, start_new_session=True, umask=CHILD_UMASK,
        )  # fmt: skip
    finally:
        os.close(out)
    _STARTED[popen.pid] = popen
    handle = ServerHandle(popen.pid, sock, log)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not sock.exists():
        if popen.poll() is not None or time.monotonic() > deadline:
            handle.stop()
            tail = log.read_text(errors="replace")[-2000:]
            raise FailoverError(f"the instant recovery NBD server did not start: {tail}")
        time.sleep(0.02)
    return handle


def overlay_args(point: PointManifest, disks: Sequence[DiskConfig], workdir: Path) -> list[str]:
    """Create ``WORKDIR/<disk>.overlay.qcow2`` for each of ``disks`` and return the QEMU args.

    Each overlay is as large as the disk and empty; its backing is given at run time, so the
    image header names no backing file (a stale path can never be picked up later).
    """
    args = controller_args(disks)
    sock = workdir / SERVER_SOCKET
    for disk in disks:
        name, opts = disk.name, node_options(disk)
        overlay = workdir / f"{name}.overlay.qcow2"
        make_disk(overlay, point.disks[name].size, overwrite=True)
        node: dict[str, Any] = {
            "driver": "qcow2", "node-name": name, **opts,
            "file": {"driver": "file", "node-name": f"{name}-file", "filename": str(overlay),
                     **opts},
            "backing": {
                "driver": "nbd", "node-name": f"{name}-nbd", "export": name, "read-only": True,
                "server": {"type": "unix", "path": str(sock)},
            },
        }  # fmt: skip
        args += ["-blockdev", json.dumps(node), *device_args(name, disk)]
    return args


def start_hydration(qmp: Path, disks: list[str]) -> None:
    """Start ``block-stream`` on every disk: copy the store's data into the local overlays."""
    for disk in disks:
        try:
            qmp_execute(qmp, "block-stream", {"job-id": f"hydrate-{disk}", "device": disk})
        except HypervisorError as exc:
            raise FailoverError(
                f"hydration of disk {disk} did not start: {exc}",
                hint="the VM keeps running on the replica store; run the failover's "
                "hydration again or fail over with --full-restore",
            ) from exc


@dataclass(frozen=True)
class HydrationStatus:
    """Per disk: bytes copied and total, and whether the disk is fully local now."""

    disks: dict[str, tuple[int, int, bool]]

    @property
    def done(self) -> bool:
        return all(local for _, _, local in self.disks.values())


def hydration_status(qmp: Path, disks: list[str]) -> HydrationStatus:
    """Ask the VM how far hydration got; a disk without a backing node is local."""
    jobs = {j["device"]: j for j in qmp_execute(qmp, "query-block-jobs")}
    nodes = {n["node-name"]: n for n in qmp_execute(qmp, "query-named-block-nodes")}
    out: dict[str, tuple[int, int, bool]] = {}
    for disk in disks:
        node = nodes.get(disk, {})
        local = not node.get("backing_file") and f"{disk}-nbd" not in nodes
        job = jobs.get(f"hydrate-{disk}")
        size = int(node.get("image", {}).get("virtual-size", 0))
        if job is not None:
            out[disk] = (int(job["offset"]), int(job["len"]), False)
        else:
            out[disk] = (size if local else 0, size, local)
    return HydrationStatus(out)


def wait_hydrated(qmp: Path, disks: list[str], timeout: float) -> HydrationStatus:
    """Poll until every disk is local; FailoverError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        status = hydration_status(qmp, disks)
        if status.done:
            return status
        if time.monotonic() > deadline:
            raise FailoverError(f"hydration not finished after {timeout:g} s: {status.disks}")
        time.sleep(0.2)
