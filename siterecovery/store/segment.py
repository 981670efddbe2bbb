"""The delta segment: exactly the dirty extents of one disk in one cycle.

A segment is one object under ``segments/<vm>/<disk>/<id>``, laid out so a reader can fetch
its header and then any block's data with range reads, within bounded memory::

    offset          size        field
    0               4           magic b"SRSG"                    (plain)
    4               2           version (1)                      (plain)
    6               2           reserved (0)                     (plain)
    8               8           header_len                       (plain)
    16              header_len  sealed header, object name "<key>#header"
    16+header_len   ...         frames: sealed, one per disk block the extents touch, object
                                name "<key>#block<N>", in block order, back to back

Header plaintext (big-endian)::

    disk_size u64, block_size u64, extent_count u32, frame_count u32, sum_count u32
    extents:  extent_count x (offset u64, length u64)
    frames:   frame_count  x (block u64, rel_offset u64, stored_len u64, plain_len u64)
    sums:     sum_count    x (subblock u64, checksum 16 bytes)

Invariants (checked on write and on read): extents are non-empty, sorted, non-overlapping,
512-byte aligned in offset and length (the last one may end at ``disk_size`` instead), and
inside the disk; adjacent extents are merged by the writer. A frame holds the bytes of every
extent part inside its block, concatenated in disk order; ``rel_offset`` counts from the end
of the header. ``sums`` are the keyed 64 KiB checksums of the sub-blocks the extents cover
*completely* (the last, short sub-block counts when covered up to ``disk_size``), i.e. the
disk's content there after this segment is applied.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from siterecovery.store.codec import SUM_LEN
from siterecovery.store.errors import FormatError, IntegrityError, StoreInputError

__all__ = [
    "PREFIX_LEN",
    "SEGMENT_VERSION",
    "Frame",
    "SegmentHeader",
    "encode_prefix",
    "extents_in_range",
    "parse_prefix",
    "validate_extents",
]

SEGMENT_MAGIC: Final = b"SRSG"
SEGMENT_VERSION: Final = 1
SECTOR: Final = 512
_PREFIX = struct.Struct(">4sHHQ")
PREFIX_LEN: Final = _PREFIX.size
_COUNTS = struct.Struct(">QQIII")
_EXTENT = struct.Struct(">QQ")
_FRAME = struct.Struct(">QQQQ")
_SUM = struct.Struct(f">Q{SUM_LEN}s")

Extents = Sequence[tuple[int, int]]


def validate_extents(extents: Iterable[tuple[int, int]], disk_size: int, what: str) -> None:
    """Check the extent invariants of the module docstring; ``StoreInputError`` if broken."""
    prev_end = 0
    for offset, length in extents:
        end = offset + length
        if length <= 0 or offset < prev_end or end > disk_size:
            raise StoreInputError(
                f"{what}: extent ({offset}, {length}) is empty, out of order, overlapping or "
                f"beyond the disk size {disk_size}"
            )
        if offset % SECTOR or (length % SECTOR and end != disk_size):
            raise StoreInputError(
                f"{what}: extent ({offset}, {length}) is not {SECTOR}-byte aligned"
            )
        prev_end = end


def extents_in_range(extents: Extents, start: int, end: int) -> list[tuple[int, int]]:
    """The parts of sorted, non-overlapping ``extents`` inside ``[start, end)``."""
    i = max(bisect.bisect_right(extents, (start, 0)) - 1, 0)
    parts = []
    for offset, length in extents[i:]:
        if offset >= end:
            break
        lo, hi = max(offset, start), min(offset + length, end)
        if lo < hi:
            parts.append((lo, hi - lo))
    return parts


@dataclass(frozen=True)
class Frame:
    """Where one block's extent bytes sit in the segment object."""

    block: int
    rel_offset: int
    stored_len: int
    plain_len: int


