"""The state machine applied to stored replicated VMs: every allowed move works, others fail."""

from __future__ import annotations

import itertools
from collections import deque

import pytest

from siterecovery.domain import DiskSpec, Health, ReplicationState
from siterecovery.errors import InputError
from siterecovery.policies.states import TRANSITIONS, allowed_transitions
from siterecovery.vault import service
from siterecovery.vault.db import Database
from siterecovery.vault.errors import InvalidTransition, UnknownVm, VmNotProtected

S = ReplicationState
_names = itertools.count()


def path_to(target: ReplicationState) -> list[ReplicationState]:
    """The shortest list of transitions leading from *enabling protection* to ``target``."""
    parents: dict[ReplicationState, ReplicationState | None] = {S.ENABLING_PROTECTION: None}
    queue = deque([S.ENABLING_PROTECTION])
    while queue:
        state = queue.popleft()
        for nxt in sorted(allowed_transitions(state) - {S.UNPROTECTED}):
            if nxt not in parents:
                parents[nxt] = state
                queue.append(nxt)
    steps: list[ReplicationState] = []
    node: ReplicationState | None = target
    while node is not None and node != S.ENABLING_PROTECTION:
        steps.append(node)
        node = parents[node]
    return steps[::-1]


def new_vm(db: Database) -> str:
    name = f"vm{next(_names)}"
    service.upsert_vm(db, host="kvm1", name=name, config={}, disks=[DiskSpec("vda", 1 << 20)])
    return name


def vm_in(db: Database, state: ReplicationState) -> str:
    """A new VM driven through allowed transitions into ``state`` (by hand: its enable
    protection job is cancelled, as no agent runs it)."""
    vm = new_vm(db)
    if state == S.UNPROTECTED:
        return vm
    job = service.protect(db, vm=vm, policy="gold").job
    service.cancel_job(db, job=job.id, reason="the test drives the VM by hand")
    for step in path_to(state):
        service.transition(db, vm=vm, to_state=step, reason=f"test step to {step}")
    assert service.get_vm(db, name=vm).state == state
    return vm


ALLOWED = sorted((s, t) for s, targets in TRANSITIONS.items() for t in targets)


@pytest.mark.parametrize(("current", "target"), ALLOWED, ids=lambda s: str(s).replace(" ", "_"))
def test_every_allowed_transition_works(
    inventory: Database, current: ReplicationState, target: ReplicationState
) -> None:
    db = inventory
    vm = vm_in(db, current)
    if current == S.UNPROTECTED:
        service.protect(db, vm=vm, policy="gold")
    elif target == S.UNPROTECTED:
        service.unprotect(db, vm=vm)
    else:
        record = service.transition(db, vm=vm, to_state=target, reason="operator asked")
        assert record.state == target
        assert record.state_reason == "operator asked"
    assert service.get_vm(db, name=vm).state == target


FORBIDDEN = [
    (S.PROTECTED, S.COMMITTED),
    (S.PROTECTED, S.FAILED_BACK),
    (S.INITIAL_REPLICATION, S.FAILING_OVER),
    (S.TEST_FAILOVER_RUNNING, S.FAILING_OVER),
    (S.FAILED_OVER, S.PROTECTED),
    (S.COMMITTED, S.PROTECTED),
    (S.COMMITTED_BACK, S.PROTECTED),
    (S.FAILING_BACK, S.PROTECTED),
    (S.ERROR, S.COMMITTED),
]


@pytest.mark.parametrize(("current", "target"), FORBIDDEN, ids=lambda s: str(s).replace(" ", "_"))
def test_forbidden_transitions_raise_and_change_nothing(
    inventory: Database, current: ReplicationState, target: ReplicationState
) -> None:
    db = inventory
    vm = vm_in(db, current)
    before = service.get_protection(db, vm=vm)
    with pytest.raises(InvalidTransition) as raised:
        service.transition(db, vm=vm, to_state=target, reason="bad idea")
    message = str(raised.value)
    assert vm in message
    assert f"'{current}'" in message
    assert f"'{target}'" in message
    for required in raised.value.required:
        assert f"'{required}'" in message
    assert current not in raised.value.required
    assert service.get_protection(db, vm=vm) == before


