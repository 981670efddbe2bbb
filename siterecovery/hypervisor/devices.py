"""QEMU arguments for the disks of a :class:`~siterecovery.domain.VmConfig`.

A disk ``D`` is a format node ``D`` over a protocol node ``D-file`` (built by the caller:
:class:`~siterecovery.hypervisor.process.DriveSpec` or instant recovery's overlays), with the
disk's node options on both, and a guest device with id ``D-dev``::

    virtio-blk-pci,drive=D,id=D-dev,serial=S,write-cache=on     (the default; also nvme,
    scsi-hd,drive=D,id=D-dev,bus=sr-scsi0.0,...                  ide-hd the same way)

``scsi-hd`` disks sit on one ``virtio-scsi-pci`` controller, id ``sr-scsi0``, which
:func:`controller_args` adds once, before any disk device. Values are QemuOpts-escaped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from siterecovery.domain import DiskConfig

SCSI_CONTROLLER = "sr-scsi0"


def node_options(disk: DiskConfig | None) -> dict[str, Any]:
    """``-blockdev`` options of both nodes of ``disk``: discard and cache (none by default)."""
    if disk is None:
        return {}
    opts: dict[str, Any] = {}
    if disk.discard is not None:
        opts["discard"] = disk.discard
    if disk.cache.direct or disk.cache.no_flush:
        opts["cache"] = {"direct": disk.cache.direct, "no-flush": disk.cache.no_flush}
    return opts


def device_args(node: str, disk: DiskConfig | None) -> list[str]:
    """The ``-device`` of the guest device of format node ``node``.

    Without a ``disk``: virtio-blk with the node name as serial (siterecovery's own VMs).
    """
    model = disk.model if disk is not None else "virtio-blk-pci"
    props = {"drive": node, "id": f"{node}-dev"}
    if model == "scsi-hd":
        props["bus"] = f"{SCSI_CONTROLLER}.0"
    serial = node if disk is None else disk.serial
    if serial:
        props["serial"] = serial
    if disk is not None:
        props["write-cache"] = "on" if disk.cache.writeback else "off"
    return ["-device", ",".join([model, *(f"{k}={opt(v)}" for k, v in props.items())])]


def controller_args(disks: Sequence[DiskConfig | None]) -> list[str]:
    """The SCSI controller, when one of ``disks`` is a ``scsi-hd``; else nothing."""
    if any(d is not None and d.model == "scsi-hd" for d in disks):
        return ["-device", f"virtio-scsi-pci,id={SCSI_CONTROLLER}"]
    return []


def opt(value: str) -> str:
    """A QemuOpts value: commas are doubled."""
    return value.replace(",", ",,")
