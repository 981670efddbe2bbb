"""The replica is the same machine (DESIGN §5), against real QEMU under TCG: the replica's
command line and its own QMP answers show the source's machine type, memory, vCPUs and CPU
model, disk devices and options, and NIC models and MACs; a setting this host cannot honour
falls back and says so in the job's *start replica VM* task."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from siterecovery.domain import DiskCache, DiskConfig
from siterecovery.hypervisor.machine import host_capabilities
from siterecovery.hypervisor.process import QemuProcess
from siterecovery.hypervisor.shape import read_shape
from siterecovery.recovery import instant, network
from siterecovery.store.manifest import PointManifest
from siterecovery.vault import points

from .conftest import Site

pytestmark = [pytest.mark.qemu]
MAC1, MAC2 = "52:54:00:5a:00:01", "52:54:00:5a:00:02"
NICS = ["-netdev", "user,id=prod", "-device", f"virtio-net-pci,netdev=prod,mac={MAC1}",
        "-netdev", "user,id=backup", "-device", f"e1000,netdev=backup,mac={MAC2}"]  # fmt: skip
SOURCE = {"machine": "pc", "cpus": 2, "cpu_model": "max", "memory_mib": 384, "extra_args": NICS}
DATA = DiskConfig("data", model="ide-hd", serial="DATA-2", discard="unmap",
                  cache=DiskCache(writeback=True, direct=True))  # fmt: skip


def _argv(pid: int) -> list[str]:
    return [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]]


def _values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]


def _map_networks(site: Site, *sources: str) -> None:
    network.create_network(site.db, name="lan", kind="user", subnet="10.9.0.0/24")
    network.create_network(site.db, name="drill", kind="isolated", subnet="10.99.0.0/24")
    for source in sources:
        network.map_network(site.db, source=source, recovery="lan", test="drill")


def _latest(site: Site, vm: str) -> PointManifest:
    record = points.latest_point(site.db, vm=vm)
    assert record is not None
    return site.store.load_point(vm, record.point_id)


def test_a_drill_replica_is_the_same_machine(
    site: Site, protected_vm: Callable[..., QemuProcess]
) -> None:
    primary = protected_vm("vm-same", paused=True, machine=SOURCE, disks={"data": DATA})
    _map_networks(site, "prod", "backup")
    source = read_shape(primary.qmp_path, name="vm-same")
    pc = host_capabilities("tcg").aliases["pc"]  # what -machine pc runs: pc-i440fx-7.2 here
    assert (source.machine, source.cpus, source.cpu_model, source.memory_mib) == (
        pc, 2, "max", 384
    )  # fmt: skip
    stored = _latest(site, "vm-same").vm_config
    assert stored == source.to_json() and "qga" not in stored and "qmp" not in stored

    outcome = site.failover.test("vm-same")
    argv = _argv(outcome.process.pid)
    assert _values(argv, "-machine") == [f"{pc},accel=tcg"]
    assert (_values(argv, "-m"), _values(argv, "-smp"), _values(argv, "-cpu")) == (
        ["384"], ["2"], ["max"]
    )  # fmt: skip
    devices = _values(argv, "-device")
    assert f"virtio-net-pci,netdev=rnet0,mac={MAC1}" in devices
    assert f"e1000,netdev=rnet1,mac={MAC2}" in devices
    assert "ide-hd,drive=data,id=data-dev,serial=DATA-2,write-cache=on" in devices
    assert "virtio-blk-pci,drive=system,id=system-dev,serial=system,write-cache=on" in devices
    # asked over QMP, the replica has the source's shape (its NICs on the mapped networks)
    replica = read_shape(outcome.process.qmp_path, name="vm-same")
    assert [(n.model, n.mac) for n in replica.nics] == [(n.model, n.mac) for n in source.nics]
    assert replace(replica, nics=source.nics) == source
    assert outcome.job.task("start replica VM").details["warnings"] == []
    site.failover.cleanup("vm-same")


def test_a_setting_the_host_cannot_honour_is_a_warning_in_the_job(
    site: Site, protected_vm: Callable[..., QemuProcess]
) -> None:
    # as recorded on a KVM host with a newer QEMU: -cpu host, a machine type this one lacks
    protected_vm("vm-kvm", paused=True, disks={"data": DATA},
                 config={"cpu_model": "host", "machine": "pc-q35-99.0"})  # fmt: skip
    assert _latest(site, "vm-kvm").vm_config["cpu_model"] == "host"
    outcome = site.failover.unplanned("vm-kvm")
    assert outcome.job.state == "succeeded"
    warnings = outcome.job.task("start replica VM").details["warnings"]
    host = host_capabilities("tcg")
    assert warnings == [
        f"machine type pc-q35-99.0 is not available on this recovery host ({host.qemu}): the "
        f"replica runs machine type q35 ({host.aliases['q35']})",
        "CPU model host needs kvm, this recovery host runs replicas under tcg: the replica "
        "runs CPU model max (every feature tcg offers)",
    ]
    argv = _argv(outcome.process.pid)
    assert _values(argv, "-machine") == ["q35,accel=tcg"] and _values(argv, "-cpu") == ["max"]
    # every disk hydrates, whatever its device model
    assert outcome.record.disks == ["system", "data"]
    instant.wait_hydrated(outcome.process.qmp_path, outcome.record.disks, 120)
