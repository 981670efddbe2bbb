"""Fixtures of the vault tests.

``database_url`` is a fresh SQLite file per test. Set ``SITERECOVERY_TEST_DATABASE_URL`` to a
PostgreSQL URL to run the same tests there: the fixture then empties that database first.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import MetaData, create_engine

from siterecovery.domain import DiskSpec
from siterecovery.vault import service
from siterecovery.vault.db import Database, open_database
from siterecovery.vault.models import SiteRole

URL_ENV = "SITERECOVERY_TEST_DATABASE_URL"
START = datetime(2025, 1, 6, 12, 0, tzinfo=UTC)


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


def _empty(url: str) -> None:
    engine = create_engine(url)
    try:
        metadata = MetaData()
        metadata.reflect(engine)
        metadata.drop_all(engine)
    finally:
        engine.dispose()


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    url = os.environ.get(URL_ENV)
    if url:
        _empty(url)
        yield url
        _empty(url)
    else:
        yield f"sqlite:///{tmp_path / 'vault.db'}"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db(database_url: str, clock: FakeClock) -> Iterator[Database]:
    database = open_database(database_url, clock=clock)
    yield database
    database.close()


@pytest.fixture
def inventory(db: Database) -> Database:
    """A primary site with host kvm1, VM web1 (two disks) and a policy gold (30 s, 24 h)."""
    service.ensure_site(db, name="dc1", role=SiteRole.PRIMARY)
    service.ensure_host(db, name="kvm1", site="dc1")
    service.upsert_vm(
        db,
        host="kvm1",
        name="web1",
        config={"cpus": 1, "memory_mib": 256},
        disks=[DiskSpec("vda", 1 << 30, "drive-vda", "/img/web1.qcow2"), DiskSpec("vdb", 4096)],
    )
    service.create_policy(db, name="gold", copy_frequency_s=30, retention_h=24)
    return db
