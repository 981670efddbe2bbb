"""One typed settings object, built at start-up from flags and environment and passed down.

Nothing is read at import time. The embedded default keeps everything under one work
directory::

    WORKDIR/
      vault.db          the vault (SQLite, WAL)
      store/            the replica store (file://)
      store.key         the store's key file (back it up: without it the store is unreadable)
      run/              agent runtime: NBD sockets, fleecing overlays
      recovery/         disks and processes of failed-over VMs
      guest/            the demo guest's kernel and initramfs (cache)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

ENV_WORKDIR = "SITERECOVERY_WORKDIR"


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
    def guest_dir(self) -> Path:
        return self.workdir / "guest"

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
