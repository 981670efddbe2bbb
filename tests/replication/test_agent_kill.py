"""An agent killed at any step of a cycle loses no change and leaves nothing behind.

For each named step of a cycle (:data:`~siterecovery.replication.engine.CYCLE_STEPS`), a child
process runs a delta cycle of the VM through the real path and stops at that step (its step
hook signals the test and sleeps); the test SIGKILLs it there, writes more, and runs the next
cycle in-process through :class:`EmbeddedAgent`. That point must restore byte for byte to
the model, and QEMU must hold no export, job, fleecing node or extra bitmap of the dead cycle.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from siterecovery.hypervisor.process import qmp_execute
from siterecovery.replication.engine import CYCLE_STEPS
from siterecovery.vault import points, service

from .test_resync import MiB, VmRig, make_rig

pytestmark = pytest.mark.qemu

CHILD = r"""
import json, sys, time
from pathlib import Path
from siterecovery.hypervisor.tracking import ChangeTracker
from siterecovery.replication.engine import Replicator
from siterecovery.store.keys import StoreKeys
from siterecovery.store.repository import ReplicaStore

args = json.loads(sys.argv[1])
store = ReplicaStore.open(args["store"], StoreKeys.load(Path(args["keys"])))
previous = store.load_point("vm1", args["previous"])
tracker = ChangeTracker(Path(args["qmp"]), Path(args["run_dir"]), args["relationship"])

def hook(step):
    if step == args["step"]:
        Path(args["flag"]).write_text(step)
        time.sleep(3600)

Replicator(tracker, store, "vm1").run_cycle(previous, hook=hook)
Path(args["flag"]).write_text("finished")
"""


def _run_child_until(rig: VmRig, step: str, tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    rig.keys.save(keys)
    protection = service.get_protection(rig.db, vm="vm1")
    latest = points.latest_point(rig.db, vm="vm1")
    assert latest is not None and rig.vm is not None
    flag = tmp_path / "flag"
    args = {
        "store": rig.store.url, "keys": str(keys), "previous": latest.point_id,
        "qmp": str(rig.vm.qmp_path), "run_dir": str(rig.protection.run_dir / "vm1"),
        "relationship": protection.relationship_id.replace("-", ""), "step": step,
        "flag": str(flag),
    }  # fmt: skip
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)],
                             stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not flag.exists():
            if child.poll() is not None:
                pytest.fail(f"the cycle ended before {step}: {child.stderr.read()!r}")  # type: ignore[union-attr]
            assert time.monotonic() < deadline, f"the child never reached {step}"
            time.sleep(0.02)
        assert flag.read_text() == step
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        child.stderr.close()  # type: ignore[union-attr]


def _assert_nothing_left(rig: VmRig) -> None:
    assert rig.vm is not None
    qmp = rig.vm.qmp_path
    exports = {e["id"] for e in qmp_execute(qmp, "query-block-exports")}
    assert exports == {f"rw-{d}" for d in rig.sizes}
    assert qmp_execute(qmp, "query-block-jobs") == []
    nodes = qmp_execute(qmp, "query-named-block-nodes", {"flat": True})
    assert not [n["node-name"] for n in nodes if n["node-name"].startswith("srf-")]
    for node in nodes:
        if node["node-name"] in rig.sizes:
            ours = [b["name"] for b in node.get("dirty-bitmaps", [])
                    if b["name"].startswith("sr-")]  # fmt: skip
            assert len(ours) == 1, (node["node-name"], ours)
    leftovers = list((rig.protection.run_dir / "vm1").glob("fleece-*"))
    assert leftovers == []


@pytest.mark.parametrize("step", CYCLE_STEPS)
def test_agent_killed_at_a_step_loses_no_change(tmp_path: Path, step: str) -> None:
    rig = make_rig(tmp_path)
    try:
        rig.write("d0", 0, b"\x01" * MiB)
        rig.protect()
        rig.write("d0", 2 * MiB, b"\x02" * 3 * MiB)  # enough to be mid-shipping at "shipping"
        rig.write("d1", 4 * MiB, b"\x03" * 4096)
        _run_child_until(rig, step, tmp_path)
        rig.write("d1", 6 * MiB, b"\x04" * 65536)  # after the kill: the next point has it too
        rig.write("d0", 2 * MiB, b"\x05" * 4096)  # over a block the dead cycle had frozen

        cycle = rig.protection.replicate("vm1")
        assert cycle.bytes_read >= 3 * MiB + 2 * 65536  # nothing the dead cycle saw was lost
        assert rig.latest_disks() == rig.snapshot()
        _assert_nothing_left(rig)
        rig.write("d0", 9 * MiB, b"\x06" * 512)
        assert rig.protection.replicate("vm1").bytes_read == 65536  # back to exact deltas
        assert rig.latest_disks() == rig.snapshot()
    finally:
        rig.stop()
        rig.db.close()
