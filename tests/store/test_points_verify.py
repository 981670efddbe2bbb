"""Recovery point manifests, verification, and interrupted writes."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from siterecovery.errors import InputError
from siterecovery.store import (
    DiskChain,
    FormatError,
    IntegrityError,
    ObjectNotFound,
    PointManifest,
    ReplicaStore,
    StoreInputError,
    StoreKeys,
    StoreUnavailable,
)
from siterecovery.store.file import TEMP_PREFIX, FileBackend
from siterecovery.store.memory import MemoryBackend, flip_byte

from .conftest import BLOCK


def base_chain(
    store: ReplicaStore, vm: str = "vm1", disk: str = "vda", blocks: int = 4
) -> DiskChain:
    data = os.urandom(blocks * BLOCK)
    writer = store.begin_base(vm, disk, len(data))
    writer.write(0, data)
    return DiskChain(len(data), writer.commit())


def add_segment(
    store: ReplicaStore, chain: DiskChain, vm: str = "vm1", disk: str = "vda"
) -> DiskChain:
    writer = store.begin_segment(vm, disk, chain.size)
    writer.add(BLOCK, os.urandom(4096))
    return chain.extend(writer.commit())


def publish(store: ReplicaStore, chain: DiskChain, vm: str = "vm1", **kw: object) -> PointManifest:
    return store.publish_point(vm, {"vda": chain}, consistency="crash", vm_config={"cpus": 2}, **kw)  # type: ignore[arg-type]


# -- manifests -----------------------------------------------------------------------


def test_manifest_round_trip(store: ReplicaStore) -> None:
    chain = add_segment(store, base_chain(store))
    when = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    point = store.publish_point(
        "vm1",
        {"vda": chain},
        consistency="app",
        vm_config={"cpus": 2, "nics": ["n1"]},
        created_at=when,
    )
    assert point.point_id == "20240501T120000.123456Z-0000"
    loaded = store.load_point("vm1", point.point_id)
    assert loaded == point
    assert loaded.created_at == when and loaded.consistency.value == "app"
    assert loaded.disks["vda"] == chain and loaded.vm_config == {"cpus": 2, "nics": ["n1"]}
    doc = json.loads(store.backend.get(point.key))
    assert doc["format"] == "siterecovery-point" and doc["version"] == 1 and "mac" in doc


def test_point_ids_sort_and_never_collide(store: ReplicaStore) -> None:
    chain = base_chain(store)
    when = datetime(2024, 1, 1, tzinfo=UTC)
    ids = [publish(store, chain, created_at=when).point_id for _ in range(3)]
    later = publish(store, chain, created_at=when + timedelta(microseconds=1)).point_id
    assert ids == [f"20240101T000000.000000Z-000{i}" for i in range(3)]
    assert [p.point_id for p in store.list_points("vm1")] == [*ids, later]
    assert store.list_points("other") == []


@pytest.mark.parametrize("cut", [1, 40, -60, -2])
def test_truncated_manifest_names_the_point(store: ReplicaStore, cut: int) -> None:
    point = publish(store, base_chain(store))
    raw = store.backend.get(point.key)
    store.backend.put(point.key, raw[:cut])
    with pytest.raises((FormatError, IntegrityError), match=f"recovery point vm1/{point.point_id}"):
        store.load_point("vm1", point.point_id)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda d: d["vm_config"].update(cpus=64),
        lambda d: d["disks"]["vda"].update(size=d["disks"]["vda"]["size"] * 2),
        lambda d: d.update(consistency="app"),
        lambda d: d.update(mac="0" * 64),
    ],
)
def test_tampered_manifest_is_refused(store: ReplicaStore, tamper) -> None:  # type: ignore[no-untyped-def]
    point = publish(store, base_chain(store))
    doc = json.loads(store.backend.get(point.key))
    tamper(doc)
    store.backend.put(point.key, json.dumps(doc).encode())
    with pytest.raises(IntegrityError, match=f"vm1/{point.point_id}: manifest MAC mismatch"):
        store.load_point("vm1", point.point_id)


def test_manifest_copied_to_another_point_is_refused(store: ReplicaStore) -> None:
    point = publish(store, base_chain(store))
    other = "20300101T000000.000000Z-0000"
    store.backend.put(f"points/vm1/{other}.json", store.backend.get(point.key))
    with pytest.raises(IntegrityError, match="another point"):
        store.load_point("vm1", other)


def test_newer_manifest_version(store: ReplicaStore) -> None:
    point = publish(store, base_chain(store))
    doc = json.loads(store.backend.get(point.key))
    doc["version"] = 7
    store.backend.put(point.key, json.dumps(doc).encode())
    with pytest.raises(FormatError, match="version 7 is newer"):
        store.load_point("vm1", point.point_id)


def test_damaged_manifests_are_reported_not_skipped(store: ReplicaStore) -> None:
    chain = base_chain(store)
    good = publish(store, chain)
    bad = publish(store, chain)
    store.backend.put(bad.key, b"{")
    with pytest.raises(FormatError, match=f"1 damaged.*vm1/{bad.point_id}"):
        store.list_points("vm1")
    scan = store.scan_points("vm1")
    assert [p.point_id for p in scan.ok] == [good.point_id]
    assert [(d.point_id, d.key) for d in scan.damaged] == [(bad.point_id, bad.key)]
    assert "truncated" in scan.damaged[0].problem


def test_load_missing_point(store: ReplicaStore) -> None:
    with pytest.raises(ObjectNotFound, match=r"vm1/20240101T000000\.000000Z-0000 does not exist"):
        store.load_point("vm1", "20240101T000000.000000Z-0000")
    with pytest.raises(StoreInputError, match="invalid recovery point id"):
        store.load_point("vm1", "../../siterecovery-store")


def test_publish_input_errors(store: ReplicaStore) -> None:
    chain = base_chain(store)
    bad_calls: list[dict[str, Any]] = [
        dict(vm="bad/vm", disks={"vda": chain}),
        dict(vm="vm1", disks={}),
        dict(vm="vm1", disks={"a b": chain}),
        dict(vm="vm1", disks={"vda": chain}, consistency="sort of"),
        dict(vm="vm1", disks={"vda": chain}, vm_config={"x": object()}),
        dict(vm="vm1", disks={"vda": chain}, created_at=datetime(2024, 1, 1)),
    ]
    for call in bad_calls:
        kwargs = {"consistency": "crash", "vm_config": {}, **call}
        with pytest.raises(InputError):
            store.publish_point(**kwargs)
    assert list(store.backend.list("points/")) == []


def test_publish_refuses_missing_objects(store: ReplicaStore, keys: StoreKeys) -> None:
    chain = add_segment(store, base_chain(store))
    store.backend.delete(chain.segments[0].key)
    # A fresh instance has not seen the objects being written, so it checks them.
    fresh = ReplicaStore.open(store.url, keys)
    with pytest.raises(ObjectNotFound, match=chain.segments[0].key):
        publish(fresh, chain)
    assert list(store.backend.list("points/")) == []


# -- verify ------------------------------------------------------------------------


def three_points(store: ReplicaStore) -> tuple[DiskChain, list[PointManifest]]:
    chain = base_chain(store)
    p1 = publish(store, chain)
    chain = add_segment(store, chain)
    p2 = publish(store, chain)
    chain = add_segment(store, chain)
    p3 = publish(store, chain)
    return chain, [p1, p2, p3]


def test_verify_clean_store(store: ReplicaStore) -> None:
    three_points(store)
    for deep in (False, True):
        report = store.verify(deep=deep)
        assert report.ok and report.points_checked == 3
        assert report.objects_checked == 3 + 4  # index, 2 segments, 4 chunks


def test_verify_reports_missing_objects_with_affected_points(store: ReplicaStore) -> None:
    chain, points = three_points(store)
    chunk = next(iter(store.backend.list("chunks/"))).key
    store.backend.delete(chunk)
    store.backend.delete(chain.segments[1].key)
    report = store.verify()
    assert not report.ok
    damaged = {d.key: d for d in report.damaged_objects}
    assert set(damaged) == {chunk, chain.segments[1].key}
    assert damaged[chunk].problem == "missing"
    assert damaged[chunk].points == tuple(sorted(p.name for p in points))
    assert damaged[chain.segments[1].key].points == (points[2].name,)
    assert report.affected_points == sorted(p.name for p in points)


def test_deep_verify_finds_flipped_bytes(store: ReplicaStore) -> None:
    chain, points = three_points(store)
    chunk = next(iter(store.backend.list("chunks/"))).key
    for key in (chunk, chain.segments[0].key):
        store.backend.put(key, flip_byte(store.backend.get(key)))
    assert store.verify().ok  # same sizes: only reading finds it
    report = store.verify(deep=True)
    damaged = {d.key: d for d in report.damaged_objects}
    assert set(damaged) == {chunk, chain.segments[0].key}
    assert "corrupt" in damaged[chunk].problem
    assert damaged[chain.segments[0].key].points == (points[1].name, points[2].name)


@pytest.mark.parametrize("where", [0, 20, -1])
def test_flipped_index_byte_is_found_by_plain_verify(store: ReplicaStore, where: int) -> None:
    chain, points = three_points(store)
    key = chain.base.key
    store.backend.put(key, flip_byte(store.backend.get(key), where))
    report = store.verify()
    assert [d.key for d in report.damaged_objects] == [key]
    assert report.damaged_objects[0].points == tuple(p.name for p in points)
    with pytest.raises(IntegrityError, match=f"{key} is corrupt"):
        list(store.read_disk(points[0], "vda"))


def test_truncated_segment_is_reported(store: ReplicaStore) -> None:
    chain, points = three_points(store)
    key = chain.segments[1].key
    store.backend.put(key, store.backend.get(key)[:-5])
    report = store.verify()
    assert [(d.key, d.points) for d in report.damaged_objects] == [(key, (points[2].name,))]
    assert "corrupt" in report.damaged_objects[0].problem
    with pytest.raises(IntegrityError, match=key):
        list(store.read_disk(points[2], "vda"))
    assert len(list(store.read_disk(points[1], "vda"))) == 4  # earlier points are unharmed


def test_verify_reports_damaged_manifests(store: ReplicaStore) -> None:
    _, points = three_points(store)
    store.backend.put(points[1].key, b"garbage")
    report = store.verify()
    assert [d.point_id for d in report.damaged_points] == [points[1].point_id]
    assert report.affected_points == [points[1].name]


# -- interrupted writes ------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["chunks/", "indexes/"])
def test_failed_base_write_publishes_nothing(mem_store: ReplicaStore, prefix: str) -> None:
    backend = mem_store.backend
    assert isinstance(backend, MemoryBackend)
    backend.fail_nth_put(2 if prefix == "chunks/" else 1, prefix=prefix)
    writer = mem_store.begin_base("vm1", "vda", 6 * BLOCK)
    with pytest.raises(StoreUnavailable):
        writer.write(0, os.urandom(6 * BLOCK))
        writer.commit()
    backend.clear_faults()
    assert list(backend.list("indexes/")) == []
    assert list(backend.list("points/")) == []
    assert mem_store.list_points("vm1") == []
    assert mem_store.verify(deep=True).ok


def test_failed_segment_put_keeps_the_previous_point(mem_store: ReplicaStore) -> None:
    chain = base_chain(mem_store)
    point = publish(mem_store, chain)
    backend = mem_store.backend
    assert isinstance(backend, MemoryBackend)
    backend.fail_nth_put(1, prefix="segments/")
    with pytest.raises(StoreUnavailable):
        add_segment(mem_store, chain)
    assert list(backend.list("segments/")) == []
    assert mem_store.list_points("vm1") == [point]


def test_failed_manifest_put_publishes_nothing(mem_store: ReplicaStore) -> None:
    chain = base_chain(mem_store)
    backend = mem_store.backend
    assert isinstance(backend, MemoryBackend)
    backend.fail_nth_put(1, prefix="points/")
    with pytest.raises(StoreUnavailable):
        publish(mem_store, chain)
    assert mem_store.list_points("vm1") == []
    backend.clear_faults()
    retried = publish(mem_store, chain)
    assert mem_store.list_points("vm1") == [retried]


def test_corruption_on_read_is_detected(mem_store: ReplicaStore) -> None:
    chain = add_segment(mem_store, base_chain(mem_store))
    point = publish(mem_store, chain)
    backend = mem_store.backend
    assert isinstance(backend, MemoryBackend)
    backend.corrupt_on_get(lambda key: key.startswith("segments/"))
    with pytest.raises(IntegrityError, match="segments/"):
        list(mem_store.read_disk(point, "vda"))
    assert not mem_store.verify(deep=True).ok


def test_crash_leftovers_on_file_store_are_not_trusted(tmp_path: Path, keys: StoreKeys) -> None:
    store = ReplicaStore.init(f"file://{tmp_path}/r", keys, block_size=BLOCK)
    chain = base_chain(store)
    point = publish(store, chain)
    root = tmp_path / "r"
    # What a crash mid-put leaves: temp files next to where objects and manifests go.
    (root / "points/vm1" / f"{TEMP_PREFIX}x").write_bytes(b'{"format": "siterecovery-point"')
    (root / "chunks" / f"{TEMP_PREFIX}y").write_bytes(b"half a chunk")
    assert store.list_points("vm1") == [point]
    assert store.verify(deep=True).ok
    assert isinstance(store.backend, FileBackend)
    assert store.backend.cleanup_temp(older_than=-1) == 2
