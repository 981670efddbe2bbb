"""read_shape against real QEMU (paused, TCG): every field of a VM started by hand equals what
was started; a VM started from that shape has the same shape; devices that cannot be
described are refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from siterecovery.domain import BootConfig, DiskCache, DiskConfig, NicSpec, VmConfig
from siterecovery.hypervisor.errors import QmpError, ShapeError
from siterecovery.hypervisor.guest import make_disk
from siterecovery.hypervisor.machine import host_capabilities
from siterecovery.hypervisor.process import QEMU_BINARY, DriveSpec, QemuProcess, VmProcessSpec
from siterecovery.hypervisor.qmp import QmpSession
from siterecovery.hypervisor.shape import discard_options, qemu_opts, read_shape, shape_of

pytestmark = [pytest.mark.qemu]
MiB = 1 << 20
MAC1, MAC2 = "52:54:00:12:34:56", "52:54:00:AB:CD:EF"


def _wait_qmp(proc: subprocess.Popen[bytes], qmp: Path, log: Path) -> None:
    """Until QMP answers; fail with QEMU's log if QEMU exits or stays silent for 30 s."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        if qmp.exists():
            try:
                QmpSession.connect(qmp, timeout=2).close()
                return
            except QmpError:
                pass
        time.sleep(0.05)
    raise AssertionError(f"QEMU did not come up: {log.read_text(errors='replace')}")


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Factory: start ``qemu-system-x86_64 -S`` with the given args; returns its QMP path."""
    if shutil.which(QEMU_BINARY) is None:
        pytest.skip(f"{QEMU_BINARY} is not installed")
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str, name: str = "vm") -> Path:
        qmp, log = tmp_path / f"{name}.qmp", tmp_path / f"{name}.log"
        argv = [QEMU_BINARY, "-nodefaults", "-no-user-config", "-display", "none", "-S",
                "-chardev", f"socket,id=qmp,path={qmp},server=on,wait=off",
                "-mon", "chardev=qmp,mode=control", *args]  # fmt: skip
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        started.append(proc)
        _wait_qmp(proc, qmp, log)
        return qmp

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def _source_args(root: Path) -> list[str]:
    """-machine pc -smp 2 -cpu max -m 384; a virtio-blk disk (-blockdev, discard=unmap) and an
    IDE disk (-drive, cache=none); virtio-net and e1000 with fixed MACs; a guest agent port."""
    make_disk(root / "sys.qcow2", 64 * MiB)
    make_disk(root / "data.qcow2", 32 * MiB)
    sys_file = {"driver": "file", "node-name": "sys-file", "filename": str(root / "sys.qcow2"),
                "discard": "unmap"}  # fmt: skip
    sys_fmt = {"driver": "qcow2", "node-name": "sys", "file": "sys-file", "discard": "unmap"}
    return [
        "-machine", "pc,accel=tcg", "-smp", "2", "-cpu", "max", "-m", "384",
        "-blockdev", json.dumps(sys_file), "-blockdev", json.dumps(sys_fmt),
        "-device", "virtio-blk-pci,drive=sys,id=sys-dev,serial=SYS-1",
        "-drive", f"file={root / 'data.qcow2'},format=qcow2,if=none,id=data,cache=none",
        "-device", "ide-hd,drive=data,id=data-dev,serial=DATA-2",
        "-netdev", "user,id=prod", "-device", f"virtio-net-pci,netdev=prod,mac={MAC1}",
        "-netdev", "user,id=backup", "-device", f"e1000,netdev=backup,mac={MAC2}",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=qga0,path={root / 'vm.qga'},server=on,wait=off",
        "-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
    ]  # fmt: skip


EXPECTED_DISKS = (
    DiskConfig("sys", 64 * MiB, "qcow2", "virtio-blk-pci", "SYS-1", "unmap", DiskCache()),
    DiskConfig("data", 32 * MiB, "qcow2", "ide-hd", "DATA-2", "ignore",
               DiskCache(writeback=True, direct=True, no_flush=False)),
)  # fmt: skip


def test_read_shape_reports_what_was_started(tmp_path: Path, qemu: Callable[..., Path]) -> None:
    qmp = qemu(*_source_args(tmp_path))
    shape = read_shape(qmp, name="web1")
    pc = host_capabilities("tcg").aliases["pc"]  # "pc" runs the newest pc-i440fx: 7.2 here
    assert pc.startswith("pc-i440fx-")
    assert shape == VmConfig(
        name="web1", cpus=2, memory_mib=384, machine=pc, cpu_model="max",
        disks=EXPECTED_DISKS,
        nics=(NicSpec("virtio-net-pci", MAC1, "prod"), NicSpec("e1000", MAC2.lower(), "backup")),
        boot=BootConfig(order="cad"), guest_agent=True, qga_socket=str(tmp_path / "vm.qga"),
    )  # fmt: skip
    with QmpSession.connect(qmp) as session:  # without the command line, discard is unknown
        blind = shape_of(session, name="web1", argv=None)
    assert [d.discard for d in blind.disks] == [None, None]
    assert replace(blind, disks=EXPECTED_DISKS) == shape


def test_a_vm_started_from_a_shape_has_that_shape(
    tmp_path: Path, qemu: Callable[..., Path]
) -> None:
    source = read_shape(qemu(*_source_args(tmp_path)), name="web1")
    copy = tmp_path / "copy"
    copy.mkdir()
    drives = []
    for disk in source.disks:
        make_disk(copy / f"{disk.name}.qcow2", disk.size)
        drives.append(DriveSpec(disk.name, copy / f"{disk.name}.qcow2", disk=disk))
    nics = [a for nic in source.nics
            for a in ("-netdev", f"user,id={nic.network}",
                      "-device", f"{nic.model},netdev={nic.network},mac={nic.mac}")]  # fmt: skip
    spec = VmProcessSpec(
        name="copy", workdir=copy, drives=drives, memory_mib=source.memory_mib,
        cpus=source.cpus, cpu_model=source.cpu_model, machine=source.machine,
        boot_order=source.boot.order, guest_agent=True, extra_args=[*nics, "-S"],
    )  # fmt: skip
    vm = QemuProcess.start(spec)
    try:
        again = read_shape(vm.qmp_path, name="web1")
    finally:
        vm.stop()
    assert again == replace(source, qga_socket=str(spec.qga_path))


def test_a_disk_on_an_unknown_device_or_no_device_is_refused(
    tmp_path: Path, qemu: Callable[..., Path]
) -> None:
    make_disk(tmp_path / "a.qcow2", MiB)
    lonely = qemu("-drive", f"file={tmp_path / 'a.qcow2'},format=qcow2,if=none,id=lonely",
                  name="lonely")  # fmt: skip
    with pytest.raises(ShapeError, match="disk lonely is attached to no guest device"):
        read_shape(lonely, name="vm1")
    nic = qemu("-netdev", "user,id=n0", "-device", "ne2k_pci,netdev=n0", name="nic")
    with pytest.raises(ShapeError, match=r"is a ne2k_pci; siterecovery can start NICs of models"):
        read_shape(nic, name="vm1")


def test_command_line_options_parse() -> None:
    assert qemu_opts("file=/a,,b,if=none,id=x,discard=on") == {
        "file": "/a,b", "if": "none", "id": "x", "discard": "on"
    }  # fmt: skip
    argv = ["qemu", "-drive", "file=/a,id=d0,discard=on", "-drive", "file=/b,id=d1",
            "-blockdev", "driver=qcow2,node-name=n1,file=n1f,discard=ignore",
            "-blockdev", '{"driver": "qcow2", "node-name": "n2", "discard": "unmap"}',
            "-blockdev", "{not json"]  # fmt: skip
    assert discard_options(argv) == {"d0": "unmap", "d1": "ignore", "n1": "ignore", "n2": "unmap"}
