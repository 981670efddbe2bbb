"""The vocabulary of DESIGN.md as small frozen types shared by every layer.

Layers exchange these, never ORM rows, HTTP payloads or QMP dictionaries.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class VmConfig:
    """What is needed to start the same machine on the recovery site."""

    name: str
    cpus: int = 1
    memory_mib: int = 256
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[str, ...] = ()
    boot: dict[str, str] = field(default_factory=dict)


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
