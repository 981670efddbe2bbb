"""Network mapping (DESIGN §5): each source network maps to a recovery network, drills use an
isolated one; and the QEMU NIC arguments that attach a replica VM to them.

A VM's NICs are described in its config (replicated into every recovery point; the typed
form is :class:`~siterecovery.domain.NicSpec`)::

    "nics": [{"network": "prod", "mac": "52:54:00:12:34:56", "model": "virtio-net-pci"}]

Recovery networks on a QEMU recovery host use the means every host has, user-mode
networking: ``user`` gives the guest NAT to the outside on ``subnet``; ``isolated`` is the
same with ``restrict=on`` (no packet leaves the guest's network; explicit port forwards still
work, which is how drill probes reach it). An exposed port (the seed's public IP) is a
``hostfwd`` from ``127.0.0.1:HOST_PORT`` (or any address) to the guest's port.

The networks and mappings themselves are vault records (:mod:`siterecovery.vault.networks`,
re-exported here).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from siterecovery.domain import NIC_MODELS, VmConfig
from siterecovery.errors import InputError
from siterecovery.recovery.errors import FailoverError
from siterecovery.vault.networks import (
    NETWORK_KINDS,
    MappingRecord,
    NetworkRecord,
    create_network,
    list_mappings,
    list_networks,
    map_network,
)

__all__ = [
    "NETWORK_KINDS",
    "NIC_MODELS",
    "MappingRecord",
    "NetworkRecord",
    "PlannedNic",
    "PortForward",
    "create_network",
    "list_mappings",
    "list_networks",
    "map_network",
    "nic_args",
    "plan_nics",
]


@dataclass(frozen=True)
class PortForward:
    """Expose ``guest_port`` of the replica VM at ``host_addr:host_port`` (TCP)."""

    host_port: int
    guest_port: int
    host_addr: str = "127.0.0.1"

    @classmethod
    def parse(cls, text: str) -> PortForward:
        """``HOST_PORT:GUEST_PORT`` or ``ADDR:HOST_PORT:GUEST_PORT``."""
        parts = text.split(":")
        try:
            if len(parts) == 2:
                fwd = cls(int(parts[0]), int(parts[1]))
            elif len(parts) == 3:
                ipaddress.IPv4Address(parts[0])
                fwd = cls(int(parts[1]), int(parts[2]), parts[0])
            else:
                raise ValueError(text)
        except ValueError:
            raise InputError(
                f"invalid port exposure {text!r}", hint="write HOST_PORT:GUEST_PORT, e.g. 8080:80"
            ) from None
        if not (0 <= fwd.host_port < 65536 and 0 < fwd.guest_port < 65536):
            raise InputError(f"port out of range in {text!r}")
        return fwd


# ---------------------------------------------------------------------------------------------
# NICs of a replica VM


@dataclass(frozen=True)
class PlannedNic:
    """One NIC of the replica VM: where it attaches and how it looks to the guest."""

    source_network: str
    network: NetworkRecord
    mac: str | None
    model: str


def plan_nics(
    vm: str,
    vm_config: VmConfig | Mapping[str, Any],
    mappings: Sequence[MappingRecord],
    *,
    test: bool,
) -> list[PlannedNic]:
    """The replica VM's NICs (model and MAC as recorded), each source network resolved
    through ``mappings``; ``vm_config`` may be the point's JSON (checked here).

    Raises FailoverError naming the unmapped networks, VmConfigError for a malformed config
    (nothing is started).
    """
    config = vm_config
    if not isinstance(config, VmConfig):
        config = VmConfig.from_json(config, name=vm)
    by_source = {m.source_network: m for m in mappings}
    missing = sorted({n.network for n in config.nics if n.network not in by_source})
    if missing:
        raise FailoverError(
            f"VM {vm} has NICs on networks with no mapping: {', '.join(missing)}",
            hint="map them first: "
            "`siterecovery failover network map SOURCE --recovery NET --test NET`",
        )
    planned = []
    for nic in config.nics:
        mapping = by_source[nic.network]
        network = mapping.test_network if test else mapping.recovery_network
        planned.append(PlannedNic(mapping.source_network, network, nic.mac, nic.model))
    return planned


def nic_args(nics: Sequence[PlannedNic], forwards: Sequence[PortForward]) -> list[str]:
    """QEMU ``-netdev``/``-device`` args; ``forwards`` go on the first NIC."""
    args: list[str] = []
    for n, nic in enumerate(nics):
        net = ipaddress.IPv4Network(nic.network.subnet)
        opts = [f"user,id=rnet{n}", f"net={net}"]
        if nic.network.kind == "isolated":
            opts.append("restrict=on")
        if n == 0:
            guest = net.network_address + 15  # slirp's first DHCP address
            opts += [f"hostfwd=tcp:{f.host_addr}:{f.host_port}-{guest}:{f.guest_port}"
                     for f in forwards]  # fmt: skip
        device = f"{nic.model},netdev=rnet{n}" + (f",mac={nic.mac}" if nic.mac else "")
        args += ["-netdev", ",".join(opts), "-device", device]
    return args
