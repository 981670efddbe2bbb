"""One typed settings object, built at start-up from flags and environment and passed down.

Nothing is read at import time. The embedded default keeps everything under one work
directory::

    WORKDIR/
      vault.db          the vault (SQLite, WAL)
      store/            the replica store (file://)
      store.key         the store's key file (back it up: without it the store is unreadable)
      run/              agent runtime: NBD sockets, fleecing overlays
      recovery/         disks and processes of failed-over VMs, and of failed-back primaries
      pki/              the vault's CA and server certificate
      siterecovery.json where `vault init` recorded a non-default vault or store URL

Everything siterecovery makes there is 0600 in 0700 directories (:mod:`siterecovery.fsutil`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from siterecovery.fsutil import private_dir, write_private

ENV_WORKDIR = "SITERECOVERY_WORKDIR"
CONFIG_NAME = "siterecovery.json"


@dataclass(frozen=True)
class Settings:
    """Where the embedded vault, store and runtime files live."""

    workdir: Path
    vault_url: str
    store_url: str
    key_file: Path

    @property
    def run_dir(self) -> Path:
        return self.workdir / "run"

    @property
    def recovery_dir(self) -> Path:
        return self.workdir / "recovery"

    @property
    def pki_dir(self) -> Path:
        return self.workdir / "pki"

    @property
    def config_file(self) -> Path:
        return self.workdir / CONFIG_NAME

    def save(self) -> None:
        """Record the vault and store URLs in the work directory (for later commands)."""
        private_dir(self.workdir)
        doc = {"vault_url": self.vault_url, "store_url": self.store_url}
        write_private(self.config_file, (json.dumps(doc, indent=2) + "\n").encode())

    @classmethod
    def load(cls, workdir: Path | None = None) -> Settings:
        """The embedded settings of ``workdir``, with the URLs `vault init` recorded there."""
        settings = cls.embedded(workdir)
        if settings.config_file.exists():
            doc = json.loads(settings.config_file.read_text())
            settings = cls.embedded(
                settings.workdir, vault_url=doc.get("vault_url"), store_url=doc.get("store_url")
            )
        return settings

    @classmethod
    def embedded(
        cls,
        workdir: Path | None = None,
        *,
        vault_url: str | None = None,
        store_url: str | None = None,
    ) -> Settings:
        """Settings for the embedded default rooted at ``workdir``.

        ``workdir`` defaults to ``$SITERECOVERY_WORKDIR``, else the user's data directory.
        """
        if workdir is None:
            env = os.environ.get(ENV_WORKDIR)
            workdir = Path(env) if env else Path(platformdirs.user_data_dir("siterecovery"))
        workdir = workdir.expanduser().resolve()
        return cls(
            workdir=workdir,
            vault_url=vault_url or f"sqlite:///{workdir / 'vault.db'}",
            store_url=store_url or f"file://{workdir / 'store'}",
            key_file=workdir / "store.key",
        )
