"""Change tracking on QEMU: persistent dirty bitmaps, one-transaction cycles, fleecing views.

This is the seed's replication tracker (the ``.hrl`` change log) expressed with QEMU block layer
primitives (DESIGN §3). For a VM whose replication relationship is ``REL``, each disk carries one
persistent, enabled dirty bitmap named ``sr-REL-G`` (64 KiB granularity); ``G`` is the generation,
incremented by every cycle.

A cycle:

1. :meth:`ChangeTracker.begin` runs **one** QMP ``transaction`` over every disk of the VM:
   add bitmap ``G+1`` (new writes land there from this instant, like the seed's "changes go to
   another log while the log is in transit"), disable bitmap ``G`` (frozen: exactly the changes
   of this cycle), and start ``blockdev-backup sync=none`` from the disk into a temporary qcow2
   overlay whose backing is the disk (fleecing). The overlay is then a read-only point-in-time
   view of every disk at the same instant, while the guest keeps writing.
2. Each view is exported over NBD (one NBD server per QEMU, a unix socket in the run directory),
   with ``qemu:dirty-bitmap:sr-REL-G`` as meta context, and the caller reads only dirty extents.
   An initial cycle exports with no bitmap and the caller copies allocated extents.
3. :meth:`ChangeTracker.end` tears down in the order QEMU needs (export, then job, then overlay
   node) and then either removes bitmap ``G`` (shipped) or **merges** it into ``G+1`` before
   removing it (not shipped), so no change is ever lost.

App-consistent points: ``begin(quiesce=...)`` wraps **only** the transaction in the caller's
quiesce context (the guest agent's filesystem freeze), so the guest is frozen for the few
milliseconds the transaction takes, not while overlays are created or exports added. The
context yields the :class:`~siterecovery.domain.Consistency` actually obtained (a guest without
an agent yields *crash*); it is recorded in the view.

Step hooks: ``begin(hook=...)`` calls ``hook(step)`` at the named points of :data:`STEPS`
(tests stop or kill the agent there).

Crash safety: names of everything a cycle creates start with ``sre-``/``srj-``/``srf-``, so
:meth:`ChangeTracker.reconcile` (run at the start of every cycle) can remove what a killed agent
left behind and fold leftover bitmaps into the newest one. A bitmap that QEMU reports
``inconsistent`` (QEMU crashed), a missing bitmap, or a newest bitmap that is not recording
cannot be trusted: :class:`BitmapError` is raised and the VM must be resynchronized. So is a
**stale** bitmap, whose generation is older than the one the last recovery point recorded (the
image was rolled back), and a **foreign** one: a bitmap of this product for another
relationship on a disk that lacks ours.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from siterecovery.domain import Consistency
from siterecovery.fsutil import CHILD_UMASK, private_dir
from siterecovery.hypervisor.errors import BitmapError, QmpError
from siterecovery.hypervisor.qmp import QmpSession

GRANULARITY = 64 * 1024
#: Named steps of a cycle at which ``hook(step)`` is called (in this order).
STEPS = ("before-transaction", "after-transaction", "exported")
Quiesce = Callable[[], AbstractContextManager[Consistency]]
"""A factory of the context that wraps the transaction; it yields the consistency obtained."""
StepHook = Callable[[str], None]


@dataclass(frozen=True)
class TrackedDisk:
    """A writable disk of a running QEMU, as discovered through QMP."""

    name: str
    node: str
    size: int
    filename: str = ""
    fmt: str = ""


@dataclass(frozen=True)
class DiskView:
    """One disk's frozen point-in-time view, exported over NBD."""

    disk: str
    node: str
    size: int
    export: str
    bitmap: str | None

    @property
    def bitmap_context(self) -> str | None:
        """The NBD meta context holding this cycle's changes, or None for a full copy."""
        return f"qemu:dirty-bitmap:{self.bitmap}" if self.bitmap else None


@dataclass(frozen=True)
class CycleView:
    """All disks of a VM frozen at one instant (``captured_at``)."""

    nbd_socket: Path
    generation: int
    initial: bool
    captured_at: datetime
    disks: tuple[DiskView, ...]
    consistency: Consistency = Consistency.CRASH
    #: seconds the guest was quiesced (0 for a crash-consistent view)
    quiesced_s: float = 0.0


