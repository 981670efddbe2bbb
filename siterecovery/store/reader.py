"""Reading a disk of a recovery point: the merged view of base + segments, and restore.

Applying a chain means: base blocks, then each segment's extents in chain order (a later
segment wins). The reader plans, per block, the base chunk and the segment frames that
touch it, then materializes blocks in order on a bounded pool. Everything read is verified
(chunk content hash, envelope MAC / authentication tag, index digest); a mismatch raises
``IntegrityError`` and nothing corrupt is returned or written.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from siterecovery import fsutil
from siterecovery.store.codec import SUBBLOCK_SIZE, SUM_LEN
from siterecovery.store.context import StoreContext, is_zero, ordered_map, zeros
from siterecovery.store.errors import (
    FormatError,
    IntegrityError,
    StoreError,
    StoreFull,
    StoreInputError,
    StoreUnavailable,
)
from siterecovery.store.index import BaseIndex, block_count, block_span, chunk_key
from siterecovery.store.manifest import DiskChain, DiskRef, PointManifest, SegmentRef
from siterecovery.store.segment import (
    PREFIX_LEN,
    Frame,
    SegmentHeader,
    extents_in_range,
    parse_prefix,
)

__all__ = ["ChainReader", "RestoreStats", "load_index", "load_segment_header", "restore_disk"]

RESTORE_FORMATS = ("raw", "qcow2")


def load_index(ctx: StoreContext, ref: DiskRef) -> BaseIndex:
    """Fetch a base index, check it against its reference, and decode it."""
    blob = ctx.backend.get(ref.key)
    if len(blob) != ref.size or ctx.codec.digest(blob) != ref.digest:
        raise IntegrityError(
            f"object {ref.key} is corrupt: {len(blob)} bytes with digest not matching the "
            f"manifest ({ref.size} bytes)"
        )
    return BaseIndex.decode(ctx.codec.unseal(ref.key, blob), ref.key)


def load_segment_header(ctx: StoreContext, ref: SegmentRef) -> tuple[int, SegmentHeader]:
    """Fetch and decode a segment's header; return (data area offset, header)."""
    head = ctx.backend.get(ref.key, 0, PREFIX_LEN)
    header_len = parse_prefix(head, ref.key, ref.size)
    blob = ctx.backend.get(ref.key, PREFIX_LEN, header_len)
    if len(blob) != header_len:
        raise IntegrityError(f"object {ref.key} is corrupt: truncated segment header")
    header = SegmentHeader.decode(ctx.codec.unseal(f"{ref.key}#header", blob), ref.key)
    return PREFIX_LEN + header_len, header


def read_frame(ctx: StoreContext, key: str, data_start: int, frame: Frame) -> bytes:
    """Fetch and verify one frame of a segment."""
    blob = ctx.backend.get(key, data_start + frame.rel_offset, frame.stored_len)
    if len(blob) != frame.stored_len:
        raise IntegrityError(f"object {key} is corrupt: truncated at frame {frame.block}")
    plain = ctx.codec.unseal(f"{key}#block{frame.block}", blob)
    if len(plain) != frame.plain_len:
        raise IntegrityError(f"object {key} is corrupt: frame {frame.block} has a wrong length")
    return plain


def read_chunk(ctx: StoreContext, chunk_id: str, length: int | None = None) -> bytes:
    """Fetch a chunk and check that its content hashes to its id."""
    key = chunk_key(chunk_id)
    data = ctx.codec.unseal(key, ctx.backend.get(key))
    if ctx.codec.chunk_id(data) != chunk_id or (length is not None and len(data) != length):
        raise IntegrityError(f"object {key} is corrupt: content does not match its id")
    return data


@dataclass(frozen=True)
class _Overlay:
    segment: int
    data_start: int
    frame: Frame


