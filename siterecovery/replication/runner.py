"""The agent's replication loop: run what :func:`scheduler.decide` says is due, VM by VM.

:meth:`Runner.run_due` looks at every protected VM (of one host, or all), asks the pure
scheduler what is due at the vault clock's ``now``, and runs it: a delta cycle, a retry (the
same cycle, or the initial copy when that is what failed), or a resync. Failures are already
recorded by :class:`EmbeddedAgent` (error, class, attempts, next retry, state); the loop
reports them in its outcomes and goes on with the next VM, so one VM never stops another.

VMs run in parallel: at most ``parallel`` at once, and only while the sum of their memory
estimates (:func:`~siterecovery.replication.engine.cycle_memory`, from their disk count)
stays within ``memory_budget`` bytes. A VM whose estimate alone exceeds the budget runs when
nothing else does. Outcomes are returned in schedule order (by VM name).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from siterecovery.agent.embedded import EmbeddedAgent
from siterecovery.domain import ReplicationState
from siterecovery.errors import InputError, SiteRecoveryError
from siterecovery.policies.retry import diagnose
from siterecovery.policies.schedule import Action, Due, VmSchedule, decide
from siterecovery.replication.engine import cycle_memory
from siterecovery.replication.maintenance import Maintenance, MaintenanceOutcome
from siterecovery.vault import service
from siterecovery.vault.records import ReplicatedVmRecord

S = ReplicationState


@dataclass(frozen=True)
class Outcome:
    """What one due action did: ``ok``, and either a summary or the error it recorded."""

    vm: str
    action: Action
    ok: bool
    summary: str


#: Default memory the runner lets concurrent cycles use.
MEMORY_BUDGET = 512 << 20


class MemoryBudget:
    """A counting budget of bytes: :meth:`hold` blocks until ``n`` bytes fit.

    A request larger than the whole budget is granted when nothing else is held, so a large
    VM runs alone instead of never.
    """

    def __init__(self, total: int) -> None:
        if total <= 0:
            raise InputError(f"memory budget must be positive, got {total}")
        self.total = total
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, n: int) -> Iterator[None]:
        n = max(0, n)
        with self._cond:
            self._cond.wait_for(lambda: self.used == 0 or self.used + n <= self.total)
            self.used += n
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= n
                self._cond.notify_all()


class Runner:
    """Runs due cycles, retries and resyncs for the VMs of ``host`` (None: every host),
    up to ``parallel`` VMs at once within ``memory_budget`` bytes."""

    def __init__(
        self,
        protection: EmbeddedAgent,
        *,
        host: str | None = None,
        parallel: int = 2,
        memory_budget: int = MEMORY_BUDGET,
        maintenance: Maintenance | None = None,
    ) -> None:
        if parallel < 1:
            raise InputError(f"parallel must be at least 1, got {parallel}")
        self.protection = protection
        self.db = protection.db
        self.host = host
        self.parallel = parallel
        self.budget = MemoryBudget(memory_budget)
        self.maintenance = maintenance

    def schedule(self) -> list[tuple[ReplicatedVmRecord, Due]]:
        """Every VM of this runner with what is due for it, by VM name."""
        now = self.db.now()
        hosts = {v.name: v.host for v in service.list_vms(self.db)}
        result = []
        for record in service.list_protected(self.db):
            if self.host is None or hosts.get(record.vm) == self.host:
                result.append((record, decide(self._inputs(record), now)))
        return result

    def run_due(self) -> list[Outcome]:
        """Run every action that is due now, VMs in parallel; never raises for a VM."""
        now = self.db.now()
        due = [(record, d) for record, d in self.schedule() if d.ready(now)]
        if self.parallel == 1 or len(due) <= 1:
            return [self._run_budgeted(record, d) for record, d in due]
        with ThreadPoolExecutor(self.parallel, thread_name_prefix="sr-vm") as pool:
            futures = [pool.submit(self._run_budgeted, record, d) for record, d in due]
            return [f.result() for f in futures]

    def _run_budgeted(self, record: ReplicatedVmRecord, due: Due) -> Outcome:
        with self.budget.hold(self._estimate(record.vm)):
            return self._run(record, due)

    def _estimate(self, vm: str) -> int:
        try:
            disks = len(service.get_vm(self.db, name=vm).disks)
        except SiteRecoveryError:
            disks = 1
        return cycle_memory(disks, self.protection.store)

    def run_forever(
        self,
        stop: threading.Event,
        *,
        tick_s: float = 5.0,
        report: Callable[[Outcome], None] | None = None,
        on_maintenance: Callable[[MaintenanceOutcome], None] | None = None,
    ) -> None:
        """Call :meth:`run_due` every ``tick_s`` seconds until ``stop`` is set."""
        self.resume_interrupted()
        while not stop.is_set():
            for outcome in self.run_due():
                if report is not None:
                    report(outcome)
            for done in self.run_maintenance():
                if on_maintenance is not None:
                    on_maintenance(done)
            stop.wait(tick_s)

    def run_maintenance(self) -> list[MaintenanceOutcome]:
        """Prune, compact and collect garbage when due (see :mod:`.maintenance`)."""
        if self.maintenance is None:
            return []
        return self.maintenance.run_due([record.vm for record, _ in self.schedule()])

    def resume_interrupted(self) -> list[str]:
        """VMs left *resyncing* by a stopped agent go back to *resync required* (one agent
        per host, so nothing else runs them); returns their names."""
        names = []
        for record, _ in self.schedule():
            if record.state == S.RESYNCING:
                service.transition(
                    self.db, vm=record.vm, to_state=S.RESYNC_REQUIRED,
                    reason="the resync was interrupted by an agent restart",
                )  # fmt: skip
                names.append(record.vm)
        return names

    def _run(self, record: ReplicatedVmRecord, due: Due) -> Outcome:
        try:
            return Outcome(record.vm, due.action, True, self._act(record, due.action))
        except SiteRecoveryError as exc:
            return Outcome(record.vm, due.action, False, f"{diagnose(exc).cause}: {exc}")
        except Exception as exc:  # recorded by the service; the loop must go on
            return Outcome(record.vm, due.action, False, f"{diagnose(exc).cause}: {exc!r}")

    def _act(self, record: ReplicatedVmRecord, action: Action) -> str:
        vm = record.vm
        if action == Action.RESYNC:
            job, result = self.protection.resync(vm, reason=record.resync_required_reason
                                                 or "resync required")  # fmt: skip
            if result is None:
                return f"resync job {job.id[:8]} resumed and finished"
            return (
                f"resync job {job.id[:8]}: {result.blocks_sent}/{result.blocks_compared} "
                f"blocks sent ({result.bytes_sent} bytes) in {result.duration_s:.2f} s"
            )
        cycle = self.protection.replicate(vm)  # or the retried initial copy
        return f"point {cycle.point.point_id}: {cycle.bytes_read} bytes read"

    def _inputs(self, record: ReplicatedVmRecord) -> VmSchedule:
        policy = service.get_policy(self.db, name=record.policy)
        return VmSchedule(
            state=record.state,
            copy_frequency_s=policy.copy_frequency_s,
            resync_window=policy.resync_window,
            last_cycle_at=record.last_cycle_at,
            error_class=record.error_class,
            next_retry_at=record.next_retry_at,
        )
