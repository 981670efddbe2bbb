"""The primary side for ours: a qcow2 disk served by qemu-storage-daemon, and tracked writes.

siterecovery replicates a *running* disk: the benchmark serves the reference image (converted
to qcow2, untimed, because only qcow2 keeps persistent dirty bitmaps) with
``siterecovery.hypervisor.process.StorageDaemon`` under the node name ``d0``; the QMP socket
is ``<dir>/qsd.qmp`` and the NBD server ``<dir>/nbd.sock``, where the change tracker expects
them.

The change must reach the disk *through* the daemon, or the dirty bitmap would not see it:
:meth:`ServedDisk.apply_change` adds a writable NBD export of ``d0`` over QMP and writes every
change block with ``qemu-io`` (``write -s FILE OFFSET LEN``), then removes the export.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.harness import BenchError
from bench.workload import WorkloadSpec, write_change_files
from siterecovery.hypervisor.process import DriveSpec, StorageDaemon
from siterecovery.hypervisor.qmp import QmpSession

NODE = "d0"
WRITE_EXPORT = "bench-w"
#: qemu-io commands per invocation (each ``-c`` is one write)
_BATCH = 256


@dataclass
class ServedDisk:
    """One qcow2 image served by a running qemu-storage-daemon; see the module docstring."""

    image: Path
    workdir: Path
    daemon: StorageDaemon

    @property
    def qmp(self) -> Path:
        return self.workdir / "qsd.qmp"

    @property
    def nbd_socket(self) -> Path:
        return self.workdir / "nbd.sock"

    @classmethod
    def start(cls, image: Path, workdir: Path) -> ServedDisk:
        workdir.mkdir(parents=True, exist_ok=True)
        daemon = StorageDaemon.start(workdir, [DriveSpec(NODE, image, fmt="qcow2")])
        return cls(image, workdir, daemon)

    def stop(self) -> None:
        """Stop cleanly (QMP quit): persistent bitmaps are written back to the qcow2."""
        self.daemon.stop()

    def apply_change(self, spec: WorkloadSpec, scratch: Path) -> int:
        """Write the workload's change through a writable NBD export; return bytes written."""
        files = write_change_files(scratch, spec)
        url = f"nbd+unix:///{WRITE_EXPORT}?socket={self.nbd_socket}"
        with QmpSession.connect(self.qmp) as qmp:
            qmp.cmd(
                "block-export-add",
                type="nbd",
                id=WRITE_EXPORT,
                name=WRITE_EXPORT,
                **{"node-name": NODE},
                writable=True,
            )
            try:
                for start in range(0, len(files), _BATCH):
                    _qemu_io(url, files[start : start + _BATCH], spec.write_size)
            finally:
                qmp.cmd("block-export-del", id=WRITE_EXPORT, mode="hard")
                qmp.wait_event("BLOCK_EXPORT_DELETED", {"id": WRITE_EXPORT}, timeout=30)
        shutil.rmtree(scratch, ignore_errors=True)
        return len(files) * spec.write_size


def _qemu_io(url: str, files: list[tuple[int, Path]], length: int) -> None:
    argv = ["qemu-io", "-f", "raw"]
    for offset, file in files:
        argv += ["-c", f"write -q -s {file} {offset} {length}"]
    result = subprocess.run([*argv, url], capture_output=True, text=True, check=False)
    if result.returncode != 0 or result.stdout.strip() or result.stderr.strip():
        raise BenchError(f"qemu-io could not write the change: {result.stdout}{result.stderr}")


def to_qcow2(raw: Path, qcow2: Path) -> None:
    """Convert the raw reference image to qcow2 (holes stay unallocated); untimed setup."""
    qcow2.unlink(missing_ok=True)
    result = subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise BenchError(f"qemu-img convert failed: {result.stderr.strip()}")


@contextmanager
def served(image: Path, workdir: Path) -> Iterator[ServedDisk]:
    """Serve ``image`` for the duration of the block; always stopped cleanly afterwards."""
    disk = ServedDisk.start(image, workdir)
    try:
        yield disk
    finally:
        disk.stop()
