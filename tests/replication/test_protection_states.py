"""States that heal, on a real QEMU VM: every refusal changes nothing, every state has a way out.

- a failed prerequisite (the VM's QMP socket is gone) leaves the VM *unprotected*, the error
  in the job; ``protect`` works once the VM is back;
- a protected VM is never re-pointed at another QMP socket;
- ``unprotect`` is refused while a job of the VM is open, naming it; otherwise it stops
  change tracking (the bitmaps are removed) and the VM is *unprotected*;
- a drill does not stop replication: the vault's scheduler still hands out cycles.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from siterecovery.agent.loop import Runner
from siterecovery.domain import JobState
from siterecovery.domain import ReplicationState as S
from siterecovery.hypervisor.errors import VmNotFound
from siterecovery.hypervisor.process import qmp_execute
from siterecovery.policies.schedule import Action
from siterecovery.vault import jobs, operations, points, service
from siterecovery.vault.errors import Conflict

from .test_resync import VmRig, make_rig

pytestmark = pytest.mark.qemu


@pytest.fixture
def rig(tmp_path: Path) -> VmRig:
    made = make_rig(tmp_path, model=False)
    yield made
    made.stop()
    made.db.close()


def _bitmaps(rig: VmRig) -> list[str]:
    assert rig.vm is not None
    nodes = qmp_execute(rig.vm.qmp_path, "query-named-block-nodes", {"flat": True})
    return sorted(b["name"] for n in nodes if n.get("node-name") in rig.sizes
                  for b in n.get("dirty-bitmaps", []))  # fmt: skip


def test_a_missing_socket_leaves_the_vm_unprotected_and_protect_works_later(rig: VmRig) -> None:
    assert rig.vm is not None
    rig.protection.register_vm(host="h1", name="vm1", qmp_path=rig.vm.qmp_path, config={})
    rig.stop()
    with pytest.raises(VmNotFound, match="QMP socket"):
        rig.protection.enable_protection("vm1", "gold")
    assert service.get_vm(rig.db, name="vm1").state == S.UNPROTECTED
    (job,) = jobs.list_jobs(rig.db, vm="vm1")
    assert job.state == JobState.FAILED
    task = job.task("check prerequisites")
    assert task.state == JobState.FAILED and task.error and "does not exist" in task.error
    rig.start()
    done, initial = rig.protection.enable_protection("vm1", "gold")
    assert done.state == JobState.SUCCEEDED and initial.point.point_id
    assert rig.state() == S.PROTECTED


def test_a_protected_vm_is_not_repointed_at_another_socket(rig: VmRig, tmp_path: Path) -> None:
    rig.protect()
    assert rig.vm is not None
    other = tmp_path / "other.qmp"
    other.symlink_to(rig.vm.qmp_path)  # another path: as another VM's socket would be
    before = service.get_vm(rig.db, name="vm1")
    with pytest.raises(Conflict, match="re-pointed at another QMP socket"):
        rig.protection.register_vm(host="h1", name="vm1", qmp_path=other, config={})
    assert service.get_vm(rig.db, name="vm1") == before


def test_unprotect_is_refused_while_a_job_runs_then_removes_tracking(rig: VmRig) -> None:
    rig.protect()
    assert _bitmaps(rig), "protection adds a bitmap per disk"
    job = operations.request_resync(rig.db, vm="vm1", reason="disk replaced")
    with pytest.raises(Conflict, match=f"open resynchronize job {job.id}"):
        rig.protection.unprotect("vm1")
    assert rig.state() == S.RESYNC_REQUIRED
    jobs.cancel_job(rig.db, job=job.id, reason="the operator changed their mind")
    done = rig.protection.unprotect("vm1")
    assert done.state == JobState.SUCCEEDED
    assert done.task("stop replication").details == {"bitmaps_removed": True}
    assert service.get_vm(rig.db, name="vm1").state == S.UNPROTECTED
    assert _bitmaps(rig) == []


def test_cycles_go_on_during_a_drill(rig: VmRig) -> None:
    rig.protect()
    service.transition(rig.db, vm="vm1", to_state=S.TEST_FAILOVER_RUNNING, reason="drill")
    before = len(points.list_points(rig.db, vm="vm1"))
    rig.clock.advance(seconds=31)
    (outcome,) = Runner(rig.protection).run_due()
    assert (outcome.action, outcome.ok) == (Action.CYCLE, True), outcome
    assert len(points.list_points(rig.db, vm="vm1")) == before + 1
    assert rig.state() == S.TEST_FAILOVER_RUNNING
