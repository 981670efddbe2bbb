"""Fixtures for hypervisor tests: a real ``qemu-storage-daemon`` serving an image over NBD.

:func:`start_storage_daemon` is the helper (usable from any test or script);
the ``storage_daemon`` fixture is a factory around it that stops every daemon it started.

Pitfalls found on QEMU 7.2 (they shape how tests build images):

* a *read-only* NBD export refuses an *enabled* bitmap ("Enabled bitmap 'b0' incompatible with
  readonly export"): disable it first (``qemu-img bitmap --disable IMG NAME``, or QMP);
* if the daemon exits abnormally after opening a qcow2 (a bad ``--export`` argument, SIGKILL),
  its persistent bitmaps stay flagged ``in-use`` and are inconsistent from then on: stop the
  daemon with SIGTERM (``StorageDaemon.stop``) and build a fresh image per test;
* ``bitmaps`` of an NBD export is a list, so it is passed as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

QSD = "qemu-storage-daemon"


@dataclass
class StorageDaemon:
    """A running ``qemu-storage-daemon``: NBD socket ``sock``, QMP socket ``qmp``, log ``log``."""

    process: subprocess.Popen[bytes]
    sock: Path
    qmp: Path
    log: Path
    export: str

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait, so qcow2 bitmaps are stored cleanly; SIGKILL if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL, as a crash would (leaves persistent bitmaps inconsistent)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def start_storage_daemon(
    image: Path,
    workdir: Path,
    *,
    fmt: str = "qcow2",
    export: str = "disk0",
    bitmaps: Sequence[str] = (),
    blockdevs: Sequence[dict[str, Any]] | None = None,
    node: str = "disk0",
    read_only: bool = True,
    writable: bool = False,
    tcp_port: int | None = None,
    timeout: float = 10.0,
) -> StorageDaemon:
    """Start ``qemu-storage-daemon`` exporting ``image`` read-only over NBD; wait until it listens.

    By default the block graph is ``file0`` (file driver on ``image``) under ``disk0`` (``fmt``),
    both opened ``read_only`` (then the image file is never modified, and a killed daemon leaves
    its bitmaps intact); ``blockdevs`` replaces that graph with the given ``--blockdev`` JSON
    objects (in order), and ``node`` names the node to export (``writable`` for a writable
    export, which needs a read-write graph). The NBD server listens on ``workdir/nbd.sock``, or on
    127.0.0.1:``tcp_port`` when given; QMP is on ``workdir/qmp.sock``; stdout and stderr go to
    ``workdir/qsd.log``. Raises RuntimeError with the log when the daemon does not come up.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    sock, qmp, log = workdir / "nbd.sock", workdir / "qmp.sock", workdir / "qsd.log"
    if blockdevs is None:
        blockdevs = [
            {"driver": "file", "node-name": "file0", "filename": str(image),
             "read-only": read_only},
            {"driver": fmt, "node-name": "disk0", "file": "file0", "read-only": read_only},
        ]
    addr = (
        {"type": "inet", "host": "127.0.0.1", "port": str(tcp_port)}
        if tcp_port is not None
        else {"type": "unix", "path": str(sock)}
    )
    exp = {"type": "nbd", "id": "exp0", "node-name": node, "name": export,
           "bitmaps": list(bitmaps), "writable": writable}
    args = [QSD]
    for blockdev in blockdevs:
        args += ["--blockdev", json.dumps(blockdev)]
    args += [
        "--nbd-server", json.dumps({"addr": addr}),
        "--export", json.dumps(exp),
        "--chardev", f"socket,path={qmp},server=on,wait=off,id=qmp0",
        "--monitor", "chardev=qmp0",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    daemon = StorageDaemon(process, sock, qmp, log, export)
    _wait_listening(daemon, tcp_port, timeout)
    return daemon


def _wait_listening(daemon: StorageDaemon, tcp_port: int | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.process.poll() is not None:
            break
        if _accepts(daemon.sock, tcp_port):
            return
        time.sleep(0.02)
    daemon.kill()
    raise RuntimeError(f"{QSD} did not start: {daemon.log.read_text(errors='replace')}")


def _accepts(sock_path: Path, tcp_port: int | None) -> bool:
    """True once the NBD server accepts connections (the probe disconnects at once)."""
    try:
        if tcp_port is not None:
            socket.create_connection(("127.0.0.1", tcp_port), timeout=1).close()
            return True
        if not sock_path.exists():
            return False
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(os.fspath(sock_path))
        return True
    except OSError:
        return False


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def storage_daemon(tmp_path: Path) -> Iterator[Callable[..., StorageDaemon]]:
    """Factory: ``storage_daemon(image, **kwargs)`` starts a daemon (see start_storage_daemon).

    Each daemon gets its own directory under ``tmp_path``; all are stopped at teardown.
    """
    if shutil.which(QSD) is None:
        pytest.skip(f"{QSD} is not installed")
    started: list[StorageDaemon] = []

    def start(image: Path, **kwargs: Any) -> StorageDaemon:
        daemon = start_storage_daemon(image, tmp_path / f"qsd{len(started)}", **kwargs)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()
