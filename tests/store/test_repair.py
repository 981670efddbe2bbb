"""Repair of damaged chunks by a repairing base writer, and the repair plan."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from siterecovery.store import (
    DiskChain,
    PointManifest,
    ReplicaStore,
    StoreKeys,
    damaged_vms,
    repair_plan,
)
from siterecovery.store.index import chunk_key
from siterecovery.store.wrappers import BackendMetrics, MetricsBackend

BLOCK = 64 * 1024
SIZE = 6 * BLOCK


class Fixture:
    """Two VMs sharing one block (a deduplicated chunk), vm1 with three points."""

    def __init__(self, url: str) -> None:
        self.keys = StoreKeys.generate()
        self.store = ReplicaStore.init(url, self.keys, block_size=BLOCK, workers=2)
        rnd = random.Random(3)
        self.shared = rnd.randbytes(BLOCK)
        self.images = {
            "vm1": bytearray(rnd.randbytes(SIZE)),
            "vm2": bytearray(rnd.randbytes(SIZE)),
        }
        self.images["vm1"][BLOCK : 2 * BLOCK] = self.shared
        self.images["vm2"][4 * BLOCK : 5 * BLOCK] = self.shared
        self.expected: dict[str, bytes] = {}  # point name -> disk content
        start = datetime.now(UTC) - timedelta(minutes=10)
        chain1 = self.base("vm1", "vda")
        for i in range(3):
            if i:
                seg = self.store.begin_segment("vm1", "vda", SIZE)
                data = rnd.randbytes(4096)
                seg.add(0, data)
                self.images["vm1"][0:4096] = data
                ref = seg.commit()
                assert ref is not None
                chain1 = chain1.extend(ref)
            self.publish("vm1", "vda", chain1, start + timedelta(minutes=i))
        self.publish("vm2", "vdb", self.base("vm2", "vdb"), start)

    def base(self, vm: str, disk: str, *, repair: bool = False) -> DiskChain:
        writer = self.store.begin_base(vm, disk, SIZE, repair=repair)
        writer.write(0, bytes(self.images[vm]))
        self.last_stats = writer.stats
        return DiskChain(SIZE, writer.commit())

    def publish(self, vm: str, disk: str, chain: DiskChain, when: datetime) -> PointManifest:
        point = self.store.publish_point(
            vm, {disk: chain}, consistency="crash", vm_config={}, created_at=when
        )
        self.expected[point.name] = bytes(self.images[vm])
        return point

    def shared_key(self) -> str:
        return chunk_key(self.store.context.codec.chunk_id(self.shared))

    def restores(self) -> dict[str, bytes]:
        out = {}
        for vm in ("vm1", "vm2"):
            for point in self.store.list_points(vm):
                disk = next(iter(point.disks))
                out[point.name] = b"".join(d for _, d in self.store.read_disk(point, disk))
        return out


@pytest.fixture
def fx(tmp_path: Path) -> Fixture:
    return Fixture(f"file://{tmp_path}/replica")


def corrupt(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_damaged_chunk_is_repaired_by_a_repairing_base(fx: Fixture, tmp_path: Path) -> None:
    key = fx.shared_key()
    corrupt(tmp_path / "replica" / key)
    report = fx.store.verify(deep=True)
    assert [d.key for d in report.damaged_objects] == [key]
    damaged = report.damaged_objects[0]
    assert damaged.disks == ("vm1/vda", "vm2/vdb") and len(damaged.points) == 4

    # an ordinary base deduplicates against the damaged chunk: nothing is repaired
    fx.base("vm2", "vdb")
    assert fx.last_stats.chunks_repaired == 0
    assert not fx.store.verify(deep=True).ok

    # a repairing base of one disk that still holds the block rewrites it for everyone
    chain = fx.base("vm2", "vdb", repair=True)
    assert fx.last_stats.chunks_repaired == 1
    assert fx.last_stats.chunks_deduplicated == 5  # the sound chunks were checked, kept
    fx.publish("vm2", "vdb", chain, datetime.now(UTC))
    assert fx.store.verify(deep=True).ok
    assert fx.restores() == fx.expected and len(fx.expected) == 5


def test_repairing_writer_leaves_sound_chunks_alone(fx: Fixture) -> None:
    metrics = BackendMetrics()
    store = ReplicaStore(
        MetricsBackend(fx.store.backend, metrics), fx.keys, fx.store.config, workers=2
    )
    writer = store.begin_base("vm1", "vda", SIZE, repair=True)
    writer.write(0, bytes(fx.images["vm1"]))
    writer.commit()
    assert writer.stats.chunks_repaired == 0 and writer.stats.chunks_stored == 1  # block 0
    assert metrics["put"].calls == 2  # the changed block's chunk and the index


def test_missing_chunk_is_rewritten_by_any_base(fx: Fixture, tmp_path: Path) -> None:
    (tmp_path / "replica" / fx.shared_key()).unlink()
    assert [d.problem for d in fx.store.verify().damaged_objects] == ["missing"]
    fx.base("vm1", "vda")
    assert fx.store.verify(deep=True).ok and fx.restores() == fx.expected


def test_repair_plan_and_damaged_vms(fx: Fixture, tmp_path: Path) -> None:
    corrupt(tmp_path / "replica" / fx.shared_key())
    segment = next(iter(fx.store.backend.list("segments/"))).key
    corrupt(tmp_path / "replica" / segment)
    manifest = fx.store.list_points("vm2")[0].key
    (tmp_path / "replica" / manifest).write_text("{}")
    report = fx.store.verify(deep=True)
    plan = {a.key: a for a in repair_plan(report)}
    assert set(plan) == {fx.shared_key(), segment, manifest}

    chunk = plan[fx.shared_key()]
    # vm2's only manifest is unreadable, so only vm1's chains are known to use the chunk
    assert chunk.kind == "chunk" and chunk.in_place and chunk.vms == ("vm1",)
    assert chunk.resync == ("vm1/vda",) and "rewrites this chunk" in chunk.advice
    assert len(chunk.points) == 3

    seg = plan[segment]
    assert seg.kind == "segment" and not seg.in_place and seg.vms == ("vm1",)
    assert "stay damaged" in seg.advice
    assert plan[manifest].kind == "manifest" and plan[manifest].vms == ("vm2",)

    reasons = damaged_vms(report)
    assert set(reasons) == {"vm1", "vm2"}
    assert "damaged replica data" in reasons["vm1"] and "more" in reasons["vm1"]
    assert manifest in reasons["vm2"]


def test_clean_store_has_no_plan(fx: Fixture) -> None:
    report = fx.store.verify(deep=True)
    assert report.ok and repair_plan(report) == [] and damaged_vms(report) == {}
