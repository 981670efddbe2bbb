"""The base index: which chunk (or zero) holds each block of a disk.

A disk of ``disk_size`` bytes is cut into ``block_size`` blocks (the last may be short).
Plaintext layout, version 1 (big-endian), stored sealed (see ``codec``) under
``indexes/<vm>/<disk>/<id>``::

    offset  size          field
    0       4             magic b"SRIX"
    4       2             version (1)
    6       2             flags (0)
    8       4             block_size
    12      4             subblock_size (65536)
    16      8             disk_size
    24      8             block_count = ceil(disk_size / block_size)
    32      block_count   kind per block: 0 = zero block, 1 = chunk
    ...     32 * C        raw chunk id of each chunk block, in block order (C = chunk blocks)
    ...     16 * S        sub-block checksums of each chunk block, in block order, one per
                          64 KiB piece of the block (S = total pieces of chunk blocks)

Zero blocks carry no checksums: the checksum of zeros is computed on demand. A chunk is stored
at ``chunks/<first 2 hex of id>/<id>``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from siterecovery.store.codec import SUBBLOCK_SIZE, SUM_LEN, Codec
from siterecovery.store.errors import FormatError

__all__ = [
    "INDEX_VERSION",
    "BaseIndex",
    "block_count",
    "block_span",
    "chunk_key",
    "subblock_count",
]

INDEX_MAGIC: Final = b"SRIX"
INDEX_VERSION: Final = 1
_HEADER = struct.Struct(">4sHHIIQQ")
_ID_LEN: Final = 32


def block_count(disk_size: int, block_size: int) -> int:
    """Number of blocks of a disk (the last may be short)."""
    return -(-disk_size // block_size)


def block_span(index: int, disk_size: int, block_size: int) -> tuple[int, int]:
    """(offset, length) of block ``index``."""
    start = index * block_size
    return start, min(block_size, disk_size - start)


def subblock_count(length: int) -> int:
    """Number of 64 KiB pieces of ``length`` bytes (the last may be short)."""
    return -(-length // SUBBLOCK_SIZE)


def chunk_key(chunk_id: str) -> str:
    """The store key of chunk ``chunk_id`` (64 hex characters)."""
    return f"chunks/{chunk_id[:2]}/{chunk_id}"


@dataclass
class BaseIndex:
    """Block map of one base image. ``chunks[i]`` is the raw 32-byte chunk id of block ``i``
    or None for a zero block; ``sums[i]`` its concatenated sub-block checksums (None for a
    zero block)."""

    disk_size: int
    block_size: int
    chunks: list[bytes | None]
    sums: list[bytes | None]

    def chunk_hex(self, index: int) -> str | None:
        raw = self.chunks[index]
        return None if raw is None else raw.hex()

    def chunk_ids(self) -> set[str]:
        """Distinct chunk ids the index references."""
        return {raw.hex() for raw in self.chunks if raw is not None}

    def block_sums(self, index: int, codec: Codec) -> bytes:
        """Sub-block checksums of block ``index`` (computed for zero blocks)."""
        stored = self.sums[index]
        if stored is not None:
            return stored
        _, length = block_span(index, self.disk_size, self.block_size)
        return codec.subblock_sums(bytes(length))

    def encode(self) -> bytes:
        """The version-1 plaintext (see the module docstring)."""
        n = len(self.chunks)
        parts = [
            _HEADER.pack(
                INDEX_MAGIC, INDEX_VERSION, 0, self.block_size, SUBBLOCK_SIZE, self.disk_size, n
            ),
            bytes(0 if c is None else 1 for c in self.chunks),
        ]
        parts.extend(c for c in self.chunks if c is not None)
        parts.extend(s for s in self.sums if s is not None)
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes, name: str) -> BaseIndex:
        """Parse and check a plaintext index; ``FormatError`` naming ``name`` if malformed."""
        if len(data) < _HEADER.size:
            raise FormatError(f"index {name} is malformed: too short")
        magic, version, flags, bsize, sub, dsize, n = _HEADER.unpack_from(data)
        if magic != INDEX_MAGIC:
            raise FormatError(f"index {name} is malformed: bad magic {magic!r}")
        if version != INDEX_VERSION or flags != 0:
            raise FormatError(
                f"index {name} has format version {version} (flags {flags}); this "
                f"siterecovery reads version {INDEX_VERSION}"
            )
        if sub != SUBBLOCK_SIZE or bsize % SUBBLOCK_SIZE or n != block_count(dsize, bsize):
            raise FormatError(f"index {name} is malformed: inconsistent sizes")
        return cls._decode_body(memoryview(data)[_HEADER.size :], dsize, bsize, n, name)

    @classmethod
    def _decode_body(cls, body: memoryview, dsize: int, bsize: int, n: int, name: str) -> BaseIndex:
        kinds = bytes(body[:n])
        if len(kinds) != n or any(k > 1 for k in kinds):
            raise FormatError(f"index {name} is malformed: bad block kinds")
        lengths = [block_span(i, dsize, bsize)[1] for i in range(n)]
        sum_lens = [subblock_count(lengths[i]) * SUM_LEN if kinds[i] else 0 for i in range(n)]
        n_chunks = sum(kinds)
        if len(body) != n + n_chunks * _ID_LEN + sum(sum_lens):
            raise FormatError(f"index {name} is malformed: wrong length")
        chunks: list[bytes | None] = []
        sums: list[bytes | None] = []
        pos_id, pos_sum = n, n + n_chunks * _ID_LEN
        for i in range(n):
            if not kinds[i]:
                chunks.append(None)
                sums.append(None)
                continue
            chunks.append(bytes(body[pos_id : pos_id + _ID_LEN]))
            sums.append(bytes(body[pos_sum : pos_sum + sum_lens[i]]))
            pos_id += _ID_LEN
            pos_sum += sum_lens[i]
        return cls(dsize, bsize, chunks, sums)
