"""Binary formats (index, segment) and the input rules of the writers."""

from __future__ import annotations

import os

import pytest

from siterecovery.errors import InputError
from siterecovery.store import FormatError, ReplicaStore, StoreInputError
from siterecovery.store.codec import SUBBLOCK_SIZE, Codec
from siterecovery.store.index import BaseIndex
from siterecovery.store.segment import (
    Frame,
    SegmentHeader,
    extents_in_range,
    validate_extents,
)

BS = 4 * SUBBLOCK_SIZE


def sample_index() -> BaseIndex:
    size = 3 * BS + 1000
    codec = Codec(bytes(32), None, encrypt=False)
    blocks = [os.urandom(BS), None, os.urandom(BS), os.urandom(1000)]
    return BaseIndex(
        size,
        BS,
        [None if b is None else bytes.fromhex(codec.chunk_id(b)) for b in blocks],
        [None if b is None else codec.subblock_sums(b) for b in blocks],
    )


def test_index_round_trip() -> None:
    index = sample_index()
    again = BaseIndex.decode(index.encode(), "i")
    assert again == index
    assert again.chunk_hex(1) is None and len(again.chunk_ids()) == 3
    codec = Codec(bytes(32), None, encrypt=False)
    assert again.block_sums(1, codec) == codec.subblock_sums(bytes(BS))
    assert len(again.block_sums(3, codec)) == 16


@pytest.mark.parametrize("cut", [0, 10, 33, -1, -17])
def test_truncated_index_is_malformed(cut: int) -> None:
    raw = sample_index().encode()
    with pytest.raises(FormatError, match="index idx"):
        BaseIndex.decode(raw[:cut], "idx")


def test_newer_index_version() -> None:
    raw = bytearray(sample_index().encode())
    raw[5] = 2
    with pytest.raises(FormatError, match="version 2"):
        BaseIndex.decode(bytes(raw), "idx")


@pytest.mark.parametrize(
    ("extents", "ok"),
    [
        ([(0, 512), (1024, 512)], True),
        ([(0, 512), (512, 512)], True),  # adjacent is fine
        ([(4096, 1000 - 96 + 100)], False),  # unaligned length, not at the end
        ([(9216, 784)], True),  # ends at the disk size (10000)
        ([(100, 512)], False),  # unaligned offset
        ([(1024, 512), (0, 512)], False),  # out of order
        ([(0, 1024), (512, 512)], False),  # overlapping
        ([(0, 0)], False),  # empty
        ([(9728, 512)], False),  # beyond the disk
    ],
)
def test_extent_rules(extents: list[tuple[int, int]], ok: bool) -> None:
    if ok:
        validate_extents(extents, 10000, "t")
    else:
        with pytest.raises(StoreInputError):
            validate_extents(extents, 10000, "t")


def test_extents_in_range() -> None:
    ext = [(0, 100), (200, 100), (500, 1000)]
    assert extents_in_range(ext, 50, 250) == [(50, 50), (200, 50)]
    assert extents_in_range(ext, 300, 500) == []
    assert extents_in_range(ext, 600, 700) == [(600, 100)]
    assert extents_in_range(ext, 0, 10**6) == ext


def test_segment_header_round_trip_and_checks() -> None:
    header = SegmentHeader(
        10 * BS,
        BS,
        [(0, 512), (BS - 512, 1024)],
        [Frame(0, 0, 50, 1024), Frame(1, 50, 40, 512)],
        [(3, b"s" * 16)],
    )
    assert SegmentHeader.decode(header.encode(), "s") == header
    bad = SegmentHeader(10 * BS, BS, header.extents, [Frame(0, 0, 50, 1024)], [])
    with pytest.raises(FormatError, match="extents without frames"):
        SegmentHeader.decode(bad.encode(), "s")
    with pytest.raises(FormatError, match="segment s"):
        SegmentHeader.decode(header.encode()[:-3], "s")


# -- writer input rules --------------------------------------------------------------


def test_base_writer_input_rules(mem_store: ReplicaStore) -> None:
    bs = mem_store.block_size
    w = mem_store.begin_base("vm1", "vda", 3 * bs + 512)
    for offset, length in [(1, bs), (0, bs - 512), (3 * bs, 1024), (-bs, bs), (0, 0)]:
        with pytest.raises(StoreInputError):
            w.write(offset, bytes(length))
    w.write(bs, b"\x01" * bs)
    with pytest.raises(StoreInputError, match="already written"):
        w.write(0, b"\x02" * 2 * bs)
    w.write(3 * bs, b"\x03" * 512)  # the short last block
    w.commit()
    with pytest.raises(StoreInputError, match="committed"):
        w.write(0, bytes(bs))


def test_segment_writer_input_rules(mem_store: ReplicaStore) -> None:
    w = mem_store.begin_segment("vm1", "vda", 1 << 20)
    w.add(4096, b"a" * 512)
    for offset, length in [
        (0, 512),
        (4096, 512),
        (8192, 100),
        (8193, 512),
        ((1 << 20) - 512, 1024),
    ]:
        with pytest.raises(StoreInputError):
            w.add(offset, b"b" * length)
    w.abort()
    with pytest.raises(StoreInputError, match="aborted"):
        w.add(1 << 19, b"c" * 512)


@pytest.mark.parametrize("size", [0, -1, 1.5])
def test_writers_need_a_positive_size(mem_store: ReplicaStore, size: int) -> None:
    with pytest.raises(StoreInputError, match="disk size"):
        mem_store.begin_base("vm1", "vda", size)
    with pytest.raises(StoreInputError, match="disk size"):
        mem_store.begin_segment("vm1", "vda", size)


@pytest.mark.parametrize(
    ("vm", "disk"), [("../x", "vda"), ("vm", "a/b"), ("", "vda"), ("vm", ".d")]
)
def test_writers_validate_names(mem_store: ReplicaStore, vm: str, disk: str) -> None:
    with pytest.raises(InputError):
        mem_store.begin_base(vm, disk, 1 << 20)
