"""Compaction: every point restores byte-identical before and after, chains are bounded,
and an interruption at any put leaves every point restorable."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from siterecovery.store import (
    DiskChain,
    IntegrityError,
    PointManifest,
    ReplicaStore,
    StoreKeys,
)
from siterecovery.store.compaction import CompactionPolicy, compact, plan_bases
from siterecovery.store.errors import StoreError
from siterecovery.store.gc import collect_garbage
from siterecovery.store.leases import LeaseConflict, acquire_lease, list_leases
from siterecovery.store.memory import MemoryBackend, drop_memory_store, flip_byte
from siterecovery.store.retention import MaintenanceRefused, RetentionPolicy, prune

from .conftest import BACKEND_MAKERS, BLOCK
from .helpers import random_disk, random_extents, read_all, write_base, write_segment

DISKS = {"vda": 9 * BLOCK + 1536, "vdb": 5 * BLOCK}


@pytest.fixture(params=["file", "memory"])
def store(
    request: pytest.FixtureRequest, tmp_path: Path, keys: StoreKeys
) -> Iterator[ReplicaStore]:
    """Overrides the conftest fixture: only the fast local backends here (the object-store
    backends run in the garbage collection tests)."""
    with BACKEND_MAKERS[request.param](tmp_path) as url:
        yield ReplicaStore.init(url, keys, block_size=BLOCK, workers=2)


@pytest.mark.parametrize(
    ("positions", "max_chain", "min_fold", "bases"),
    [
        ([0, 1, 2, 3], 4, 2, []),
        ([0, 1, 2, 3, 4, 5, 6], 2, 9, [3, 6]),
        ([5, 6, 7], 4, 3, [5]),  # the shared prefix is folded
        ([5, 6, 7], 8, 6, []),  # ... only from min_fold segments
        ([5, 6, 7], 4, 6, [5]),  # ... unless the chain limit needs a base there
        ([2, 9, 30, 31, 40], 8, 1, [2, 30, 40]),
        ([10, 10, 4], 3, 100, [4, 10]),  # unordered, duplicates
        ([], 3, 1, []),
    ],
)
def test_plan_bases(positions: list[int], max_chain: int, min_fold: int, bases: list[int]) -> None:
    assert plan_bases(positions, CompactionPolicy(max_chain, min_fold)) == bases


@pytest.mark.parametrize("bad", [{"max_chain": 0}, {"min_fold": -1}, {"max_chain": True}])
def test_bad_policy(bad: dict[str, int]) -> None:
    with pytest.raises(StoreError):
        CompactionPolicy(**bad)


@dataclass
class History:
    points: list[PointManifest]
    images: list[dict[str, bytes]]

    def check(self, store: ReplicaStore) -> None:
        """Every point still exists under its id and reads back exactly."""
        listed = store.list_points("vm1")
        assert [p.point_id for p in listed] == [p.point_id for p in self.points]
        for point, images in zip(listed, self.images, strict=True):
            for disk, image in images.items():
                assert read_all(store, point, disk) == image, (point.point_id, disk)


def replicate(store: ReplicaStore, cycles: int, seed: int) -> History:
    """A base, then ``cycles`` random cycles on two disks, a point after each."""
    rnd = random.Random(seed)
    images = {d: random_disk(rnd, size, BLOCK) for d, size in DISKS.items()}
    chains = {d: DiskChain(len(img), write_base(store, "vm1", d, img, rnd))
              for d, img in images.items()}  # fmt: skip
    start = datetime(2024, 5, 1, tzinfo=UTC)
    history = History([], [])
    for cycle in range(cycles + 1):
        if cycle:
            for disk, image in images.items():
                if rnd.random() < 0.8:  # some cycles leave a disk unchanged
                    extents = random_extents(rnd, len(image), BLOCK, rnd.randint(1, 5))
                    seg = write_segment(store, "vm1", disk, image, extents, rnd)
                    chains[disk] = chains[disk].extend(seg)
        history.points.append(store.publish_point(
            "vm1", chains, consistency=rnd.choice(["app", "crash"]), vm_config={"c": cycle},
            created_at=start + timedelta(minutes=5 * cycle),
        ))  # fmt: skip
        history.images.append({d: bytes(img) for d, img in images.items()})
    return history


def longest(store: ReplicaStore) -> int:
    return max(len(c.segments) for p in store.list_points("vm1") for c in p.disks.values())


def test_compaction_keeps_every_point_identical(store: ReplicaStore) -> None:
    history = replicate(store, cycles=14, seed=1)
    assert longest(store) > 4
    report = compact(store, "vm1", CompactionPolicy(max_chain=4, min_fold=100))
    assert report.bases_written and report.points_rewritten
    assert report.longest_chain_after == longest(store) <= 4 < report.longest_chain_before
    history.check(store)
    for before, after in zip(history.points, store.list_points("vm1"), strict=True):
        assert (after.created_at, after.consistency, after.vm_config) == (
            before.created_at, before.consistency, before.vm_config
        )  # fmt: skip
    assert store.verify(deep=True).ok
    # already compact: a second run changes nothing
    again = compact(store, "vm1", CompactionPolicy(max_chain=4, min_fold=100))
    assert again.bases_written == [] and again.points_rewritten == []
    assert not [lease for lease in list_leases(store.backend) if lease.purpose == "compaction"]


def test_fold_after_retention_then_gc_frees_old_chains(mem_store: ReplicaStore) -> None:
    history = replicate(mem_store, cycles=12, seed=2)
    now = history.points[-1].created_at + timedelta(minutes=1)
    # keep the last 20 minutes only: the survivors share a long common prefix
    report = prune(mem_store, "vm1", RetentionPolicy(retention_hours=21 / 60, keep_all_hours=0.3),
                   now)  # fmt: skip
    survivors = {p.point_id for p in mem_store.list_points("vm1")}
    assert report.deleted and len(survivors) >= 3
    history = History(
        [p for p in history.points if p.point_id in survivors],
        [img for p, img in zip(history.points, history.images, strict=True)
         if p.point_id in survivors],
    )  # fmt: skip
    compact(mem_store, "vm1", CompactionPolicy(max_chain=64, min_fold=2))
    assert longest(mem_store) <= 4
    history.check(mem_store)
    before = sum(i.size for i in mem_store.backend.list())
    later = datetime.now(UTC) + timedelta(hours=2)  # the retired leases have expired
    gc = collect_garbage(mem_store, clock=lambda: later)
    assert gc.deleted > 0 and gc.bytes_freed > 0
    assert sum(i.size for i in mem_store.backend.list()) < before
    assert not list(mem_store.backend.list("leases/"))
    history.check(mem_store)
    assert mem_store.verify(deep=True).ok


def test_old_chains_stay_until_the_safety_delay(mem_store: ReplicaStore) -> None:
    history = replicate(mem_store, cycles=8, seed=3)
    old = history.points[-1]
    compact(mem_store, "vm1", CompactionPolicy(max_chain=2, min_fold=100))
    # a reader that loaded the old manifest before compaction can still read it, even
    # after a GC that finds the old chain unreferenced and old
    collect_garbage(mem_store, min_age=timedelta(0))
    assert read_all(mem_store, old, "vda") == history.images[-1]["vda"]


def fresh_store(keys: StoreKeys) -> tuple[ReplicaStore, str]:
    name = f"compact-{uuid.uuid4().hex}"
    return ReplicaStore.init(f"memory://{name}", keys, block_size=BLOCK, workers=2), name


def _failing_put(n: int, fired: list[str]) -> Callable[[str, bytes], None]:
    """A put hook failing the ``n``-th put from now, recording its key in ``fired``."""
    seen = [0]

    def hook(key: str, _data: bytes) -> None:
        seen[0] += 1
        if seen[0] == n:
            fired.append(key)
            raise StoreError(f"injected failure of put {n} ({key})")

    return hook


def test_interrupted_at_every_put_leaves_every_point_restorable(keys: StoreKeys) -> None:
    policy = CompactionPolicy(max_chain=2, min_fold=100)
    n = 0
    interrupted: set[str] = set()
    while True:
        n += 1
        store, name = fresh_store(keys)
        try:
            history = replicate(store, cycles=5, seed=4)
            backend = store.backend
            assert isinstance(backend, MemoryBackend)
            fired: list[str] = []
            backend.put_hook = _failing_put(n, fired)
            try:
                compact(store, "vm1", policy)
            except StoreError:
                assert fired
            backend.clear_faults()
            history.check(store)
            if not fired:
                break  # compaction completed before the n-th put: every step was covered
            interrupted.add(fired[0].split("/")[0])
            compact(store, "vm1", policy)  # a later run finishes the job
            history.check(store)
            assert longest(store) <= 2
        finally:
            drop_memory_store(name)
    assert interrupted == {"leases", "chunks", "indexes", "points"}


def test_corrupt_segment_stops_compaction_before_any_rewrite(mem_store: ReplicaStore) -> None:
    history = replicate(mem_store, cycles=6, seed=5)
    backend = mem_store.backend
    assert isinstance(backend, MemoryBackend)
    manifests = {i.key: backend.raw(i.key) for i in backend.list("points/")}
    target = history.points[2].disks["vda"].segments[0].key
    backend.corrupt_on_get(lambda k: k == target)
    with pytest.raises(IntegrityError):
        compact(mem_store, "vm1", CompactionPolicy(max_chain=1, min_fold=100))
    backend.clear_faults()
    assert {i.key: backend.raw(i.key) for i in backend.list("points/")} == manifests
    history.check(mem_store)


def test_refusals(mem_store: ReplicaStore) -> None:
    history = replicate(mem_store, cycles=3, seed=6)
    backend = mem_store.backend
    assert isinstance(backend, MemoryBackend)
    with acquire_lease(backend, "prune", vm="vm1"):
        with pytest.raises(LeaseConflict):
            compact(mem_store, "vm1", CompactionPolicy(max_chain=1))
        with pytest.raises(LeaseConflict, match="prune"):
            prune(mem_store, "vm1", RetentionPolicy(1))
        compact(mem_store, "vm2", CompactionPolicy(max_chain=1))  # another VM: no conflict
    key = history.points[1].key
    backend.put(key, flip_byte(backend.raw(key)))
    before = {i.key for i in backend.list()}
    with pytest.raises(MaintenanceRefused, match="damaged"):
        compact(mem_store, "vm1", CompactionPolicy(max_chain=1))
    assert {i.key for i in backend.list()} == before
