"""QEMU process launcher: start/stop/kill semantics, console waiting, qemu-storage-daemon, probe.

VMs here boot no guest (``-S`` keeps the CPU paused), so each test takes well under a second.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from siterecovery.errors import InputError, NotFoundError
from siterecovery.hypervisor import process as proc_mod
from siterecovery.hypervisor.errors import ProcessError
from siterecovery.hypervisor.process import (
    ACCEL_ENV,
    ACCELS,
    DriveSpec,
    QemuProcess,
    StorageDaemon,
    VmProcessSpec,
    accel_works,
    live_processes,
    probe_accel,
    qemu_argv,
    qmp_execute,
)
from siterecovery.hypervisor.qmp import QmpSession

import filesafety  # isort: skip


def _pids_mentioning(path: Path) -> list[int]:
    """Pids of processes whose command line mentions ``path`` (our QEMUs carry their workdir)."""
    needle = os.fsencode(path)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            found.append(int(entry.name))
    return found


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A work directory; at teardown no process started under it may still exist."""
    yield tmp_path
    leftovers = [p for p in live_processes() if tmp_path in p.qmp_path.parents]
    for p in leftovers:
        p.kill()
    assert not leftovers, "a test left QEMU processes running"
    assert _pids_mentioning(tmp_path) == []


def _image(path: Path, size: str = "16M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


def _paused_vm(workdir: Path, name: str = "vm1", **kwargs: object) -> VmProcessSpec:
    """A VM that never runs guest code (-S): enough to exercise the process life cycle."""
    disk = workdir / f"{name}-d0.qcow2"
    if not disk.exists():
        _image(disk)
    return VmProcessSpec(
        name=name,
        workdir=workdir,
        drives=[DriveSpec("d0", disk)],
        memory_mib=64,
        extra_args=["-S"],
        **kwargs,  # type: ignore[arg-type]
    )


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# ---------------------------------------------------------------------------------------------
# Command line and validation (no QEMU needed)


def test_argv_uses_blockdev_node_names_and_device_ids(tmp_path: Path) -> None:
    disk = tmp_path / "a,b.qcow2"
    spec = VmProcessSpec(name="vm1", workdir=tmp_path, drives=[DriveSpec("sys", disk)])
    argv = qemu_argv(spec)
    blockdevs = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev"]
    assert blockdevs == [
        {"driver": "file", "node-name": "sys-file", "filename": str(disk)},
        {"driver": "qcow2", "node-name": "sys", "file": "sys-file"},
    ]
    assert "virtio-blk-pci,drive=sys,id=sys-dev,serial=sys" in argv
    assert "q35,accel=tcg" in argv
    assert f"socket,id=qmp,path={tmp_path}/vm1.qmp,server=on,wait=off" in argv
    assert "-kernel" not in argv


def test_argv_escapes_commas_in_socket_paths(tmp_path: Path) -> None:
    wd = tmp_path / "x,y"
    argv = qemu_argv(VmProcessSpec(name="v", workdir=wd, drives=[]))
    assert f"file,id=serial0,path={tmp_path}/x,,y/v.serial.log" in argv


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"name": "bad name"}, InputError),
        ({"accel": "hvf"}, InputError),
        ({"nics": ["tap"]}, InputError),
        ({"memory_mib": 1}, InputError),
        ({"append": "console=ttyS0"}, InputError),
        ({"kernel": Path("/nonexistent/vmlinuz")}, NotFoundError),
        ({"drives": [DriveSpec("d0", Path("/nonexistent.qcow2"))]}, NotFoundError),
        ({"drives": [DriveSpec("0bad", Path("/etc/hostname"))]}, InputError),
        ({"drives": [DriveSpec("d0", Path("/etc/hostname"), fmt="vmdk")]}, InputError),
    ],
)
def test_bad_spec_is_refused_before_anything_starts(
    workdir: Path, change: dict[str, object], error: type[Exception]
) -> None:
    spec = _paused_vm(workdir)
    for key, value in change.items():
        setattr(spec, key, value)
    before = sorted(workdir.iterdir())
    with pytest.raises(error):
        QemuProcess.start(spec)
    assert sorted(workdir.iterdir()) == before


def test_duplicate_drive_names_and_long_socket_paths_are_refused(tmp_path: Path) -> None:
    disk = _image(tmp_path / "d.qcow2")
    spec = VmProcessSpec("vm1", tmp_path, [DriveSpec("d0", disk), DriveSpec("d0", disk)])
    with pytest.raises(InputError, match="duplicate"):
        spec.validate()
    deep = tmp_path / ("x" * 100)
    deep.mkdir()
    with pytest.raises(InputError, match="longer than"):
        VmProcessSpec("vm1", deep, []).validate()
    with pytest.raises(InputError, match="does not exist"):
        VmProcessSpec("vm1", tmp_path / "missing", []).validate()


