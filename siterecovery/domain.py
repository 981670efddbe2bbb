"""The vocabulary of DESIGN.md as small frozen types shared by every layer.

Layers exchange these, never ORM rows, HTTP payloads or QMP dictionaries.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from siterecovery.errors import InputError

#: Names of VMs, disks, policies and plans: what can safely appear in an object key or a path.
#: ``\Z`` (not ``$``, which also matches before a final newline) ends the name.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")


def validate_name(kind: str, name: str) -> str:
    """Return ``name`` if it is, whole, a valid siterecovery name, else raise
    :class:`InputError`."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InputError(
            f"invalid {kind} name {name!r}",
            hint="use 1-63 characters: letters, digits, '.', '_' or '-', starting with a "
            "letter or digit",
        )
    return name


class ReplicationState(enum.StrEnum):
    """States of a replicated VM (DESIGN §4)."""

    UNPROTECTED = "unprotected"
    ENABLING_PROTECTION = "enabling protection"
    INITIAL_REPLICATION = "initial replication"
    PROTECTED = "protected"
    RESYNC_REQUIRED = "resync required"
    RESYNCING = "resyncing"
    TEST_FAILOVER_RUNNING = "test failover running"
    FAILING_OVER = "failing over"
    FAILED_OVER = "failed over"
    COMMITTED = "committed"
    FAILING_BACK = "failing back"
    FAILED_BACK = "failed back"
    COMMITTED_BACK = "committed back"
    REVERSE_REPLICATING = "reverse replicating"
    ERROR = "error"


class Consistency(enum.StrEnum):
    """How a recovery point was captured."""

    CRASH = "crash"
    APP = "app"


class Health(enum.StrEnum):
    """Health of a replicated VM."""

    NORMAL = "normal"
    WARNING = "warning"
    CRITICAL = "critical"


class JobState(enum.StrEnum):
    """State of a job or of one of its tasks."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"


class JobKind(enum.StrEnum):
    """The kinds of job (DESIGN §4): each is one operation, with its named tasks."""

    ENABLE_PROTECTION = "enable protection"
    DISABLE_PROTECTION = "disable protection"
    RESYNC = "resynchronize"
    REVERSE_REPLICATION = "reverse replication"
    TEST_FAILOVER = "test failover"
    PLANNED_FAILOVER = "planned failover"
    UNPLANNED_FAILOVER = "unplanned failover"
    FAILOVER_CLEANUP = "test failover cleanup"
    CHANGE_POINT = "change recovery point"
    COMMIT_FAILOVER = "commit failover"
    FAILBACK = "failback"
    COMMIT_FAILBACK = "commit failback"


class FailoverKind(enum.StrEnum):
    """The kinds of failover (DESIGN §5)."""

    TEST = "test"
    PLANNED = "planned"
    UNPLANNED = "unplanned"


#: Copy frequencies a policy may choose, in seconds (the seed's 30 s / 5 min / 15 min).
COPY_FREQUENCIES_S = (30, 300, 900)


@dataclass(frozen=True)
class Extent:
    """A byte range of a disk. ``dirty``/``zero`` come from NBD block status."""

    offset: int
    length: int
    zero: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class DiskSpec:
    """A disk of a VM as the hypervisor sees it."""

    name: str
    size: int
    node_name: str = ""
    path: str = ""
    fmt: str = "qcow2"


# ---------------------------------------------------------------------------------------------
# The machine a VM is (DESIGN §5 "the replica is the same machine")

#: Guest-visible disk devices the recovery side knows how to attach (QEMU device names).
DISK_MODELS = ("virtio-blk-pci", "scsi-hd", "ide-hd", "nvme")
#: Guest-visible NIC devices the recovery side knows how to attach.
NIC_MODELS = ("virtio-net-pci", "e1000", "e1000e", "rtl8139", "vmxnet3")
#: How a disk treats the guest's discard requests: pass them down, or drop them.
DISCARD_MODES = ("unmap", "ignore")
MAX_CPUS = 288
MEMORY_MIB_RANGE = (16, 1 << 24)
MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
_MACHINE_RE = re.compile(r"^[a-z][a-z0-9._-]{0,63}$")
_CPU_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_FORMAT_RE = re.compile(r"^[a-z0-9_-]{1,32}$")
_SERIAL_RE = re.compile(r"^[\x20-\x7e]{0,36}$")
_BOOT_ORDER_RE = re.compile(r"^[a-p]{0,16}$")


class VmConfigError(InputError):
    """A VM configuration (in a recovery point manifest or the vault) is malformed."""

    hint = (
        "the machine description is damaged or was written by hand: fix the VM's config "
        "(register the VM again) or fail over from another recovery point"
    )


@dataclass(frozen=True)
class DiskCache:
    """A disk's cache mode as QEMU reports it: ``cache=writeback`` is the default."""

    writeback: bool = True
    direct: bool = False
    no_flush: bool = False


