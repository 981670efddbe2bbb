"""What a command needs from the embedded default: settings, the vault and the store.

Opened lazily and once per command; a missing vault or key file gives an error that says
which command creates it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from siterecovery.errors import NotFoundError
from siterecovery.settings import Settings
from siterecovery.store.keys import StoreKeys
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
        """The replica store opened with the vault's key file."""
        if self._store is None:
            keys = StoreKeys.load(self.settings.key_file)
            self._store = ReplicaStore.open(self.settings.store_url, keys)
        return self._store

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
