"""The agent's configuration and credentials, and the registration key file.

``WORKDIR/agent/`` holds::

    agent.json      AgentConfig: vault URL, host name, store URL and key file, QMP globs...
    credential      the host's own credential, from registration
    vault-ca.pem    the vault's CA certificate, pinned for every call

all 0600 in a 0700 directory (:mod:`siterecovery.fsutil`).

A **registration key file** (made by `siterecovery registration-key create`, the seed's
"vault credentials") is one JSON object: ``vault_url``, ``key`` (one-time, expiring),
``site``, ``expires_at`` and ``ca_pem`` (the vault's CA certificate, which the agent pins).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from siterecovery.errors import InputError, NotFoundError
from siterecovery.fsutil import private_dir, write_private


@dataclass(frozen=True)
class AgentConfig:
    """What `agent run` needs. ``qmp_globs``: where the QEMU driver looks for VM sockets."""

    vault_url: str
    host: str
    site: str
    store_url: str
    store_key_file: str
    qmp_globs: list[str] = field(default_factory=list)
    poll_s: float = 5.0
    discover_every_s: float = 30.0
    lease_s: int = 300
    workers: int = 2
    accel: str = "tcg"
    """QEMU accelerator of replica VMs this host starts (recovery hosts): tcg or kvm."""

    @staticmethod
    def dir_of(workdir: Path) -> Path:
        return workdir / "agent"

    def save(self, workdir: Path, *, credential: str, ca_pem: str) -> None:
        """Write the config, the credential and the pinned CA under ``workdir/agent`` (0600)."""
        root = self.dir_of(workdir)
        private_dir(root)
        write_private(root / "credential", (credential + "\n").encode())
        write_private(root / "vault-ca.pem", ca_pem.encode())
        write_private(root / "agent.json", (json.dumps(asdict(self), indent=2) + "\n").encode())

    @classmethod
    def load(cls, workdir: Path) -> tuple[AgentConfig, str, Path]:
        """The config, the credential and the CA file; NotFoundError if not registered."""
        root = cls.dir_of(workdir)
        if not (root / "agent.json").is_file():
            raise NotFoundError(
                f"no agent registered in {workdir}",
                hint="run `siterecovery agent register --vault URL --key FILE` first",
            )
        doc = json.loads((root / "agent.json").read_text())
        credential = (root / "credential").read_text().strip()
        return cls(**doc), credential, root / "vault-ca.pem"


@dataclass(frozen=True)
class KeyFile:
    """A registration key file's contents; ``host`` is the host name the key registers
    (empty in files made before keys were bound to a host)."""

    vault_url: str
    key: str
    site: str
    expires_at: str
    ca_pem: str
    host: str = ""

    def save(self, path: Path) -> None:
        write_private(path, (json.dumps(asdict(self), indent=2) + "\n").encode())

    @classmethod
    def load(cls, path: Path) -> KeyFile:
        """Read a key file; InputError naming what is wrong with it."""
        try:
            doc: Any = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise NotFoundError(f"registration key file {path} not found") from exc
        except (OSError, ValueError) as exc:
            raise InputError(f"registration key file {path} is unreadable: {exc}") from exc
        fields = ("vault_url", "key", "site", "expires_at", "ca_pem")
        if not isinstance(doc, dict) or not all(isinstance(doc.get(f), str) for f in fields):
            raise InputError(
                f"{path} is not a registration key file",
                hint="make one with `siterecovery registration-key create --site SITE`",
            )
        host = doc.get("host", "")
        if not isinstance(host, str):
            raise InputError(f"{path}: the key's host name is not a text")
        return cls(**{f: doc[f] for f in fields}, host=host)