def test_message_names_the_required_state(inventory: Database) -> None:
    vm = vm_in(inventory, S.PROTECTED)
    with pytest.raises(InvalidTransition) as raised:
        service.transition(inventory, vm=vm, to_state=S.COMMITTED, reason="x")
    assert str(raised.value) == (
        f"VM {vm!r} is 'protected': cannot move it to 'committed'; "
        "it must be 'failed over' or 'failing back'"
    )
    assert raised.value.required == {S.FAILED_OVER, S.FAILING_BACK}


def test_protect_twice_is_an_invalid_transition(inventory: Database) -> None:
    service.protect(inventory, vm="web1", policy="gold")
    with pytest.raises(
        InvalidTransition,
        match="VM 'web1' is 'enabling protection': cannot protect it; it must be 'unprotected'",
    ):
        service.protect(inventory, vm="web1", policy="gold")
    assert len(service.list_jobs(inventory, vm="web1")) == 1


@pytest.mark.parametrize("state", [S.FAILING_OVER, S.FAILED_OVER, S.RESYNCING, S.FAILING_BACK])
def test_unprotect_refused_during_recovery(inventory: Database, state: ReplicationState) -> None:
    vm = vm_in(inventory, state)
    with pytest.raises(InvalidTransition, match=f"VM '{vm}' is '{state}': cannot unprotect it"):
        service.unprotect(inventory, vm=vm)
    assert service.get_protection(inventory, vm=vm).state == state


def test_transition_of_unprotected_vm(inventory: Database) -> None:
    with pytest.raises(
        InvalidTransition,
        match="VM 'web1' is 'unprotected': cannot move it to 'protected'; it must be 'error', ",
    ):
        service.transition(inventory, vm="web1", to_state=S.PROTECTED, reason="x")
    with pytest.raises(VmNotProtected, match="web1"):
        service.get_protection(inventory, vm="web1")
    with pytest.raises(UnknownVm, match="ghost"):
        service.transition(inventory, vm="ghost", to_state=S.PROTECTED, reason="x")


@pytest.mark.parametrize("target", [S.UNPROTECTED, S.ENABLING_PROTECTION, "sleeping"])
def test_transition_targets_reserved_or_unknown(inventory: Database, target: str) -> None:
    service.protect(inventory, vm="web1", policy="gold")
    with pytest.raises(InputError):
        service.transition(inventory, vm="web1", to_state=target, reason="x")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="reason"):
        service.transition(inventory, vm="web1", to_state=S.INITIAL_REPLICATION, reason=" ")
    assert service.get_protection(inventory, vm="web1").state == S.ENABLING_PROTECTION


def test_state_side_effects(inventory: Database) -> None:
    db = inventory
    vm = vm_in(db, S.PROTECTED)
    resync = service.transition(db, vm=vm, to_state=S.RESYNC_REQUIRED, reason="bitmap lost")
    assert resync.resync_required_reason == "bitmap lost"
    assert resync.health == Health.WARNING
    service.transition(db, vm=vm, to_state=S.RESYNCING, reason="window opened")
    back = service.transition(db, vm=vm, to_state=S.PROTECTED, reason="resync done")
    assert back.resync_required_reason is None
    failed = service.transition(db, vm=vm, to_state=S.ERROR, reason="authentication failed")
    assert failed.last_error == "authentication failed"
    assert failed.health == Health.CRITICAL
    cleared = service.transition(db, vm=vm, to_state=S.PROTECTED, reason="credential fixed")
    assert (cleared.last_error, cleared.error_class, cleared.attempts) == (None, None, 0)