class ChangeTracker:
    """Dirty-bitmap change tracking for one VM and one replication relationship.

    ``qmp_path`` is the VM's QMP socket; ``run_dir`` holds the NBD socket and fleecing
    overlays (it must be on a local filesystem with room for the writes made during a
    cycle); ``relationship`` is the replication relationship id (hex), which names bitmaps so
    that bitmaps of another product or an older relationship are never touched.
    """

    def __init__(
        self,
        qmp_path: Path,
        run_dir: Path,
        relationship: str,
        *,
        nodes: dict[str, str] | None = None,
    ) -> None:
        if not re.fullmatch(r"[0-9a-f]{8,32}", relationship):
            raise ValueError(f"relationship id must be 8-32 hex digits, not {relationship!r}")
        self.qmp_path = qmp_path
        self.run_dir = run_dir
        self.relationship = relationship
        self.prefix = f"sr-{relationship}-"
        self.nbd_socket = run_dir / "nbd.sock"
        # disk name -> format node name; None: discover the guest's disks with query-block.
        # qemu-storage-daemon (offline VMs) has no devices, so its nodes are named explicitly.
        self.nodes = nodes

    # -- discovery -------------------------------------------------------------------------

    def disks(self) -> list[TrackedDisk]:
        """The VM's writable disks, in device order."""
        with self._qmp() as qmp:
            return self._discover(qmp)

    # -- cycle -----------------------------------------------------------------------------

    def begin(
        self,
        *,
        initial: bool,
        quiesce: Quiesce | None = None,
        hook: StepHook | None = None,
        min_generation: int | None = None,
    ) -> CycleView:
        """Freeze every disk at one instant and export the views; see the module docstring.

        ``initial=True`` starts tracking from scratch (any old bitmaps of this relationship
        are dropped, since the full copy covers them). Raises :class:`BitmapError` when a
        delta cycle finds tracking state it cannot trust, including a newest bitmap older
        than ``min_generation`` (the generation the last recovery point recorded).
        """
        step = hook or _no_hook
        private_dir(self.run_dir)
        with self._qmp() as qmp:
            disks = self._discover(qmp)
            if initial:
                self._cleanup_leftovers(qmp, disks)
                self._drop_bitmaps(qmp, disks)
                generation = 0
            else:
                generation = self._reconcile(qmp, disks, min_generation)
            for disk in disks:
                self._add_overlay(qmp, disk)
            step("before-transaction")
            captured_at, consistency, quiesced_s = self._frozen_transaction(
                qmp, disks, generation, initial=initial, quiesce=quiesce
            )
            step("after-transaction")
            self._start_nbd(qmp)
            views = tuple(self._export(qmp, d, None if initial else generation) for d in disks)
            step("exported")
        return CycleView(
            self.nbd_socket, generation + 1, initial, captured_at, views, consistency, quiesced_s
        )

    def _frozen_transaction(
        self,
        qmp: QmpSession,
        disks: list[TrackedDisk],
        generation: int,
        *,
        initial: bool,
        quiesce: Quiesce | None,
    ) -> tuple[datetime, Consistency, float]:
        if quiesce is None:
            return self._transaction(qmp, disks, generation, initial=initial), Consistency.CRASH, 0
        started = time.monotonic()
        with quiesce() as consistency:
            captured_at = self._transaction(qmp, disks, generation, initial=initial)
        quiesced = time.monotonic() - started if consistency == Consistency.APP else 0.0
        return captured_at, consistency, quiesced

    def end(self, view: CycleView, *, shipped: bool) -> None:
        """Tear the cycle down; keep its changes tracked unless they were ``shipped``.

        Safe to call after a partial failure: every step tolerates what is already gone.
        """
        with self._qmp() as qmp:
            for disk in view.disks:
                self._teardown(qmp, disk.node)
            if view.initial:
                return
            old = self._bitmap_name(view.generation - 1)
            new = self._bitmap_name(view.generation)
            for disk in view.disks:
                if not shipped:
                    qmp.cmd("block-dirty-bitmap-merge", node=disk.node, target=new, bitmaps=[old])
                qmp.cmd("block-dirty-bitmap-remove", node=disk.node, name=old)

    def reconcile(self) -> int:
        """Clean leftovers of an interrupted cycle; return the current generation.

        Raises :class:`BitmapError` when the tracking state cannot be trusted.
        """
        with self._qmp() as qmp:
            return self._reconcile(qmp, self._discover(qmp), None)

    def pending_bytes(self) -> dict[str, int]:
        """Bytes each disk has changed since its last shipped cycle (its change log's size).

        Reconciles first (as a cycle would), so leftovers of an interrupted cycle are counted
        and an untrusted change log raises :class:`BitmapError`. The resync trigger compares
        these figures with the disk sizes.
        """
        with self._qmp() as qmp:
            disks = self._discover(qmp)
            self._reconcile(qmp, disks, None)
            return {
                d.name: sum(int(b.get("count", 0)) for b in self._our_bitmaps(qmp, d.node))
                for d in disks
            }

    def begin_resync(self) -> CycleView:
        """Freeze every disk for a resynchronization and start a fresh change log.

        Exactly like an initial cycle (old, possibly inconsistent bitmaps of this relationship
        are dropped; a new one records from the frozen instant), so writes made during the
        resync are shipped by the next delta cycle. The view exports no bitmap: the caller
        compares every block. End it with :meth:`end` like any cycle.
        """
        return self.begin(initial=True)

    def stop_tracking(self) -> None:
        """Remove every bitmap and leftover of this relationship (disable protection)."""
        with self._qmp() as qmp:
            disks = self._discover(qmp)
            self._cleanup_leftovers(qmp, disks)
            self._drop_bitmaps(qmp, disks)

    # -- internals -------------------------------------------------------------------------

    def _discover(self, qmp: QmpSession) -> list[TrackedDisk]:
        # A killed cycle's fleecing job puts a filter node above each disk, which hides the
        # disk's node from query-block: clean up first (one cycle per VM runs at a time).
        self._cleanup_leftovers(qmp)
        if self.nodes is None:
            return _discover(qmp)
        found = {n["node-name"]: n for n in qmp.cmd("query-named-block-nodes", flat=True)}
        disks = []
        for name, node in self.nodes.items():
            if node not in found:
                raise BitmapError(f"disk {name}: block node {node} does not exist")
            image = found[node].get("image", {})
            disks.append(
                TrackedDisk(
                    name,
                    node,
                    int(image.get("virtual-size", 0)),
                    str(image.get("filename", "")),
                    str(image.get("format", "")),
                )
            )
        return disks

    @contextmanager
    def _qmp(self) -> Iterator[QmpSession]:
        with QmpSession.connect(self.qmp_path) as qmp:
            yield qmp

    def _bitmap_name(self, generation: int) -> str:
        return f"{self.prefix}{generation}"

    def _our_bitmaps(self, qmp: QmpSession, node: str) -> list[dict[str, Any]]:
        for entry in qmp.cmd("query-named-block-nodes", flat=True):
            if entry.get("node-name") == node:
                return [
                    b
                    for b in entry.get("dirty-bitmaps", [])
                    if str(b.get("name", "")).startswith(self.prefix)
                ]
        raise BitmapError(f"block node {node} disappeared from the VM")

    def _foreign_bitmaps(self, qmp: QmpSession, node: str) -> list[str]:
        """Names of siterecovery bitmaps (``sr-``) of other relationships on ``node``."""
        for entry in qmp.cmd("query-named-block-nodes", flat=True):
            if entry.get("node-name") == node:
                names = [str(b.get("name", "")) for b in entry.get("dirty-bitmaps", [])]
                return [n for n in names if n.startswith("sr-") and not n.startswith(self.prefix)]
        return []

    def _drop_bitmaps(self, qmp: QmpSession, disks: list[TrackedDisk]) -> None:
        for disk in disks:
            for bitmap in self._our_bitmaps(qmp, disk.node):
                qmp.cmd("block-dirty-bitmap-remove", node=disk.node, name=bitmap["name"])

    def _reconcile(
        self, qmp: QmpSession, disks: list[TrackedDisk], min_generation: int | None
    ) -> int:
        self._cleanup_leftovers(qmp, disks)
        generations = {self._reconcile_disk(qmp, d) for d in disks}
        if len(generations) != 1:
            raise BitmapError(
                f"disks of the VM track different generations {sorted(generations)}: a disk "
                "was added or its bitmap replaced"
            )
        generation = generations.pop()
        if min_generation is not None and generation < min_generation:
            raise BitmapError(
                f"change tracking is stale: the disks carry bitmap generation {generation} "
                f"but the last recovery point was taken at generation {min_generation} (was "
                "the image restored from an older copy?)"
            )
        return generation

    def _reconcile_disk(self, qmp: QmpSession, disk: TrackedDisk) -> int:
        """Validate one disk's bitmaps, fold leftovers into the newest, return its generation."""
        bitmaps = self._our_bitmaps(qmp, disk.node)
        if not bitmaps:
            foreign = self._foreign_bitmaps(qmp, disk.node)
            if foreign:
                raise BitmapError(
                    f"disk {disk.name}: change tracking bitmap is missing; the disk carries "
                    f"{', '.join(foreign)} of another replication relationship instead"
                )
            raise BitmapError(f"disk {disk.name}: change tracking bitmap is missing")
        for bitmap in bitmaps:
            if bitmap.get("inconsistent"):
                raise BitmapError(
                    f"disk {disk.name}: bitmap {bitmap['name']} is inconsistent (QEMU did not "
                    "shut down cleanly); its changes cannot be trusted"
                )
        by_gen = sorted(bitmaps, key=lambda b: self._generation_of(str(b["name"])))
        newest = by_gen[-1]
        if not newest.get("recording", False):
            raise BitmapError(f"disk {disk.name}: bitmap {newest['name']} is not recording")
        older = [str(b["name"]) for b in by_gen[:-1]]
        if older:
            # An interrupted cycle left its frozen bitmap: its changes were maybe not shipped.
            qmp.cmd(
                "block-dirty-bitmap-merge", node=disk.node, target=newest["name"], bitmaps=older
            )
            for name in older:
                qmp.cmd("block-dirty-bitmap-remove", node=disk.node, name=name)
        return self._generation_of(str(newest["name"]))

    def _generation_of(self, name: str) -> int:
        suffix = name[len(self.prefix) :]
        if not suffix.isdigit():
            raise BitmapError(f"bitmap {name} does not carry a generation number")
        return int(suffix)

    def _cleanup_leftovers(self, qmp: QmpSession, disks: list[TrackedDisk] | None = None) -> None:
        """Tear down every export, job and fleecing node a cycle creates (by name prefix),
        whichever disks they belong to, then remove overlay files nobody uses."""
        exports = [e["id"] for e in qmp.cmd("query-block-exports") if e["id"].startswith("sre-")]
        jobs = [j["device"] for j in qmp.cmd("query-block-jobs") if j["device"].startswith("srj-")]
        nodes = [n.get("node-name", "") for n in qmp.cmd("query-named-block-nodes", flat=True)]
        fleece = sorted({n for n in nodes if n.startswith("srf-")})
        for export_id in exports:
            self._delete_export(qmp, export_id)
        for job_id in jobs:
            self._cancel_job(qmp, job_id)
        for node in fleece:
            qmp.cmd("blockdev-del", **{"node-name": node})
        for overlay in self.run_dir.glob("fleece-*.qcow2"):
            overlay.unlink(missing_ok=True)

    def _add_overlay(self, qmp: QmpSession, disk: TrackedDisk) -> None:
        path = self._overlay_path(disk.node)
        path.unlink(missing_ok=True)
        _run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(disk.size)])
        qmp.cmd(
            "blockdev-add",
            driver="qcow2",
            **{"node-name": _fleece_node(disk.node)},
            file={"driver": "file", "filename": str(path)},
            backing=disk.node,
        )

    def _transaction(
        self, qmp: QmpSession, disks: list[TrackedDisk], generation: int, *, initial: bool
    ) -> datetime:
        actions: list[dict[str, Any]] = []
        for disk in disks:
            actions.append(_action("block-dirty-bitmap-add", {
                "node": disk.node, "name": self._bitmap_name(generation + 1),
                "persistent": True, "granularity": GRANULARITY,
            }))  # fmt: skip
            if not initial:
                actions.append(_action("block-dirty-bitmap-disable", {
                    "node": disk.node, "name": self._bitmap_name(generation),
                }))  # fmt: skip
            actions.append(_action("blockdev-backup", {
                "device": disk.node, "target": _fleece_node(disk.node), "sync": "none",
                "job-id": _job_id(disk.node), "auto-dismiss": True,
            }))  # fmt: skip
        captured_at = datetime.now(UTC)
        qmp.cmd("transaction", actions=actions)
        return captured_at

    def _start_nbd(self, qmp: QmpSession) -> None:
        addr = {"type": "unix", "data": {"path": str(self.nbd_socket)}}
        try:
            qmp.cmd("nbd-server-start", addr=addr)
        except QmpError as exc:
            if "already running" not in str(exc):
                raise

    def _export(self, qmp: QmpSession, disk: TrackedDisk, generation: int | None) -> DiskView:
        bitmap = None if generation is None else self._bitmap_name(generation)
        args: dict[str, Any] = {
            "type": "nbd", "id": _export_id(disk.node), "node-name": _fleece_node(disk.node),
            "name": disk.name, "writable": False,
        }  # fmt: skip
        if bitmap:
            args["bitmaps"] = [{"node": disk.node, "name": bitmap}]
        qmp.cmd("block-export-add", **args)
        return DiskView(disk.name, disk.node, disk.size, disk.name, bitmap)

    def _teardown(self, qmp: QmpSession, node: str) -> None:
        """Delete export, job and overlay of ``node`` in that order; tolerate absence."""
        export_id = _export_id(node)
        if export_id in {e["id"] for e in qmp.cmd("query-block-exports")}:
            self._delete_export(qmp, export_id)
        job_id = _job_id(node)
        if job_id in {j["device"] for j in qmp.cmd("query-block-jobs")}:
            self._cancel_job(qmp, job_id)
        nodes = {n.get("node-name") for n in qmp.cmd("query-named-block-nodes", flat=True)}
        if _fleece_node(node) in nodes:
            qmp.cmd("blockdev-del", **{"node-name": _fleece_node(node)})
        self._overlay_path(node).unlink(missing_ok=True)

    @staticmethod
    def _delete_export(qmp: QmpSession, export_id: str) -> None:
        qmp.cmd("block-export-del", id=export_id, mode="hard")
        qmp.wait_event("BLOCK_EXPORT_DELETED", {"id": export_id}, timeout=30)

    @staticmethod
    def _cancel_job(qmp: QmpSession, job_id: str) -> None:
        qmp.cmd("block-job-cancel", device=job_id, force=True)
        qmp.wait_event("BLOCK_JOB_CANCELLED", {"device": job_id}, timeout=30)

    def _overlay_path(self, node: str) -> Path:
        return self.run_dir / f"fleece-{_short(node)}.qcow2"


