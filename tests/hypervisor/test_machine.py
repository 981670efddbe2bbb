"""What a recovery host can honour: the real probe of this QEMU, and ``honour`` as a pure
function over a probed host, one warning per setting it changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from siterecovery.domain import DiskCache, DiskConfig, VmConfig
from siterecovery.hypervisor.machine import (
    HostCapabilities,
    honour,
    host_capabilities,
    supports_direct_io,
)

MACHINES = [
    {"name": "pc-i440fx-7.2", "alias": "pc", "is-default": True, "cpu-max": 255},
    {"name": "pc-q35-7.2", "alias": "q35", "cpu-max": 288},
    {"name": "pc-q35-6.0", "cpu-max": 288},
    {"name": "microvm", "cpu-max": 4},
]
CPUS = [
    {"name": "max", "typename": "max-x86_64-cpu", "unavailable-features": []},
    {"name": "host", "typename": "host-x86_64-cpu", "unavailable-features": ["kvm"]},
    {"name": "Skylake-Client", "unavailable-features": ["pcid", "rtm"]},
]
TCG = HostCapabilities.parse("tcg", "QEMU 7.2.22", MACHINES, CPUS)


@pytest.mark.qemu
def test_the_probe_sees_this_qemu() -> None:
    host = host_capabilities("tcg")
    assert host.aliases["pc"].startswith("pc-i440fx-") and host.aliases["q35"] in host.machines
    assert host.default_machine == host.aliases["pc"]
    assert host.cpu_models["host"] == ("kvm",) and host.cpu_models["max"] == ()
    assert host_capabilities("tcg") is host  # probed once


def test_what_the_host_runs_is_kept_without_warnings() -> None:
    config = VmConfig("vm1", cpus=4, machine="pc-q35-6.0", cpu_model="max",
                      disks=(DiskConfig("d", cache=DiskCache(direct=True)),))  # fmt: skip
    assert honour(config, TCG) == honour(config, TCG, direct_io=True)
    assert honour(config, TCG).config == config and honour(config, TCG).warnings == ()
    assert honour(VmConfig("vm1", machine="q35"), TCG).warnings == ()


@pytest.mark.parametrize(
    ("change", "kept", "warning"),
    [
        ({"machine": "pc-i440fx-9.0"}, {"machine": "pc"},
         "machine type pc-i440fx-9.0 is not available on this recovery host (QEMU 7.2.22): "
         "the replica runs machine type pc (pc-i440fx-7.2)"),
        ({"machine": "pc-q35-2.4"}, {"machine": "q35"}, "runs machine type q35 (pc-q35-7.2)"),
        ({"machine": "virt"}, {"machine": "pc-i440fx-7.2"}, "machine type virt is not available"),
        ({"machine": "microvm", "cpus": 8}, {"machine": "microvm", "cpus": 4},
         "8 vCPUs are more than machine type microvm takes here (4): the replica runs 4 vCPUs"),
        ({"cpu_model": "host"}, {"cpu_model": "max"},
         "CPU model host needs kvm, this recovery host runs replicas under tcg: the replica "
         "runs CPU model max"),
        ({"cpu_model": "Zen9"}, {"cpu_model": "max"},
         "CPU model Zen9 is unknown to this recovery host (QEMU 7.2.22): the replica runs CPU "
         "model max"),
        ({"cpu_model": "Skylake-Client"}, {"cpu_model": "Skylake-Client"},
         "CPU model Skylake-Client lacks features pcid, rtm under tcg"),
    ],
)  # fmt: skip
def test_what_the_host_cannot_run_falls_back_with_a_warning(
    change: dict[str, object], kept: dict[str, object], warning: str
) -> None:
    config = VmConfig("vm1", **change)  # type: ignore[arg-type]
    done = honour(config, TCG)
    for field, value in kept.items():
        assert getattr(done.config, field) == value
    (said,) = done.warnings
    assert warning in said


def test_direct_io_is_dropped_with_a_warning_where_the_filesystem_refuses_it() -> None:
    disk = DiskConfig("data", cache=DiskCache(writeback=False, direct=True, no_flush=True))
    done = honour(VmConfig("vm1", disks=(disk, DiskConfig("sys"))), TCG, direct_io=False)
    assert done.config.disks == (
        DiskConfig("data", cache=DiskCache(writeback=False, direct=False, no_flush=True)),
        DiskConfig("sys"),
    )
    assert done.warnings == (
        "disk data uses direct I/O (cache.direct), which the recovery directory's filesystem "
        "does not support: the replica's disk runs without it",
    )


def test_direct_io_probe_leaves_nothing_behind(tmp_path: Path) -> None:
    assert isinstance(supports_direct_io(tmp_path), bool)
    assert list(tmp_path.iterdir()) == []
