"""Base + segments read back and restore bit-exact against a reference model."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from siterecovery.store import (
    DiskChain,
    DiskRef,
    IntegrityError,
    ReplicaStore,
    StoreInputError,
    StoreKeys,
    open_backend,
)
from siterecovery.store.index import chunk_key

from .conftest import BLOCK
from .helpers import random_disk, random_extents, read_all, write_base, write_segment

SUB = 64 * 1024

SIZES = {1: 20 * BLOCK + 3 * 512, 2: 17 * BLOCK + 777, 3: 16 * BLOCK}


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
@pytest.mark.parametrize("seed", sorted(SIZES))
def test_chain_restores_bit_exact(
    store_url: str, keys: StoreKeys, tmp_path: Path, seed: int, encrypted: bool
) -> None:
    store = ReplicaStore.init(store_url, keys, block_size=BLOCK, encrypted=encrypted, workers=2)
    rnd = random.Random(seed)
    image = random_disk(rnd, SIZES[seed], BLOCK)
    chain = DiskChain(len(image), write_base(store, "vm1", "vda", image, rnd))
    snapshots = [bytes(image)]
    points = [store.publish_point("vm1", {"vda": chain}, consistency="crash", vm_config={})]
    for _cycle in range(4):
        extents = random_extents(rnd, len(image), BLOCK, rnd.randint(1, 12))
        chain = chain.extend(write_segment(store, "vm1", "vda", image, extents, rnd))
        snapshots.append(bytes(image))
        points.append(
            store.publish_point("vm1", {"vda": chain}, consistency="app", vm_config={"n": 1})
        )

    listed = store.list_points("vm1")
    assert [p.point_id for p in listed] == [p.point_id for p in points]
    for point, expected in zip(listed, snapshots, strict=True):
        assert read_all(store, point, "vda") == expected
    for i in (0, len(points) - 1):
        dest = tmp_path / f"restored-{i}.raw"
        stats = store.restore_disk(listed[i], "vda", dest)
        assert dest.read_bytes() == snapshots[i]
        assert stats.disk_size == len(image)
    assert store.verify(deep=True).ok


def test_subblock_checksums_match_the_content(mem_store: ReplicaStore) -> None:
    rnd = random.Random(5)
    image = random_disk(rnd, 9 * BLOCK + 1536, BLOCK)
    chain = DiskChain(len(image), write_base(mem_store, "vm1", "vda", image, rnd))
    partly: set[int] = set()
    for _cycle in range(3):
        extents = random_extents(rnd, len(image), BLOCK, 6)
        for offset, length in extents:
            for sub in range(offset // SUB, -(-(offset + length) // SUB)):
                lo, hi = sub * SUB, min((sub + 1) * SUB, len(image))
                (partly.add if offset > lo or offset + length < hi else partly.discard)(sub)
        chain = chain.extend(write_segment(mem_store, "vm1", "vda", image, extents, rnd))
    point = mem_store.publish_point("vm1", {"vda": chain}, consistency="crash", vm_config={})
    sums = mem_store.subblock_checksums(point, "vda")
    assert len(sums) == -(-len(image) // SUB)
    unknown = {i for i, s in enumerate(sums) if s is None}
    assert unknown <= partly and len(unknown) < len(sums) // 2
    for i, value in enumerate(sums):
        if value is not None:
            assert value == mem_store.subblock_checksum(bytes(image[i * SUB : (i + 1) * SUB])), i


def test_restore_is_sparse_and_reports_progress(store: ReplicaStore, tmp_path: Path) -> None:
    size = 64 * BLOCK
    image = bytearray(size)
    image[5 * BLOCK : 6 * BLOCK] = os.urandom(BLOCK)
    writer = store.begin_base("vm1", "vda", size)
    writer.write(0, bytes(image))
    chain = DiskChain(size, writer.commit())
    seg = store.begin_segment("vm1", "vda", size)
    seg.add(5 * BLOCK, bytes(BLOCK))  # zeroes the only data block again
    seg.add(40 * BLOCK + 512, b"\xee" * 1024)
    image[5 * BLOCK : 6 * BLOCK] = bytes(BLOCK)
    image[40 * BLOCK + 512 : 40 * BLOCK + 1536] = b"\xee" * 1024
    point = store.publish_point(
        "vm1", {"vda": chain.extend(seg.commit())}, consistency="crash", vm_config={}
    )
    seen: list[tuple[int, int]] = []
    dest = tmp_path / "disk.raw"
    stats = store.restore_disk(point, "vda", dest, progress=lambda d, t: seen.append((d, t)))
    assert dest.read_bytes() == image
    assert dest.stat().st_blocks * 512 <= 4 * BLOCK  # only one block of data was written
    assert stats.bytes_written == BLOCK
    assert seen[-1] == (size, size) and len(seen) == 64
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    blocks = list(store.read_blocks(point, "vda"))
    assert [i for i, (_, d) in enumerate(blocks) if d is not None] == [40]


def test_identical_chunks_are_stored_once(store: ReplicaStore) -> None:
    rnd = random.Random(7)
    image = random_disk(rnd, 12 * BLOCK, BLOCK)
    distinct = {bytes(image[o : o + BLOCK]) for o in range(0, len(image), BLOCK)}
    distinct.discard(bytes(BLOCK))
    first = store.begin_base("vm1", "vda", len(image))
    first.write(0, bytes(image))
    ref1 = first.commit()
    second = store.begin_base("vm2", "sda", len(image))
    second.write(0, bytes(image))
    ref2 = second.commit()
    chunks = list(store.backend.list("chunks/"))
    assert len(chunks) == len(distinct)
    assert second.stats.chunks_stored == 0
    assert second.stats.chunks_deduplicated == first.stats.chunks_stored + (
        first.stats.chunks_deduplicated
    )
    p1 = store.publish_point(
        "vm1", {"vda": DiskChain(len(image), ref1)}, consistency="crash", vm_config={}
    )
    p2 = store.publish_point(
        "vm2", {"sda": DiskChain(len(image), ref2)}, consistency="crash", vm_config={}
    )
    assert read_all(store, p1, "vda") == read_all(store, p2, "sda") == image


def test_two_writers_racing_on_the_same_chunks(store: ReplicaStore) -> None:
    import threading

    image = os.urandom(8 * BLOCK)
    refs: list[tuple[str, DiskRef]] = []
    barrier = threading.Barrier(2)

    def write(vm: str) -> None:
        writer = store.begin_base(vm, "vda", len(image))
        barrier.wait()
        writer.write(0, image)
        refs.append((vm, writer.commit()))

    threads = [threading.Thread(target=write, args=(vm,)) for vm in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(refs) == 2
    assert len(list(store.backend.list("chunks/"))) == 8
    for vm, ref in refs:
        point = store.publish_point(
            vm, {"vda": DiskChain(len(image), ref)}, consistency="crash", vm_config={}
        )
        assert read_all(store, point, "vda") == image
    assert store.verify(deep=True).ok


def test_empty_segment_stores_nothing(store: ReplicaStore) -> None:
    before = len(list(store.backend.list()))
    assert store.begin_segment("vm1", "vda", BLOCK).commit() is None
    assert len(list(store.backend.list())) == before


def test_corrupt_chunk_is_never_restored(store: ReplicaStore, tmp_path: Path) -> None:
    image = os.urandom(3 * BLOCK)
    writer = store.begin_base("vm1", "vda", len(image))
    writer.write(0, image)
    point = store.publish_point(
        "vm1", {"vda": DiskChain(len(image), writer.commit())}, consistency="crash", vm_config={}
    )
    victim = chunk_key(_first_chunk(store))
    blob = store.backend.get(victim)
    store.backend.put(victim, blob[:-1] + bytes([blob[-1] ^ 1]))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(IntegrityError, match=f"vm1/{point.point_id}.*{victim} is corrupt"):
        store.restore_disk(point, "vda", out / "vda.raw")
    assert list(out.iterdir()) == []
    with pytest.raises(IntegrityError):
        read_all(store, point, "vda")


def _first_chunk(store: ReplicaStore) -> str:
    return next(iter(store.backend.list("chunks/"))).key.rsplit("/", 1)[1]


def test_restore_input_errors(store: ReplicaStore, tmp_path: Path) -> None:
    writer = store.begin_base("vm1", "vda", BLOCK)
    point = store.publish_point(
        "vm1", {"vda": DiskChain(BLOCK, writer.commit())}, consistency="crash", vm_config={}
    )
    existing = tmp_path / "exists.raw"
    existing.write_bytes(b"keep me")
    with pytest.raises(StoreInputError, match="already exists"):
        store.restore_disk(point, "vda", existing)
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(StoreInputError, match="has no disk 'vdb'; it has: vda"):
        store.restore_disk(point, "vdb", tmp_path / "x.raw")
    with pytest.raises(StoreInputError, match="format"):
        store.restore_disk(point, "vda", tmp_path / "x.vmdk", fmt="vmdk")
    with pytest.raises(StoreInputError, match="does not exist"):
        store.restore_disk(point, "vda", tmp_path / "no" / "x.raw")
    store.restore_disk(point, "vda", existing, overwrite=True)
    assert existing.read_bytes() == bytes(BLOCK)


@pytest.mark.qemu
def test_restore_to_qcow2(mem_store: ReplicaStore, tmp_path: Path) -> None:
    rnd = random.Random(11)
    image = random_disk(rnd, 10 * BLOCK, BLOCK)
    chain = DiskChain(len(image), write_base(mem_store, "vm1", "vda", image, rnd))
    chain = chain.extend(
        write_segment(
            mem_store, "vm1", "vda", image, random_extents(rnd, len(image), BLOCK, 5), rnd
        )
    )
    point = mem_store.publish_point("vm1", {"vda": chain}, consistency="crash", vm_config={})
    reference = tmp_path / "reference.raw"
    reference.write_bytes(image)
    dest = tmp_path / "vda.qcow2"
    mem_store.restore_disk(point, "vda", dest, fmt="qcow2")
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", str(dest)], capture_output=True, text=True, check=True
    )
    assert '"format": "qcow2"' in info.stdout
    compare = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(reference), str(dest)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reference.raw", "vda.qcow2"]


def test_other_keys_read_nothing(store_url: str, tmp_path: Path) -> None:
    keys = StoreKeys.generate()
    store = ReplicaStore.init(store_url, keys, block_size=BLOCK, encrypted=True)
    secret = b"confidential! " * (BLOCK // 14) + b"x" * (BLOCK % 14)
    writer = store.begin_base("vm1", "vda", BLOCK)
    writer.write(0, secret)
    point = store.publish_point(
        "vm1", {"vda": DiskChain(BLOCK, writer.commit())}, consistency="crash", vm_config={}
    )
    backend = open_backend(store_url)
    for info in backend.list("chunks/"):
        assert b"confidential" not in backend.get(info.key)
    # Bypassing the key check: a store object built with another data key decodes nothing.
    thief = ReplicaStore(backend, StoreKeys(keys.hash_key, os.urandom(32)), store.config)
    with pytest.raises(IntegrityError):
        read_all(thief, point, "vda")
