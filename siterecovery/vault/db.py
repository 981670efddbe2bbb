"""Opening the vault database: engine, sessions, transactions and schema migrations.

``open_database(url)`` accepts any SQLAlchemy URL; two are supported:

- ``sqlite:///PATH`` (the embedded default; ``sqlite://`` is an in-memory database for tests):
  WAL journal, foreign keys enforced, a busy timeout, and write transactions that take the
  write lock at ``BEGIN IMMEDIATE`` so two processes never deadlock upgrading a read lock;
  a new database file is created 0600 first, so its ``-wal`` and ``-shm`` files are too;
- ``postgresql+psycopg://...`` (scale-out; several vault processes may share one database).

At open the schema is brought to the newest revision with Alembic (``upgrade head``, the
migrations ship inside the package). A database whose schema revision this code does not know
was written by a newer siterecovery: opening it raises :class:`SchemaTooNew` and changes
nothing.

All work happens inside :meth:`Database.transaction`: commit on success, rollback on any
error, database errors converted to vault errors at this boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    NoSuchModuleError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from siterecovery.errors import InputError, SiteRecoveryError, VaultError
from siterecovery.fsutil import create_private
from siterecovery.vault import limits
from siterecovery.vault.errors import Conflict, DatabaseUnavailable, SchemaTooNew

#: A clock returns the current time as an aware datetime (converted to UTC by the vault).
Clock = Callable[[], datetime]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

#: Seconds a SQLite connection waits for another writer before giving up.
SQLITE_BUSY_TIMEOUT_S = 15.0

#: Arbitrary constant: the PostgreSQL advisory lock serializing concurrent migrations.
_PG_MIGRATION_LOCK = 0x5352_5641  # "SRVA"

_WRITE_OPTION = "siterecovery_write"


def utc_now() -> datetime:
    """The default clock: the system time, aware, in UTC."""
    return datetime.now(UTC)


class Database:
    """An open vault database: an engine, its sessions and the vault's clock.

    Create it with :func:`open_database`; call :meth:`close` when done.
    """

    def __init__(self, engine: Engine, *, clock: Clock, clock_skew_s: float | None) -> None:
        self.engine = engine
        self.clock = clock
        #: How far a reported time (a recovery point's, on the agent's clock) may lie outside
        #: the vault's own bounds; None: unbounded (a simulated vault clock, see open_database).
        self.clock_skew_s = clock_skew_s
        self._write_sessions = sessionmaker(bind=engine, expire_on_commit=False)
        read_engine = engine.execution_options(**{_WRITE_OPTION: False})
        self._read_sessions = sessionmaker(bind=read_engine, expire_on_commit=False)

    @property
    def url(self) -> str:
        """The database URL with any password masked, for messages."""
        return self.engine.url.render_as_string(hide_password=True)

    def now(self) -> datetime:
        """The clock's current time; raises VaultError if the clock returns a naive datetime."""
        value = self.clock()
        if value.tzinfo is None or value.utcoffset() is None:
            raise VaultError(f"the vault clock returned a naive datetime {value!r}")
        return value.astimezone(UTC)

    @contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[Session]:
        """A session in one transaction: committed if the block succeeds, else rolled back.

        ``write=False`` takes no write lock on SQLite (use it for reads). Database errors are
        raised as :class:`Conflict` (constraint violated), :class:`DatabaseUnavailable`
        (connection or lock problems) or :class:`VaultError`.
        """
        sessions = self._write_sessions if write else self._read_sessions
        try:
            with sessions() as session, session.begin():
                yield session
        except SiteRecoveryError:
            raise
        except SQLAlchemyError as exc:
            raise _convert(exc, self.url) from exc

    def schema_revision(self) -> str | None:
        """The Alembic revision the database is at, or None for an empty database."""
        with self.engine.connect() as conn:
            heads = MigrationContext.configure(conn).get_current_heads()
        return heads[0] if heads else None

    def close(self) -> None:
        """Close every pooled connection. The object must not be used afterwards."""
        self.engine.dispose()


