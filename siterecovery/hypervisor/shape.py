"""The shape of a running QEMU VM: what the recovery side needs to start the same machine.

:func:`read_shape` asks the VM over QMP and returns a :class:`~siterecovery.domain.VmConfig`.
Where each field comes from (measured on QEMU 7.2)::

    machine      qom-get /machine "type": "pc-i440fx-7.2-machine" -> "pc-i440fx-7.2", the
                 running, versioned type (query-machines only lists what the binary can run,
                 marking the default and the aliases such as "pc"; it has no is-current)
    cpus         query-cpus-fast: one entry per vCPU
    cpu_model    qom-get of the first vCPU's "type" ("max-x86_64-cpu"), named by
                 query-cpu-definitions (typename -> name: "max")
    memory_mib   query-memory-size-summary "base-memory"
    disks        query-block (named as change tracking names them; size, format, cache mode)
                 and the attached device: qom-get "type" (the model: virtio-blk-pci,
                 scsi-hd, ide-hd, nvme), "serial", "addr" (PCI disks keep their order)
    discard      not in any QMP answer: read from the QEMU process's command line
                 (/proc/PID/cmdline, PID from the QMP socket's SO_PEERCRED): the top node's
                 discard= of its -blockdev or -drive; None when that cannot be read or matched
    nics         qom-list of /machine/peripheral, /machine/peripheral-anon (-device) and
                 /machine/unattached (-nic): devices of a model in NIC_MODELS, ordered by PCI
                 address, with their "mac" and "netdev" (the netdev id is the source network)
    guest agent  a virtserialport named org.qemu.guest_agent.0: its chardev's unix socket
                 path from query-chardev ("unix:PATH,server=on", maybe "disconnected:...")
    boot         qom-get /machine "kernel", "initrd", "append" and "boot" (its "order")

A disk or NIC on a device model outside DISK_MODELS / NIC_MODELS, or a writable disk with no
guest device, raises :class:`ShapeError`: a machine that cannot be described is refused
rather than described wrongly.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from siterecovery.domain import (
    DISK_MODELS,
    NIC_MODELS,
    BootConfig,
    DiskCache,
    DiskConfig,
    NicSpec,
    VmConfig,
    validate_name,
)
from siterecovery.hypervisor.errors import ShapeError
from siterecovery.hypervisor.qmp import QmpSession
from siterecovery.hypervisor.tracking import TrackedDisk, session_disks

__all__ = ["discard_options", "qemu_cmdline", "read_shape", "shape_config", "shape_of"]

GUEST_AGENT_PORT = "org.qemu.guest_agent.0"
_CONTAINERS = ("/machine/peripheral", "/machine/peripheral-anon", "/machine/unattached")
#: Types of user-created devices known not to be NICs (no need to look at their properties).
_NOT_NICS = frozenset(
    {*DISK_MODELS, "virtserialport", "virtconsole", "virtio-serial-pci", "virtio-scsi-pci",
     "lsi53c895a", "isa-debug-exit", "virtio-balloon-pci", "virtio-rng-pci", "ide-cd",
     "scsi-cd", "usb-tablet", "qemu-xhci", "piix3-usb-uhci", "VGA", "virtio-vga"}
)  # fmt: skip
_MiB = 1 << 20


@dataclass(frozen=True)
class _Device:
    """A QOM device: its path and type."""

    path: str
    type: str


def read_shape(qmp_path: Path, *, name: str) -> VmConfig:
    """The machine running behind ``qmp_path``, as the VM ``name``'s config.

    Connects, asks, disconnects. Raises :class:`QmpError` when QEMU does not answer and
    :class:`ShapeError` for a device that cannot be described (see the module docstring).
    """
    validate_name("VM", name)
    argv = qemu_cmdline(qmp_path)
    with QmpSession.connect(qmp_path) as qmp:
        return shape_of(qmp, name=name, argv=argv)


def shape_config(
    qmp_path: Path, *, name: str, given: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The config to record for the VM ``name`` at registration: its shape, read now
    (:func:`read_shape`, with the guest agent socket as host-local ``qga``), under the keys
    of ``given`` (what the caller states: e.g. NICs with their networks).

    A key of ``given`` replaces the shape's, except ``disks``: each listed disk's fields go
    over the shape's disk of that name (so naming disks keeps their devices and options).
    Raises VmConfigError when the result is malformed, ShapeError/QmpError as read_shape.
    """
    shape = read_shape(qmp_path, name=name).to_json(host_local=True)
    merged = {**shape, **(given or {})}
    if isinstance(merged.get("disks"), list) and given and "disks" in given:
        found = {d["name"]: d for d in shape["disks"]}
        merged["disks"] = [
            {**found.get(d.get("name"), {}), **d} if isinstance(d, dict) else d
            for d in merged["disks"]
        ]
    VmConfig.from_json(merged, name=name)
    return merged


