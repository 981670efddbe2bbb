"""Fixtures: a vault served over TLS by a separate process, and tokens of each role."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .vaultproc import VaultProcess, init_vault


@pytest.fixture
def vault(tmp_path: Path) -> Iterator[VaultProcess]:
    proc = VaultProcess(init_vault(tmp_path / "vault"))
    proc.start("--heartbeat-timeout", "2s")
    yield proc
    proc.stop()


@pytest.fixture
def tokens(vault: VaultProcess) -> dict[str, str]:
    return {role: vault.token(f"t-{role}", role) for role in ("reader", "operator", "admin")}