# ---------------------------------------------------------------------------------------------
# VM life cycle


@pytest.mark.qemu
def test_start_answers_qmp_and_stop_is_clean_and_idempotent(workdir: Path) -> None:
    vm = QemuProcess.start(_paused_vm(workdir))
    assert vm.alive()
    assert vm.qmp_path == workdir / "vm1.qmp"
    assert int((workdir / "vm1.pid").read_text()) == vm.pid
    assert qmp_execute(vm.qmp_path, "query-status")["status"] == "prelaunch"
    nodes = {n["node-name"] for n in qmp_execute(vm.qmp_path, "query-named-block-nodes")}
    assert {"d0", "d0-file"} <= nodes

    started = time.monotonic()
    vm.stop()
    assert time.monotonic() - started < 5  # QMP quit worked; no SIGTERM/SIGKILL wait
    assert not vm.alive()
    assert vm.returncode == 0
    assert _gone(vm.pid)
    assert not vm.qmp_path.exists()  # QEMU removes its socket on a clean exit
    vm.stop()
    vm.kill()
    assert vm.returncode == 0


@pytest.mark.qemu
def test_kill_is_a_crash_and_a_stale_socket_does_not_block_a_restart(workdir: Path) -> None:
    spec = _paused_vm(workdir)
    vm = QemuProcess.start(spec)
    vm.kill()
    assert vm.returncode == -9
    assert _gone(vm.pid)
    assert vm.qmp_path.exists()  # SIGKILL leaves the socket file behind
    vm.kill()
    vm.stop()

    again = QemuProcess.start(spec)
    assert qmp_execute(again.qmp_path, "query-status")["status"] == "prelaunch"
    again.stop()


@pytest.mark.qemu
def test_a_file_at_the_socket_path_is_refused_and_kept(workdir: Path) -> None:
    elsewhere = workdir / "operator"
    elsewhere.mkdir()
    theirs = elsewhere / "vm1.qmp"
    theirs.write_text("not a socket: the operator's file")
    with pytest.raises(InputError, match="is not a socket") as raised:
        QemuProcess.start(_paused_vm(workdir, qmp=theirs))
    assert str(theirs) in raised.value.message
    assert theirs.read_text() == "not a socket: the operator's file"
    assert sorted(p.name for p in workdir.iterdir()) == ["operator", "vm1-d0.qcow2"]


@pytest.mark.qemu
def test_files_go_to_the_workdir_and_only_the_socket_to_a_named_path(workdir: Path) -> None:
    elsewhere = workdir / "operator"
    elsewhere.mkdir()
    with filesafety.umask(0o022):
        vm = QemuProcess.start(_paused_vm(workdir, qmp=elsewhere / "vm1.qmp"))
    try:
        assert vm.qmp_path == elsewhere / "vm1.qmp"
        assert qmp_execute(vm.qmp_path, "query-status")["status"] == "prelaunch"
        assert [p.name for p in elsewhere.iterdir()] == ["vm1.qmp"]
        for name in ("vm1.log", "vm1.pid", "vm1.serial.log"):
            assert (workdir / name).stat().st_mode & 0o777 == 0o600, name
        assert not (elsewhere / "vm1.qmp").stat().st_mode & 0o077  # made under umask 077
    finally:
        vm.stop()


@pytest.mark.qemu
def test_stop_falls_back_to_signals_when_qmp_is_busy(workdir: Path) -> None:
    vm = QemuProcess.start(_paused_vm(workdir))
    # QEMU serves one QMP client at a time: hold the monitor so `quit` cannot get through.
    holder = QmpSession.connect(vm.qmp_path)
    started = time.monotonic()
    try:
        vm.stop(timeout=3)
    finally:
        holder.close()
    assert time.monotonic() - started < 2.5  # SIGTERM right after QMP gave up (1 s)
    assert not vm.alive()
    assert _gone(vm.pid)
    assert vm.returncode in (0, -15)  # QEMU exits 0 on SIGTERM; -15 if it died of it


@pytest.mark.qemu
def test_second_vm_with_the_same_name_is_refused(workdir: Path) -> None:
    spec = _paused_vm(workdir)
    vm = QemuProcess.start(spec)
    try:
        with pytest.raises(ProcessError, match="in use"):
            QemuProcess.start(spec)
        assert vm.alive()
    finally:
        vm.stop()


@pytest.mark.qemu
def test_failed_start_reports_the_qemu_log(workdir: Path) -> None:
    spec = _paused_vm(workdir)
    spec.extra_args = ["-no-such-option"]
    with pytest.raises(ProcessError, match="no-such-option") as info:
        QemuProcess.start(spec)
    assert "exited with status 1" in str(info.value)


