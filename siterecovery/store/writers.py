"""Writers of base images and delta segments.

Neither writer makes anything visible to readers of recovery points: they store chunks,
indexes and segments that only a manifest published afterwards refers to. An aborted or failed
writer leaves at most unreferenced objects, which garbage collection removes.

The one exception is a base writer in **repair** mode: a chunk is named by its content, so
an existing chunk is normally reused unread (deduplication) and a damaged one could never be
replaced. In repair mode an existing chunk is read and checked first; when it is damaged
(corrupt, truncated, unreadable) the writer replaces it with a replacing put -- atomic on
every backend, and with the very content its name promises, so every recovery point that
refers to it becomes whole again and no reader ever sees a mix.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from siterecovery.store.codec import SUBBLOCK_SIZE
from siterecovery.store.context import StoreContext, is_zero, new_object_id
from siterecovery.store.errors import (
    FormatError,
    IntegrityError,
    ObjectExists,
    ObjectNotFound,
    StoreInputError,
)
from siterecovery.store.index import BaseIndex, block_count, chunk_key
from siterecovery.store.manifest import DiskRef, SegmentRef
from siterecovery.store.segment import (
    Frame,
    SegmentHeader,
    encode_prefix,
    validate_extents,
)

__all__ = ["BaseWriter", "SegmentWriter", "WriteStats"]


@dataclass
class WriteStats:
    """What a writer did. ``bytes_stored`` counts stored object bytes (after compression);
    ``chunks_repaired`` the damaged chunks a repairing base writer replaced (also counted in
    ``chunks_stored``)."""

    blocks: int = 0
    zero_blocks: int = 0
    chunks_stored: int = 0
    chunks_deduplicated: int = 0
    chunks_repaired: int = 0
    bytes_in: int = 0
    bytes_stored: int = 0


def _check_size(size: int) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise StoreInputError(f"invalid disk size {size!r}: it must be a positive integer")
    return size


class _Pipeline:
    """A thread pool with a bounded number of queued tasks and first-error capture."""

    def __init__(self, ctx: StoreContext, name: str) -> None:
        self._pool = ctx.pool(name)
        self._slots = threading.BoundedSemaphore(ctx.max_in_flight)
        self._futures: list[Future[object]] = []
        self.error: BaseException | None = None

    def submit(self, fn: Callable[..., object], *args: object) -> Future[object]:
        self._slots.acquire()  # blocks the producer while max_in_flight tasks are pending
        fut = self._pool.submit(self._run, fn, *args)
        self._futures.append(fut)
        return fut

    def _run(self, fn: Callable[..., object], *args: object) -> object:
        try:
            return fn(*args)
        except BaseException as exc:
            self.error = self.error or exc
            raise
        finally:
            self._slots.release()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def drain(self) -> None:
        """Wait for every task; raise the first error."""
        for fut in self._futures:
            if not fut.cancelled():
                fut.exception()
        self._futures.clear()
        self.raise_error()

    def close(self, cancel: bool = False) -> None:
        self._pool.shutdown(wait=True, cancel_futures=cancel)


class BaseWriter:
    """Writes a full image of one disk as chunks plus an index.

    ``write`` takes block-aligned pieces in any order; each block may be written once;
    blocks never written read as zeros. Work runs on a bounded pool; an error in the
    background is raised by the next ``write`` or by ``commit``. With ``repair``, existing
    chunks are checked and damaged ones replaced (see the module docstring).
    """

    def __init__(
        self, ctx: StoreContext, vm: str, disk: str, size: int, *, repair: bool = False
    ) -> None:
        self._ctx = ctx
        self.repair = repair
        self.size = _check_size(size)
        self.key = f"indexes/{vm}/{disk}/{new_object_id()}"
        n = block_count(size, ctx.block_size)
        self._chunks: list[bytes | None] = [None] * n
        self._sums: list[bytes | None] = [None] * n
        self._seen = bytearray(n)
        self._lock = threading.Lock()
        self._pipe = _Pipeline(ctx, "base")
        self._state = "open"
        self.stats = WriteStats()

    def write(self, offset: int, data: bytes) -> None:
        """Store ``data`` at ``offset``: the offset is block-aligned and the length a
        multiple of the block size, except for a piece that ends at the disk size."""
        self._check_open()
        self._fail_if_broken()
        first, count = self._check_piece(offset, len(data))
        view = memoryview(data)
        bs = self._ctx.block_size
        for i in range(first, first + count):
            pos = (i - first) * bs
            self._pipe.submit(self._store_block, i, view[pos : pos + bs])

    def _check_piece(self, offset: int, length: int) -> tuple[int, int]:
        bs, end = self._ctx.block_size, offset + length
        if offset < 0 or offset % bs or length <= 0 or end > self.size:
            raise StoreInputError(
                f"base write at {offset} of {length} bytes: the offset must be a multiple of "
                f"the block size {bs} and the piece inside the disk ({self.size} bytes)"
            )
        if length % bs and end != self.size:
            raise StoreInputError(
                f"base write at {offset} of {length} bytes: the length must be a multiple of "
                f"the block size {bs} unless the piece ends at the disk end"
            )
        first, count = offset // bs, -(-length // bs)
        with self._lock:
            if any(self._seen[first : first + count]):
                raise StoreInputError(f"base write at {offset}: a block was already written")
            self._seen[first : first + count] = b"\x01" * count
        return first, count

    def _store_block(self, index: int, view: memoryview) -> None:
        if is_zero(view):
            self._count(zero_blocks=1, bytes_in=len(view))
            return
        codec = self._ctx.codec
        cid = codec.chunk_id(view)
        sums = codec.subblock_sums(view)
        stored, repaired = self._put_chunk(cid, view)
        self._chunks[index], self._sums[index] = bytes.fromhex(cid), sums
        if stored:
            self._count(
                chunks_stored=1, chunks_repaired=int(repaired), bytes_in=len(view),
                bytes_stored=stored,
            )  # fmt: skip
        else:
            self._count(chunks_deduplicated=1, bytes_in=len(view))

    def _put_chunk(self, cid: str, view: memoryview) -> tuple[int, bool]:
        """Store a chunk unless present (and, in repair mode, sound); return the bytes
        stored (0 when deduplicated) and whether a damaged chunk was replaced."""
        key = chunk_key(cid)
        backend = self._ctx.backend
        if backend.stat(key) is not None:
            if not self.repair or self._chunk_sound(key, cid, len(view)):
                return 0, False
            blob = self._ctx.codec.seal(key, view)
            backend.put(key, blob)  # atomic replace with the content the name promises
            return len(blob), True
        blob = self._ctx.codec.seal(key, view)
        try:
            backend.put(key, blob, create_only=True)
        except ObjectExists:
            return 0, False  # another writer stored the same content first: same bytes by name
        return len(blob), False

    def _chunk_sound(self, key: str, cid: str, length: int) -> bool:
        """Whether the stored chunk ``key`` decodes to ``length`` bytes hashing to ``cid``.
        Damage is an answer (False); failures to reach the store propagate."""
        try:
            plain = self._ctx.codec.unseal(key, self._ctx.backend.get(key))
        except (IntegrityError, FormatError, ObjectNotFound):
            return False
        return len(plain) == length and self._ctx.codec.chunk_id(plain) == cid

    def _count(self, **amounts: int) -> None:
        with self._lock:
            self.stats.blocks += 1
            for name, value in amounts.items():
                setattr(self.stats, name, getattr(self.stats, name) + value)

    def _fail_if_broken(self) -> None:
        """A background failure ends the writer: abort, then raise it."""
        if self._pipe.error is not None:
            self.abort()
            self._pipe.raise_error()

    def _check_open(self) -> None:
        if self._state != "open":
            raise StoreInputError(f"base writer for {self.key} is {self._state}")

    def commit(self) -> DiskRef:
        """Wait for every block, store the index, and return its reference."""
        self._check_open()
        try:
            self._pipe.drain()
            index = BaseIndex(self.size, self._ctx.block_size, self._chunks, self._sums)
            blob = self._ctx.codec.seal(self.key, index.encode())
            self._ctx.backend.put(self.key, blob, create_only=True)
            self._ctx.known.add(self.key)
        except BaseException:
            self.abort()
            raise
        finally:
            self._pipe.close()
        self._state = "committed"
        self.stats.bytes_stored += len(blob)
        return DiskRef(self.key, self._ctx.codec.digest(blob), len(blob))

    def abort(self) -> None:
        """Stop, dropping queued work. Nothing becomes visible; idempotent."""
        if self._state == "open":
            self._state = "aborted"
            self._pipe.close(cancel=True)


class SegmentWriter:
    """Writes the dirty extents of one disk for one cycle as a single segment object.

    ``add`` takes extents in increasing, non-overlapping order (512-byte aligned, the last
    one may end at the disk size). Frames are sealed in the background; the sealed (that is,
    compressed) frames are held in memory until ``commit`` puts the object, so memory is
    bounded by the compressed size of one cycle's changes: callers shipping very large
    cycles can commit several segments and add all of them to the chain.
    """

    def __init__(self, ctx: StoreContext, vm: str, disk: str, size: int) -> None:
        self._ctx = ctx
        self.size = _check_size(size)
        self.key = f"segments/{vm}/{disk}/{new_object_id()}"
        self._extents: list[tuple[int, int]] = []
        self._block = -1
        self._parts: list[tuple[int, memoryview]] = []
        self._frames: list[tuple[int, int, Future[object]]] = []
        self._sums: list[tuple[int, bytes]] = []
        self._pipe = _Pipeline(ctx, "segment")
        self._state = "open"

    def add(self, offset: int, data: bytes) -> None:
        """Add one dirty extent."""
        if self._state != "open":
            raise StoreInputError(f"segment writer for {self.key} is {self._state}")
        if self._pipe.error is not None:
            self.abort()
            self._pipe.raise_error()
        extent = (offset, len(data))
        last = self._extents[-1:] or []
        validate_extents([*last, extent], self.size, f"segment {self.key}")
        if last and last[0][0] + last[0][1] == offset:
            self._extents[-1] = (last[0][0], last[0][1] + len(data))  # merge adjacent
        else:
            self._extents.append(extent)
        self._split(offset, memoryview(data))

    def _split(self, offset: int, view: memoryview) -> None:
        bs = self._ctx.block_size
        while view:
            block = offset // bs
            take = min(len(view), (block + 1) * bs - offset)
            if block != self._block:
                self._flush()
                self._block = block
            self._parts.append((offset, view[:take]))
            offset, view = offset + take, view[take:]

    def _flush(self) -> None:
        if not self._parts:
            return
        block, parts = self._block, self._parts
        self._parts = []
        plain = b"".join(p for _, p in parts)
        self._sums.extend(self._covered_sums(parts, plain))
        name = f"{self.key}#block{block}"
        fut = self._pipe.submit(self._ctx.codec.seal, name, plain)
        self._frames.append((block, len(plain), fut))

    def _covered_sums(
        self, parts: list[tuple[int, memoryview]], plain: bytes
    ) -> list[tuple[int, bytes]]:
        """Checksums of the sub-blocks that ``parts`` (sorted) cover completely."""
        runs: list[list[int]] = []  # [disk_start, disk_end, plain_start]
        pos = 0
        for offset, view in parts:
            if runs and runs[-1][1] == offset:
                runs[-1][1] += len(view)
            else:
                runs.append([offset, offset + len(view), pos])
            pos += len(view)
        sums = []
        for start, end, pstart in runs:
            sub = -(-start // SUBBLOCK_SIZE)
            while sub * SUBBLOCK_SIZE < end:
                s0, s1 = sub * SUBBLOCK_SIZE, min((sub + 1) * SUBBLOCK_SIZE, self.size)
                if s1 > end:
                    break
                piece = plain[pstart + s0 - start : pstart + s1 - start]
                sums.append((sub, self._ctx.codec.subblock_sums(piece)))
                sub += 1
        return sums

    def commit(self) -> SegmentRef | None:
        """Store the segment; None (and nothing stored) if no extent was added."""
        if self._state != "open":
            raise StoreInputError(f"segment writer for {self.key} is {self._state}")
        try:
            self._flush()
            self._pipe.drain()
            ref = self._store() if self._extents else None
        except BaseException:
            self.abort()
            raise
        finally:
            self._pipe.close()
        self._state = "committed"
        return ref

    def _store(self) -> SegmentRef:
        blobs: list[bytes] = []
        frames: list[Frame] = []
        rel = 0
        for block, plain_len, fut in self._frames:
            blob = fut.result()
            assert isinstance(blob, bytes)
            frames.append(Frame(block, rel, len(blob), plain_len))
            blobs.append(blob)
            rel += len(blob)
        header = SegmentHeader(self.size, self._ctx.block_size, self._extents, frames, self._sums)
        header_blob = self._ctx.codec.seal(f"{self.key}#header", header.encode())
        obj = b"".join([encode_prefix(len(header_blob)), header_blob, *blobs])
        self._ctx.backend.put(self.key, obj, create_only=True)
        self._ctx.known.add(self.key)
        return SegmentRef(
            self.key, self._ctx.codec.digest(obj), len(obj), len(self._extents), header.data_bytes
        )

    def abort(self) -> None:
        """Stop, dropping queued work. Nothing is stored; idempotent."""
        if self._state == "open":
            self._state = "aborted"
            self._pipe.close(cancel=True)