class ChainReader:
    """The content of one disk of a recovery point, block by block."""

    def __init__(self, ctx: StoreContext, point: PointManifest, disk: str) -> None:
        chain = point.disks.get(disk)
        if chain is None:
            raise StoreInputError(
                f"recovery point {point.name} has no disk {disk!r}; it has: "
                + ", ".join(sorted(point.disks)),
            )
        self._ctx = ctx
        self.what = f"disk {disk} of recovery point {point.name}"
        self.chain = chain
        with _naming(self.what):
            self.index = load_index(ctx, chain.base)
            self._check_index(chain)
            self._segments = [load_segment_header(ctx, ref) for ref in chain.segments]
        self._overlays = self._plan()
        self.block_size = self.index.block_size
        self.size = chain.size

    def _check_index(self, chain: DiskChain) -> None:
        if self.index.disk_size != chain.size:
            raise FormatError(
                f"{self.what}: index {chain.base.key} is for {self.index.disk_size} bytes, "
                f"the manifest says {chain.size}"
            )

    def _plan(self) -> dict[int, list[_Overlay]]:
        overlays: dict[int, list[_Overlay]] = {}
        for i, (start, header) in enumerate(self._segments):
            key = self.chain.segments[i].key
            if header.disk_size != self.chain.size or header.block_size != self.index.block_size:
                raise FormatError(f"{self.what}: segment {key} does not fit the base image")
            for frame in header.frames:
                overlays.setdefault(frame.block, []).append(_Overlay(i, start, frame))
        return overlays

    @property
    def block_count(self) -> int:
        return block_count(self.size, self.block_size)

    def block(self, index: int) -> bytes | None:
        """The verified content of block ``index``, or None if it is all zeros."""
        with _naming(self.what):
            start, length = block_span(index, self.size, self.block_size)
            cid = self.index.chunk_hex(index)
            base = None if cid is None else read_chunk(self._ctx, cid, length)
            overlays = self._overlays.get(index)
            if not overlays:
                return base
            buf = bytearray(base if base is not None else zeros(length))
            for ov in overlays:
                self._apply(buf, start, ov)
            return None if is_zero(buf) else bytes(buf)

    def _apply(self, buf: bytearray, start: int, ov: _Overlay) -> None:
        ref = self.chain.segments[ov.segment]
        header = self._segments[ov.segment][1]
        plain = read_frame(self._ctx, ref.key, ov.data_start, ov.frame)
        pos = 0
        for offset, length in extents_in_range(header.extents, start, start + len(buf)):
            buf[offset - start : offset - start + length] = plain[pos : pos + length]
            pos += length

    def subblock_sums(self) -> list[bytes | None]:
        """The keyed 64 KiB checksum of every sub-block of the disk at this point, from the
        index and segment headers alone (no data is read). None marks a sub-block a segment
        changed only partly: its checksum is unknown without reading it."""
        codec = self._ctx.codec
        sums: list[bytes | None] = []
        for i in range(self.block_count):
            block = self.index.block_sums(i, codec)
            sums.extend(block[j : j + SUM_LEN] for j in range(0, len(block), SUM_LEN))
        for _, header in self._segments:
            for offset, length in header.extents:
                first, end = offset // SUBBLOCK_SIZE, -(-(offset + length) // SUBBLOCK_SIZE)
                sums[first:end] = [None] * (end - first)
            for sub, value in header.sums:
                sums[sub] = value
        return sums

    def blocks(self) -> Iterator[tuple[int, bytes | None]]:
        """(offset, data or None for zeros) for every block in order, read in parallel with
        at most ``max_in_flight`` blocks ahead of the consumer."""
        pool = self._ctx.pool("read")
        try:
            results = ordered_map(
                pool, self.block, range(self.block_count), self._ctx.max_in_flight
            )
            for i, data in enumerate(results):
                yield i * self.block_size, data
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def _naming(what: str) -> Iterator[None]:
    """Prefix store errors raised inside with what was being read (same error type)."""
    try:
        yield
    except StoreError as exc:
        if exc.message.startswith(what):
            raise
        raise type(exc)(f"{what}: {exc.message}", hint=exc.hint) from exc


@dataclass(frozen=True)
class RestoreStats:
    """What a restore did."""

    disk_size: int
    bytes_written: int
    zero_bytes_skipped: int
    seconds: float


def _check_dest(dest: Path, fmt: str, overwrite: bool) -> None:
    if fmt not in RESTORE_FORMATS:
        raise StoreInputError(
            f"unsupported image format {fmt!r}; supported: {', '.join(RESTORE_FORMATS)}"
        )
    if not dest.parent.is_dir():
        raise StoreInputError(f"destination directory {dest.parent} does not exist")
    if dest.exists() and not overwrite:
        raise StoreInputError(
            f"destination {dest} already exists", hint="choose a new path or remove it first"
        )


def restore_disk(
    reader: ChainReader,
    dest: Path,
    *,
    fmt: str = "raw",
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
) -> RestoreStats:
    """Write the disk to ``dest`` as a sparse raw image (zero blocks are not written) or a
    qcow2 image (converted with ``qemu-img``). The image appears at ``dest`` only when
    complete (temporary file + rename); on any failure nothing is left behind."""
    _check_dest(dest, fmt, overwrite)
    started = time.monotonic()
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex}")
    final = tmp
    try:
        written = _write_raw(reader, tmp, progress)
        if fmt == "qcow2":
            final = tmp.with_name(tmp.name + ".qcow2")
            _convert(tmp, final)
        os.replace(final, dest)
        fsutil.fsync_dir(dest.parent)
    except OSError as exc:
        raise _dest_error(dest, exc) from exc
    finally:
        tmp.unlink(missing_ok=True)
        final.unlink(missing_ok=True)
    elapsed = time.monotonic() - started
    return RestoreStats(reader.size, written, reader.size - written, elapsed)


def _write_raw(reader: ChainReader, path: Path, progress: Callable[[int, int], None] | None) -> int:
    written = 0
    fd = fsutil.open_private(path, exclusive=True)
    try:
        os.ftruncate(fd, reader.size)  # sparse: unwritten ranges read as zeros
        for offset, data in reader.blocks():
            if data is not None:
                os.pwrite(fd, data, offset)
                written += len(data)
            if progress is not None:
                progress(min(offset + reader.block_size, reader.size), reader.size)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def _convert(src: Path, dst: Path) -> None:
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise StoreError(
            "restoring to qcow2 needs qemu-img, which is not installed",
            hint="install qemu-utils, or restore with --format raw",
        )
    cmd = [qemu_img, "convert", "-q", "-f", "raw", "-O", "qcow2", str(src), str(dst)]
    done = subprocess.run(
        cmd, capture_output=True, text=True, check=False, umask=fsutil.CHILD_UMASK
    )
    if done.returncode != 0:
        raise StoreError(f"qemu-img convert to {dst} failed: {done.stderr.strip()}")


def _dest_error(dest: Path, exc: OSError) -> StoreError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull(f"cannot write {dest}: no space left on the destination")
    return StoreUnavailable(f"cannot write {dest}: {exc.strerror or exc}")
