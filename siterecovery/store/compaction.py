"""Compaction: fold delta segments into new base indexes, so restores read short chains.

Design ("chain rebase"). For each disk of a VM, the points whose chain for that disk starts
with the same base form a **family**; their segment lists are prefixes of the family's
longest chain ``L`` (points made by successive cycles). A point's **position** is its number
of segments. :func:`plan_bases` picks positions where new bases go:

* when the oldest point of the family has at least ``min_fold`` segments, a base at its
  position (the segments every point shares are folded: the seed's "merged into the parent
  disk");
* then, walking up, a base at a point's position whenever it would otherwise read more than
  ``max_chain`` segments. Each base is a **level**; every rebased point reads its nearest
  base at or below it plus at most ``max_chain`` segments.

A base at position ``j`` is built from the previous base (old or just built) plus the
segments in between: only the blocks those segments touch are materialized (verified
reads), hashed and stored as chunks (deduplicated); every other block reuses the previous
index's chunk id and checksums, so nothing else is read or uploaded. The new index is then
**verified**: read back and compared with what was built, every touched chunk read back and
hash-checked, every untouched entry equal to the previous index's.

Only then are manifests rewritten: a point at position ``p`` with the base at ``j <= p``
gets the chain ``new base + L[j:p]``, the same content by construction. The manifest keeps
its point id, time, consistency and VM config and is **replaced atomically** under the same
key (this is the one exception to "manifests are never modified": the vault and operators
hold point ids, which must stay valid). Before the first rewrite a ``retired`` lease pins the
old chains for the safety delay, so a reader that loaded an old manifest still finds them;
GC frees them afterwards. A manifest that changed or vanished since it was planned from is
left alone.

Crash safety: compaction deletes nothing. Interrupted before a rewrite, every manifest names
the old, untouched objects; interrupted between rewrites, each manifest is either old or
new and both are complete. What a failed run wrote is unreferenced and GC removes it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from siterecovery.domain import Consistency, validate_name
from siterecovery.store.context import StoreContext, new_object_id, ordered_map
from siterecovery.store.errors import (
    IntegrityError,
    MaintenanceRefused,
    ObjectExists,
    StoreError,
    StoreInputError,
)
from siterecovery.store.index import BaseIndex, block_span, chunk_key
from siterecovery.store.leases import Clock, acquire_lease, retire_roots, utc_now
from siterecovery.store.manifest import DiskChain, DiskRef, PointManifest, SegmentRef
from siterecovery.store.reader import ChainReader, load_index, load_segment_header, read_chunk
from siterecovery.store.retention import DEFAULT_SAFETY_DELAY

if TYPE_CHECKING:
    from siterecovery.store.repository import ReplicaStore

__all__ = ["CompactionPolicy", "CompactionReport", "compact", "plan_bases"]

#: Time and consistency of the in-memory view a base is built from (never published).
_VIEW_TIME = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class CompactionPolicy:
    """``max_chain``: most segments a restore of a compacted point reads per disk;
    ``min_fold``: fold the segments all points share once there are at least this many."""

    max_chain: int = 64
    min_fold: int = 16

    def __post_init__(self) -> None:
        for name, value in (("max_chain", self.max_chain), ("min_fold", self.min_fold)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise StoreInputError(f"invalid compaction {name} {value!r}: use 1 or more")


def plan_bases(positions: Sequence[int], policy: CompactionPolicy) -> list[int]:
    """Positions (segment counts, ascending) where new bases go; see the module docstring."""
    ordered = sorted(set(positions))
    bases: list[int] = []
    current = 0
    if ordered and ordered[0] >= policy.min_fold:
        current = ordered[0]
        bases.append(current)
    for position in ordered:
        if position - current > policy.max_chain:
            current = position
            bases.append(current)
    return bases


@dataclass
class CompactionReport:
    """What :func:`compact` did."""

    vm: str
    bases_written: list[str] = field(default_factory=list)
    blocks_rewritten: int = 0
    chunks_stored: int = 0
    points_rewritten: list[str] = field(default_factory=list)
    points_skipped: list[str] = field(default_factory=list)
    longest_chain_before: int = 0
    longest_chain_after: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Family:
    """Points sharing one base on one disk, and the longest chain among them."""

    disk: str
    base: DiskRef
    longest: tuple[SegmentRef, ...] = ()
    members: dict[str, int] = field(default_factory=dict)  # point id -> position


def _families(points: Sequence[PointManifest], report: CompactionReport) -> list[_Family]:
    found: dict[tuple[str, str], _Family] = {}
    for point in points:
        for disk, chain in point.disks.items():
            fam = found.setdefault((disk, chain.base.key), _Family(disk, chain.base))
            if len(chain.segments) > len(fam.longest):
                fam.longest = chain.segments
    for point in points:
        for disk, chain in point.disks.items():
            fam = found[(disk, chain.base.key)]
            n = len(chain.segments)
            if chain.base == fam.base and fam.longest[:n] == chain.segments:
                fam.members[point.point_id] = n
            else:
                report.warnings.append(
                    f"disk {disk} of {point.name}: chain is not a prefix of its family's; "
                    "left as it is"
                )
    return list(found.values())


class _BaseBuilder:
    """Builds and verifies one new base = previous base + some segments."""

    def __init__(self, ctx: StoreContext, vm: str, disk: str, size: int) -> None:
        self.ctx = ctx
        self.vm, self.disk, self.size = vm, disk, size

    def build(
        self, prev: DiskRef, segments: tuple[SegmentRef, ...], report: CompactionReport
    ) -> DiskRef:
        prev_index = load_index(self.ctx, prev)
        touched = self._touched(segments)
        chain = DiskChain(self.size, prev, segments)
        view = PointManifest("compaction", self.vm, _VIEW_TIME, Consistency.CRASH, {}, {
            self.disk: chain
        })  # fmt: skip
        reader = ChainReader(self.ctx, view, self.disk)
        index = BaseIndex(
            self.size, prev_index.block_size, list(prev_index.chunks), list(prev_index.sums)
        )
        pool = self.ctx.pool("compact")
        try:
            work = functools.partial(self._materialize, reader)
            for i, (raw, sums, stored) in zip(
                touched, ordered_map(pool, work, touched, self.ctx.max_in_flight), strict=True
            ):
                index.chunks[i], index.sums[i] = raw, sums
                report.chunks_stored += stored
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        report.blocks_rewritten += len(touched)
        ref = self._store(index)
        self._verify(ref, index, prev_index, set(touched))
        return ref

    def _touched(self, segments: tuple[SegmentRef, ...]) -> list[int]:
        blocks: set[int] = set()
        for ref in segments:
            blocks.update(f.block for f in load_segment_header(self.ctx, ref)[1].frames)
        return sorted(blocks)

    def _materialize(self, reader: ChainReader, i: int) -> tuple[bytes | None, bytes | None, int]:
        data = reader.block(i)
        if data is None:
            return None, None, 0
        codec = self.ctx.codec
        cid = codec.chunk_id(data)
        key = chunk_key(cid)
        stored = 0
        if self.ctx.backend.stat(key) is None:
            try:
                self.ctx.backend.put(key, codec.seal(key, data), create_only=True)
                stored = 1
            except ObjectExists:
                pass  # stored meanwhile by another writer: same content by name
        return bytes.fromhex(cid), codec.subblock_sums(data), stored

    def _store(self, index: BaseIndex) -> DiskRef:
        key = f"indexes/{self.vm}/{self.disk}/{new_object_id()}"
        blob = self.ctx.codec.seal(key, index.encode())
        self.ctx.backend.put(key, blob, create_only=True)
        return DiskRef(key, self.ctx.codec.digest(blob), len(blob))

    def _verify(self, ref: DiskRef, built: BaseIndex, prev: BaseIndex, touched: set[int]) -> None:
        stored = load_index(self.ctx, ref)
        same_prev = all(
            built.chunks[i] == prev.chunks[i] and built.sums[i] == prev.sums[i]
            for i in range(len(built.chunks))
            if i not in touched
        )
        if stored != built or not same_prev:
            raise IntegrityError(f"compaction: new base {ref.key} does not read back as built")
        for i in sorted(touched):
            cid = built.chunk_hex(i)
            if cid is not None:
                read_chunk(self.ctx, cid, block_span(i, self.size, built.block_size)[1])


class _Compactor:
    def __init__(
        self, store: ReplicaStore, vm: str, policy: CompactionPolicy, delay: timedelta, clock: Clock
    ) -> None:
        self.store, self.ctx = store, store.context
        self.vm, self.policy, self.delay, self.clock = vm, policy, delay, clock
        self.report = CompactionReport(vm)

    def run(self) -> CompactionReport:
        lease = acquire_lease(
            self.store.backend, "compaction", vm=self.vm, writes=True, dedup=True, clock=self.clock
        )
        with lease:
            points = self._load()
            new_chains: dict[str, dict[str, DiskChain]] = {}
            for fam in _families(points, self.report):
                self._compact_family(fam, points, new_chains)
                lease.renew_if_due()
            self._rewrite(points, new_chains)
        return self.report

    def _load(self) -> list[PointManifest]:
        scan = self.store.scan_points(self.vm)
        if scan.damaged:
            raise MaintenanceRefused(
                f"not compacting VM {self.vm}: {len(scan.damaged)} recovery point manifest(s) "
                f"are damaged (first: {scan.damaged[0].problem})"
            )
        lengths = [len(c.segments) for p in scan.ok for c in p.disks.values()]
        self.report.longest_chain_before = max(lengths, default=0)
        self.report.longest_chain_after = self.report.longest_chain_before
        return scan.ok

    def _compact_family(
        self, fam: _Family, points: list[PointManifest], out: dict[str, dict[str, DiskChain]]
    ) -> None:
        bases = plan_bases(list(fam.members.values()), self.policy)
        if not bases:
            return
        size = next(p.disks[fam.disk].size for p in points if p.point_id in fam.members)
        builder = _BaseBuilder(self.ctx, self.vm, fam.disk, size)
        built: list[tuple[int, DiskRef]] = []
        prev_pos, prev_ref = 0, fam.base
        for pos in bases:
            prev_ref = builder.build(prev_ref, fam.longest[prev_pos:pos], self.report)
            prev_pos = pos
            built.append((pos, prev_ref))
            self.report.bases_written.append(prev_ref.key)
        for point_id, n in fam.members.items():
            usable = [(pos, ref) for pos, ref in built if pos <= n]
            if usable:
                pos, ref = usable[-1]
                chain = DiskChain(size, ref, fam.longest[pos:n])
                out.setdefault(point_id, {})[fam.disk] = chain

    def _rewrite(self, points: list[PointManifest], new: dict[str, dict[str, DiskChain]]) -> None:
        changed = [p for p in points if p.point_id in new]
        if not changed:
            return
        old_roots = [r.key for p in changed for c in p.disks.values() for r in c.refs()]
        retire_roots(self.store.backend, old_roots, delay=self.delay, clock=self.clock, vm=self.vm)
        for point in changed:
            disks = {**point.disks, **new[point.point_id]}
            self._replace(point, disks)
        lengths = [
            len(c.segments) for p in points for c in {**p.disks, **new.get(p.point_id, {})}.values()
        ]
        self.report.longest_chain_after = max(lengths, default=0)

    def _replace(self, point: PointManifest, disks: dict[str, DiskChain]) -> None:
        """Replace one manifest if it is still what compaction planned from."""
        try:
            current = self.store.load_point(self.vm, point.point_id)
        except StoreError as exc:
            if exc.recoverable:
                raise
            self.report.points_skipped.append(point.point_id)  # gone or damaged meanwhile
            return
        if current != point:
            self.report.points_skipped.append(point.point_id)
            return
        rebased = PointManifest(
            point.point_id, point.vm, point.created_at, point.consistency, point.vm_config, disks
        )
        self.store.backend.put(rebased.key, rebased.encode(self.ctx.codec))
        if self.store.load_point(self.vm, point.point_id) != rebased:
            raise IntegrityError(f"compaction: manifest {rebased.name} does not read back")
        self.report.points_rewritten.append(point.point_id)


def compact(
    store: ReplicaStore,
    vm: str,
    policy: CompactionPolicy | None = None,
    *,
    safety_delay: timedelta = DEFAULT_SAFETY_DELAY,
    clock: Clock = utc_now,
) -> CompactionReport:
    """Compact the chains of ``vm`` (see the module docstring) and report.

    Raises :class:`MaintenanceRefused` (nothing changed) if a manifest of ``vm`` is damaged,
    ``LeaseConflict`` while another compaction or a prune of ``vm`` runs, and the store's
    errors when reading or writing fails (every point stays restorable).
    """
    validate_name("VM", vm)
    return _Compactor(store, vm, policy or CompactionPolicy(), safety_delay, clock).run()
