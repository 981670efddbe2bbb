"""Protection of a VM, written once: the primary host's work, against the vault port.

Every method takes the :class:`~siterecovery.vault.work.WorkItem` the vault leased to this
host's agent session (claimed by ``agent run``, or leased for the operator's own command by
the embedded door, :mod:`siterecovery.replication.local`) and reports everything through the
:class:`~siterecovery.vault.port.VaultPort`; data goes from the hypervisor to the replica
store directly.

``enable_protection(item)``
    the seed's *enable protection* job and its four tasks: **check prerequisites** (QMP
    reachable, every disk can hold a persistent bitmap, the replica store answers), **create
    replication relationship** (the vault's relationship id names the VM's bitmaps), **start
    initial replication** (a full point-in-time copy of every disk while the changes made
    meanwhile are tracked for the first delta) and **finalize protection**. A failed
    prerequisite leaves the VM *unprotected* (the vault does that when the task fails);
    ``protect`` works again once the cause is fixed.
``cycle(item)``
    one delta cycle on top of the newest recovery point (or, for a VM whose initial copy
    failed recoverably, the initial copy again). A change log larger than the resync
    threshold, or one that cannot be trusted, moves the VM to *resync required*.
``resync(item)`` / ``reverse_replicate(item)``
    compare every block with the checksums the store holds, send the differing ones, publish
    a point, *protected* again with a fresh change log (reverse replication: after a
    committed failback, the primary runs on disks that now hold the replica's data).
``disable_protection(item)``
    stop change tracking (this relationship's bitmaps are removed); replica data is left to
    the store's retention and garbage collection.
``final_cycle(item)``
    the last cycle of a planned failover's source phase (the source VM is paused).

Per cycle, from the item (the vault decided when it leased the work): **consistency** —
``item.app_consistent`` freezes the guest's filesystems through its agent around the
freezing transaction (a guest without an agent gets a crash-consistent point and a warning);
**bandwidth** — ``item.limit_bps`` throttles the store; **powered-off VMs** — when QMP does
not answer and the VM was shut down cleanly, its images are opened offline
(:mod:`siterecovery.replication.offline`); **stale tracking** — the bitmap generation each
point recorded must not go backwards.

Every failure of replication work is diagnosed here once
(:func:`siterecovery.policies.retry.diagnose`) and reported; the vault records it, sets the
next retry of the seed's backoff, and moves the state
(:func:`siterecovery.policies.retry.state_after`). The error is then re-raised.

The VM's QMP socket path is host-local configuration kept in the vault's VM record under
``config["qmp"]``, and so is its guest agent socket (``config["qga"]``, optional); everything
else in ``config`` is the machine's description, replicated into every recovery point.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from siterecovery.domain import DiskSpec, ReplicationState, validate_name
from siterecovery.errors import InputError, SiteRecoveryError
from siterecovery.hypervisor.errors import QmpError, VmNotFound
from siterecovery.hypervisor.qmp import QmpSession
from siterecovery.hypervisor.shape import shape_config
from siterecovery.hypervisor.tracking import ChangeTracker, Quiesce, discover_disks
from siterecovery.policies.retry import diagnose
from siterecovery.policies.schedule import CYCLING_STATES, RESYNC_THRESHOLD, over_threshold
from siterecovery.replication.engine import (
    CycleResult,
    Progress,
    Replicator,
    agent_quiesce,
    check_layout,
)
from siterecovery.replication.errors import ChangeLogTooLarge
from siterecovery.replication.jobrun import ErrorHook, JobDriver, JobListener, TaskHandle
from siterecovery.replication.offline import offline_tracker, powered_off
from siterecovery.replication.resync import Resyncer, ResyncResult
from siterecovery.store.manifest import PointManifest
from siterecovery.store.repair import DAMAGE_REASON
from siterecovery.store.repository import ReplicaStore
from siterecovery.store.wrappers import wrap_backend
from siterecovery.vault.port import DiscoveredVm, FailureReport, PointReport, VaultPort
from siterecovery.vault.records import VmRecord
from siterecovery.vault.work import WorkItem

S = ReplicationState
HOST_LOCAL_KEYS = ("qmp", "qga")


class ProtectionService:
    """Runs the primary host's protection work leased to one agent session."""

    def __init__(
        self,
        vault: VaultPort,
        store: ReplicaStore,
        run_dir: Path,
        *,
        on_job: JobListener | None = None,
        progress: Progress | None = None,
        resync_threshold: float = RESYNC_THRESHOLD,
    ) -> None:
        if not 0 < resync_threshold <= 1:
            raise InputError(
                f"resync threshold {resync_threshold!r} is out of range",
                hint="give a fraction of the disk size in (0, 1], e.g. 0.5",
            )
        self.vault = vault
        self.store = store
        self.run_dir = run_dir
        self.on_job = on_job
        self.progress = progress
        self.resync_threshold = resync_threshold

    # -- protection ------------------------------------------------------------------------

    def enable_protection(self, item: WorkItem, job: JobDriver) -> CycleResult | None:
        """The enable protection job, resumed where the vault says it stands; the initial
        cycle (None when a resumed job had copied it already)."""
        vm = item.vm
        record = self.vault.vm(vm)
        made: list[CycleResult] = []

        def initial(task: TaskHandle) -> dict[str, Any]:
            # Inside the task: a VM that cannot enter initial replication fails the job.
            self._move(vm, S.INITIAL_REPLICATION, "initial copy started")
            result = self._initial_copy(item, record)
            made.append(result)
            return result.figures()

        job.run("check prerequisites", lambda _: self._check_prerequisites(record))
        job.run("create replication relationship",
                lambda _: self._relationship_task(record, item))  # fmt: skip
        job.run("start initial replication", initial, on_error=self._reporter(vm))
        job.run("finalize protection",
                lambda _: self._move(vm, S.PROTECTED, "initial replication complete"))  # fmt: skip
        job.finish()
        return made[0] if made else None

    def cycle(self, item: WorkItem) -> CycleResult:
        """One cycle of ``item.vm``; the point (or the failure) is reported, the lease ended."""
        vm = item.vm
        try:
            record = self.vault.vm(vm)
            state = self.vault.protection(vm).state
            if state == S.INITIAL_REPLICATION:  # retrying a failed initial copy
                result = self._initial_copy(item, record)
                self._move(vm, S.PROTECTED, "initial replication complete")
                self.vault.release_lease(vm)
                return result
            if state not in CYCLING_STATES:
                raise InputError(f"VM {vm} is {state}: it gets no cycle now",
                                 hint="see `siterecovery status VM`")  # fmt: skip
            result = self._delta(item, record)
        except Exception as exc:
            self._report_failure(vm, exc, release=True)
            raise
        self._report_point(item, result, release=True)
        return result

    def final_cycle(self, item: WorkItem) -> CycleResult:
        """The final cycle of a planned failover (the source is paused); the lease stays."""
        try:
            result = self._delta(item, self.vault.vm(item.vm))
        except Exception as exc:
            self._report_failure(item.vm, exc, release=False)
            raise
        self._report_point(item, result, release=False)
        return result

    def disable_protection(self, item: WorkItem, job: JobDriver) -> None:
        """Stop tracking the VM's changes; replica data is left to retention and GC."""
        record = self.vault.vm(item.vm)
        relationship = str(item.details.get("relationship_id") or "")

        def stop(_: TaskHandle) -> dict[str, Any]:
            qmp = _qmp_path(record)
            if not qmp.exists():
                return {"bitmaps_removed": False, "reason": f"{qmp} does not exist"}
            ChangeTracker(qmp, self.run_dir / record.name, relationship.replace("-", "")
                          ).stop_tracking()  # fmt: skip
            return {"bitmaps_removed": True}

        job.run("stop replication", stop)
        job.run("remove replication relationship", lambda _: {"relationship_id": relationship})
        job.run("remove replica data", lambda _: {"left_for_gc": True})
        job.finish()

    # -- resync ----------------------------------------------------------------------------

    def resync(self, item: WorkItem, job: JobDriver) -> ResyncResult | None:
        """The *resynchronize* job (None when a resumed job had sent the blocks already).

        ``details["full"]`` (or a VM with no point, or damaged replica data) ignores the
        checksums the store holds and copies every disk into a new base.
        """
        reason = str(item.details.get("reason") or "resync required")
        full = bool(item.details.get("full")) or reason.startswith(DAMAGE_REASON)
        return self._compare_and_send(
            item, job, ("prepare resync", "compare and send blocks", "finalize resync"),
            (S.RESYNCING, reason), (S.PROTECTED, "resync complete"), full=full,
        )  # fmt: skip

    def reverse_replicate(self, item: WorkItem, job: JobDriver) -> ResyncResult | None:
        """The *reverse replication* job of a VM whose failback is committed.

        Its old change log cannot describe disks that now hold the replica's data, so tracking
        starts afresh and every block is compared with the newest point: only differences
        ship. The VM is *protected* again.
        """
        return self._compare_and_send(
            item, job,
            ("prepare reverse replication", "compare and send blocks", "finalize protection"),
            (S.REVERSE_REPLICATING, "failback committed"),
            (S.PROTECTED, "reverse replication complete"), full=False,
        )  # fmt: skip

    def _compare_and_send(
        self,
        item: WorkItem,
        job: JobDriver,
        tasks: tuple[str, str, str],
        enter: tuple[ReplicationState, str],
        leave: tuple[ReplicationState, str],
        *,
        full: bool,
    ) -> ResyncResult | None:
        vm = item.vm
        latest = self.vault.latest_point(vm)
        full = full or latest is None
        made: list[ResyncResult] = []

        def prepare(_: TaskHandle) -> dict[str, Any]:
            self._move(vm, *enter)
            return {"compare_with": None if full or latest is None else latest.point_id,
                    "full": full}  # fmt: skip

        def send(_: TaskHandle) -> dict[str, Any]:
            previous = None if full or latest is None else self.store.load_point(vm,
                                                                              latest.point_id)
            record = self.vault.vm(vm)
            with self._open_tracker(record, _relationship(item), resync=True) as tracker:
                record = self._refresh_disks(record, tracker)
                resyncer = Resyncer(tracker, self._store_for(item), vm,
                                    vm_config=replica_config(record.config),
                                    progress=self.progress)  # fmt: skip
                result = resyncer.run(previous)
            self._report_point(item, result, release=False)
            made.append(result)
            return result.figures()

        job.run(tasks[0], prepare)
        job.run(tasks[1], send, on_error=self._reporter(vm))
        job.run(tasks[2], lambda _: self._move(vm, *leave))
        job.finish()
        return made[0] if made else None

    # -- cycles ----------------------------------------------------------------------------

    def _initial_copy(self, item: WorkItem, record: VmRecord) -> CycleResult:
        """The full copy of every disk, reported as the first point (the lease stays)."""
        tracker = self._tracker(record, _relationship(item))
        result = self._run_cycle(item, record, tracker, None)
        self._report_point(item, result, release=False)
        return result

    def _delta(self, item: WorkItem, record: VmRecord) -> CycleResult:
        latest = self.vault.latest_point(item.vm)
        if latest is None:
            raise InputError(f"VM {item.vm} has no recovery point to continue from",
                             hint="run `siterecovery resync VM`")  # fmt: skip
        previous = self.store.load_point(item.vm, latest.point_id)
        generation = latest.figures.get("generation")
        with self._open_tracker(record, _relationship(item)) as tracker:
            check_layout(tracker.disks(), previous)  # before the change log: a new disk
            self._check_change_log(tracker)  # has none, which is not a lost one
            return self._run_cycle(
                item, record, tracker, previous,
                min_generation=generation if isinstance(generation, int) else None,
            )  # fmt: skip

    def _run_cycle(
        self,
        item: WorkItem,
        record: VmRecord,
        tracker: ChangeTracker,
        previous: PointManifest | None,
        *,
        min_generation: int | None = None,
    ) -> CycleResult:
        warnings: list[str] = []
        replicator = Replicator(
            tracker, self._store_for(item), record.name,
            vm_config=replica_config(record.config), progress=self.progress,
        )  # fmt: skip
        quiesce = self._quiesce(record, item, warnings)
        result = replicator.run_cycle(previous, quiesce=quiesce, min_generation=min_generation)
        return dataclasses.replace(result, warnings=tuple(warnings))

    def _quiesce(self, record: VmRecord, item: WorkItem, warnings: list[str]) -> Quiesce | None:
        """The guest agent's freeze when the vault says an app-consistent point is due."""
        if not item.app_consistent:
            return None
        qga = record.config.get("qga")
        return agent_quiesce(Path(str(qga)) if qga else None, warnings)

    def _store_for(self, item: WorkItem) -> ReplicaStore:
        """The store, throttled to the policy's bandwidth limit the vault gave with the work."""
        return self.store if item.limit_bps is None else throttled_store(self.store,
                                                                         item.limit_bps)

    def _check_change_log(self, tracker: ChangeTracker) -> None:
        """Raise :class:`ChangeLogTooLarge` when a disk's pending change passes the threshold."""
        sizes = {d.name: d.size for d in tracker.disks()}
        pending = tracker.pending_bytes()
        over = over_threshold(pending, sizes, self.resync_threshold)
        if over:
            shares = ", ".join(f"{d} {pending[d] / sizes[d]:.0%}" for d in over)
            raise ChangeLogTooLarge(
                f"pending change over {self.resync_threshold:.0%} of the disk size: {shares}"
            )

    # -- reports ---------------------------------------------------------------------------

    def _report_point(
        self, item: WorkItem, result: CycleResult | ResyncResult, *, release: bool
    ) -> None:
        point = result.point
        shipped = result.bytes_shipped if isinstance(result, CycleResult) else result.bytes_stored
        figures = {**result.figures(), "bandwidth_limit_bps": item.limit_bps}
        report = PointReport(point.point_id, point.created_at, point.consistency, point.key,
                             shipped, figures)  # fmt: skip
        self.vault.record_point(item.vm, report, release=release)

    def _report_failure(self, vm: str, exc: BaseException, *, release: bool) -> dict[str, Any]:
        """Diagnose ``exc`` and report it; what the task shows of it."""
        diagnosis = diagnose(exc)
        detail = exc.describe() if isinstance(exc, SiteRecoveryError) else f"{exc!r}"
        after = self.vault.record_failure(vm, FailureReport.of(diagnosis, detail),
                                          release=release)  # fmt: skip
        return {
            "error_class": str(diagnosis.error_class), "cause": diagnosis.cause,
            "attempts": after.attempts, "state": str(after.state),
            "next_retry_at": None if after.next_retry_at is None
            else after.next_retry_at.isoformat(),
        }  # fmt: skip

    def _reporter(self, vm: str) -> ErrorHook:
        """A task's error hook: the failure reported (the lease kept for the job)."""
        return lambda exc: self._report_failure(vm, exc, release=False)

    def _move(self, vm: str, state: ReplicationState, reason: str) -> dict[str, Any]:
        """Move ``vm`` to ``state`` unless it is there already (a resumed task)."""
        if self.vault.protection(vm).state != state:
            self.vault.transition(vm, state, reason)
        return {"state": str(state)}

    # -- the VM on this host ---------------------------------------------------------------

    def _tracker(self, record: VmRecord, relationship: str) -> ChangeTracker:
        qmp = _qmp_path(record)
        if not qmp.exists():
            raise _missing(record, qmp)
        return ChangeTracker(qmp, self.run_dir / record.name, relationship)

    @contextmanager
    def _open_tracker(
        self, record: VmRecord, relationship: str, *, resync: bool = False
    ) -> Iterator[ChangeTracker]:
        """The VM's tracker: over its running QEMU, or over its images when it is powered
        off cleanly (:mod:`~siterecovery.replication.offline`). A resync of a powered-off VM
        needs no clean bitmap (it starts a new one), only images nobody has open.

        Raises the QMP error ("VM not reachable", retried) when QEMU does not answer and the
        VM was not shut down cleanly, VmNotFound when neither QEMU nor its images are there.
        """
        qmp = _qmp_path(record)
        try:
            QmpSession.connect(qmp).close()
        except QmpError:
            # powered_off raises VmNotFound when the images are gone too (a deleted VM).
            if not (resync or powered_off(record, relationship)):
                if not qmp.exists():
                    raise _missing(record, qmp) from None
                raise
            with offline_tracker(record, relationship, self.run_dir / record.name) as tracker:
                yield tracker
            return
        yield ChangeTracker(qmp, self.run_dir / record.name, relationship)

    def _refresh_disks(self, record: VmRecord, tracker: ChangeTracker) -> VmRecord:
        """Record the disks the running VM has now (added, removed or resized ones), in the
        vault's disk list and in the machine description the recovery points carry."""
        if tracker.nodes is not None:
            return record  # offline: the images are the recorded ones
        found = tracker.disks()
        if {d.name: d.size for d in found} == {d.name: d.size for d in record.disks}:
            return record
        config = dict(record.config)
        known = {e.get("name"): e for e in config.get("disks", []) if isinstance(e, dict)}
        # a disk the VM still has keeps its device model, serial and options
        config["disks"] = [{**known.get(d.name, {}), "name": d.name, "size": d.size, "fmt": d.fmt}
                           for d in found]  # fmt: skip
        specs = tuple(DiskSpec(d.name, d.size, node_name=d.node, path=d.filename, fmt=d.fmt)
                      for d in found)  # fmt: skip
        self.vault.report_vms([DiscoveredVm(record.name, config, specs)])
        return self.vault.vm(record.name)

    def _check_prerequisites(self, record: VmRecord) -> dict[str, Any]:
        qmp = _qmp_path(record)
        if not qmp.exists():
            raise _missing(record, qmp)
        disks = discover_disks(qmp)
        unsupported = [d.name for d in disks if d.fmt != "qcow2"]
        if unsupported:
            raise InputError(
                f"disks {unsupported} of VM {record.name} are not qcow2: persistent change "
                "tracking needs qcow2 images",
                hint="convert them with `qemu-img convert -O qcow2` while the VM is off",
            )
        self.store.list_points(record.name)  # the store answers and its points load
        return {"disks": [d.name for d in disks], "store": self.store.url}

    def _relationship_task(self, record: VmRecord, item: WorkItem) -> dict[str, Any]:
        self._tracker(record, _relationship(item))  # the socket is there
        return {"relationship_id": item.relationship_id}


