"""Recovery point manifests: what a recovery point is made of.

A manifest is JSON at ``points/<vm>/<point_id>.json``::

    {"format": "siterecovery-point", "version": 1,
     "point_id": "20240501T120000.000000Z-0000", "vm": "web1",
     "created_at": "2024-05-01T12:00:00.000000Z", "consistency": "crash" | "app",
     "vm_config": {...the machine: domain.VmConfig.to_json(), docs/store-format.md...},
     "disks": {"vda": {"size": 10737418240,
                       "base": {"key": "indexes/web1/vda/...", "digest": "<hex>", "size": 1234},
                       "segments": [{"key": "segments/web1/vda/...", "digest": "<hex>",
                                     "size": 5678, "extents": 3, "bytes": 196608}, ...]}},
     "mac": "<hex>"}

``digest``/``size`` are the keyed digest and length of the stored object bytes. ``mac`` is a
keyed MAC over the canonical JSON (sorted keys, no spaces) of every other field; loading checks
it, so a truncated or altered manifest is refused with an error naming the point. Point ids
sort in time order: ``%Y%m%dT%H%M%S.%fZ`` of ``created_at`` then a 4-digit sequence number that
only grows when two points share a microsecond.

A manifest is published last, with a create-only put, after every object it names exists: a
recovery point exists exactly when its manifest does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from siterecovery.domain import Consistency
from siterecovery.store.codec import Codec
from siterecovery.store.errors import FormatError, IntegrityError, StoreInputError
from siterecovery.store.keys import canonical_json, utc_text

__all__ = [
    "MANIFEST_VERSION",
    "DiskChain",
    "DiskRef",
    "PointManifest",
    "SegmentRef",
    "make_point_id",
    "point_key",
    "validate_point_id",
]

MANIFEST_FORMAT: Final = "siterecovery-point"
MANIFEST_VERSION: Final = 1
POINT_ID_RE: Final = re.compile(r"^\d{8}T\d{6}\.\d{6}Z-\d{4}$")


def make_point_id(created_at: datetime, seq: int) -> str:
    """The sortable id of a point created at ``created_at`` (aware) with sequence ``seq``."""
    return f"{created_at.astimezone(UTC):%Y%m%dT%H%M%S.%fZ}-{seq:04d}"


def validate_point_id(point_id: str) -> str:
    """Return ``point_id`` if well formed, else raise ``StoreInputError``."""
    if not isinstance(point_id, str) or not POINT_ID_RE.match(point_id):
        raise StoreInputError(
            f"invalid recovery point id {point_id!r}",
            hint="use an id listed by `siterecovery points VM`, e.g. 20240501T120000.000000Z-0000",
        )
    return point_id


def point_key(vm: str, point_id: str) -> str:
    """The store key of a manifest."""
    return f"points/{vm}/{point_id}.json"


@dataclass(frozen=True)
class DiskRef:
    """A stored base index: its key, keyed digest and size of the stored bytes."""

    key: str
    digest: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "digest": self.digest, "size": self.size}

    @classmethod
    def from_json(cls, doc: Any) -> DiskRef:
        return cls(str(doc["key"]), _hex(doc["digest"]), _count(doc["size"]))


@dataclass(frozen=True)
class SegmentRef:
    """A stored delta segment; ``extents``/``data_bytes`` describe what it changes."""

    key: str
    digest: str
    size: int
    extents: int
    data_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "digest": self.digest,
            "size": self.size,
            "extents": self.extents,
            "bytes": self.data_bytes,
        }

    @classmethod
    def from_json(cls, doc: Any) -> SegmentRef:
        return cls(
            str(doc["key"]),
            _hex(doc["digest"]),
            _count(doc["size"]),
            _count(doc["extents"]),
            _count(doc["bytes"]),
        )


@dataclass(frozen=True)
class DiskChain:
    """A disk's content at a point: base blocks, then the segments applied in order."""

    size: int
    base: DiskRef
    segments: tuple[SegmentRef, ...] = ()

    def extend(self, *segments: SegmentRef | None) -> DiskChain:
        """This chain followed by ``segments`` (None entries, i.e. empty cycles, skipped)."""
        added = tuple(s for s in segments if s is not None)
        return DiskChain(self.size, self.base, self.segments + added)

    def refs(self) -> list[DiskRef | SegmentRef]:
        """Every object the chain names, base first."""
        return [self.base, *self.segments]

    def to_json(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "base": self.base.to_json(),
            "segments": [s.to_json() for s in self.segments],
        }

    @classmethod
    def from_json(cls, doc: Any) -> DiskChain:
        segments = tuple(SegmentRef.from_json(s) for s in _list(doc["segments"]))
        return cls(_count(doc["size"]), DiskRef.from_json(doc["base"]), segments)