@dataclass(frozen=True)
class DiskConfig:
    """One disk as the guest sees it: device ``model`` (bus), ``serial`` and node options.

    ``size`` 0 means not recorded (the recovery point's disk chain knows the size);
    ``discard`` None means not known (QEMU's default, ``ignore``, applies).
    """

    name: str
    size: int = 0
    fmt: str = "qcow2"
    model: str = "virtio-blk-pci"
    serial: str = ""
    discard: str | None = None
    cache: DiskCache = DiskCache()

    @property
    def bus(self) -> str:
        """The bus family of ``model``: virtio, scsi, ide or nvme."""
        return {"virtio-blk-pci": "virtio", "scsi-hd": "scsi", "ide-hd": "ide"}.get(
            self.model, self.model
        )


@dataclass(frozen=True)
class NicSpec:
    """One NIC: device ``model``, ``mac`` (None: QEMU picks one) and its source ``network``."""

    model: str = "virtio-net-pci"
    mac: str | None = None
    network: str = "default"


@dataclass(frozen=True)
class BootConfig:
    """How the VM boots: a direct kernel (paths on the host) or firmware with a boot order."""

    kernel: str = ""
    initrd: str = ""
    append: str = ""
    order: str = ""


@dataclass(frozen=True)
class VmConfig:
    """What is needed to start the same machine on the recovery site.

    ``cpu_model`` "" means the recovery host's default (``host`` under KVM, QEMU's default
    under TCG); ``guest_agent`` says the machine has the qemu-guest-agent port, and
    ``qga_socket`` is that port's socket on the source host (host-local: never replicated).
    JSON form (:meth:`to_json`, :meth:`from_json`): docs/store-format.md.
    """

    name: str
    cpus: int = 1
    memory_mib: int = 256
    disks: tuple[DiskConfig, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    boot: BootConfig = BootConfig()
    machine: str = "q35"
    cpu_model: str = ""
    guest_agent: bool = False
    qga_socket: str = ""

    def disk(self, name: str) -> DiskConfig:
        """The disk called ``name``; a default virtio-blk disk when the config lacks it."""
        return next((d for d in self.disks if d.name == name), DiskConfig(name, serial=name))

    def to_json(self, *, host_local: bool = False) -> dict[str, Any]:
        """The JSON object of this config; the guest agent socket only with ``host_local``."""
        doc: dict[str, Any] = {
            "machine": self.machine, "cpus": self.cpus, "cpu_model": self.cpu_model,
            "memory_mib": self.memory_mib, "disks": [_disk_json(d) for d in self.disks],
            "nics": [dataclasses.asdict(n) for n in self.nics],
            "boot": dataclasses.asdict(self.boot), "guest_agent": self.guest_agent,
        }  # fmt: skip
        if host_local and self.qga_socket:
            doc["qga"] = self.qga_socket
        return doc

    @classmethod
    def from_json(cls, doc: Any, *, name: str) -> VmConfig:
        """Parse and check the config of VM ``name``; :class:`VmConfigError` names the bad field.

        Accepts the older loose form (any field missing takes today's default, disks without
        a serial had their name as serial, NICs may be bare network names). Unknown keys are
        ignored (host-local ``qmp``, fields of newer writers).
        """
        top = _Fields(doc, f"VM {name}: vm_config")
        return cls(
            name=name,
            cpus=top.integer("cpus", 1, 1, MAX_CPUS),
            memory_mib=top.integer("memory_mib", 256, *MEMORY_MIB_RANGE),
            disks=_unique(tuple(_disk(f) for f in top.items("disks")), top.where),
            nics=tuple(_nic(f) for f in top.items("nics", loose=True)),
            boot=_boot(top.child("boot")),
            machine=top.text("machine", "q35", pattern=_MACHINE_RE),
            cpu_model=top.text("cpu_model", "", pattern=_CPU_MODEL_RE, empty=True),
            guest_agent=top.flag("guest_agent", False),
            qga_socket=top.text("qga", "", max_len=4096, empty=True),
        )


def _disk_json(disk: DiskConfig) -> dict[str, Any]:
    return {**dataclasses.asdict(disk), "cache": dataclasses.asdict(disk.cache)}


def _disk(f: _Fields) -> DiskConfig:
    name = f.text("name", None, pattern=NAME_RE)
    cache = f.child("cache")
    return DiskConfig(
        name=name,
        size=f.integer("size", 0, 0, 1 << 62),
        fmt=f.text("fmt", "qcow2", pattern=_FORMAT_RE),
        model=f.text("model", "virtio-blk-pci", choices=DISK_MODELS),
        serial=f.text("serial", name, pattern=_SERIAL_RE, empty=True),
        discard=f.optional_text("discard", DISCARD_MODES),
        cache=DiskCache(
            cache.flag("writeback", True),
            cache.flag("direct", False),
            cache.flag("no_flush", False),
        ),
    )


def _nic(f: _Fields) -> NicSpec:
    mac = f.optional_text("mac", None)
    if mac is not None and not MAC_RE.match(mac.lower()):
        raise VmConfigError(f"{f.where}.mac {mac!r} is not a MAC address like 52:54:00:12:34:56")
    return NicSpec(
        model=f.text("model", "virtio-net-pci", choices=NIC_MODELS),
        mac=None if mac is None else mac.lower(),
        network=f.text("network", None, pattern=NAME_RE),
    )


def _boot(f: _Fields) -> BootConfig:
    return BootConfig(
        kernel=f.text("kernel", "", max_len=4096, empty=True),
        initrd=f.text("initrd", "", max_len=4096, empty=True),
        append=f.text("append", "", max_len=4096, empty=True),
        order=f.text("order", "", pattern=_BOOT_ORDER_RE, empty=True),
    )


def _unique(disks: tuple[DiskConfig, ...], where: str) -> tuple[DiskConfig, ...]:
    names = [d.name for d in disks]
    if len(set(names)) != len(names):
        raise VmConfigError(f"{where}.disks names a disk twice: {names}")
    return disks


class _Fields:
    """Typed reads of one JSON object's fields; every failure names ``where.key``."""

    def __init__(self, doc: Any, where: str) -> None:
        if not isinstance(doc, Mapping):
            raise VmConfigError(f"{where} must be an object, not {type(doc).__name__}")
        self.doc, self.where = doc, where

    def _get(self, key: str, default: Any) -> Any:
        value = self.doc.get(key)
        if value is None:
            if default is None:
                raise VmConfigError(f"{self.where}.{key} is missing")
            return default
        return value

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self._get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise VmConfigError(
                f"{self.where}.{key} must be a whole number from {low} to {high}, not {value!r}"
            )
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise VmConfigError(f"{self.where}.{key} must be true or false, not {value!r}")
        return value

    def text(
        self, key: str, default: str | None, *, pattern: re.Pattern[str] | None = None,
        choices: tuple[str, ...] = (), max_len: int = 255, empty: bool = False,
    ) -> str:  # fmt: skip
        value = self._get(key, default)
        if not isinstance(value, str) or len(value) > max_len:
            raise VmConfigError(f"{self.where}.{key} must be text, not {value!r}")
        if choices and value not in choices:
            raise VmConfigError(f"{self.where}.{key} {value!r} is not one of {', '.join(choices)}")
        if pattern is not None and not (empty and value == "") and not pattern.match(value):
            raise VmConfigError(f"{self.where}.{key} {value!r} is not a valid {key}")
        return value

    def optional_text(self, key: str, choices: tuple[str, ...] | None) -> str | None:
        if self.doc.get(key) is None:
            return None
        return self.text(key, None, choices=choices or ())

    def child(self, key: str) -> _Fields:
        return _Fields(self._get(key, {}), f"{self.where}.{key}")

    def items(self, key: str, *, loose: bool = False) -> list[_Fields]:
        """The objects of list ``key``; with ``loose`` a bare string means ``{"network": s}``."""
        value = self._get(key, [])
        if not isinstance(value, list):
            raise VmConfigError(f"{self.where}.{key} must be a list, not {value!r}")
        return [
            _Fields({"network": v} if loose and isinstance(v, str) else v,
                    f"{self.where}.{key}[{i}]")
            for i, v in enumerate(value)
        ]  # fmt: skip


_SIZE_RE = re.compile(r"\s*(\d+)\s*([KMG]i?B?|B)?\s*\Z", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str, *, what: str = "size") -> int:
    """``"512"``, ``"64KiB"``, ``"1MiB"``, ``"2G"`` as bytes (units are binary: K = 1024).

    Raises :class:`InputError` naming ``what`` for anything else.
    """
    match = _SIZE_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise InputError(
            f"invalid {what} {text!r}", hint="write bytes, or a number with KiB, MiB or GiB"
        )
    return int(match[1]) * _SIZE_UNITS[(match[2] or "")[:1].upper()]


_DURATION_RE = re.compile(r"^\s*(\d+)\s*(s|m|h|d)?\s*$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, *, what: str = "duration", default_unit: str = "s") -> int:
    """``"30s"``, ``"5m"``, ``"24h"``, ``"7d"`` (or a bare number in ``default_unit``) as seconds.

    Raises :class:`InputError` naming ``what`` for anything else.
    """
    match = _DURATION_RE.match(text) if isinstance(text, str) else None
    if match is None:
        raise InputError(
            f"invalid {what} {text!r}",
            hint="write a whole number with a unit: 30s, 5m, 15m, 24h, 7d",
        )
    return int(match[1]) * _DURATION_UNITS[match[2] or default_unit]
