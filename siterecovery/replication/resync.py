"""Resynchronization (the seed's 다시 동기화): send only the blocks that differ.

Contract of :meth:`Resyncer.run`:

- every disk is frozen at one instant and a **fresh change log** starts at that instant
  (:meth:`ChangeTracker.begin_resync`), so writes made while the resync runs are shipped by
  the next delta cycle;
- each disk is split into fixed 64 KiB blocks; each block's keyed checksum is compared with
  the checksum the replica store already holds for that block at the previous recovery point
  (:meth:`ReplicaStore.subblock_checksums`: taken from the index and segment headers, so the
  target is never read back). Blocks the source reports as zero are compared without being
  read. Only differing blocks (and blocks whose stored checksum is unknown) are sent, as
  delta segments on top of the previous point's chain;
- a disk that is new or changed size since the previous point (or every disk, when there is
  no previous point) is copied whole into a new base;
- the new recovery point is published only after everything it names is stored; on failure
  nothing is published and the error propagates (the VM stays *resync required*).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from siterecovery.domain import Consistency
from siterecovery.hypervisor.nbd import NbdClient
from siterecovery.hypervisor.tracking import ChangeTracker, CycleView, DiskView
from siterecovery.replication.engine import (
    READ_REQUEST,
    CycleRun,
    Progress,
    Replicator,
    block_ranges,
)
from siterecovery.store.codec import SUBBLOCK_SIZE
from siterecovery.store.manifest import DiskChain, PointManifest
from siterecovery.store.repository import ReplicaStore
from siterecovery.store.writers import SegmentWriter

#: The fixed block of the compare: the granularity of the checksums the store holds.
BLOCK = SUBBLOCK_SIZE
#: Plain bytes per resync segment: bounds the memory a writer holds before it stores.
SEGMENT_LIMIT = 128 << 20
SUM_LEN = 16


@dataclass(frozen=True)
class DiskResyncStats:
    """What resynchronizing one disk did. ``bytes_sent`` counts the plain bytes of the
    differing blocks; ``bytes_stored`` what reached the store (compressed)."""

    disk: str
    blocks_compared: int
    blocks_sent: int
    bytes_read: int
    bytes_sent: int
    bytes_stored: int
    full_copy: bool = False


@dataclass(frozen=True)
class ResyncResult:
    """The outcome of one successful resynchronization."""

    point: PointManifest
    captured_at: datetime
    duration_s: float
    disks: tuple[DiskResyncStats, ...] = field(default=())

    @property
    def blocks_compared(self) -> int:
        return sum(d.blocks_compared for d in self.disks)

    @property
    def blocks_sent(self) -> int:
        return sum(d.blocks_sent for d in self.disks)

    @property
    def bytes_sent(self) -> int:
        return sum(d.bytes_sent for d in self.disks)

    @property
    def bytes_stored(self) -> int:
        return sum(d.bytes_stored for d in self.disks)

    @property
    def bytes_read(self) -> int:
        return sum(d.bytes_read for d in self.disks)

    def figures(self) -> dict[str, Any]:
        """The figures the resync job and its recovery point record show."""
        return {
            "resync": True,
            "block_size": BLOCK,
            "blocks_compared": self.blocks_compared,
            "blocks_sent": self.blocks_sent,
            "bytes_read": self.bytes_read,
            "bytes_sent": self.bytes_sent,
            "bytes_shipped": self.bytes_stored,
            "duration_s": round(self.duration_s, 3),
            "captured_at": self.captured_at.isoformat(),
            "full_copy_disks": [d.disk for d in self.disks if d.full_copy],
        }


class Resyncer:
    """Resynchronizes one VM from its :class:`ChangeTracker` into a :class:`ReplicaStore`."""

    def __init__(
        self,
        tracker: ChangeTracker,
        store: ReplicaStore,
        vm: str,
        *,
        vm_config: Mapping[str, Any] | None = None,
        progress: Progress | None = None,
        segment_limit: int = SEGMENT_LIMIT,
    ) -> None:
        self.tracker = tracker
        self.store = store
        self.vm = vm
        self.vm_config = dict(vm_config or {})
        self.progress = progress
        self.segment_limit = segment_limit

    def run(
        self, previous: PointManifest | None, *, consistency: Consistency = Consistency.CRASH
    ) -> ResyncResult:
        """Resynchronize against ``previous`` (None: copy every disk whole)."""
        started = time.monotonic()
        cycle = CycleRun(self.tracker, self.store, self.vm, self.vm_config)
        view, point, stats = cycle.run(
            self.tracker.begin_resync, self._ship, previous, consistency=consistency, base=True
        )
        return ResyncResult(point, view.captured_at, time.monotonic() - started, stats)

    def _ship(
        self, view: CycleView, previous: PointManifest | None
    ) -> tuple[dict[str, DiskChain], tuple[DiskResyncStats, ...]]:
        with ThreadPoolExecutor(max_workers=max(1, len(view.disks))) as pool:
            futures = {d.disk: pool.submit(self._disk, view, d, previous) for d in view.disks}
            results = {name: f.result() for name, f in futures.items()}
        return {n: c for n, (c, _) in results.items()}, tuple(s for _, s in results.values())

    def _disk(
        self, view: CycleView, disk: DiskView, previous: PointManifest | None
    ) -> tuple[DiskChain, DiskResyncStats]:
        chain = previous.disks.get(disk.disk) if previous is not None else None
        with NbdClient.connect_unix(str(view.nbd_socket), disk.export, ["base:allocation"]) as nbd:
            if chain is None or chain.size != disk.size:
                return self._full_copy(nbd, disk)
            assert previous is not None
            stored = self.store.subblock_checksums(previous, disk.disk)
            return self._compare(nbd, disk, chain, stored)

    def _full_copy(self, nbd: NbdClient, disk: DiskView) -> tuple[DiskChain, DiskResyncStats]:
        replicator = Replicator(self.tracker, self.store, self.vm, progress=self.progress)
        chain, stats = replicator.copy_base(nbd, disk, repair=True)
        blocks = -(-disk.size // BLOCK)
        stats_ = DiskResyncStats(
            disk.disk, blocks, blocks, stats.bytes_read, stats.bytes_read, stats.bytes_shipped,
            full_copy=True,
        )  # fmt: skip
        return chain, stats_

    def _compare(
        self, nbd: NbdClient, disk: DiskView, chain: DiskChain, stored: Sequence[bytes | None]
    ) -> tuple[DiskChain, DiskResyncStats]:
        extents = nbd.allocated_extents()
        data_ranges = block_ranges(extents, BLOCK, disk.size)
        zero_diffs = _zero_diffs(stored, data_ranges, disk.size, self.store.subblock_checksum)
        sender = _Sender(self.store, self.vm, disk, chain, self.segment_limit)
        compared = len(stored)
        bytes_read = 0
        total = sum(length for _, length in data_ranges)
        try:
            pieces = nbd.pread_many(data_ranges, max_request=READ_REQUEST)
            for offset, data in pieces:
                bytes_read += len(data)
                sums = self.store.subblock_checksum(data)
                for diff_offset, diff in _differing(offset, data, sums, stored):
                    sender.zeros_before(zero_diffs, diff_offset)
                    sender.send(diff_offset, diff)
                if self.progress:
                    self.progress(disk.disk, bytes_read, total)
            sender.zeros_before(zero_diffs, disk.size)
            new_chain = sender.finish()
        except BaseException:
            sender.abort()
            raise
        stats = DiskResyncStats(
            disk.disk, compared, sender.blocks, bytes_read, sender.bytes, sender.stored
        )
        return new_chain, stats


class _Sender:
    """Ships differing blocks of one disk as delta segments, rolling over at a size limit."""

    def __init__(
        self, store: ReplicaStore, vm: str, disk: DiskView, chain: DiskChain, limit: int
    ) -> None:
        self.store, self.vm, self.disk, self.chain, self.limit = store, vm, disk, chain, limit
        self.writer: SegmentWriter | None = None
        self.in_writer = 0
        self.blocks = self.bytes = self.stored = 0

    def send(self, offset: int, data: bytes) -> None:
        if self.writer is None:
            self.writer = self.store.begin_segment(self.vm, self.disk.disk, self.disk.size)
        self.writer.add(offset, data)
        self.blocks += -(-len(data) // BLOCK)
        self.bytes += len(data)
        self.in_writer += len(data)
        if self.in_writer >= self.limit:
            self._commit()

    def zeros_before(self, diffs: deque[tuple[int, int]], end: int) -> None:
        """Send the pending zero-block differences that start before ``end`` (in order)."""
        while diffs and diffs[0][0] < end:
            offset, length = diffs.popleft()
            for start in range(offset, offset + length, READ_REQUEST):
                self.send(start, bytes(min(READ_REQUEST, offset + length - start)))

    def _commit(self) -> None:
        if self.writer is not None:
            segment = self.writer.commit()
            self.stored += segment.size if segment is not None else 0
            self.chain = self.chain.extend(segment)
            self.writer, self.in_writer = None, 0

    def finish(self) -> DiskChain:
        self._commit()
        return self.chain

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def _differing(
    offset: int, data: bytes, sums: bytes, stored: Sequence[bytes | None]
) -> Iterator[tuple[int, bytes]]:
    """Runs of consecutive blocks of ``data`` (at ``offset``, block-aligned) whose checksum
    differs from the stored one, as ``(offset, bytes)``."""
    first = offset // BLOCK
    count = len(sums) // SUM_LEN
    run_start: int | None = None
    for i in range(count + 1):
        differs = i < count and sums[i * SUM_LEN : (i + 1) * SUM_LEN] != stored[first + i]
        if differs and run_start is None:
            run_start = i
        elif not differs and run_start is not None:
            yield offset + run_start * BLOCK, data[run_start * BLOCK : i * BLOCK]
            run_start = None


def _zero_diffs(
    stored: Sequence[bytes | None],
    data_ranges: list[tuple[int, int]],
    size: int,
    checksum: Callable[[bytes], bytes],
) -> deque[tuple[int, int]]:
    """Merged ``(offset, length)`` of the blocks the source reports as zero but whose stored
    checksum is not the checksum of zeros (or is unknown)."""
    zero_sum = checksum(bytes(BLOCK))
    last = len(stored) - 1
    tail_sum = checksum(bytes(size - last * BLOCK))
    is_data = bytearray(len(stored))
    for offset, length in data_ranges:
        first, end = offset // BLOCK, -(-(offset + length) // BLOCK)
        is_data[first:end] = b"\x01" * (end - first)
    diffs: deque[tuple[int, int]] = deque()
    for i, value in enumerate(stored):
        if is_data[i] or value == (tail_sum if i == last else zero_sum):
            continue
        start, length = i * BLOCK, min(BLOCK, size - i * BLOCK)
        if diffs and diffs[-1][0] + diffs[-1][1] == start:
            diffs[-1] = (diffs[-1][0], diffs[-1][1] + length)
        else:
            diffs.append((start, length))
    return diffs
