"""One replication cycle: freeze every disk, read what changed over NBD, ship it, publish a point.

Contract of :meth:`Replicator.run_cycle`:

- every disk of the VM is captured at one instant (:meth:`ChangeTracker.begin`); with a
  ``quiesce`` context (the guest agent's filesystem freeze, :func:`agent_quiesce`) around that
  instant the point is *app-consistent*, else *crash-consistent*, and the point records which;
- a delta cycle first checks that the VM has the disks (names and sizes) of the previous
  point: a disk added, removed or resized raises :class:`DiskLayoutChanged` before anything
  is frozen (the VM then needs a resync, which copies new and resized disks whole);
- the initial cycle copies each disk's allocated blocks into a **base** (holes and zero
  ranges are skipped); a delta cycle copies exactly the dirty extents into one **delta
  segment** per disk;
- the recovery point manifest is published only after every object it names is stored;
- on success the frozen change log is dropped; on any failure it is merged back into the live
  one, so the next cycle ships those changes again and nothing is lost. The error propagates.

Disks are read in parallel, one NBD connection per disk, each with up to
:data:`READ_IN_FLIGHT` pipelined requests of :data:`READ_REQUEST` bytes. Hashing, compression
and uploads run on the store's own worker threads (blake3 and zstandard release the GIL);
:func:`cycle_memory` is the memory bound a runner budgets for one cycle.

``hook(step)`` is called at each named step (:data:`CYCLE_STEPS`): the tracker's steps, then
``shipping`` (the first data was read), then ``published`` (the point exists; teardown next).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from siterecovery.domain import Consistency
from siterecovery.errors import HypervisorError
from siterecovery.hypervisor.guestagent import GuestAgent, GuestLeftFrozen
from siterecovery.hypervisor.nbd import NbdClient
from siterecovery.hypervisor.tracking import (
    STEPS,
    ChangeTracker,
    CycleView,
    DiskView,
    Quiesce,
    StepHook,
    TrackedDisk,
)
from siterecovery.replication.errors import DiskLayoutChanged
from siterecovery.store.leases import acquire_lease
from siterecovery.store.manifest import DiskChain, PointManifest
from siterecovery.store.repository import ReplicaStore

log = logging.getLogger(__name__)

#: Largest NBD read request; 2-8 MiB requests read at socket speed.
READ_REQUEST = 4 << 20
#: NBD read requests outstanding per disk (pipelining).
READ_IN_FLIGHT = 8
CYCLE_STEPS = (*STEPS, "shipping", "published")

Progress = Callable[[str, int, int], None]
"""progress(disk, bytes_done, bytes_total)"""


@dataclass(frozen=True)
class DiskCycleStats:
    """What one disk contributed to a cycle."""

    disk: str
    bytes_read: int
    extents: int
    bytes_shipped: int = 0


@dataclass(frozen=True)
class CycleResult:
    """The outcome of one successful cycle."""

    point: PointManifest
    initial: bool
    captured_at: datetime
    duration_s: float
    disks: tuple[DiskCycleStats, ...] = field(default=())
    generation: int = 0
    quiesced_s: float = 0.0
    warnings: tuple[str, ...] = ()

    @property
    def consistency(self) -> Consistency:
        return Consistency(self.point.consistency)

    @property
    def bytes_read(self) -> int:
        return sum(d.bytes_read for d in self.disks)

    @property
    def bytes_shipped(self) -> int:
        """Bytes written to the replica store (compressed, deduplicated)."""
        return sum(d.bytes_shipped for d in self.disks)

    def figures(self) -> dict[str, Any]:
        """Per-cycle figures as recorded in the vault's job and recovery point records."""
        return {
            "initial": self.initial,
            "duration_s": round(self.duration_s, 3),
            "bytes_read": self.bytes_read,
            "bytes_shipped": self.bytes_shipped,
            "extents": sum(d.extents for d in self.disks),
            "captured_at": self.captured_at.isoformat(),
            "consistency": str(self.consistency),
            "quiesced_s": round(self.quiesced_s, 3),
            "generation": self.generation,
            "warnings": list(self.warnings),
        }


