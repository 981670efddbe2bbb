"""Registration keys bound to a host and the migration that binds them (DESIGN §6)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, select, text

from siterecovery.vault import access
from siterecovery.vault.access import NotAuthenticated, PermissionDenied
from siterecovery.vault.auth_models import RegistrationKey
from siterecovery.vault.db import MIGRATIONS_DIR, Database, open_database
from siterecovery.vault.errors import Conflict, UnknownHost
from siterecovery.vault.models import Host


def keys(db: Database) -> list[tuple[str | None, bool, str | None]]:
    with db.transaction(write=False) as session:
        found = session.scalars(select(RegistrationKey).order_by(RegistrationKey.id))
        return [(k.host, k.may_replace, k.used_by) for k in found]


def test_a_key_registers_its_host_only(db: Database) -> None:
    first = access.register_host(db, key=access.create_registration_key(
        db, site="dc1", host="hostA")[0], host="hostA")  # fmt: skip
    key, _ = access.create_registration_key(db, site="dc1", host="hostNew")
    with pytest.raises(PermissionDenied, match="for host 'hostNew', not 'hostA'"):
        access.register_host(db, key=key, host="hostA")
    assert access.authenticate(db, secret=first.credential).host == "hostA"
    assert keys(db)[1] == ("hostNew", False, None)  # refused: the key is still unused
    assert access.register_host(db, key=key, host="hostNew").replaced is False


def test_replacing_needs_a_key_made_for_it(db: Database, caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="siterecovery.audit")
    key, _ = access.create_registration_key(db, site="dc1", host="hostA", by="test")
    old = access.register_host(db, key=key, host="hostA")
    with pytest.raises(Conflict, match="already registered"):
        access.create_registration_key(db, site="dc1", host="hostA")
    with pytest.raises(Conflict, match="in site 'dc1', not 'dc2'"):
        access.create_registration_key(db, site="dc2", host="hostA", replace=True)
    with pytest.raises(UnknownHost, match="no credential to replace"):
        access.create_registration_key(db, site="dc1", host="hostB", replace=True)
    assert len(keys(db)) == 1  # refused keys are not made
    new_key, _ = access.create_registration_key(db, site="dc1", host="hostA", replace=True)
    new = access.register_host(db, key=new_key, host="hostA")
    assert new.replaced
    with pytest.raises(NotAuthenticated):
        access.authenticate(db, secret=old.credential)
    assert access.authenticate(db, secret=new.credential).host == "hostA"
    messages = [r.getMessage() for r in caplog.records if r.name == "siterecovery.audit"]
    assert any("made by test for host 'hostA'" in m for m in messages)
    assert any("host 'hostA' registered in site 'dc1'" in m for m in messages)
    assert any("re-registered" in m and "previous credential was replaced" in m
               for m in messages)  # fmt: skip


def test_a_host_without_a_credential_takes_a_plain_key(db: Database) -> None:
    """Hosts the embedded vault made (``ensure_host``) have no agent credential to protect."""
    from siterecovery.vault import service

    service.ensure_site(db, name="dc1", role="primary")
    service.ensure_host(db, name="kvm1", site="dc1")
    key, _ = access.create_registration_key(db, site="dc1", host="kvm1")
    assert access.register_host(db, key=key, host="kvm1").replaced is False
    assert access.is_registered(db, host="kvm1") and not access.is_registered(db, host="kvm9")


def test_keys_made_before_binding_register_new_hosts_only(database_url: str) -> None:
    """Migration 0004 leaves older keys unbound: they can no longer take over a host."""
    engine = create_engine(database_url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    now = datetime.now(UTC)
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0003")
        site = "INSERT INTO sites (name, role, created_at) VALUES ('dc1', 'primary', :t)"
        conn.execute(text(site), {"t": now})
        for n, digest in enumerate((access.digest("srk_old1"), access.digest("srk_old2"))):
            conn.execute(
                text("INSERT INTO registration_keys (secret_digest, site_id, created_at, "
                     "expires_at) VALUES (:d, 1, :t, :e)"),
                {"d": digest, "t": now, "e": now + timedelta(hours=1 + n)},
            )  # fmt: skip
    engine.dispose()
    db = open_database(database_url)
    try:
        assert keys(db) == [(None, False, None), (None, False, None)]
        access.register_host(db, key="srk_old1", host="kvm1")
        with pytest.raises(Conflict, match="may not replace"):
            access.register_host(db, key="srk_old2", host="kvm1")
        assert access.register_host(db, key="srk_old2", host="kvm2").host == "kvm2"
    finally:
        db.close()


def test_a_host_row_is_needed_for_nothing_but_registration(db: Database) -> None:
    key, _ = access.create_registration_key(db, site="dc1", host="kvm1")
    with db.transaction(write=False) as session:
        assert session.scalars(select(Host)).all() == []  # a key makes no host
    access.register_host(db, key=key, host="kvm1")
    with db.transaction(write=False) as session:
        assert [h.name for h in session.scalars(select(Host))] == ["kvm1"]
