"""Publishing, loading and listing recovery point manifests."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from siterecovery.domain import Consistency, validate_name
from siterecovery.store.context import StoreContext
from siterecovery.store.errors import (
    FormatError,
    IntegrityError,
    ObjectExists,
    ObjectNotFound,
    StoreError,
    StoreInputError,
)
from siterecovery.store.manifest import (
    DiskChain,
    PointManifest,
    make_point_id,
    point_key,
    validate_point_id,
)

__all__ = ["DamagedPoint", "PointScan", "load_point", "publish_point", "scan_points"]

#: Upper bound of the sequence part of a point id.
_MAX_SEQ = 10_000


@dataclass(frozen=True)
class DamagedPoint:
    """A manifest that could not be loaded, and why."""

    vm: str
    point_id: str
    key: str
    error: StoreError

    @property
    def problem(self) -> str:
        return self.error.message


@dataclass
class PointScan:
    """The recovery points of a VM (oldest first) and the manifests that are damaged."""

    ok: list[PointManifest] = field(default_factory=list)
    damaged: list[DamagedPoint] = field(default_factory=list)


def load_point(ctx: StoreContext, vm: str, point_id: str) -> PointManifest:
    """Load and verify one manifest (``ObjectNotFound`` if there is no such point)."""
    validate_name("VM", vm)
    validate_point_id(point_id)
    try:
        raw = ctx.backend.get(point_key(vm, point_id))
    except ObjectNotFound as exc:
        raise ObjectNotFound(
            f"recovery point {vm}/{point_id} does not exist",
            hint=f"run `siterecovery points {vm}` to list its recovery points",
        ) from exc
    return PointManifest.decode(raw, ctx.codec, vm=vm, point_id=point_id)


def scan_points(ctx: StoreContext, vm: str) -> PointScan:
    """Load every manifest of ``vm``; damaged ones are collected, never skipped silently."""
    validate_name("VM", vm)
    scan = PointScan()
    prefix = f"points/{vm}/"
    for info in ctx.backend.list(prefix):
        name = info.key[len(prefix) :]
        point_id = name.removesuffix(".json")
        try:
            if "/" in name or not name.endswith(".json"):
                raise FormatError(f"unexpected object {info.key} among recovery points")
            scan.ok.append(load_point(ctx, vm, point_id))
        except StoreError as exc:
            scan.damaged.append(DamagedPoint(vm, point_id, info.key, exc))
    scan.ok.sort(key=lambda p: p.point_id)
    return scan


def list_vms(ctx: StoreContext) -> list[str]:
    """VM names that have manifests in the store."""
    vms = {info.key.split("/")[1] for info in ctx.backend.list("points/")}
    return sorted(vms)


def publish_point(
    ctx: StoreContext,
    vm: str,
    disks: Mapping[str, DiskChain],
    *,
    consistency: str | Consistency,
    vm_config: dict[str, Any],
    created_at: datetime | None,
    known: set[str],
) -> PointManifest:
    """Check every object the point names exists, then publish the manifest create-only.

    ``known`` holds keys already checked or written by this process (skipped, then
    extended). Raises ``ObjectNotFound`` / ``IntegrityError`` naming the object when a
    reference is missing or has the wrong size; nothing is published then.
    """
    validate_name("VM", vm)
    chains = _check_disks(disks)
    level = _check_consistency(consistency)
    config = _check_vm_config(vm_config)
    when = created_at if created_at is not None else datetime.now(UTC)
    if when.tzinfo is None:
        raise StoreInputError("created_at must be timezone-aware (UTC)")
    _check_refs(ctx, chains, known)
    for seq in range(_MAX_SEQ):
        point = PointManifest(make_point_id(when, seq), vm, when, level, config, chains)
        try:
            ctx.backend.put(point.key, point.encode(ctx.codec), create_only=True)
        except ObjectExists:
            continue  # another point in the same microsecond: take the next sequence number
        # What was published must read back: the point id format drops nothing.
        return PointManifest.decode(
            point.encode(ctx.codec), ctx.codec, vm=vm, point_id=point.point_id
        )
    raise StoreError(f"too many recovery points of {vm} at {when.isoformat()}")


def _check_disks(disks: Mapping[str, DiskChain]) -> dict[str, DiskChain]:
    if not disks:
        raise StoreInputError("a recovery point needs at least one disk")
    for name, chain in disks.items():
        validate_name("disk", name)
        if not isinstance(chain, DiskChain):
            raise StoreInputError(f"disk {name}: expected a DiskChain, got {type(chain).__name__}")
    return dict(sorted(disks.items()))


def _check_consistency(value: str | Consistency) -> Consistency:
    try:
        return Consistency(value)
    except ValueError as exc:
        allowed = ", ".join(c.value for c in Consistency)
        raise StoreInputError(f"invalid consistency {value!r}; use one of: {allowed}") from exc


def _check_vm_config(vm_config: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(vm_config, dict):
        raise StoreInputError("vm_config must be a dict")
    try:
        # A JSON round trip both validates and freezes a private copy.
        copied: dict[str, Any] = json.loads(json.dumps(vm_config, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise StoreInputError(f"vm_config is not JSON-serializable: {exc}") from exc
    return copied


def _check_refs(ctx: StoreContext, chains: Mapping[str, DiskChain], known: set[str]) -> None:
    for disk, chain in chains.items():
        for ref in chain.refs():
            if ref.key in known:
                continue
            info = ctx.backend.stat(ref.key)
            if info is None:
                raise ObjectNotFound(
                    f"cannot publish: disk {disk} names object {ref.key}, which does not exist"
                )
            if info.size != ref.size:
                raise IntegrityError(
                    f"cannot publish: object {ref.key} of disk {disk} has {info.size} bytes, "
                    f"the reference says {ref.size}"
                )
            known.add(ref.key)
