"""`siterecovery up`: a vault and a local agent in one process tree, stopped together."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from api.vaultproc import CLI, free_port

from siterecovery.api.client import VaultClient
from siterecovery.errors import SiteRecoveryError


def test_up_starts_vault_and_agent_and_stops_both(tmp_path: Path) -> None:
    workdir, port = tmp_path / "w", free_port()
    with (tmp_path / "up.log").open("wb") as log:
        up = subprocess.Popen([*CLI, "--workdir", str(workdir), "up", "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline, hosts = time.monotonic() + 60, []
        while not hosts and time.monotonic() < deadline:
            time.sleep(0.3)
            token = workdir / "admin.token"
            if not token.exists():
                continue
            with VaultClient(f"https://127.0.0.1:{port}", ca_file=workdir / "pki" / "ca.pem",
                             secret=token.read_text().strip()) as client:  # fmt: skip
                try:
                    hosts = [h for h in client.get("/v1/hosts") if h["connected"]]
                except SiteRecoveryError:
                    continue
        assert [h["host"]["name"] for h in hosts] == ["localhost"], (
            tmp_path / "up.log"
        ).read_text()
        assert (workdir / "admin.token").stat().st_mode & 0o077 == 0
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=30) == 0
    with pytest.raises(ConnectionRefusedError):  # the vault child is gone too
        socket.create_connection(("127.0.0.1", port), timeout=5)
