"""Opening the vault database: migrations, idempotence, newer schemas, SQLite settings."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from siterecovery.domain import JobState
from siterecovery.errors import InputError, VaultError
from siterecovery.vault import service
from siterecovery.vault.db import Database, head_revision, open_database
from siterecovery.vault.errors import Conflict, DatabaseUnavailable, SchemaTooNew
from siterecovery.vault.models import Base, Site, SiteRole

from .conftest import FakeClock


def tables() -> set[str]:
    """Every table the models declare, plus Alembic's own: what a migrated vault holds."""
    return set(Base.metadata.tables) | {"alembic_version"}


def test_open_creates_the_schema_from_empty(database_url: str) -> None:
    db = open_database(database_url)
    try:
        assert set(inspect(db.engine).get_table_names()) == tables()
        assert db.schema_revision() == head_revision()
    finally:
        db.close()


def test_migrated_schema_matches_the_models(db: Database) -> None:
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_open_twice_is_idempotent_and_keeps_data(database_url: str) -> None:
    first = open_database(database_url)
    service.ensure_site(first, name="dc1", role=SiteRole.PRIMARY)
    first.close()
    second = open_database(database_url)
    try:
        assert second.schema_revision() == head_revision()
        assert [s.name for s in _sites(second)] == ["dc1"]
    finally:
        second.close()


def test_newer_schema_is_refused_and_left_alone(database_url: str) -> None:
    db = open_database(database_url)
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    db.close()
    with pytest.raises(SchemaTooNew, match="9999") as raised:
        open_database(database_url)
    assert f"newest known: '{head_revision()}'" in str(raised.value)
    assert "upgrade siterecovery" in raised.value.hint
    check = open_database(database_url, migrate=False)
    try:
        assert check.schema_revision() == "9999"
    finally:
        check.close()


@pytest.mark.parametrize("url", ["not a url", "mysql://h/db", "oracle://h/db"])
def test_bad_urls_are_input_errors(url: str) -> None:
    with pytest.raises(InputError, match=r"URL|unsupported"):
        open_database(url)


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatabaseUnavailable, match="does not exist"):
        open_database(f"sqlite:///{tmp_path / 'nope' / 'vault.db'}")
    assert not (tmp_path / "nope").exists()


def test_sqlite_settings(db: Database) -> None:
    if db.engine.dialect.name != "sqlite":
        pytest.skip("SQLite only")
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 15000


def test_in_memory_database_works() -> None:
    db = open_database("sqlite://")
    try:
        service.ensure_site(db, name="dc1", role="primary")
        assert [s.name for s in _sites(db)] == ["dc1"]
    finally:
        db.close()


def test_times_are_stored_and_returned_as_aware_utc(database_url: str) -> None:
    plus_two = timezone(timedelta(hours=2))
    clock = FakeClock(datetime(2025, 3, 1, 14, 30, tzinfo=plus_two))
    db = open_database(database_url, clock=clock)
    try:
        site = service.ensure_site(db, name="dc1", role="primary")
        assert site.created_at.utcoffset() == timedelta(0)
        assert site.created_at == datetime(2025, 3, 1, 12, 30, tzinfo=UTC)
        [row] = _sites(db)
        assert row.created_at.tzinfo is not None
        assert row.created_at == clock.now
    finally:
        db.close()


def test_a_naive_clock_is_refused(database_url: str) -> None:
    db = open_database(database_url, clock=lambda: datetime(2025, 1, 1))
    try:
        with pytest.raises(VaultError, match="naive"):
            service.ensure_site(db, name="dc1", role="primary")
        assert _sites(db) == []
    finally:
        db.close()


def _sites(db: Database) -> list[Site]:
    with db.transaction(write=False) as session:
        return list(session.query(Site).order_by(Site.name))


def test_two_vaults_on_one_database_write_at_the_same_time(
    database_url: str, clock: FakeClock
) -> None:
    vaults = [open_database(database_url, clock=clock) for _ in range(2)]
    try:
        service.ensure_site(vaults[0], name="dc1", role="primary")
        service.ensure_host(vaults[0], name="kvm1", site="dc1")
        service.upsert_vm(vaults[0], host="kvm1", name="web1", config={}, disks=[])

        def work(db: Database, n: int) -> None:
            for i in range(15):
                job = service.create_job(db, kind=f"kind {n}", vm="web1", tasks=["a", "b"])
                service.start_task(db, job=job.id, name="a")
                service.update_task(db, job=job.id, name="a", progress=i)

        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = [pool.submit(work, vaults[n % 2], n) for n in range(4)]
            for future in futures:
                future.result()
        jobs = service.list_jobs(vaults[1], limit=1000)
        assert len(jobs) == 60
        assert {j.state for j in jobs} == {JobState.RUNNING}
    finally:
        for db in vaults:
            db.close()


def test_reads_are_not_blocked_by_a_writer(database_url: str) -> None:
    writer, reader = open_database(database_url), open_database(database_url)
    try:
        with writer.transaction() as session:
            session.add(Site(name="dc1", role=SiteRole.PRIMARY, created_at=writer.now()))
            session.flush()
            assert service.list_policies(reader) == []
            assert _sites(reader) == []
        assert [s.name for s in _sites(reader)] == ["dc1"]
    finally:
        writer.close()
        reader.close()


def test_constraint_violations_become_conflicts(db: Database) -> None:
    service.ensure_site(db, name="dc1", role="primary")
    with (
        pytest.raises(Conflict, match="conflicts with existing vault data"),
        db.transaction() as session,
    ):
        session.add(Site(name="dc1", role=SiteRole.RECOVERY, created_at=db.now()))
    assert [(s.name, s.role) for s in _sites(db)] == [("dc1", SiteRole.PRIMARY)]