def open_database(
    url: str, *, clock: Clock = utc_now, migrate: bool = True,
    clock_skew_s: float | None = limits.CLOCK_SKEW_S,
) -> Database:  # fmt: skip
    """Open the vault database at ``url`` and bring its schema to the newest revision.

    ``clock`` is the vault's clock; ``clock_skew_s`` how far agents' clocks may differ from it
    when they report times (:func:`siterecovery.vault.checks.within`). ``None`` leaves
    reported times unbounded: only for a simulated vault clock that is not the wall clock the
    agents' reports are dated with (tests that move time by hand).

    Idempotent: opening an up-to-date database changes nothing. Raises :class:`InputError` for
    a malformed or unsupported URL, :class:`SchemaTooNew` for a database written by a newer
    siterecovery, :class:`DatabaseUnavailable` when it cannot be reached.
    """
    parsed = _parse_url(url)
    engine = _create_engine(parsed)
    database = Database(engine, clock=clock, clock_skew_s=clock_skew_s)
    try:
        if migrate:
            _migrate(engine)
    except BaseException:
        database.close()
        raise
    return database


def head_revision() -> str:
    """The newest schema revision this code knows."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    if head is None:
        raise VaultError("the packaged vault migrations have no head revision")
    return head


def _parse_url(url: str) -> URL:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise InputError(
            f"invalid vault database URL {url!r}",
            hint="use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB",
        ) from exc
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise InputError(
            f"unsupported vault database {parsed.get_backend_name()!r}",
            hint="use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB",
        )
    database = parsed.database or ""
    if parsed.get_backend_name() == "sqlite" and _is_file(database):
        parent = Path(database).expanduser().resolve().parent
        if not parent.is_dir():
            raise DatabaseUnavailable(
                f"the vault database directory {parent} does not exist",
                hint="create the directory, or run `siterecovery vault init`",
            )
    return parsed


def _is_file(sqlite_database: str) -> bool:
    return sqlite_database not in ("", ":memory:") and not sqlite_database.startswith("file:")


def _create_engine(url: URL) -> Engine:
    if url.get_backend_name() != "sqlite":
        try:
            return create_engine(url, pool_pre_ping=True)
        except (NoSuchModuleError, ImportError) as exc:
            raise InputError(
                f"no database driver for {url.drivername!r}: {exc}",
                hint="install the driver, e.g. `pip install psycopg[binary]`",
            ) from exc
    kwargs: dict[str, Any] = {
        "connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}
    }
    if not _is_file(url.database or ""):
        # An in-memory database lives in one connection: share it.
        kwargs["poolclass"] = StaticPool
    else:
        _create_private_file(Path(url.database or "").expanduser())
    engine = create_engine(url, **kwargs)
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def _create_private_file(path: Path) -> None:
    """Create a new database file 0600: SQLite gives its -wal and -shm files the same mode."""
    try:
        create_private(path)
    except OSError as exc:
        raise DatabaseUnavailable(
            f"cannot create the vault database {path}: {exc.strerror or exc}",
            hint="check the directory's permissions and free space",
        ) from exc


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event emit BEGIN instead of pysqlite's implicit one.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        # WAL lets readers work while a writer commits; synchronous stays FULL (durable).
        cursor.execute("PRAGMA journal_mode=WAL")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    write = conn.get_execution_options().get(_WRITE_OPTION, True)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def _migrate(engine: Engine) -> None:
    """Check the schema revision and run ``upgrade head`` in one transaction."""
    config = _alembic_config()
    script = ScriptDirectory.from_config(config)
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            _refuse_unknown_revisions(conn, script, engine.url)
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
    except SiteRecoveryError:
        raise
    except SQLAlchemyError as exc:
        raise _convert(exc, engine.url.render_as_string(hide_password=True)) from exc


def _refuse_unknown_revisions(conn: Connection, script: ScriptDirectory, url: URL) -> None:
    for revision in MigrationContext.configure(conn).get_current_heads():
        try:
            known = script.get_revision(revision)
        except CommandError:
            known = None
        if known is None:
            raise SchemaTooNew(
                f"the vault database {url.render_as_string(hide_password=True)} has schema "
                f"revision {revision!r}, unknown to this siterecovery "
                f"(newest known: {script.get_current_head()!r})"
            )


def _convert(exc: SQLAlchemyError, url: str) -> SiteRecoveryError:
    """Map a SQLAlchemy error to the vault's error tree."""
    detail = str(getattr(exc, "orig", None) or exc).splitlines()[0]
    if isinstance(exc, IntegrityError):
        return Conflict(f"the change conflicts with existing vault data: {detail}")
    if isinstance(exc, OperationalError | InterfaceError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    ):
        return DatabaseUnavailable(f"vault database {url} unavailable: {detail}")
    return VaultError(f"vault database {url} error: {detail}")
