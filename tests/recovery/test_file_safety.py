"""siterecovery never touches what is not its own (DESIGN §6), through the whole DR loop.

The VM's QMP socket lives in the operator's directory, which also holds the operator's own
files, named as a naive implementation would name its own (``vm.log``, ``vm.pid``,
``vm.serial.log``) plus an unrelated one. Under umask 022 the CLI runs protect, a cycle, a
drill and its cleanup, a planned failover and its commit, a failback (minimize downtime) and
its commit, and reverse replication, on a real QEMU VM (TCG). Afterwards that directory holds
exactly what it held, every file with the same bytes and mtime (the socket is there again:
the failed-back primary VM listens on it), and everything under the work directory is 0700
or 0600.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from siterecovery.errors import HypervisorError
from siterecovery.hypervisor.guest import make_disk
from siterecovery.hypervisor.process import DriveSpec, QemuProcess, VmProcessSpec, qmp_execute
from siterecovery.recovery.replica import ReplicaRecord, stop_replica

# tests/ is on sys.path: the CLI runner of tests/cli and the shared file-safety checks
import filesafety  # isort: skip
from cli.test_app import run  # isort: skip

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
MiB = 1 << 20
USER_FILES = {
    "vm.log": "the operator's own QEMU log, kept for years\n",
    "vm.pid": "4242\n",
    "vm.serial.log": "console output of another day\n",
    "notes.txt": "nothing to do with siterecovery\n",
}


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    """The operator's directory: the QMP socket will be here, next to their own files."""
    user = tmp_path / "user"
    user.mkdir()
    for name, text in USER_FILES.items():
        (user / name).write_text(text)
    return user


@pytest.fixture
def primary(tmp_path: Path, user_dir: Path) -> Iterator[QemuProcess]:
    """The operator's VM: disks in their own directory, its QMP socket in ``user_dir``."""
    disks, own = tmp_path / "disks", tmp_path / "qemu-files"
    disks.mkdir()
    own.mkdir()
    make_disk(disks / "system.qcow2", 16 * MiB)
    make_disk(disks / "data.qcow2", 32 * MiB)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 2M",
                    str(disks / "data.qcow2")], check=True, capture_output=True)  # fmt: skip
    spec = VmProcessSpec(
        name="vm", workdir=own, qmp=user_dir / "vm.qmp",
        drives=[DriveSpec("system", disks / "system.qcow2"),
                DriveSpec("data", disks / "data.qcow2")],
        extra_args=["-S"],
    )  # fmt: skip
    vm = QemuProcess.start(spec)
    yield vm
    vm.stop()


@pytest.fixture
def workdir(tmp_path: Path, user_dir: Path) -> Iterator[Path]:
    """The work directory; afterwards every VM the CLI left running is stopped."""
    path = tmp_path / "vault"
    yield path
    with contextlib.suppress(HypervisorError):
        qmp_execute(user_dir / "vm.qmp", "quit", timeout=2.0)  # the failed-back primary
    for slot in (path / "recovery").glob("*/*"):
        record = ReplicaRecord.load(slot)
        if record is not None:
            stop_replica(record, None)


def _without_socket(listing: dict[str, filesafety.Entry]) -> dict[str, filesafety.Entry]:
    return {name: entry for name, entry in listing.items() if name != "vm.qmp"}


def _state(workdir: Path, vm: str) -> str:
    (status,) = json.loads(run(workdir, "status", vm, "--json").stdout)
    return str(status["state"])


def test_the_dr_loop_touches_nothing_beside_the_qmp_socket(
    workdir: Path, user_dir: Path, primary: QemuProcess
) -> None:
    with filesafety.umask(0o022):
        before = filesafety.snapshot(user_dir)
        assert set(before) == {*USER_FILES, "vm.qmp"}
        for step in (
            ("vault", "init"),
            ("policy", "create", "gold"),
            ("vm", "register", "vm", "--qmp", str(user_dir / "vm.qmp")),
            ("protect", "vm", "--policy", "gold"),
            ("replicate", "vm"),
            ("failover", "vm", "--test"),
            ("failover", "cleanup", "vm"),
            ("failover", "vm", "--planned"),
            ("failover", "commit", "vm"),
            ("failback", "vm", "--minimize-downtime"),
            ("failback", "commit", "vm"),
            ("reverse-replicate", "vm"),
        ):
            run(workdir, *step)
            # the socket comes and goes with the VM (the planned failover quits it); the
            # operator's files never change
            assert _without_socket(filesafety.snapshot(user_dir)) == _without_socket(before), step
        assert _state(workdir, "vm") == "protected"

    assert filesafety.snapshot(user_dir) == before  # the primary listens there again
    assert not primary.alive()  # the planned failover shut the operator's QEMU down
    status = qmp_execute(user_dir / "vm.qmp", "query-status")
    assert status["status"] in ("running", "prelaunch", "paused"), status
    own = workdir / "run" / "primary" / "vm"
    assert {p.name for p in own.iterdir()} >= {"vm.log", "vm.pid", "vm.serial.log"}
    assert filesafety.not_private(workdir) == []
