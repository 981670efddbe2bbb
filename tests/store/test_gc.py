"""Garbage collection: what is deleted, what never is, leases, and refusal on damage."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from siterecovery.store import DiskChain, DiskRef, PointManifest, ReplicaStore
from siterecovery.store.gc import collect_garbage
from siterecovery.store.leases import LeaseConflict, acquire_lease, list_leases
from siterecovery.store.memory import MemoryBackend, flip_byte
from siterecovery.store.retention import MaintenanceRefused

from .conftest import BLOCK
from .helpers import random_disk, random_extents, read_all, write_base, write_segment

PREFIXES = ("chunks/", "indexes/", "segments/")


def data_keys(store: ReplicaStore) -> dict[str, int]:
    return {i.key: i.size for p in PREFIXES for i in store.backend.list(p)}


def later(hours: float = 2) -> Callable[[], datetime]:
    """A clock ``hours`` ahead: everything stored so far is that much older."""
    return lambda: datetime.now(UTC) + timedelta(hours=hours)


@dataclass
class Scenario:
    points: list[PointManifest]
    images: list[bytes]
    live: dict[str, int]
    garbage: dict[str, int]
    garbage_index: str
    garbage_ref: DiskRef
    garbage_image: bytes


def build(store: ReplicaStore) -> Scenario:
    """Two published points of vm1, then garbage: an aborted cycle's segment and an
    unpublished base of other content (its index and chunks)."""
    rnd = random.Random(5)
    image = random_disk(rnd, 12 * BLOCK + 512, BLOCK)
    chain = DiskChain(len(image), write_base(store, "vm1", "vda", image, rnd))
    points = [store.publish_point("vm1", {"vda": chain}, consistency="app", vm_config={})]
    images = [bytes(image)]
    seg = write_segment(store, "vm1", "vda", image, random_extents(rnd, len(image), BLOCK, 6), rnd)
    chain = chain.extend(seg)
    points.append(store.publish_point("vm1", {"vda": chain}, consistency="crash", vm_config={}))
    images.append(bytes(image))
    live = data_keys(store)
    scratch = bytearray(image)
    write_segment(store, "vm1", "vda", scratch, random_extents(rnd, len(image), BLOCK, 3), rnd)
    other = random_disk(random.Random(99), 6 * BLOCK, BLOCK)
    orphan = write_base(store, "vm2", "vda", other, random.Random(99))
    garbage = {k: v for k, v in data_keys(store).items() if k not in live}
    assert orphan.key in garbage and any(k.startswith("chunks/") for k in garbage)
    return Scenario(points, images, live, garbage, orphan.key, orphan, bytes(other))


def assert_restorable(store: ReplicaStore, sc: Scenario) -> None:
    for point, image in zip(sc.points, sc.images, strict=True):
        assert read_all(store, store.load_point("vm1", point.point_id), "vda") == image
    assert store.verify(deep=True).ok


def test_unreferenced_objects_go_only_after_min_age(store: ReplicaStore) -> None:
    sc = build(store)
    young = collect_garbage(store)
    assert young.deleted == 0 and young.kept_young == len(sc.garbage)
    assert data_keys(store) == {**sc.live, **sc.garbage}

    report = collect_garbage(store, clock=later())
    assert sorted(report.candidates) == sorted(sc.garbage)
    assert report.deleted == len(sc.garbage)
    assert report.bytes_freed == sum(sc.garbage.values())
    assert report.kept_referenced == len(sc.live)
    assert report.objects_scanned == len(sc.live) + len(sc.garbage)
    assert report.points == 2
    assert data_keys(store) == sc.live
    assert_restorable(store, sc)
    # nothing more to do, and referenced objects survive however old they are
    again = collect_garbage(store, clock=later(1000))
    assert again.deleted == 0 and data_keys(store) == sc.live


def test_dry_run_lists_and_deletes_nothing(mem_store: ReplicaStore) -> None:
    sc = build(mem_store)
    report = collect_garbage(mem_store, dry_run=True, clock=later())
    assert report.dry_run and sorted(report.candidates) == sorted(sc.garbage)
    assert report.bytes_freed == sum(sc.garbage.values())
    assert data_keys(mem_store) == {**sc.live, **sc.garbage}
    assert list_leases(mem_store.backend) == []


def test_min_age_zero_collects_at_once(mem_store: ReplicaStore) -> None:
    sc = build(mem_store)
    collect_garbage(mem_store, min_age=timedelta(0), clock=later(0.01))
    assert data_keys(mem_store) == sc.live


def test_writer_lease_protects_its_objects(mem_store: ReplicaStore) -> None:
    backend = mem_store.backend
    lease = acquire_lease(backend, "cycle", vm="vm1", writes=True, ttl=timedelta(hours=3))
    sc = build(mem_store)  # written while the lease is held
    report = collect_garbage(mem_store, clock=later())
    assert report.deleted == 0 and report.kept_leased == len(sc.garbage)
    assert data_keys(mem_store) == {**sc.live, **sc.garbage}
    lease.release()
    collect_garbage(mem_store, clock=later())
    assert data_keys(mem_store) == sc.live


def test_crashed_writers_lease_expires(mem_store: ReplicaStore) -> None:
    acquire_lease(mem_store.backend, "base", writes=True, dedup=True, ttl=timedelta(minutes=30))
    sc = build(mem_store)
    report = collect_garbage(mem_store, clock=later())  # 2 h later the lease has expired
    assert data_keys(mem_store) == sc.live
    assert report.leases_removed == 1 and list_leases(mem_store.backend) == []


def test_dedup_lease_defers_chunks_and_roots_are_kept(mem_store: ReplicaStore) -> None:
    sc = build(mem_store)
    backend = mem_store.backend
    # a base writer that started after the garbage was written: it may reuse old chunks
    acquire_lease(backend, "base", dedup=True, ttl=timedelta(hours=3), clock=later(1))
    report = collect_garbage(mem_store, clock=later())
    garbage_chunks = {k for k in sc.garbage if k.startswith("chunks/")}
    assert report.deferred_chunks == len(garbage_chunks)
    assert set(data_keys(mem_store)) == set(sc.live) | garbage_chunks


def test_garbage_index_with_pin_survives(mem_store: ReplicaStore) -> None:
    sc = build(mem_store)
    acquire_lease(mem_store.backend, "restore", roots=[sc.garbage_index], ttl=timedelta(hours=3))
    collect_garbage(mem_store, clock=later())
    left = set(data_keys(mem_store)) - set(sc.live)
    assert left == {k for k in sc.garbage if not k.startswith("segments/")}


def test_a_lease_taken_during_the_mark_is_honoured(mem_store: ReplicaStore) -> None:
    sc = build(mem_store)

    def take_lease(phase: str, done: int, total: int) -> None:
        if phase == "mark" and done == total == 1:
            acquire_lease(mem_store.backend, "base", dedup=True, clock=later())

    report = collect_garbage(mem_store, clock=later(), progress=take_lease)
    # the lease appeared after the first mark: chunks are deferred at the recheck
    garbage_chunks = {k for k in sc.garbage if k.startswith("chunks/")}
    assert not garbage_chunks & set(report.candidates)
    assert report.deferred_chunks == len(garbage_chunks)
    assert set(data_keys(mem_store)) == set(sc.live) | garbage_chunks


def test_a_point_published_during_the_mark_is_honoured(mem_store: ReplicaStore) -> None:
    sc = build(mem_store)
    published: list[PointManifest] = []

    def publish(phase: str, done: int, total: int) -> None:
        if phase == "mark" and done == total == 1:
            chain = DiskChain(6 * BLOCK, sc.garbage_ref)
            published.append(
                mem_store.publish_point("vm2", {"vda": chain}, consistency="crash", vm_config={})
            )

    collect_garbage(mem_store, clock=later(), progress=publish)
    left = set(data_keys(mem_store)) - set(sc.live)
    assert left == {k for k in sc.garbage if not k.startswith("segments/")}
    assert read_all(mem_store, published[0], "vda") == sc.garbage_image


def test_damaged_manifest_refuses_and_deletes_nothing(mem_store: ReplicaStore) -> None:
    sc = build(mem_store)
    backend = mem_store.backend
    assert isinstance(backend, MemoryBackend)
    key = sc.points[0].key
    backend.put(key, flip_byte(backend.raw(key)))
    with pytest.raises(MaintenanceRefused, match="damaged recovery point") as info:
        collect_garbage(mem_store, clock=later())
    assert "nothing was deleted" in info.value.message and info.value.hint
    assert data_keys(mem_store) == {**sc.live, **sc.garbage}


def test_unreadable_index_refuses(mem_store: ReplicaStore) -> None:
    sc = build(mem_store)
    backend = mem_store.backend
    assert isinstance(backend, MemoryBackend)
    key = sc.points[0].disks["vda"].base.key
    backend.corrupt_on_get(lambda k: k == key)
    with pytest.raises(MaintenanceRefused, match=key):
        collect_garbage(mem_store, clock=later())
    backend.clear_faults()
    backend.delete(key)
    with pytest.raises(MaintenanceRefused):
        collect_garbage(mem_store, clock=later())
    assert data_keys(mem_store) == {k: v for k, v in {**sc.live, **sc.garbage}.items() if k != key}


def test_leases_exclude_and_wait(mem_store: ReplicaStore) -> None:
    backend = mem_store.backend
    gc_lease = acquire_lease(backend, "gc")
    with pytest.raises(LeaseConflict, match="holds a gc lease"):
        acquire_lease(backend, "gc")
    with pytest.raises(LeaseConflict, match="still sweeping"):
        acquire_lease(backend, "cycle", wait_for_gc=0.0, sleep=lambda _s: None)
    with pytest.raises(LeaseConflict):
        collect_garbage(mem_store)
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        gc_lease.release()  # the sweep ends while the writer waits

    with acquire_lease(backend, "cycle", sleep=sleep) as lease:
        assert slept and lease.info.key in {i.key for i in backend.list("leases/")}
    assert list_leases(backend) == []
    with acquire_lease(backend, "compaction", vm="vm1"):
        with pytest.raises(LeaseConflict, match="compaction of VM vm1"):
            acquire_lease(backend, "compaction", vm="vm1")
        acquire_lease(backend, "compaction", vm="vm2").release()
    assert list_leases(backend) == []


def test_damaged_lease_is_read_the_safe_way(mem_store: ReplicaStore) -> None:
    sc = build(mem_store)
    mem_store.backend.put("leases/0123456789abcdef0123456789abcdef.json", b"{not json")
    report = collect_garbage(mem_store, clock=later())
    assert report.deleted == 0 and report.warnings and "unreadable lease" in report.warnings[0]
    assert data_keys(mem_store) == {**sc.live, **sc.garbage}
    report = collect_garbage(mem_store, clock=later(30))  # honoured for 24 h at most
    assert data_keys(mem_store) == sc.live and report.leases_removed == 1
