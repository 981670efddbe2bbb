"""What a command needs: settings, the vault (API or embedded database) and the store.

Opened lazily and once per command; a missing vault or key file gives an error that says
which command creates it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from typer._click.globals import get_current_context  # typer 0.29 vendors click

from siterecovery.errors import InputError, NotFoundError
from siterecovery.settings import Settings
from siterecovery.store.repository import ReplicaStore
from siterecovery.vault.db import Database, open_database

if TYPE_CHECKING:
    from siterecovery.cli.facade import VaultFacade


@dataclass
class Env:
    """The settings of this invocation and the handles opened from them."""

    settings: Settings
    vault_url: str | None = None
    """``--vault URL``: operator commands go through this vault's API."""
    ca_file: Path | None = None
    """``--ca FILE``: the CA certificate that vault's TLS is pinned to."""
    _db: Database | None = field(default=None, repr=False)
    _store: ReplicaStore | None = field(default=None, repr=False)
    _vault: VaultFacade | None = field(default=None, repr=False)

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

    def vault(self) -> VaultFacade:
        """The vault operator commands talk to: the API when one is configured (see
        :class:`~siterecovery.cli.facade.VaultTarget`), else the embedded database."""
        if self._vault is None:
            from siterecovery.cli.facade import open_vault

            self._vault = open_vault(self)
        return self._vault

    def close(self) -> None:
        if self._vault is not None:
            self._vault.close()
        if self._db is not None:
            self._db.close()


def current_env() -> Env:
    """The :class:`Env` the root command stored in the running command's context.

    For sub-apps built by factories, which are created before any command runs.
    """
    env = get_current_context().find_object(Env)
    if env is None:
        raise InputError("internal: no settings")
    return env