@dataclass
class SegmentHeader:
    """The decoded segment header (see the module docstring)."""

    disk_size: int
    block_size: int
    extents: list[tuple[int, int]]
    frames: list[Frame]
    sums: list[tuple[int, bytes]]

    @property
    def data_bytes(self) -> int:
        return sum(length for _, length in self.extents)

    def encode(self) -> bytes:
        counts = _COUNTS.pack(
            self.disk_size, self.block_size, len(self.extents), len(self.frames), len(self.sums)
        )
        return b"".join(
            [counts]
            + [_EXTENT.pack(*e) for e in self.extents]
            + [_FRAME.pack(f.block, f.rel_offset, f.stored_len, f.plain_len) for f in self.frames]
            + [_SUM.pack(i, s) for i, s in self.sums]
        )

    @classmethod
    def decode(cls, data: bytes, name: str) -> SegmentHeader:
        """Parse and check a header plaintext; ``FormatError`` naming ``name`` if malformed."""
        if len(data) < _COUNTS.size:
            raise FormatError(f"segment {name} header is malformed: too short")
        dsize, bsize, n_ext, n_frames, n_sums = _COUNTS.unpack_from(data)
        want = _COUNTS.size + n_ext * _EXTENT.size + n_frames * _FRAME.size + n_sums * _SUM.size
        if len(data) != want or bsize <= 0:
            raise FormatError(f"segment {name} header is malformed: wrong length")
        pos = _COUNTS.size
        extents = [_EXTENT.unpack_from(data, pos + i * _EXTENT.size) for i in range(n_ext)]
        pos += n_ext * _EXTENT.size
        frames = [Frame(*_FRAME.unpack_from(data, pos + i * _FRAME.size)) for i in range(n_frames)]
        pos += n_frames * _FRAME.size
        sums = [_SUM.unpack_from(data, pos + i * _SUM.size) for i in range(n_sums)]
        header = cls(dsize, bsize, extents, frames, sums)
        header._check(name)
        return header

    def _check(self, name: str) -> None:
        try:
            validate_extents(self.extents, self.disk_size, f"segment {name}")
        except StoreInputError as exc:
            raise FormatError(f"segment {name} header is malformed: {exc}") from exc
        blocks = [f.block for f in self.frames]
        if blocks != sorted(set(blocks)):
            raise FormatError(f"segment {name} header is malformed: frames out of order")
        for f in self.frames:
            start = f.block * self.block_size
            parts = extents_in_range(self.extents, start, start + self.block_size)
            if not parts or sum(n for _, n in parts) != f.plain_len:
                raise FormatError(f"segment {name} header is malformed: frame {f.block} size")
        if sum(f.plain_len for f in self.frames) != self.data_bytes:
            raise FormatError(f"segment {name} header is malformed: extents without frames")


def encode_prefix(header_len: int) -> bytes:
    """The 16 plain bytes that start every segment object."""
    return _PREFIX.pack(SEGMENT_MAGIC, SEGMENT_VERSION, 0, header_len)


def parse_prefix(data: bytes, name: str, object_size: int | None = None) -> int:
    """Check a segment prefix and return ``header_len``."""
    if len(data) < PREFIX_LEN:
        raise IntegrityError(f"object {name} is corrupt: truncated segment prefix")
    magic, version, reserved, header_len = _PREFIX.unpack_from(data)
    if magic != SEGMENT_MAGIC or reserved != 0:
        raise IntegrityError(f"object {name} is corrupt: bad segment prefix {data[:8]!r}")
    if version != SEGMENT_VERSION:
        raise FormatError(
            f"segment {name} has unknown format version {version} (written by a newer "
            f"siterecovery, or corrupt); this siterecovery reads version {SEGMENT_VERSION}"
        )
    if object_size is not None and PREFIX_LEN + header_len > object_size:
        raise IntegrityError(f"object {name} is corrupt: segment header beyond the object end")
    return int(header_len)
