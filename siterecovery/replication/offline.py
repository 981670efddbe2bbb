"""Cycles of a powered-off VM: its images opened offline by ``qemu-storage-daemon``.

A protected VM that is shut down is still protected: the changes it made before it stopped are
in its persistent dirty bitmaps (QEMU stores them in the qcow2 images on a clean shutdown), and
the pending cycle ships them. Nothing else writes to the disks while it is off, so the cycle
is exact.

Contract:

- :func:`powered_off` says whether a VM whose QMP monitor does not answer was **shut down
  cleanly**: every disk image named in its vault record exists, and each carries a bitmap of
  this replication relationship that is *not* flagged ``in-use`` (``qemu-img info -U``). A
  bitmap flagged ``in-use`` means a QEMU has the image open, or crashed with it open; no
  bitmap of ours means the bitmap was created after QEMU opened the image and never stored.
  In both cases the VM is not powered off cleanly and the caller must not open the images
  (a crashed VM is reported as "VM not reachable" and, once it runs again, resynchronized).
- :func:`offline_tracker` starts ``qemu-storage-daemon`` on the images (one block node per
  disk, named ``d0``, ``d1``, ... in record order), yields a :class:`ChangeTracker` on it with
  explicit ``nodes=`` (the daemon has no guest devices), and stops the daemon **cleanly**
  (QMP ``quit``) so the bitmaps are stored back as persistent and consistent: when the VM
  starts again, QEMU loads them and tracking continues.

The daemon's sockets and the cycle's overlays are in the VM's run directory (the same place
an online cycle uses), so a killed agent's leftovers are found there.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from siterecovery.fsutil import private_dir
from siterecovery.hypervisor.errors import ProcessError, VmNotFound
from siterecovery.hypervisor.process import DriveSpec, StorageDaemon
from siterecovery.hypervisor.tracking import ChangeTracker
from siterecovery.vault.records import VmRecord


def offline_drives(record: VmRecord) -> list[DriveSpec]:
    """The VM's images as drives for the storage daemon; VmNotFound if one is missing."""
    if not record.disks:
        raise VmNotFound(f"VM {record.name} has no disks recorded in the vault")
    drives = []
    for i, disk in enumerate(record.disks):
        path = Path(disk.path) if disk.path else None
        if path is None or not path.is_file():
            raise VmNotFound(
                f"VM {record.name} is not running and its disk {disk.name} image "
                f"{disk.path or '(no path recorded)'} does not exist",
                hint="if the VM was deleted, disable protection; if it was moved, register it "
                "again, then run `siterecovery resync VM`",
            )
        drives.append(DriveSpec(f"d{i}", path))
    return drives


def powered_off(record: VmRecord, relationship: str) -> bool:
    """True when every image has our bitmap stored cleanly (see the module docstring).

    Raises VmNotFound when an image is missing.
    """
    prefix = f"sr-{relationship}-"
    for drive in offline_drives(record):
        ours = [b for b in _image_bitmaps(drive.path) if str(b.get("name", "")).startswith(prefix)]
        if not ours or any("in-use" in list(b.get("flags") or []) for b in ours):
            return False
    return True


def _image_bitmaps(path: Path) -> list[dict[str, Any]]:
    """The persistent bitmaps ``qemu-img info`` lists for a qcow2 image ([] for others)."""
    argv = ["qemu-img", "info", "-U", "--output=json", str(path)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProcessError(f"qemu-img info {path} failed: {exc}") from exc
    if done.returncode != 0:
        raise ProcessError(f"qemu-img info {path} failed: {done.stderr.strip()}")
    info = json.loads(done.stdout)
    data = info.get("format-specific", {}).get("data", {})
    return list(data.get("bitmaps", []))


@contextmanager
def offline_tracker(record: VmRecord, relationship: str, run_dir: Path) -> Iterator[ChangeTracker]:
    """A tracker over the powered-off VM's images, served by a storage daemon for the body.

    The daemon is stopped cleanly on every path out of the body (its bitmaps stay
    persistent and consistent).
    """
    drives = offline_drives(record)
    private_dir(run_dir)
    daemon = StorageDaemon.start(run_dir, drives)
    try:
        nodes = {disk.name: drive.name for disk, drive in zip(record.disks, drives, strict=True)}
        yield ChangeTracker(daemon.qmp_path, run_dir, relationship, nodes=nodes)
    finally:
        daemon.stop()
