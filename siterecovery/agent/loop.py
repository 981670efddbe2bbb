"""``siterecovery run``: the embedded default's agent loop, on the vault's own schedule.

:meth:`Runner.run_due` claims what the vault says is due for the hosts of the embedded vault
(:func:`siterecovery.vault.work.claim_work`, the very function behind ``/v1/agent/claims``:
a cycle one copy interval after the last, a retry on the seed's backoff, a resync inside the
policy's window, and any open job an interrupted command left behind, resumed) and runs each
piece with the agent's worker (:class:`~siterecovery.agent.worker.Worker`) in this process.
Nothing here decides what is due: there is one scheduler, in the vault.

VMs run in parallel: at most ``parallel`` at once, and only while the sum of their memory
estimates (:func:`~siterecovery.replication.engine.cycle_memory`, from their disk count)
stays within ``memory_budget`` bytes. A VM whose estimate alone exceeds the budget runs when
nothing else does. Failures are recorded in the vault by the services; the loop reports them
in its outcomes and goes on with the next VM, so one VM never stops another. Outcomes are in
claim order.

:meth:`Runner.schedule` is a read-only preview of the same rules for display and tests.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from siterecovery.agent.embedded import LEASE_S, EmbeddedAgent
from siterecovery.errors import InputError, SiteRecoveryError
from siterecovery.policies.retry import diagnose
from siterecovery.policies.schedule import Action, Due, VmSchedule, decide
from siterecovery.replication.engine import cycle_memory
from siterecovery.replication.maintenance import Maintenance, MaintenanceOutcome
from siterecovery.vault import service
from siterecovery.vault.db import Database
from siterecovery.vault.port import LocalVaultPort
from siterecovery.vault.records import ReplicatedVmRecord
from siterecovery.vault.work import CYCLE, MAX_CLAIM, WorkItem


@dataclass(frozen=True)
class Outcome:
    """What one piece of due work did: ``ok``, and either a summary or the error it recorded.

    ``action`` is :class:`Action` for cycles, retries and resyncs, else the job's kind."""

    vm: str
    action: str
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
    """Runs the due work of ``host`` (None: every host of the vault) through ``agent``'s
    worker, up to ``parallel`` VMs at once within ``memory_budget`` bytes."""

    def __init__(
        self,
        agent: EmbeddedAgent,
        *,
        host: str | None = None,
        parallel: int = 2,
        memory_budget: int = MEMORY_BUDGET,
        maintenance: Maintenance | None = None,
    ) -> None:
        if parallel < 1:
            raise InputError(f"parallel must be at least 1, got {parallel}")
        self.agent = agent
        self.db = agent.db
        self.host = host
        self.parallel = parallel
        self.budget = MemoryBudget(memory_budget)
        self.maintenance = maintenance

    def hosts(self) -> list[str]:
        """The hosts this runner claims for."""
        if self.host is not None:
            return [self.host]
        return sorted({vm.host for vm in service.list_vms(self.db)})

    def claim(self) -> list[WorkItem]:
        """Lease everything due now for this runner's hosts to its session."""
        items: list[WorkItem] = []
        for host in self.hosts():
            port = LocalVaultPort(self.db, host=host, session=self.agent.session)
            items += port.claim(limit=MAX_CLAIM, lease_s=LEASE_S)
        return items

    def run_due(self) -> list[Outcome]:
        """Claim and run everything due now, VMs in parallel; never raises for a VM."""
        items = self.claim()
        if self.parallel == 1 or len(items) <= 1:
            return [self._run_budgeted(item) for item in items]
        with ThreadPoolExecutor(self.parallel, thread_name_prefix="sr-vm") as pool:
            return list(pool.map(self._run_budgeted, items))

    def schedule(self) -> list[tuple[ReplicatedVmRecord, Due]]:
        """Every VM of this runner with what the vault's rules say is due, by VM name."""
        now = self.db.now()
        hosts = {v.name: v.host for v in service.list_vms(self.db)}
        return [(record, decide(_inputs(self.db, record), now))
                for record in service.list_protected(self.db)
                if self.host is None or hosts.get(record.vm) == self.host]  # fmt: skip

    def run_forever(
        self,
        stop: threading.Event,
        *,
        tick_s: float = 5.0,
        report: Callable[[Outcome], None] | None = None,
        on_maintenance: Callable[[MaintenanceOutcome], None] | None = None,
    ) -> None:
        """Call :meth:`run_due` every ``tick_s`` seconds until ``stop`` is set."""
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

    def _run_budgeted(self, item: WorkItem) -> Outcome:
        with self.budget.hold(self._estimate(item.vm)):
            return self._run(item)

    def _estimate(self, vm: str) -> int:
        try:
            disks = len(service.get_vm(self.db, name=vm).disks)
        except SiteRecoveryError:
            disks = 1
        return cycle_memory(disks, self.agent.store)

    def _run(self, item: WorkItem) -> Outcome:
        action = _action(item)
        try:
            return Outcome(item.vm, action, True, self._act(item))
        except SiteRecoveryError as exc:
            return Outcome(item.vm, action, False, f"{diagnose(exc).cause}: {exc}")
        except Exception as exc:  # recorded by the service; the loop must go on
            return Outcome(item.vm, action, False, f"{diagnose(exc).cause}: {exc!r}")

    def _act(self, item: WorkItem) -> str:
        worker = self.agent.worker_of(item)
        if item.kind != CYCLE:
            worker.run_or_raise(item)
            return f"{item.kind} job {str(item.job_id)[:8]} done"
        with worker.leased(item):
            cycle = worker.protection.cycle(item)
        return f"point {cycle.point.point_id}: {cycle.bytes_read} bytes read"


def _action(item: WorkItem) -> str:
    if item.kind == CYCLE:
        return Action.RETRY if item.retry else Action.CYCLE
    return Action.RESYNC if item.kind == "resynchronize" else item.kind


def _inputs(db: Database, record: ReplicatedVmRecord) -> VmSchedule:
    policy = service.get_policy(db, name=record.policy)
    return VmSchedule(
        state=record.state, copy_frequency_s=policy.copy_frequency_s,
        resync_window=policy.resync_window, last_cycle_at=record.last_cycle_at,
        error_class=record.error_class, next_retry_at=record.next_retry_at,
    )  # fmt: skip
