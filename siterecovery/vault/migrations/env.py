"""Alembic environment of the vault schema.

Normally run by :func:`siterecovery.vault.db.open_database`, which passes an open connection
in ``config.attributes["connection"]`` (inside its transaction). Developers can also run the
Alembic CLI with ``-c siterecovery/vault/migrations/alembic.ini`` and ``-x url=...``, e.g. to
autogenerate a new revision against a database at head.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from siterecovery.vault.models import Base

target_metadata = Base.metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things: later revisions use batch mode there.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def run_offline() -> None:
    """Emit the SQL for ``alembic upgrade --sql`` without a database."""
    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option(
        "sqlalchemy.url"
    )
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    """Migrate through the caller's connection, or one made from ``-x url=``."""
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option(
        "sqlalchemy.url"
    )
    engine = create_engine(str(url))
    try:
        with engine.begin() as conn:
            _configure(conn)
            context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
