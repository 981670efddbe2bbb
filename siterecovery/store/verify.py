"""Checking a replica store: manifests, the objects they name, and (deep) their content.

A normal check loads every manifest (MAC verified) and every base index (digest verified,
since the chunks to look for are listed there), then checks that every referenced object
exists with the recorded size, from one listing per object kind. A deep check also reads
every segment and chunk and verifies digests, envelopes and content hashes. Each object is
checked once however many points share it; the report names every damaged object and the
points that depend on it.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from siterecovery.store.context import StoreContext
from siterecovery.store.errors import StoreError
from siterecovery.store.index import chunk_key
from siterecovery.store.manifest import DiskRef, PointManifest, SegmentRef
from siterecovery.store.points import DamagedPoint, list_vms, scan_points
from siterecovery.store.reader import load_index, load_segment_header, read_chunk

__all__ = ["DamagedObject", "VerifyReport", "verify_store"]


@dataclass(frozen=True)
class DamagedObject:
    """An object that is missing or corrupt, the points (``vm/point_id``) it breaks, and
    the disks (``vm/disk``) whose chains refer to it."""

    key: str
    problem: str
    points: tuple[str, ...]
    disks: tuple[str, ...] = ()


@dataclass
class VerifyReport:
    """The outcome of :func:`verify_store`; ``ok`` when nothing is damaged."""

    deep: bool
    points_checked: int = 0
    objects_checked: int = 0
    damaged_points: list[DamagedPoint] = field(default_factory=list)
    damaged_objects: list[DamagedObject] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged_points and not self.damaged_objects

    @property
    def affected_points(self) -> list[str]:
        """Every point (``vm/point_id``) that cannot be fully restored."""
        names = {f"{d.vm}/{d.point_id}" for d in self.damaged_points}
        for obj in self.damaged_objects:
            names.update(obj.points)
        return sorted(names)


class _Verifier:
    def __init__(self, ctx: StoreContext, deep: bool) -> None:
        self.ctx = ctx
        self.report = VerifyReport(deep)
        self.users: dict[str, set[str]] = defaultdict(set)  # object key -> points
        self.disks: dict[str, set[str]] = defaultdict(set)  # object key -> vm/disk
        self.refs: dict[str, DiskRef | SegmentRef] = {}
        self.chunks: set[str] = set()
        self.problems: dict[str, str] = {}

    def run(self) -> VerifyReport:
        points = self._load_points()
        self._load_indexes(points)
        self._check_existence()
        if self.report.deep:
            self._check_content()
        self.report.damaged_objects = [
            DamagedObject(
                key, problem, tuple(sorted(self.users[key])), tuple(sorted(self.disks[key]))
            )
            for key, problem in sorted(self.problems.items())
        ]
        return self.report

    def _load_points(self) -> list[PointManifest]:
        points: list[PointManifest] = []
        for vm in list_vms(self.ctx):
            scan = scan_points(self.ctx, vm)
            points.extend(scan.ok)
            self.report.damaged_points.extend(scan.damaged)
        self.report.points_checked = len(points) + len(self.report.damaged_points)
        for point in points:
            for disk, chain in point.disks.items():
                for ref in chain.refs():
                    self.users[ref.key].add(point.name)
                    self.disks[ref.key].add(f"{point.vm}/{disk}")
                    self.refs[ref.key] = ref
        return points

    def _load_indexes(self, points: list[PointManifest]) -> None:
        for key, ref in self.refs.items():
            if not isinstance(ref, DiskRef):
                continue
            try:
                index = load_index(self.ctx, ref)
            except StoreError as exc:
                self.problems[key] = exc.message
                continue
            for cid in index.chunk_ids():
                ckey = chunk_key(cid)
                self.chunks.add(cid)
                self.users[ckey].update(self.users[key])
                self.disks[ckey].update(self.disks[key])

    def _check_existence(self) -> None:
        sizes: dict[str, int] = {}
        for prefix in ("indexes/", "segments/", "chunks/"):
            sizes.update((i.key, i.size) for i in self.ctx.backend.list(prefix))
        for key, ref in self.refs.items():
            if key not in sizes:
                self.problems[key] = "missing"
            elif sizes[key] != ref.size and key not in self.problems:
                self.problems[key] = f"corrupt: {sizes[key]} bytes, the manifest says {ref.size}"
        for cid in self.chunks:
            if chunk_key(cid) not in sizes:
                self.problems[chunk_key(cid)] = "missing"
        self.report.objects_checked = len(self.refs) + len(self.chunks)

    def _check_content(self) -> None:
        checks: list[tuple[str, Callable[[], None]]] = []
        for key, ref in self.refs.items():
            if isinstance(ref, SegmentRef) and key not in self.problems:
                checks.append((key, functools.partial(self._check_segment, ref)))
        for cid in self.chunks:
            if chunk_key(cid) not in self.problems:
                checks.append((chunk_key(cid), functools.partial(self._check_chunk, cid)))
        pool = self.ctx.pool("verify")
        try:
            for key, problem in zip(
                (k for k, _ in checks), pool.map(_run_check, (c for _, c in checks)), strict=True
            ):
                if problem is not None:
                    self.problems[key] = problem
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _check_chunk(self, cid: str) -> None:
        read_chunk(self.ctx, cid)

    def _check_segment(self, ref: SegmentRef) -> None:
        """Header, every frame, and the digest of the whole object, reading it once."""
        start, header = load_segment_header(self.ctx, ref)
        hasher = self.ctx.codec.digest_hasher()
        hasher.update(self.ctx.backend.get(ref.key, 0, start))
        pos = start
        for frame in header.frames:
            if start + frame.rel_offset != pos:
                raise StoreError(f"corrupt: frame {frame.block} is not where the header says")
            blob = self.ctx.backend.get(ref.key, pos, frame.stored_len)
            hasher.update(blob)
            plain = self.ctx.codec.unseal(f"{ref.key}#block{frame.block}", blob)
            if len(plain) != frame.plain_len:
                raise StoreError(f"corrupt: frame {frame.block} has a wrong length")
            pos += frame.stored_len
        if pos != ref.size:
            raise StoreError(f"corrupt: frames end at {pos}, the object has {ref.size} bytes")
        if hasher.hexdigest() != ref.digest:
            raise StoreError("corrupt: digest does not match the manifest")


def _run_check(check: Callable[[], None]) -> str | None:
    try:
        check()
    except StoreError as exc:
        return exc.message
    return None


def verify_store(ctx: StoreContext, *, deep: bool = False) -> VerifyReport:
    """Check the whole store; see the module docstring."""
    return _Verifier(ctx, deep).run()