def shape_of(qmp: QmpSession, *, name: str, argv: list[str] | None) -> VmConfig:
    """:func:`read_shape` on an open session; ``argv`` is QEMU's command line if known."""
    devices = _devices(qmp)
    qga = _guest_agent_socket(qmp, devices)
    return VmConfig(
        name=name,
        cpus=len(qmp.cmd("query-cpus-fast")),
        memory_mib=math.ceil(int(qmp.cmd("query-memory-size-summary")["base-memory"]) / _MiB),
        disks=_disks(qmp, None if argv is None else discard_options(argv)),
        nics=_nics(qmp, devices),
        boot=_boot(qmp),
        machine=str(_qom(qmp, "/machine", "type")).removesuffix("-machine"),
        cpu_model=_cpu_model(qmp),
        guest_agent=qga is not None,
        qga_socket=qga or "",
    )


# ---------------------------------------------------------------------------------------------
# CPU, boot


def _cpu_model(qmp: QmpSession) -> str:
    """The model name of the first vCPU (``-cpu`` as given: max, host, Skylake-Client...)."""
    first = qmp.cmd("query-cpus-fast")[0]["qom-path"]
    typename = str(_qom(qmp, first, "type"))
    names = {d["typename"]: d["name"] for d in qmp.cmd("query-cpu-definitions")}
    return str(names.get(typename) or typename.removesuffix("-x86_64-cpu"))


def _boot(qmp: QmpSession) -> BootConfig:
    boot = _qom(qmp, "/machine", "boot")
    return BootConfig(
        kernel=str(_qom(qmp, "/machine", "kernel") or ""),
        initrd=str(_qom(qmp, "/machine", "initrd") or ""),
        append=str(_qom(qmp, "/machine", "append") or ""),
        order=str(boot.get("order", "")) if isinstance(boot, dict) else "",
    )


# ---------------------------------------------------------------------------------------------
# Disks


def _disks(qmp: QmpSession, discard: dict[str, str] | None) -> tuple[DiskConfig, ...]:
    """Writable disks with their guest device, PCI ones in PCI order, then the others."""
    blocks = {e["inserted"]["node-name"]: e for e in qmp.cmd("query-block") if e.get("inserted")}
    found = []
    for index, disk in enumerate(session_disks(qmp)):
        entry = blocks[disk.node]
        config, addr = _disk(qmp, disk, entry, discard)
        found.append(((0, addr) if addr is not None else (1, index), config))
    return tuple(config for _, config in sorted(found, key=lambda pair: pair[0]))


def _disk(
    qmp: QmpSession, disk: TrackedDisk, entry: dict[str, Any], discard: dict[str, str] | None
) -> tuple[DiskConfig, int | None]:
    """The disk's config and its device's PCI address (None: not a PCI device)."""
    qdev = entry.get("qdev")
    if not qdev:
        raise ShapeError(f"disk {disk.name} is attached to no guest device")
    path = _device_path(str(qdev))
    model = str(_qom(qmp, path, "type"))
    if model not in DISK_MODELS:
        raise ShapeError(
            f"disk {disk.name} is on a {model} device; siterecovery can start disks on "
            + ", ".join(DISK_MODELS)
        )
    cache = entry["inserted"].get("cache", {})
    config = DiskConfig(
        name=disk.name, size=disk.size, fmt=disk.fmt or "raw", model=model,
        serial=str(_qom(qmp, path, "serial") or ""),
        discard=None if discard is None else _lookup(discard, entry),
        cache=DiskCache(bool(cache.get("writeback", True)), bool(cache.get("direct", False)),
                        bool(cache.get("no-flush", False))),
    )  # fmt: skip
    addr = _try_qom(qmp, path, "addr")
    return config, addr if isinstance(addr, int) and addr >= 0 else None


def _device_path(qdev: str) -> str:
    """The QOM path of a block device: qdev is an id, or a path (virtio: .../virtio-backend)."""
    if not qdev.startswith("/"):
        return f"/machine/peripheral/{qdev}"
    return qdev.removesuffix("/virtio-backend")


def _lookup(discard: dict[str, str], entry: dict[str, Any]) -> str | None:
    """The discard mode the command line gave this disk's drive id or top node, if any."""
    for key in (entry.get("device"), entry["inserted"].get("node-name")):
        if key and key in discard:
            return discard[key]
    return None


# ---------------------------------------------------------------------------------------------
# The command line (discard is in no QMP answer)


