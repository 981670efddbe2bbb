"""What an agent runs for the work it claims, reporting everything through the vault API.

- ``enable protection``: the seed's four tasks (check prerequisites, create replication
  relationship, start initial replication, finalize protection). **Resumable**: tasks the
  vault shows as succeeded are skipped, a task left *running* by a previous agent process is
  run again (each is safe to repeat: the initial copy makes a fresh point, and a recovery
  point exists only once its manifest is written, so nothing half-made is ever recorded).
- ``cycle``: one delta cycle on top of the newest recovery point; the point and its figures
  (duration, bytes read, bytes shipped, extents) are reported, or the failure with its class.
  An untrusted change log asks the vault for a resync.
- ``disable protection``: stop change tracking (remove this relationship's bitmaps); replica
  data is left to the store's retention and garbage collection.
- ``resynchronize``: for a VM in *resync required*, in its policy's window or when an operator
  asked: the differing blocks are sent (:class:`~siterecovery.replication.resync.Resyncer`),
  the point is reported, the VM is *protected* again.
- failover jobs: see :mod:`siterecovery.agent.failover_tasks` (the source phases of a planned
  failover run here; everything else on a recovery host).

Data goes from the hypervisor to the replica store directly; the vault only gets records.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from siterecovery.api.client import VaultClient
from siterecovery.domain import ReplicationState
from siterecovery.errors import InputError, SiteRecoveryError
from siterecovery.hypervisor.errors import BitmapError
from siterecovery.hypervisor.tracking import ChangeTracker, discover_disks
from siterecovery.replication.engine import CycleResult, Replicator
from siterecovery.replication.protection import replica_config
from siterecovery.replication.resync import Resyncer, ResyncResult
from siterecovery.store.manifest import PointManifest
from siterecovery.store.repository import ReplicaStore

if TYPE_CHECKING:
    from siterecovery.agent.failover_tasks import RecoveryWork

log = logging.getLogger("siterecovery.agent")
S = ReplicationState


@dataclass(frozen=True)
class Claimed:
    """A claimed piece of work as the vault handed it out (``/v1/agent/claims``)."""

    kind: str
    vm: str
    relationship_id: str | None
    job_id: str | None
    resumed: bool
    details: dict[str, Any]

    @classmethod
    def of(cls, doc: dict[str, Any]) -> Claimed:
        return cls(
            kind=doc["kind"], vm=doc["vm"], relationship_id=doc.get("relationship_id"),
            job_id=doc.get("job_id"), resumed=bool(doc.get("resumed")),
            details=dict(doc.get("details") or {}),
        )  # fmt: skip


class WorkRunner:
    """Runs claimed work of one host. ``session`` is this agent process's claim session."""

    def __init__(
        self,
        client: VaultClient,
        store: ReplicaStore,
        run_dir: Path,
        session: str,
        lease_s: int,
        *,
        recovery: RecoveryWork | None = None,
    ) -> None:
        self.client = client
        self.store = store
        self.run_dir = run_dir
        self.session = session
        self.lease_s = lease_s
        self.recovery = recovery

    def handlers(self) -> dict[str, Callable[[Claimed], None]]:
        """Work kind → what runs it (failover follow-ups only on a recovery host)."""
        handlers: dict[str, Callable[[Claimed], None]] = {
            "cycle": self.cycle,
            "enable protection": self.enable_protection,
            "disable protection": self.disable_protection,
            "resynchronize": self.resync,
            "test failover": self.failover,
            "planned failover": self.failover,
            "unplanned failover": self.failover,
        }
        if self.recovery is not None:
            handlers["test failover cleanup"] = self.recovery.cleanup
            handlers["change recovery point"] = self.recovery.change_point
            handlers["commit failover"] = self.recovery.commit
        return handlers

    def run(self, item: Claimed) -> None:
        """Run ``item`` to its end; every outcome is reported to the vault, none raised."""
        handler = self.handlers().get(item.kind)
        if handler is None:
            log.warning("ignoring unknown work %r for VM %s", item.kind, item.vm)
            return
        with self._keep_lease(item.vm):
            try:
                handler(item)
            except SiteRecoveryError as exc:
                log.warning("%s of VM %s failed: %s", item.kind, item.vm, exc.describe())

    # -- cycle ---------------------------------------------------------------------------

    def cycle(self, item: Claimed) -> None:
        """One delta cycle of a protected VM; the point or the failure goes to the vault."""
        vm = self.client.get(f"/v1/agent/vms/{item.vm}")
        protection = self.client.get(f"/v1/agent/vms/{item.vm}/protection")
        try:
            latest = protection.get("last_point_id")
            if not latest:
                raise InputError(f"VM {item.vm} has no recovery point to continue from")
            previous = self.store.load_point(item.vm, latest)
            result = self._run_cycle(vm, protection["relationship_id"], previous)
        except SiteRecoveryError as exc:
            self._report_failure(item.vm, exc)
            raise
        self._report_point(item.vm, result, release=True)

    # -- enable protection ---------------------------------------------------------------

    def enable_protection(self, item: Claimed) -> None:
        """The enable protection job, resumed where the vault says it stands."""
        assert item.job_id is not None
        job = RemoteJob(self.client, item.job_id, self.session)
        vm = self.client.get(f"/v1/agent/vms/{item.vm}")
        relationship = str(item.details.get("relationship_id") or item.relationship_id)

        def initial_copy() -> dict[str, Any]:
            # Inside the task: a VM that cannot enter initial replication fails the task, and
            # with it the job, instead of leaving the job open to be claimed again and again.
            self._move(item.vm, S.INITIAL_REPLICATION, "initial copy started")
            cycle = self._run_cycle(vm, relationship, None)
            self._report_point(item.vm, cycle, release=False)
            return cycle.figures()

        try:
            job.run("check prerequisites", lambda: self._check_prerequisites(vm))
            job.run("create replication relationship", lambda: {"relationship_id": relationship})
            job.run("start initial replication", initial_copy)
            job.run(
                "finalize protection",
                lambda: self._move(item.vm, S.PROTECTED, "initial replication complete"),
            )
        except SiteRecoveryError as exc:
            self._report_failure(item.vm, exc, release=False)
            job.release()
            raise
        job.finish()
        log.info("VM %s protected", item.vm)

    def _move(self, vm: str, state: S, reason: str) -> dict[str, Any]:
        current = self.client.get(f"/v1/agent/vms/{vm}/protection")["state"]
        if current != state:
            self.client.post(f"/v1/agent/vms/{vm}/transition",
                             {"to_state": state.value, "reason": reason})  # fmt: skip
        return {"state": state.value}

    # -- disable protection --------------------------------------------------------------

    def disable_protection(self, item: Claimed) -> None:
        """Stop tracking the VM's changes; replica data is left to retention and GC."""
        assert item.job_id is not None
        job = RemoteJob(self.client, item.job_id, self.session)
        vm = self.client.get(f"/v1/agent/vms/{item.vm}")
        relationship = str(item.details.get("relationship_id", ""))

        def stop() -> dict[str, Any]:
            self._tracker(vm, relationship).stop_tracking()
            return {"bitmaps_removed": True}

        try:
            job.run("stop replication", stop)
            job.run("remove replication relationship", lambda: {"relationship_id": relationship})
            job.run("remove replica data", lambda: {"left_for_gc": True})
        except SiteRecoveryError:
            job.release()
            raise
        job.finish()

    # -- resync --------------------------------------------------------------------------

    def resync(self, item: Claimed) -> None:
        """The *resynchronize* job: compare every block with the store's checksums, send the
        differing ones, publish a point, back to *protected* with a fresh change log.

        A failure is reported like a cycle's: the vault moves the VM back to *resync
        required* (retried in the window) or to *error*.
        """
        assert item.job_id is not None
        job = RemoteJob(self.client, item.job_id, self.session)
        vm = self.client.get(f"/v1/agent/vms/{item.vm}")
        protection = self.client.get(f"/v1/agent/vms/{item.vm}/protection")
        latest = protection.get("last_point_id")
        full = bool(item.details.get("full")) or not latest

        def prepare() -> dict[str, Any]:
            self._move(item.vm, S.RESYNCING, str(item.details.get("reason") or "resync"))
            return {"compare_with": None if full else latest, "full": full}

        def compare() -> dict[str, Any]:
            previous = None if full else self.store.load_point(item.vm, str(latest))
            tracker = self._tracker(vm, protection["relationship_id"])
            resyncer = Resyncer(
                tracker, self.store, item.vm, vm_config=replica_config(vm["config"])
            )
            result = resyncer.run(previous)
            self._report_point(item.vm, result, release=False)
            return result.figures()

        try:
            job.run("prepare resync", prepare)
            job.run("compare and send blocks", compare)
            job.run("finalize resync", lambda: self._move(item.vm, S.PROTECTED, "resync complete"))
        except SiteRecoveryError as exc:
            self._report_failure(item.vm, exc, release=False)
            job.release()
            raise
        job.finish()

    # -- failover ------------------------------------------------------------------------

    def failover(self, item: Claimed) -> None:
        """A failover job: its source phases here (planned), the rest on a recovery host."""
        from siterecovery.agent.failover_tasks import source_finish, source_phase

        assert item.job_id is not None
        phase = item.details.get("phase")
        if phase in ("source", "source-finish"):
            job = RemoteJob(self.client, item.job_id, self.session)
            vm = self.client.get(f"/v1/agent/vms/{item.vm}")
            if phase == "source-finish":
                return source_finish(job, item, _qmp_path(vm))
            return source_phase(job, item, _qmp_path(vm), lambda: self._final_cycle(vm))
        if self.recovery is None:
            raise InputError(f"host of VM {item.vm} is not a recovery host: it cannot fail over")
        return self.recovery.failover(item)

    def _final_cycle(self, vm: dict[str, Any]) -> str:
        protection = self.client.get(f"/v1/agent/vms/{vm['name']}/protection")
        latest = protection.get("last_point_id")
        if not latest:
            raise InputError(f"VM {vm['name']} has no recovery point to continue from")
        previous = self.store.load_point(vm["name"], latest)
        result = self._run_cycle(vm, protection["relationship_id"], previous)
        self._report_point(vm["name"], result, release=False)
        return result.point.point_id

    # -- internals -----------------------------------------------------------------------

    def _tracker(self, vm: dict[str, Any], relationship: str) -> ChangeTracker:
        hexid = relationship.replace("-", "")
        return ChangeTracker(_qmp_path(vm), self.run_dir / vm["name"], hexid)

    def _run_cycle(
        self, vm: dict[str, Any], relationship: str, previous: PointManifest | None
    ) -> CycleResult:
        tracker = self._tracker(vm, relationship)
        replicator = Replicator(tracker, self.store, vm["name"],
                                vm_config=replica_config(vm["config"]))  # fmt: skip
        return replicator.run_cycle(previous)

    def _check_prerequisites(self, vm: dict[str, Any]) -> dict[str, Any]:
        disks = discover_disks(_qmp_path(vm))
        unsupported = [d.name for d in disks if d.fmt != "qcow2"]
        if unsupported:
            raise InputError(
                f"disks {unsupported} of VM {vm['name']} are not qcow2: persistent change "
                "tracking needs qcow2 images",
                hint="convert them with `qemu-img convert -O qcow2` while the VM is off",
            )
        self.store.list_points(vm["name"])
        return {"disks": [d.name for d in disks], "store": self.store.url}

    def _report_point(self, vm: str, result: CycleResult | ResyncResult, *, release: bool) -> None:
        point = {
            "point_id": result.point.point_id,
            "created_at": result.point.created_at.isoformat(),
            "consistency": str(result.point.consistency),
            "manifest_key": result.point.key,
            "bytes_shipped": _shipped(result),
            "figures": result.figures(),
        }
        body = {"session": self.session, "point": point, "release_lease": release}
        self.client.post(f"/v1/agent/vms/{vm}/cycles", body)

    def _report_failure(self, vm: str, exc: SiteRecoveryError, *, release: bool = True) -> None:
        failure = {"message": exc.describe()[:10_000], "recoverable": exc.recoverable,
                   "resync": isinstance(exc, BitmapError)}  # fmt: skip
        body = {"session": self.session, "failure": failure, "release_lease": release}
        try:
            self.client.post(f"/v1/agent/vms/{vm}/cycles", body)
        except SiteRecoveryError as report_exc:
            log.error("could not report the failure of VM %s: %s", vm, report_exc.describe())

    @contextmanager
    def _keep_lease(self, vm: str) -> Iterator[None]:
        """Extend the VM's lease every third of its length while the work runs."""
        done = threading.Event()

        def keep() -> None:
            while not done.wait(self.lease_s / 3):
                try:
                    body = {"session": self.session, "lease_s": self.lease_s}
                    self.client.post(f"/v1/agent/vms/{vm}/lease", body)
                except SiteRecoveryError as exc:
                    log.warning("could not extend the lease of VM %s: %s", vm, exc)

        thread = threading.Thread(target=keep, name=f"lease-{vm}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()


class RemoteJob:
    """A vault job driven over the API, resuming from the tasks' recorded states."""

    def __init__(self, client: VaultClient, job_id: str, session: str) -> None:
        self.client = client
        self.job_id = job_id
        self.session = session
        self.states = {t["name"]: t["state"] for t in client.get(self._path)["tasks"]}

    @property
    def _path(self) -> str:
        return f"/v1/agent/jobs/{self.job_id}"

    def run(
        self,
        name: str,
        body: Callable[[], dict[str, Any] | None],
        *,
        fail: bool = True,
        failed: list[str] | None = None,
    ) -> None:
        """Run task ``name`` with ``body`` (its details) unless the vault shows it succeeded.

        A task left *running* by an earlier agent process is run again without restarting.
        On error the task is failed (and with it the job), or with ``fail=False`` left
        running with the error in its details and its name appended to ``failed`` (another
        agent fails it later: the hand-off of a planned failover).
        """
        state = self.states.get(name)
        if state in ("succeeded", "skipped"):
            return
        if state == "pending":
            self._start(name)
        try:
            details = body() or {}
        except SiteRecoveryError as exc:
            if fail:
                self._event(name, "fail", error=exc.describe()[:10_000])
            else:
                self._event(name, "progress", details={"error": exc.describe()[:4000]})
                self.states[name] = "running"
                if failed is not None:
                    failed.append(name)
            raise
        self._event(name, "finish", details=details)

    def fail(self, name: str, error: str) -> None:
        """Fail task ``name`` (pending or running): the job fails with ``error``."""
        self._event(name, "fail", error=error[:10_000])

    def hand_off(self, phase: str, details: dict[str, Any]) -> None:
        """Hand the job to the other site's agent (``recovery`` / ``source-finish``)."""
        body = {"session": self.session, "phase": phase, "details": details}
        self.client.post(f"{self._path}/handoff", body)

    def _start(self, name: str) -> None:
        """Start task ``name``; tolerate a start the vault recorded but whose answer was lost.

        The client retries requests while the vault is unreachable, so a start that the vault
        committed just before it went away is sent twice; the second finds the task running.
        """
        try:
            self._event(name, "start")
        except SiteRecoveryError:
            tasks = {t["name"]: t["state"] for t in self.client.get(self._path)["tasks"]}
            if tasks.get(name) != "running":
                raise
            self.states[name] = "running"

    def _event(self, name: str, action: str, **extra: Any) -> None:
        self.client.post(f"{self._path}/tasks/{name}", {"action": action, **extra})
        self.states[name] = {"start": "running", "finish": "succeeded"}.get(action, "failed")

    def finish(self) -> None:
        self.client.post(f"{self._path}/finish", {"session": self.session})

    def release(self) -> None:
        self.client.post(f"{self._path}/release", {"session": self.session})


def _shipped(result: CycleResult | ResyncResult) -> int:
    return result.bytes_stored if isinstance(result, ResyncResult) else result.bytes_shipped


def _qmp_path(vm: dict[str, Any]) -> Path:
    qmp = vm.get("config", {}).get("qmp")
    if not qmp:
        raise InputError(f"VM {vm.get('name')} has no QMP socket recorded")
    return Path(str(qmp))
