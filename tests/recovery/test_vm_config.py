"""The typed VmConfig a recovery point carries: JSON round trip, the loose form older points
carry, and malformed content refused with an error naming the field (never a KeyError)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from siterecovery.domain import (
    BootConfig,
    Consistency,
    DiskCache,
    DiskConfig,
    NicSpec,
    VmConfig,
    VmConfigError,
)
from siterecovery.errors import InputError
from siterecovery.recovery import network
from siterecovery.recovery.replica import disk_order, point_config
from siterecovery.store.manifest import DiskChain, DiskRef, PointManifest

FULL = VmConfig(
    name="web1",
    cpus=2,
    memory_mib=384,
    disks=(
        DiskConfig("system", 64 << 20, "qcow2", "virtio-blk-pci", "SYS-1", "unmap"),
        DiskConfig("data", 32 << 20, "raw", "ide-hd", "QM00002", None, DiskCache(False, True)),
        DiskConfig("logs", 16 << 20, "qcow2", "scsi-hd", "", "ignore", DiskCache(no_flush=True)),
    ),
    nics=(
        NicSpec("virtio-net-pci", "52:54:00:12:34:56", "prod"),
        NicSpec("e1000", None, "backup"),
    ),
    boot=BootConfig("/boot/vmlinuz", "/boot/initrd", "console=ttyS0", "cad"),
    machine="pc-i440fx-7.2",
    cpu_model="max",
    guest_agent=True,
    qga_socket="/run/qemu/web1.qga",
)


def test_json_round_trip_keeps_every_field() -> None:
    doc = json.loads(json.dumps(FULL.to_json(host_local=True)))
    assert VmConfig.from_json(doc, name="web1") == FULL
    assert doc["disks"][1]["cache"] == {"writeback": False, "direct": True, "no_flush": False}
    assert doc["nics"][0] == {"model": "virtio-net-pci", "mac": "52:54:00:12:34:56",
                              "network": "prod"}  # fmt: skip


def test_the_guest_agent_socket_is_host_local() -> None:
    replicated = FULL.to_json()
    assert "qga" not in replicated and replicated["guest_agent"] is True
    back = VmConfig.from_json(replicated, name="web1")
    assert back.qga_socket == "" and back.guest_agent is True
    assert back == VmConfig(**{**FULL.__dict__, "qga_socket": ""})


def test_the_loose_form_of_older_points_takes_todays_defaults() -> None:
    old = {
        "cpus": 1, "memory_mib": 256, "qmp": "/run/qemu/vm1.qmp",
        "boot": {"kernel": "/k", "initrd": "/i", "append": "quiet"},
        "disks": [{"name": "system"}, {"name": "data", "size": 1 << 20, "fmt": "qcow2"}],
        "nics": ["prod", {"network": "lan", "mac": "52:54:00:AA:BB:01"}],
    }  # fmt: skip
    config = VmConfig.from_json(old, name="vm1")
    assert config == VmConfig(
        name="vm1", cpus=1, memory_mib=256, machine="q35", cpu_model="",
        disks=(DiskConfig("system", serial="system"), DiskConfig("data", 1 << 20, serial="data")),
        nics=(NicSpec("virtio-net-pci", None, "prod"),
              NicSpec("virtio-net-pci", "52:54:00:aa:bb:01", "lan")),
        boot=BootConfig("/k", "/i", "quiet"),
    )  # fmt: skip
    assert VmConfig.from_json({}, name="vm1") == VmConfig("vm1")


def _point(vm_config: dict[str, Any]) -> PointManifest:
    chain = DiskChain(1 << 20, DiskRef("indexes/vm1/b", "0" * 64, 10))
    return PointManifest("20240501T120000.000000Z-0000", "vm1", datetime.now(UTC),
                         Consistency.CRASH, vm_config, {"zeta": chain, "data": chain})  # fmt: skip


def test_an_old_point_still_plans_its_replica() -> None:
    point = _point({"disks": [{"name": "data"}], "nics": [{"network": "prod"}]})
    assert point_config(point).memory_mib == 256
    assert disk_order(point) == ["data", "zeta"]
    lan = network.NetworkRecord("lan", "user", "10.9.0.0/24")
    drill = network.NetworkRecord("drill", "isolated", "10.99.0.0/24")
    (nic,) = network.plan_nics("vm1", point.vm_config, [network.MappingRecord("prod", lan, drill)],
                               test=True)  # fmt: skip
    assert (nic.network, nic.mac, nic.model) == (drill, None, "virtio-net-pci")


BAD: list[tuple[Any, str]] = [
    ([], r"vm_config must be an object, not list"),
    ({"cpus": "2"}, r"vm_config\.cpus must be a whole number from 1 to 288, not '2'"),
    ({"cpus": True}, r"vm_config\.cpus must be a whole number"),
    ({"cpus": 0}, r"vm_config\.cpus must be a whole number"),
    ({"memory_mib": -256}, r"vm_config\.memory_mib must be a whole number .* not -256"),
    ({"memory_mib": 2.5}, r"vm_config\.memory_mib must be a whole number"),
    ({"machine": "pc;rm -rf"}, r"vm_config\.machine 'pc;rm -rf' is not a valid machine"),
    ({"cpu_model": "max,+avx"}, r"vm_config\.cpu_model 'max,\+avx' is not a valid cpu_model"),
    ({"disks": {"name": "vda"}}, r"vm_config\.disks must be a list"),
    ({"disks": ["vda"]}, r"vm_config\.disks\[0\] must be an object, not str"),
    ({"disks": [{"size": 1}]}, r"vm_config\.disks\[0\]\.name is missing"),
    ({"disks": [{"name": "a/b"}]}, r"vm_config\.disks\[0\]\.name 'a/b' is not a valid name"),
    ({"disks": [{"name": "vda", "model": "usb-storage"}]},
     r"vm_config\.disks\[0\]\.model 'usb-storage' is not one of virtio-blk-pci, scsi-hd"),
    ({"disks": [{"name": "vda", "discard": "yes"}]},
     r"vm_config\.disks\[0\]\.discard 'yes' is not one of unmap, ignore"),
    ({"disks": [{"name": "vda", "cache": {"direct": "no"}}]},
     r"vm_config\.disks\[0\]\.cache\.direct must be true or false, not 'no'"),
    ({"disks": [{"name": "vda", "size": -1}]},
     r"vm_config\.disks\[0\]\.size must be a whole number"),
    ({"disks": [{"name": "vda"}, {"name": "vda"}]}, r"vm_config\.disks names a disk twice"),
    ({"nics": [{"network": "prod", "mac": "52:54:00:zz:00:01"}]},
     r"vm_config\.nics\[0\]\.mac '52:54:00:zz:00:01' is not a MAC address"),
    ({"nics": [{"network": "prod", "model": "ne2k_pci"}]},
     r"vm_config\.nics\[0\]\.model 'ne2k_pci' is not one of virtio-net-pci"),
    ({"nics": [{"mac": "52:54:00:00:00:01"}]}, r"vm_config\.nics\[0\]\.network is missing"),
    ({"nics": [7]}, r"vm_config\.nics\[0\] must be an object, not int"),
    ({"boot": "vmlinuz"}, r"vm_config\.boot must be an object, not str"),
    ({"boot": {"kernel": 5}}, r"vm_config\.boot\.kernel must be text, not 5"),
    ({"guest_agent": "yes"}, r"vm_config\.guest_agent must be true or false"),
]  # fmt: skip


@pytest.mark.parametrize(("doc", "message"), BAD)
def test_malformed_content_is_refused_naming_the_field(doc: Any, message: str) -> None:
    with pytest.raises(VmConfigError, match=f"^VM web1: {message}") as raised:
        VmConfig.from_json(doc, name="web1")
    assert isinstance(raised.value, InputError) and raised.value.hint


def test_a_point_with_a_malformed_config_is_refused_before_planning() -> None:
    point = _point({"memory_mib": -1})
    with pytest.raises(VmConfigError, match=r"VM vm1: vm_config\.memory_mib"):
        point_config(point)
    with pytest.raises(VmConfigError, match=r"VM vm1: vm_config\.memory_mib"):
        network.plan_nics("vm1", point.vm_config, [], test=False)
