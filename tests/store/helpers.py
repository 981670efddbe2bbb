"""Reference-model helpers: random disks and extents, written through the store writers."""

from __future__ import annotations

import random

from siterecovery.store import DiskRef, ReplicaStore, SegmentRef

SECTOR = 512


def random_disk(rnd: random.Random, size: int, bs: int) -> bytearray:
    """A disk image mixing zero, random, repeated (dedup) and half-zero blocks."""
    disk = bytearray(size)
    pool = [rnd.randbytes(bs) for _ in range(2)]
    for off in range(0, size, bs):
        n = min(bs, size - off)
        kind = rnd.choice(["zero", "random", "repeat", "half"])
        if kind == "random":
            disk[off : off + n] = rnd.randbytes(n)
        elif kind == "repeat":
            disk[off : off + n] = rnd.choice(pool)[:n]
        elif kind == "half":
            disk[off : off + n // 2] = rnd.randbytes(n // 2)
    return disk


def write_base(
    store: ReplicaStore, vm: str, disk: str, image: bytes | bytearray, rnd: random.Random
) -> DiskRef:
    """Write ``image`` in shuffled pieces of 1-3 blocks; some all-zero pieces are skipped,
    others written explicitly (both must read back as zeros)."""
    bs = store.block_size
    pieces, off = [], 0
    while off < len(image):
        n = min(rnd.randint(1, 3) * bs, len(image) - off)
        pieces.append((off, bytes(image[off : off + n])))
        off += n
    rnd.shuffle(pieces)
    writer = store.begin_base(vm, disk, len(image))
    for off, data in pieces:
        if any(data) or rnd.random() < 0.5:
            writer.write(off, data)
    return writer.commit()


def random_extents(rnd: random.Random, size: int, bs: int, count: int) -> list[tuple[int, int]]:
    """Sorted, non-overlapping, 512-aligned extents (some spanning blocks, maybe one that
    ends at an unaligned disk end)."""
    starts = sorted(rnd.sample(range(0, size // SECTOR), count))
    extents = []
    prev_end = 0
    for s in starts:
        offset = max(s * SECTOR, prev_end)
        if offset >= size:
            break
        length = rnd.choice([SECTOR, 8 * SECTOR, bs, 2 * bs + 3 * SECTOR])
        length = min(length, size - offset)
        if length % SECTOR and offset + length != size:
            length -= length % SECTOR
        if length > 0:
            extents.append((offset, length))
            prev_end = offset + length + rnd.choice([0, SECTOR])
    return extents


def write_segment(
    store: ReplicaStore,
    vm: str,
    disk: str,
    image: bytearray,
    extents: list[tuple[int, int]],
    rnd: random.Random,
) -> SegmentRef | None:
    """Write ``extents`` with random or zero data, applying them to ``image``."""
    writer = store.begin_segment(vm, disk, len(image))
    for offset, length in extents:
        data = bytes(length) if rnd.random() < 0.2 else rnd.randbytes(length)
        image[offset : offset + length] = data
        writer.add(offset, data)
    return writer.commit()


def read_all(store: ReplicaStore, point: object, disk: str) -> bytes:
    from siterecovery.store import PointManifest

    assert isinstance(point, PointManifest)
    pieces = list(store.read_disk(point, disk))
    offsets = [o for o, _ in pieces]
    assert offsets == sorted(offsets)
    return b"".join(d for _, d in pieces)