def discovered_vm(
    name: str, qmp_path: Path, config: Mapping[str, Any], qga_path: Path | None = None
) -> DiscoveredVm:
    """The VM reachable at ``qmp_path`` as a discovery report: its disks as QEMU reports
    them, and its config with the host-local sockets. InputError when it has no disk.

    The config is the machine's shape as QEMU reports it, under the keys of ``config``
    (:func:`~siterecovery.hypervisor.shape.shape_config`); ``qga_path`` replaces the guest
    agent socket the shape found.
    """
    validate_name("VM", name)
    found = discover_disks(qmp_path)
    if not found:
        raise InputError(f"VM {name} has no writable disk to protect")
    full: dict[str, Any] = {**shape_config(qmp_path, name=name, given=config),
                            "qmp": str(qmp_path)}  # fmt: skip
    if qga_path is not None:
        full["qga"] = str(qga_path)
    full.setdefault("disks", [{"name": d.name, "size": d.size, "fmt": d.fmt} for d in found])
    disks = tuple(DiskSpec(d.name, d.size, node_name=d.node, path=d.filename, fmt=d.fmt)
                  for d in found)  # fmt: skip
    return DiscoveredVm(name, full, disks)


def throttled_store(store: ReplicaStore, limit_bps: float) -> ReplicaStore:
    """A view of ``store`` whose backend is limited to ``limit_bps`` bytes per second.

    Shares everything else (codec, keys, parallelism, what the store already knows). The
    store has no public constructor from another opened store, so the copy swaps the backend
    of its context here.
    """
    backend = wrap_backend(store.backend, retry=None, limit_bps=limit_bps)
    view = copy.copy(store)
    view.backend = backend
    view._ctx = dataclasses.replace(store.context, backend=backend)
    return view


def replica_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The VM description stored in recovery points: the config without host-local keys."""
    return {k: v for k, v in config.items() if k not in HOST_LOCAL_KEYS}


def _relationship(item: WorkItem) -> str:
    """The bitmap-name form of the item's relationship id (hex, no dashes)."""
    rel = item.relationship_id or str(item.details.get("relationship_id") or "")
    if not rel:
        raise InputError(f"work on VM {item.vm} carries no replication relationship")
    return rel.replace("-", "")


def _missing(record: VmRecord, qmp: Path) -> VmNotFound:
    return VmNotFound(
        f"VM {record.name} not found on this host: its QMP socket {qmp} does not exist",
        hint="if the VM was deleted, disable protection (`siterecovery unprotect VM`); if it "
        "was moved or only shut down, start it (or register it again), then run "
        "`siterecovery resync VM`",
    )


def _qmp_path(record: VmRecord) -> Path:
    qmp = record.config.get("qmp")
    if not qmp:
        raise InputError(
            f"VM {record.name} has no QMP socket recorded",
            hint="register the VM again with its QMP socket path",
        )
    return Path(str(qmp))
