"""Garbage collection: delete chunks, indexes and segments no recovery point needs.

Mark, then sweep:

1. **Mark.** Load every manifest of every VM and every base index they name (digest
   verified): the live set is those indexes and segments plus the chunks the indexes list.
   The roots of live leases join it (see :mod:`siterecovery.store.leases`). If any manifest,
   or any index the live set depends on, cannot be read, GC raises
   :class:`MaintenanceRefused` and deletes nothing: it cannot tell what is live, and silent
   data loss is the worst failure a DR product can have.
2. **Select.** Every object under ``chunks/``, ``indexes/``, ``segments/`` that is not live
   is a candidate unless it is younger than ``min_age`` (mtime, the safety delay), or was
   modified after ``created - LEASE_SKEW`` of the oldest live *writing* lease (its writer has
   not published yet), or is a chunk while a live *deduplicating* lease exists (the writer
   may have found it and skipped its upload).
3. **Sweep.** Put a ``gc`` lease, then mark again (manifests and leases; indexes already
   loaded are cached) and re-apply step 2 to the candidates (the handshake: a writer that
   put its lease before this listing is honoured; one that puts it after waits for the
   sweep to end; a manifest published or rewritten meanwhile is seen), then delete
   segments, indexes, chunks in that order (a crash mid-sweep never leaves an index whose
   chunks are gone while the index is kept).
   Expired leases are deleted, and the file backend's old temporary files.

Manifests (``points/``), the store config and unknown keys are never touched. ``dry_run``
does steps 1-2 and reports what the sweep would delete.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from siterecovery.store.backend import ObjectInfo
from siterecovery.store.context import StoreContext
from siterecovery.store.errors import (
    MaintenanceRefused,
    ObjectNotFound,
    StoreError,
    StoreInputError,
)
from siterecovery.store.index import BaseIndex, chunk_key
from siterecovery.store.leases import (
    LEASE_SKEW,
    Clock,
    Lease,
    LeaseInfo,
    acquire_lease,
    list_leases,
    utc_now,
)
from siterecovery.store.manifest import DiskRef
from siterecovery.store.points import list_vms, scan_points
from siterecovery.store.reader import load_index

if TYPE_CHECKING:
    from siterecovery.store.repository import ReplicaStore

__all__ = ["DEFAULT_MIN_AGE", "GcReport", "collect_garbage"]

DEFAULT_MIN_AGE = timedelta(hours=1)
#: Deletion order: what refers to other objects goes first.
SWEPT_PREFIXES = ("segments/", "indexes/", "chunks/")
GC_LEASE_TTL = timedelta(minutes=30)

#: progress(phase, done, total); phase is "mark" or "sweep".
GcProgress = Callable[[str, int, int], None]


@dataclass
class GcReport:
    """What a collection found and did. ``deleted``/``bytes_freed`` are what a dry run would
    delete; ``candidates`` names those objects."""

    dry_run: bool
    min_age_seconds: float
    points: int = 0
    objects_scanned: int = 0
    kept_referenced: int = 0
    kept_young: int = 0
    kept_leased: int = 0
    deferred_chunks: int = 0
    deleted: int = 0
    bytes_freed: int = 0
    leases_removed: int = 0
    temp_files_removed: int = 0
    candidates: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return self.kept_referenced + self.kept_young + self.kept_leased + self.deferred_chunks


class _Marker:
    """The live set: referenced index/segment keys and chunk keys."""

    def __init__(self, ctx: StoreContext) -> None:
        self.ctx = ctx
        self.keys: set[str] = set()
        self.chunks: set[str] = set()
        self.points = 0
        self._indexes: dict[str, set[str]] = {}  # index key -> its chunk keys (a cache)

    def reset(self) -> None:
        """Forget the live set (not the index cache) before marking again."""
        self.keys.clear()
        self.chunks.clear()
        self.points = 0

    def mark_manifests(self) -> None:
        damaged = []
        for vm in list_vms(self.ctx):
            scan = scan_points(self.ctx, vm)
            damaged.extend(scan.damaged)
            for point in scan.ok:
                self.points += 1
                for chain in point.disks.values():
                    self.keys.update(ref.key for ref in chain.refs())
                    self._mark_index(chain.base, point.name)
        if damaged:
            names = ", ".join(f"{d.vm}/{d.point_id}" for d in damaged[:5])
            raise MaintenanceRefused(
                f"garbage collection refused: {len(damaged)} damaged recovery point "
                f"manifest(s) ({names}; first problem: {damaged[0].problem}); the live set "
                "cannot be computed, so nothing was deleted"
            )

    def _mark_index(self, ref: DiskRef, user: str) -> None:
        if ref.key in self._indexes:
            self.chunks.update(self._indexes[ref.key])
            return
        try:
            index = load_index(self.ctx, ref)
        except StoreError as exc:
            if exc.recoverable:
                raise
            raise MaintenanceRefused(
                f"garbage collection refused: index {ref.key} of recovery point {user} "
                f"cannot be read ({exc.message}); its chunks cannot be known, so nothing "
                "was deleted"
            ) from exc
        self._add_index(ref.key, index)

    def _add_index(self, key: str, index: BaseIndex) -> None:
        self._indexes[key] = {chunk_key(cid) for cid in index.chunk_ids()}
        self.chunks.update(self._indexes[key])

    def mark_roots(self, leases: Iterable[LeaseInfo]) -> None:
        for lease in leases:
            for root in lease.roots:
                self.keys.add(root)
                if root in self._indexes:
                    self.chunks.update(self._indexes[root])
                elif root.startswith("indexes/"):
                    self._mark_root_index(root, lease)

    def _mark_root_index(self, key: str, lease: LeaseInfo) -> None:
        """An index pinned by a lease has no recorded digest: unseal it under its name."""
        try:
            blob = self.ctx.backend.get(key)
        except ObjectNotFound:
            return  # not written yet (or never): nothing of it to keep
        try:
            index = BaseIndex.decode(self.ctx.codec.unseal(key, blob), key)
        except StoreError as exc:
            raise MaintenanceRefused(
                f"garbage collection refused: index {key} pinned by lease {lease.key} "
                f"cannot be read ({exc.message}); nothing was deleted"
            ) from exc
        self._add_index(key, index)

    def live(self, key: str) -> bool:
        return key in self.keys or key in self.chunks


@dataclass(frozen=True)
class _Rules:
    """The lease-derived protections of step 2."""

    young_after: float  # mtime above this: too young
    write_bound: float | None  # mtime at or above this: a live writer may own it
    dedup: bool

    @classmethod
    def of(cls, leases: list[LeaseInfo], now: datetime, min_age: timedelta) -> _Rules:
        writers = [lease for lease in leases if lease.writes]
        bound = min((w.created for w in writers), default=None)
        return cls(
            (now - min_age).timestamp(),
            None if bound is None else (bound - LEASE_SKEW).timestamp(),
            any(lease.dedup for lease in leases),
        )

    def verdict(self, info: ObjectInfo, marker: _Marker) -> str:
        if marker.live(info.key):
            return "referenced"
        if info.mtime > self.young_after:
            return "young"
        if self.write_bound is not None and info.mtime >= self.write_bound:
            return "leased"
        if self.dedup and info.key.startswith("chunks/"):
            return "deferred"
        return "candidate"


class _Collector:
    def __init__(
        self,
        store: ReplicaStore,
        min_age: timedelta,
        dry_run: bool,
        clock: Clock,
        progress: GcProgress | None,
    ) -> None:
        self.ctx = store.context
        self.backend = store.backend
        self.min_age = min_age
        self.clock = clock
        self.progress = progress or (lambda _phase, _done, _total: None)
        self.report = GcReport(dry_run, min_age.total_seconds())
        self.marker = _Marker(self.ctx)

    def run(self) -> GcReport:
        now = self.clock()
        self.progress("mark", 0, 1)
        leases = self._live_leases(now)
        self.marker.mark_manifests()
        self.marker.mark_roots(leases)
        self.report.points = self.marker.points
        self.progress("mark", 1, 1)
        objects = [info for prefix in SWEPT_PREFIXES for info in self.backend.list(prefix)]
        candidates = self._select(objects, _Rules.of(leases, now, self.min_age), count=True)
        if self.report.dry_run:
            self._record(candidates)
            return self.report
        with acquire_lease(self.backend, "gc", ttl=GC_LEASE_TTL, clock=self.clock) as lease:
            candidates = self._recheck(candidates, now)
            self._record(candidates)
            self._sweep(candidates, lease)
            self._remove_expired_leases(lease)
        self._cleanup_temp()
        return self.report

    def _live_leases(self, now: datetime) -> list[LeaseInfo]:
        leases = [lease for lease in list_leases(self.backend) if lease.live(now)]
        for lease in leases:
            if lease.damaged and lease.damaged not in self.report.warnings:
                self.report.warnings.append(lease.damaged)
        return [lease for lease in leases if lease.purpose != "gc"]

    def _select(self, objects: list[ObjectInfo], rules: _Rules, *, count: bool) -> list[ObjectInfo]:
        chosen = []
        for info in objects:
            verdict = rules.verdict(info, self.marker)
            if verdict == "candidate":
                chosen.append(info)
            elif count:
                self._count(verdict)
        if count:
            self.report.objects_scanned = len(objects)
        return chosen

    def _count(self, verdict: str) -> None:
        attr = {
            "referenced": "kept_referenced",
            "young": "kept_young",
            "leased": "kept_leased",
            "deferred": "deferred_chunks",
        }[verdict]
        setattr(self.report, attr, getattr(self.report, attr) + 1)

    def _recheck(self, candidates: list[ObjectInfo], now: datetime) -> list[ObjectInfo]:
        """Mark again under our gc lease (the handshake): manifests published or rewritten
        since the first mark, and leases put before ours, are honoured. Indexes already
        loaded are not read again."""
        leases = self._live_leases(self.clock())
        self.marker.reset()
        self.marker.mark_manifests()
        self.marker.mark_roots(leases)
        rules = _Rules.of(leases, now, self.min_age)
        still = self._select(candidates, rules, count=False)
        chosen = {info.key for info in still}
        for info in candidates:
            if info.key not in chosen:
                self._count(rules.verdict(info, self.marker))
        return still

    def _record(self, candidates: list[ObjectInfo]) -> None:
        self.report.candidates = [info.key for info in candidates]
        self.report.deleted = len(candidates)
        self.report.bytes_freed = sum(info.size for info in candidates)

    def _sweep(self, candidates: list[ObjectInfo], lease: Lease) -> None:
        total = len(candidates)
        for done, info in enumerate(candidates, 1):
            self.backend.delete(info.key)
            if done % 256 == 0:
                lease.renew_if_due()
            self.progress("sweep", done, total)
        if not total:
            self.progress("sweep", 0, 0)

    def _remove_expired_leases(self, own: Lease) -> None:
        now = self.clock()
        for lease in list_leases(self.backend):
            if lease.id != own.info.id and not lease.live(now):
                self.backend.delete(lease.key)
                self.report.leases_removed += 1

    def _cleanup_temp(self) -> None:
        cleanup = getattr(self.backend, "cleanup_temp", None)
        if callable(cleanup):
            self.report.temp_files_removed = int(cleanup(self.min_age.total_seconds()))


def collect_garbage(
    store: ReplicaStore,
    *,
    min_age: timedelta = DEFAULT_MIN_AGE,
    dry_run: bool = False,
    clock: Clock = utc_now,
    progress: GcProgress | None = None,
) -> GcReport:
    """Collect the store's garbage (see the module docstring) and report.

    Raises :class:`MaintenanceRefused` (nothing deleted) when the live set cannot be
    computed, ``LeaseConflict`` when another collection is sweeping, and ``StoreInputError``
    for a negative ``min_age``.
    """
    if min_age < timedelta(0):
        raise StoreInputError(
            f"invalid minimum age {min_age}", hint="use a duration of 0 or more, e.g. 1h"
        )
    return _Collector(store, min_age, dry_run, clock, progress).run()