def discover_disks(qmp_path: Path) -> list[TrackedDisk]:
    """The writable disks of the QEMU behind ``qmp_path`` (connect, ask, disconnect)."""
    with QmpSession.connect(qmp_path) as qmp:
        return _discover(qmp)


def session_disks(qmp: QmpSession) -> list[TrackedDisk]:
    """Like :func:`discover_disks`, on an open session."""
    return _discover(qmp)


def _discover(qmp: QmpSession) -> list[TrackedDisk]:
    """Writable disks from ``query-block``, named by device (``-drive``) or node (``-blockdev``)."""
    disks = []
    for entry in qmp.cmd("query-block"):
        inserted = entry.get("inserted")
        if not inserted or inserted.get("ro"):
            continue
        node = str(inserted["node-name"])
        name = entry.get("device") or (node if not node.startswith("#") else entry.get("qdev"))
        image = inserted.get("image", {})
        disks.append(
            TrackedDisk(
                name=_disk_name(str(name)),
                node=node,
                size=int(image.get("virtual-size", 0)),
                filename=str(image.get("filename", "")),
                fmt=str(image.get("format", "")),
            )
        )
    return disks


def _disk_name(raw: str) -> str:
    """A store-safe disk name derived from a QEMU device/qdev path."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", raw.rsplit("/", 2)[-1] if "/" in raw else raw)
    return name.strip("_.-")[:63] or "disk"


def _short(node: str) -> str:
    return hashlib.blake2s(node.encode(), digest_size=5).hexdigest()


def _fleece_node(node: str) -> str:
    return f"srf-{_short(node)}"


def _job_id(node: str) -> str:
    return f"srj-{_short(node)}"


def _export_id(node: str) -> str:
    return f"sre-{_short(node)}"


def _no_hook(step: str) -> None:
    """The default step hook: nothing."""


def _action(kind: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "data": data}


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, umask=CHILD_UMASK)
    if result.returncode != 0:
        raise QmpError(f"{argv[0]} failed: {result.stderr.strip()}")
