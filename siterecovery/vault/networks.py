"""Recovery networks and network mappings (DESIGN §5), kept in the vault.

Each source network of a VM maps to a **recovery network** (failover) and an isolated **test
network** (drills). :mod:`siterecovery.recovery.network` turns these records into a replica
VM's NICs. Functions follow the vault's conventions: the Database positionally, keyword
arguments, one transaction, frozen records back, InputError/NotFoundError on bad input with
nothing changed.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from siterecovery.domain import validate_name
from siterecovery.errors import InputError, NotFoundError
from siterecovery.vault.db import Database
from siterecovery.vault.errors import Conflict
from siterecovery.vault.models import NetworkMapping, RecoveryNetwork

NETWORK_KINDS = ("user", "isolated")


@dataclass(frozen=True)
class NetworkRecord:
    name: str
    kind: str
    subnet: str


@dataclass(frozen=True)
class MappingRecord:
    source_network: str
    recovery_network: NetworkRecord
    test_network: NetworkRecord


def create_network(db: Database, /, *, name: str, kind: str, subnet: str) -> NetworkRecord:
    """Create a recovery network; Conflict if the name exists."""
    validate_name("network", name)
    if kind not in NETWORK_KINDS:
        raise InputError(f"unknown network kind {kind!r}", hint="use user or isolated")
    net = _subnet(subnet)
    with db.transaction() as session:
        if session.scalars(select(RecoveryNetwork).where(RecoveryNetwork.name == name)).first():
            raise Conflict(f"recovery network {name!r} already exists")
        row = RecoveryNetwork(name=name, kind=kind, subnet=str(net), created_at=db.now())
        session.add(row)
        return NetworkRecord(row.name, row.kind, row.subnet)


def map_network(
    db: Database, /, *, source: str, recovery: str, test: str
) -> MappingRecord:
    """Map ``source`` to the recovery network ``recovery``, drills to ``test`` (isolated).

    Replaces an existing mapping of ``source``.
    """
    validate_name("source network", source)
    with db.transaction() as session:
        rec, tst = _network_row(session, recovery), _network_row(session, test)
        if tst.kind != "isolated":
            raise InputError(
                f"drills need an isolated network; {test!r} is {tst.kind}",
                hint="create one: `siterecovery failover network create NAME --kind isolated`",
            )
        row = session.scalars(
            select(NetworkMapping).where(NetworkMapping.source_network == source)
        ).one_or_none()
        if row is None:
            row = NetworkMapping(source_network=source, created_at=db.now(),
                                 recovery_network=rec, test_network=tst)  # fmt: skip
            session.add(row)
        row.recovery_network, row.test_network = rec, tst
        session.flush()
        return _mapping_record(row)


def list_mappings(db: Database, /) -> list[MappingRecord]:
    with db.transaction(write=False) as session:
        query = select(NetworkMapping).order_by(NetworkMapping.source_network)
        return [_mapping_record(r) for r in session.scalars(query)]


def list_networks(db: Database, /) -> list[NetworkRecord]:
    with db.transaction(write=False) as session:
        query = select(RecoveryNetwork).order_by(RecoveryNetwork.name)
        return [NetworkRecord(r.name, r.kind, r.subnet) for r in session.scalars(query)]


def _network_row(session: Any, name: str) -> RecoveryNetwork:
    validate_name("network", name)
    row = session.scalars(select(RecoveryNetwork).where(RecoveryNetwork.name == name)).first()
    if row is None:
        raise NotFoundError(
            f"no recovery network {name!r}",
            hint="create it with `siterecovery failover network create`",
        )
    assert isinstance(row, RecoveryNetwork)
    return row


def _mapping_record(row: NetworkMapping) -> MappingRecord:
    rec, tst = row.recovery_network, row.test_network
    return MappingRecord(
        row.source_network,
        NetworkRecord(rec.name, rec.kind, rec.subnet),
        NetworkRecord(tst.name, tst.kind, tst.subnet),
    )


def _subnet(text: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(text, strict=True)
    except ValueError:
        raise InputError(
            f"invalid subnet {text!r}", hint="write an IPv4 CIDR like 10.0.2.0/24"
        ) from None
    if net.prefixlen > 29:
        raise InputError(f"subnet {text!r} is too small", hint="use /29 or larger")
    return net