@pytest.mark.qemu
def test_wait_serial_matches_and_times_out_with_the_console_tail(workdir: Path) -> None:
    vm = QemuProcess.start(_paused_vm(workdir))
    try:
        # The paused guest prints nothing; stand in for it by appending to its console file.
        with open(vm.serial_path, "ab") as console:
            console.write(b"early noise\r\nSR-WROTE 7 abc\r\nlast line 42\r\n")
        match = vm.wait_serial(r"^SR-WROTE (\d+) (\w+)$", timeout=5)
        assert match.groups() == ("7", "abc")
        assert "SR-WROTE 7 abc\nlast line 42\n" in vm.serial_text()

        started = time.monotonic()
        with pytest.raises(ProcessError) as info:
            vm.wait_serial("never printed", timeout=0.5)
        assert 0.5 <= time.monotonic() - started < 3
        assert "within 0.5 s" in str(info.value)
        assert "last line 42" in str(info.value)
    finally:
        vm.stop()


@pytest.mark.qemu
def test_wait_serial_gives_up_at_once_when_the_vm_dies(workdir: Path) -> None:
    vm = QemuProcess.start(_paused_vm(workdir))
    vm.kill()
    started = time.monotonic()
    with pytest.raises(ProcessError, match="exited with status -9"):
        vm.wait_serial("SR-BOOTED", timeout=30)
    assert time.monotonic() - started < 2


@pytest.mark.qemu
def test_wait_returns_the_exit_status_of_a_vm_that_quits(workdir: Path) -> None:
    vm = QemuProcess.start(_paused_vm(workdir))
    with pytest.raises(ProcessError, match="still running"):
        vm.wait(0.2)
    qmp_execute(vm.qmp_path, "quit")
    assert vm.wait(10) == 0


# ---------------------------------------------------------------------------------------------
# qemu-storage-daemon


@pytest.mark.qemu
def test_storage_daemon_serves_qmp_and_nbd_and_stops_cleanly(workdir: Path) -> None:
    disk = _image(workdir / "data.qcow2")
    qsd = StorageDaemon.start(workdir, [DriveSpec("data", disk)])
    try:
        assert qsd.alive()
        assert qsd.nbd_path == workdir / "nbd.sock"
        with QmpSession.connect(qsd.qmp_path) as monitor:
            nodes = monitor.cmd("query-named-block-nodes")
            assert isinstance(nodes, list)
            assert {"data", "data-file"} <= {n["node-name"] for n in nodes}
            assert monitor.cmd("query-block-exports") == []
            assert (
                monitor.cmd("block-dirty-bitmap-add", node="data", name="b0", persistent=True) == {}
            )
        with socket.socket(socket.AF_UNIX) as nbd:
            nbd.settimeout(5)
            nbd.connect(str(qsd.nbd_path))
            assert nbd.recv(8) == b"NBDMAGIC"
    finally:
        qsd.stop()
    assert qsd.returncode == 0
    assert _gone(qsd.pid)
    # A clean exit stores the persistent bitmap without the "in-use" flag a crash leaves.
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", str(disk)], capture_output=True, check=True
    )
    bitmaps = json.loads(info.stdout)["format-specific"]["data"]["bitmaps"]
    assert [(b["name"], b["flags"]) for b in bitmaps] == [("b0", ["auto"])]


@pytest.mark.qemu
def test_storage_daemon_kill_and_bad_input(workdir: Path) -> None:
    with pytest.raises(NotFoundError):
        StorageDaemon.start(workdir, [DriveSpec("data", workdir / "missing.qcow2")])
    with pytest.raises(InputError):
        StorageDaemon.start(workdir / "missing", [])
    raw = workdir / "empty.raw"
    raw.write_bytes(b"\0" * 65536)
    qsd = StorageDaemon.start(workdir, [DriveSpec("r", raw, fmt="raw", read_only=True)])
    assert qmp_execute(qsd.qmp_path, "query-named-block-nodes")[0]["ro"] is True
    qsd.kill()
    assert qsd.returncode == -9
    qsd.stop()


# ---------------------------------------------------------------------------------------------
# Accelerator probe


@pytest.mark.qemu
def test_probe_firmware_reaches_long_mode_under_tcg() -> None:
    assert len(proc_mod.probe_firmware()) == 65536
    assert accel_works("tcg")
    with pytest.raises(InputError):
        accel_works("xen")


def test_accel_env_overrides_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    for value in ACCELS:
        monkeypatch.setenv(ACCEL_ENV, value)
        assert probe_accel() == value
    monkeypatch.setenv(ACCEL_ENV, "fast")
    with pytest.raises(InputError, match=ACCEL_ENV):
        probe_accel()


@pytest.mark.qemu
def test_probe_is_bounded_and_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ACCEL_ENV, raising=False)
    started = time.monotonic()
    accel = probe_accel()
    assert accel in ACCELS
    assert time.monotonic() - started < 8  # a hanging KVM is cut off after 5 s
    started = time.monotonic()
    assert probe_accel() == accel
    assert time.monotonic() - started < 0.01
    if accel == "kvm":
        assert accel_works("kvm")