def qemu_cmdline(qmp_path: Path) -> list[str] | None:
    """The command line of the QEMU serving ``qmp_path``, or None when it cannot be read.

    The pid is the socket's peer credential, taken on a connection of its own that is closed
    at once (QEMU serves QMP clients one at a time and drops this one unserved).
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2.0)
            sock.connect(str(qmp_path))
            cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", cred)[0]
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [arg.decode(errors="replace") for arg in raw.split(b"\0")[:-1]] or None


def discard_options(argv: list[str]) -> dict[str, str]:
    """Drive id / top node name -> "unmap" or "ignore", from ``-blockdev`` and ``-drive``.

    The top (format) node's own ``discard`` decides: a guest discard stops at a node without
    it. A node or drive that names no discard has QEMU's default, "ignore".
    """
    found: dict[str, str] = {}
    for flag, value in itertools.pairwise(argv):
        if flag in ("-blockdev", "--blockdev"):
            doc = _blockdev_doc(value)
            keys = [doc.get("node-name")]
        elif flag == "-drive":
            doc = qemu_opts(value)
            keys = [doc.get("id"), doc.get("node-name")]
        else:
            continue
        mode = _discard_mode(doc.get("discard"))
        found.update({str(k): mode for k in keys if isinstance(k, str) and k})
    return found


def _blockdev_doc(value: str) -> dict[str, Any]:
    if value.lstrip().startswith("{"):
        try:
            doc = json.loads(value)
        except ValueError:
            return {}
        return doc if isinstance(doc, dict) else {}
    return dict(qemu_opts(value))


def qemu_opts(text: str) -> dict[str, str]:
    """``key=value,key2=value2`` (QemuOpts: ``,,`` is a literal comma) as a dict."""
    parts = text.replace(",,", "\0").split(",")
    pairs = (p.replace("\0", ",").partition("=") for p in parts if p)
    return {key: value for key, _, value in pairs}


def _discard_mode(value: Any) -> str:
    return "unmap" if value in ("unmap", "on", True) else "ignore"


# ---------------------------------------------------------------------------------------------
# Devices: NICs and the guest agent port


def _devices(qmp: QmpSession) -> list[_Device]:
    """Every device under the QOM containers (``-device``, anonymous ones, board ones)."""
    out = []
    for container in _CONTAINERS:
        for entry in qmp.cmd("qom-list", path=container):
            kind = str(entry.get("type", ""))
            if kind.startswith("child<"):
                out.append(_Device(f"{container}/{entry['name']}", kind[6:-1]))
    return out


def _nics(qmp: QmpSession, devices: list[_Device]) -> tuple[NicSpec, ...]:
    """NICs in PCI order; a NIC-like user device of another model raises ShapeError."""
    found = []
    for device in devices:
        if device.type not in NIC_MODELS:
            _refuse_unknown_nic(qmp, device)
            continue
        addr = _try_qom(qmp, device.path, "addr")
        nic = NicSpec(
            model=device.type,
            mac=str(_qom(qmp, device.path, "mac")).lower(),
            network=_network_name(str(_try_qom(qmp, device.path, "netdev") or "")),
        )
        found.append((addr if isinstance(addr, int) else 1 << 16, device.path, nic))
    return tuple(nic for *_, nic in sorted(found, key=lambda item: (item[0], item[1])))


def _refuse_unknown_nic(qmp: QmpSession, device: _Device) -> None:
    if device.path.startswith("/machine/unattached") or device.type in _NOT_NICS:
        return
    props = {p["name"] for p in qmp.cmd("qom-list", path=device.path)}
    if "netdev" in props and "mac" in props:
        raise ShapeError(
            f"NIC {device.path} is a {device.type}; siterecovery can start NICs of models "
            + ", ".join(NIC_MODELS)
        )


def _network_name(netdev: str) -> str:
    """A netdev id as a siterecovery network name ("__org.qemu.nic0" -> "org.qemu.nic0")."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", netdev).lstrip("._-")[:63]
    return validate_name("network", name) if name else "default"


def _guest_agent_socket(qmp: QmpSession, devices: list[_Device]) -> str | None:
    """The host path of the qemu-guest-agent port's unix socket, if the VM has one."""
    for device in devices:
        if device.type == "virtserialport" and _qom(qmp, device.path, "name") == GUEST_AGENT_PORT:
            chardev = _qom(qmp, device.path, "chardev")
            for entry in qmp.cmd("query-chardev"):
                if entry["label"] == chardev:
                    return _unix_path(str(entry["filename"]))
    return None


def _unix_path(filename: str) -> str | None:
    """``[disconnected:]unix:PATH[,server=on]`` -> PATH; None for another kind of chardev."""
    rest = filename.removeprefix("disconnected:")
    if not rest.startswith("unix:"):
        return None
    return re.sub(r",server(=on)?$", "", rest[5:]) or None


def _qom(qmp: QmpSession, path: str, prop: str) -> Any:
    return qmp.cmd("qom-get", path=path, property=prop)


def _try_qom(qmp: QmpSession, path: str, prop: str) -> Any:
    """``qom-get``, None when the object has no such property."""
    return qmp.try_cmd("qom-get", path=path, property=prop)
