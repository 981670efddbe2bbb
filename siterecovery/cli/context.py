"""What a command needs from the embedded default: settings, the vault and the store.

Opened lazily and once per command; a missing vault or key file gives an error that says
which command creates it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from siterecovery.errors import NotFoundError
from siterecovery.settings import Settings
from siterecovery.store.repository import ReplicaStore
from siterecovery.vault.db import Database, open_database


@dataclass
class Env:
    """The settings of this invocation and the handles opened from them."""

    settings: Settings
    _db: Database | None = field(default=None, repr=False)
    _store: ReplicaStore | None = field(default=None, repr=False)

    def db(self) -> Database:
        """The vault database; NotFoundError if no vault was initialized here."""
        if self._db is None:
            if self.settings.vault_url.startswith("sqlite:///"):
                path = Path(self.settings.vault_url.removeprefix("sqlite:///"))
                if not path.exists():
                    raise NotFoundError(
                        f"no vault in {self.settings.workdir}",
                        hint="run `siterecovery vault init` (or pass --workdir)",
                    )
            self._db = open_database(self.settings.vault_url)
        return self._db

    def store(self) -> ReplicaStore:
        """The replica store opened with the vault's key file (a passphrase-protected one
        is unlocked from $SITERECOVERY_PASSPHRASE or a prompt), its operations retried on
        the CLI's short policy (``store_cmd.CLI_RETRY``: 3 attempts within a few seconds)."""
        if self._store is None:
            from siterecovery.cli.store_cmd import open_store  # the CLI's one way to open it

            self._store = open_store(self.settings)
        return self._store

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