ShipFn = Callable[[CycleView, PointManifest | None], tuple[dict[str, DiskChain], tuple[Any, ...]]]


@dataclass(frozen=True)
class CycleRun:
    """The frame every cycle-like operation (delta, initial copy, resync) runs in.

    Under a store lease (so garbage collection keeps the chain being extended and what is
    being written), freeze the disks, ship, publish the point, and end the cycle: the frozen
    change log is dropped only after the point is published, and merged back otherwise.
    """

    tracker: ChangeTracker
    store: ReplicaStore
    vm: str
    vm_config: Mapping[str, Any]

    def run(
        self,
        begin: Callable[[], CycleView],
        ship: ShipFn,
        previous: PointManifest | None,
        *,
        consistency: Consistency | None = None,
        base: bool,
        hook: StepHook | None = None,
    ) -> tuple[CycleView, PointManifest, tuple[Any, ...]]:
        """Run one frame; the point's consistency is ``consistency`` or else the view's."""
        roots = [ref.key for chain in (previous.disks.values() if previous else ())
                 for ref in chain.refs()]  # fmt: skip
        purpose = "base" if base else "cycle"
        with acquire_lease(
            self.store.backend, purpose, vm=self.vm, writes=True, dedup=base, roots=roots
        ):
            view = begin()
            try:
                chains, stats = ship(view, previous)
                point = self.store.publish_point(
                    self.vm, chains, consistency=str(consistency or view.consistency),
                    vm_config=dict(self.vm_config), created_at=view.captured_at,
                )  # fmt: skip
                if hook is not None:
                    hook("published")
            except BaseException:
                self.tracker.end(view, shipped=False)
                raise
        self.tracker.end(view, shipped=True)
        return view, point, stats


