"""A real vault for tests: initialized in a work directory, served by a separate process.

``SITERECOVERY_TEST_DATABASE_URL`` (a PostgreSQL URL, see ``scripts/setup-postgres.sh``)
makes the vault use that database (emptied first) instead of SQLite in the work directory.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import MetaData, create_engine

from siterecovery.api.client import VaultClient
from siterecovery.api.server import pki_of
from siterecovery.errors import SiteRecoveryError
from siterecovery.settings import Settings
from siterecovery.store.keys import StoreKeys
from siterecovery.store.repository import ReplicaStore
from siterecovery.vault import access
from siterecovery.vault.db import open_database

URL_ENV = "SITERECOVERY_TEST_DATABASE_URL"
CLI = [sys.executable, "-m", "siterecovery"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def empty_database(url: str) -> None:
    engine = create_engine(url)
    try:
        metadata = MetaData()
        metadata.reflect(engine)
        metadata.drop_all(engine)
    finally:
        engine.dispose()


def init_vault(workdir: Path) -> Settings:
    """A vault in ``workdir``: store, key file, database (migrated) and TLS files."""
    url = os.environ.get(URL_ENV)
    if url:
        empty_database(url)
    settings = Settings.embedded(workdir, vault_url=url or None)
    workdir.mkdir(parents=True, exist_ok=True)
    keys = StoreKeys.generate()
    ReplicaStore.init(settings.store_url, keys, encrypted=False)
    keys.save(settings.key_file)
    open_database(settings.vault_url).close()
    settings.save()
    pki_of(settings)
    return settings


@dataclass
class VaultProcess:
    """``vault serve`` in a subprocess on 127.0.0.1:``port``; its output goes to ``log``."""

    settings: Settings
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.settings.workdir / "pki" / "ca.pem"

    @property
    def log(self) -> Path:
        return self.settings.workdir / "vault.log"

    def start(self, *extra: str) -> VaultProcess:
        argv = [*CLI, "--workdir", str(self.settings.workdir), "vault", "serve",
                "--port", str(self.port), *extra]  # fmt: skip
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while True:
                assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
                try:
                    client.get("/healthz")
                    return
                except SiteRecoveryError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: the vault dies mid-whatever, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self, secret: str | None = None, retry_for_s: float = 0) -> VaultClient:
        return VaultClient(self.url, ca_file=self.ca, secret=secret, retry_for_s=retry_for_s)

    def token(self, name: str, role: str) -> str:
        db = open_database(self.settings.vault_url)
        try:
            return access.create_token(db, name=name, role=role)[1]
        finally:
            db.close()

    def registration_key(
        self, host: str, site: str = "dc1", ttl_s: int = 600, *, replace: bool = False
    ) -> str:
        """A key for ``host`` to join ``site`` (``replace``: re-register it)."""
        db = open_database(self.settings.vault_url)
        try:
            return access.create_registration_key(
                db, site=site, host=host, ttl_s=ttl_s, replace=replace
            )[0]
        finally:
            db.close()