@dataclass(frozen=True)
class PointManifest:
    """A recovery point: all disks of a VM at one instant."""

    point_id: str
    vm: str
    created_at: datetime
    consistency: Consistency
    vm_config: dict[str, Any]
    disks: Mapping[str, DiskChain] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return point_key(self.vm, self.point_id)

    @property
    def name(self) -> str:
        """``vm/point_id``, as messages name a point."""
        return f"{self.vm}/{self.point_id}"

    def body(self) -> dict[str, Any]:
        """The manifest JSON without its MAC."""
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "point_id": self.point_id,
            "vm": self.vm,
            "created_at": utc_text(self.created_at),
            "consistency": self.consistency.value,
            "vm_config": self.vm_config,
            "disks": {name: chain.to_json() for name, chain in sorted(self.disks.items())},
        }

    def encode(self, codec: Codec) -> bytes:
        doc = self.body()
        doc["mac"] = codec.mac(canonical_json(doc))
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def decode(cls, raw: bytes, codec: Codec, *, vm: str, point_id: str) -> PointManifest:
        """Parse and verify the manifest stored for ``vm``/``point_id``.

        ``FormatError`` when it is not JSON (e.g. truncated), has another format or a newer
        version, or lacks a field; ``IntegrityError`` when the MAC does not match or the
        manifest names another point. Messages name the point.
        """
        what = f"recovery point {vm}/{point_id}"
        doc = _parse(raw, what)
        mac = doc.pop("mac", None)
        if not isinstance(mac, str):
            raise FormatError(f"{what}: manifest has no MAC")
        if mac != codec.mac(canonical_json(doc)):
            raise IntegrityError(
                f"{what}: manifest MAC mismatch (the manifest was altered or written with "
                "other keys)"
            )
        if doc.get("vm") != vm or doc.get("point_id") != point_id:
            raise IntegrityError(f"{what}: manifest describes another point")
        return cls._from_doc(doc, what)

    @classmethod
    def _from_doc(cls, doc: dict[str, Any], what: str) -> PointManifest:
        try:
            created = datetime.strptime(doc["created_at"], "%Y-%m-%dT%H:%M:%S.%fZ")
            disks = doc["disks"]
            if not isinstance(disks, dict) or not isinstance(doc["vm_config"], dict):
                raise TypeError("disks and vm_config must be objects")
            return cls(
                point_id=doc["point_id"],
                vm=doc["vm"],
                created_at=created.replace(tzinfo=UTC),
                consistency=Consistency(doc["consistency"]),
                vm_config=doc["vm_config"],
                disks={str(n): DiskChain.from_json(c) for n, c in disks.items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(
                f"{what}: manifest is malformed ({type(exc).__name__}: {exc})"
            ) from exc


def _parse(raw: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise FormatError(f"{what}: manifest is truncated or not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise FormatError(f"{what}: not a siterecovery recovery point manifest")
    version = doc.get("version")
    if not isinstance(version, int) or version < 1:
        raise FormatError(f"{what}: manifest has an invalid version {version!r}")
    if version > MANIFEST_VERSION:
        raise FormatError(
            f"{what}: manifest format version {version} is newer than this siterecovery "
            f"reads ({MANIFEST_VERSION})",
            hint="upgrade siterecovery",
        )
    return doc


def _hex(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError(f"bad digest {value!r}")
    return value


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"bad count {value!r}")
    return value


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError("segments must be a list")
    return value