class Replicator:
    """Runs cycles of one VM from its :class:`ChangeTracker` into a :class:`ReplicaStore`."""

    def __init__(
        self,
        tracker: ChangeTracker,
        store: ReplicaStore,
        vm: str,
        *,
        vm_config: Mapping[str, Any] | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.tracker = tracker
        self.store = store
        self.vm = vm
        self.vm_config = dict(vm_config or {})
        self.progress = progress
        self._hook: StepHook | None = None
        self._shipping_seen = threading.Event()

    def run_cycle(
        self,
        previous: PointManifest | None,
        *,
        quiesce: Quiesce | None = None,
        hook: StepHook | None = None,
        min_generation: int | None = None,
    ) -> CycleResult:
        """Run one cycle: initial when ``previous`` is None, else a delta on top of it.

        ``quiesce`` wraps the freezing transaction (app-consistent points); ``min_generation``
        is the bitmap generation the previous point recorded (older bitmaps are stale).
        """
        started = time.monotonic()
        if previous is not None:
            check_layout(self.tracker.disks(), previous)
        self._hook = hook
        self._shipping_seen = threading.Event()
        cycle = CycleRun(self.tracker, self.store, self.vm, self.vm_config)
        # Options go to begin() only when set, so trackers that wrap begin(initial=...) work.
        options: dict[str, Any] = {"quiesce": quiesce, "hook": hook,
                                   "min_generation": min_generation}  # fmt: skip
        options = {k: v for k, v in options.items() if v is not None}
        view, point, stats = cycle.run(
            lambda: self.tracker.begin(initial=previous is None, **options),
            self._ship, previous, base=previous is None, hook=hook,
        )  # fmt: skip
        return CycleResult(
            point, view.initial, view.captured_at, time.monotonic() - started, stats,
            generation=view.generation, quiesced_s=view.quiesced_s,
        )  # fmt: skip

    def _ship(
        self, view: CycleView, previous: PointManifest | None
    ) -> tuple[dict[str, DiskChain], tuple[DiskCycleStats, ...]]:
        if previous is not None:
            _check_same_disks(view, previous)
        with ThreadPoolExecutor(max_workers=max(1, len(view.disks))) as pool:
            futures = {d.disk: pool.submit(self._ship_disk, view, d, previous) for d in view.disks}
            results = {name: f.result() for name, f in futures.items()}
        chains = {name: chain for name, (chain, _) in results.items()}
        return chains, tuple(stats for _, stats in results.values())

    def _ship_disk(
        self, view: CycleView, disk: DiskView, previous: PointManifest | None
    ) -> tuple[DiskChain, DiskCycleStats]:
        contexts = [disk.bitmap_context] if disk.bitmap_context else ["base:allocation"]
        with NbdClient.connect_unix(str(view.nbd_socket), disk.export, contexts) as nbd:
            if previous is None or disk.bitmap_context is None:
                return self.copy_base(nbd, disk)
            return self._copy_delta(nbd, disk, previous.disks[disk.disk])

    def copy_base(
        self, nbd: NbdClient, disk: DiskView, *, repair: bool = False
    ) -> tuple[DiskChain, DiskCycleStats]:
        """Copy every allocated, non-zero store block of ``disk`` into a new base.

        ``repair`` checks each chunk that already exists before reusing it and rewrites a
        damaged one (a resync after damage must not deduplicate against corrupt data).
        """
        ranges = block_ranges(nbd.allocated_extents(), self.store.block_size, disk.size)
        writer = self.store.begin_base(self.vm, disk.disk, disk.size, repair=repair)
        done = self._pump(nbd, ranges, disk.disk, writer.write, writer.abort)
        base = writer.commit()
        chain = DiskChain(size=disk.size, base=base, segments=())
        return chain, DiskCycleStats(disk.disk, done, len(ranges), writer.stats.bytes_stored)

    def _copy_delta(
        self, nbd: NbdClient, disk: DiskView, previous: DiskChain
    ) -> tuple[DiskChain, DiskCycleStats]:
        assert disk.bitmap_context is not None
        ranges = nbd.dirty_extents(disk.bitmap_context)
        writer = self.store.begin_segment(self.vm, disk.disk, disk.size)
        done = self._pump(nbd, ranges, disk.disk, writer.add, writer.abort)
        segment = writer.commit()
        shipped = segment.size if segment is not None else 0
        return previous.extend(segment), DiskCycleStats(disk.disk, done, len(ranges), shipped)

    def _pump(
        self,
        nbd: NbdClient,
        ranges: list[tuple[int, int]],
        disk: str,
        sink: Callable[[int, bytes], None],
        abort: Callable[[], None],
    ) -> int:
        """Read ``ranges`` (pipelined) into ``sink``; abort the writer on any failure."""
        total = sum(length for _, length in ranges)
        done = 0
        try:
            pieces = nbd.pread_many(ranges, max_request=READ_REQUEST, in_flight=READ_IN_FLIGHT)
            for offset, data in pieces:
                sink(offset, data)
                done += len(data)
                self._shipping()
                if self.progress:
                    self.progress(disk, done, total)
        except BaseException:
            abort()
            raise
        return done

    def _shipping(self) -> None:
        """Call the ``shipping`` hook once per cycle, at the first data stored."""
        if self._hook is not None and not self._shipping_seen.is_set():
            self._shipping_seen.set()
            self._hook("shipping")


def cycle_memory(disks: int, store: ReplicaStore) -> int:
    """Bytes one cycle of a VM with ``disks`` disks may hold at once: per disk, the pipelined
    NBD reads plus the store writer's blocks in flight (plain and compressed copies)."""
    ctx = store.context
    per_disk = READ_REQUEST * READ_IN_FLIGHT + 2 * ctx.max_in_flight * ctx.block_size
    return max(1, disks) * per_disk


def agent_quiesce(
    agent_path: Path | None, warnings: list[str], *, freeze_timeout: float = 20.0
) -> Quiesce:
    """A :data:`Quiesce` factory that freezes the guest's filesystems through its agent.

    If no agent answers on ``agent_path`` (none configured, socket missing, nobody runs
    qemu-ga) or the freeze fails, the transaction runs anyway and the point is
    crash-consistent: a warning is logged and appended to ``warnings`` (never an error).
    The thaw is guaranteed by :meth:`GuestAgent.quiesce`; only a guest that cannot be thawed
    raises (:class:`GuestLeftFrozen`).
    """

    @contextmanager
    def quiesce() -> Iterator[Consistency]:
        agent = _connect(agent_path, warnings)
        if agent is None:
            yield Consistency.CRASH
            return
        with agent:
            try:
                agent.freeze(timeout=freeze_timeout)
            except GuestLeftFrozen:
                raise
            except HypervisorError as exc:
                _warn(f"guest filesystem freeze failed ({exc}): crash-consistent point", warnings)
                yield Consistency.CRASH
                return
            try:
                yield Consistency.APP
            finally:
                agent.thaw()

    return quiesce


def _connect(agent_path: Path | None, warnings: list[str]) -> GuestAgent | None:
    if agent_path is None:
        _warn("no guest agent configured for the VM: crash-consistent point", warnings)
        return None
    try:
        return GuestAgent.connect(agent_path)
    except HypervisorError as exc:
        _warn(f"guest agent unavailable ({exc}): crash-consistent point", warnings)
        return None


def _warn(text: str, warnings: list[str]) -> None:
    log.warning("%s", text)
    warnings.append(text)


def check_layout(disks: Sequence[TrackedDisk], previous: PointManifest) -> None:
    """Raise :class:`DiskLayoutChanged` naming each disk added, removed or resized since
    ``previous`` (the VM then needs a resync: new and resized disks are copied whole)."""
    now = {d.name: d.size for d in disks}
    before = {name: chain.size for name, chain in previous.disks.items()}
    changes = [f"disk {n} was added ({_mib(now[n])})" for n in sorted(now.keys() - before)]
    changes += [f"disk {n} was removed" for n in sorted(before.keys() - now)]
    changes += [
        f"disk {n} was resized from {_mib(before[n])} to {_mib(now[n])}"
        for n in sorted(now.keys() & before.keys())
        if now[n] != before[n]
    ]
    if changes:
        raise DiskLayoutChanged(
            f"the VM's disks changed since recovery point {previous.point_id}: "
            + "; ".join(changes)
        )


def _mib(size: int) -> str:
    return f"{size >> 20} MiB" if size % (1 << 20) == 0 else f"{size} bytes"


def block_ranges(
    extents: Iterable[tuple[int, int, bool]], block_size: int, size: int
) -> list[tuple[int, int]]:
    """Whole store blocks that hold any non-zero data, as (offset, length), merged.

    The store's base is made of fixed blocks, so a data extent is widened to the blocks it
    touches; blocks only covered by holes or zero extents are left out (they read as zero).
    """
    blocks: list[int] = []
    for offset, length, is_zero in extents:
        if is_zero or length <= 0:
            continue
        first, last = offset // block_size, (offset + length - 1) // block_size
        if blocks and blocks[-1] >= first:
            first = blocks[-1] + 1
        blocks.extend(range(first, last + 1))
    merged: list[tuple[int, int]] = []
    for block in blocks:
        start = block * block_size
        length = min(block_size, size - start)
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1] = (merged[-1][0], merged[-1][1] + length)
        else:
            merged.append((start, length))
    return merged


def _check_same_disks(view: CycleView, previous: PointManifest) -> None:
    from siterecovery.replication.errors import DiskLayoutChanged

    now = {d.disk: d.size for d in view.disks}
    before = {name: chain.size for name, chain in previous.disks.items()}
    if now != before:
        raise DiskLayoutChanged(
            f"the VM's disks changed since the last recovery point: now {now}, then {before}"
        )
