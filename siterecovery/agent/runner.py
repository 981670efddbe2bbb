"""``agent register`` and ``agent run``: a host's agent as a long-running client of the vault.

The loop (every ``poll_s``): heartbeat; every ``discover_every_s`` report the VMs the QEMU
driver sees (each QMP socket matching the configured globs is a VM named after the socket's
file name without extension: ``/run/qemu/web1.qmp`` → ``web1``); claim as much due work as
there are free workers and run it in a bounded thread pool. A VM is never run twice at once
(the vault's lease, and the agent's own in-flight set). An agent stopped mid-work leaves its
leases to the next agent process of the host, which resumes them (see ``worker``).
"""

from __future__ import annotations

import glob
import logging
import socket
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from siterecovery.agent.config import AgentConfig, KeyFile
from siterecovery.agent.worker import Worker
from siterecovery.api.client import VaultClient
from siterecovery.api.port import RemoteVaultPort
from siterecovery.domain import NAME_RE, validate_name
from siterecovery.errors import InputError, SiteRecoveryError
from siterecovery.fsutil import private_dir, write_private
from siterecovery.replication.protection import discovered_vm
from siterecovery.store.keys import StoreKeys
from siterecovery.store.repository import ReplicaStore
from siterecovery.vault.port import DiscoveredVm, Discovery, VaultPort
from siterecovery.vault.work import WorkItem

log = logging.getLogger("siterecovery.agent")


def register(
    workdir: Path,
    key_file: Path,
    *,
    vault_url: str | None = None,
    host: str | None = None,
    qmp_globs: list[str] | None = None,
    store_key_file: Path | None = None,
    poll_s: float = 5.0,
) -> AgentConfig:
    """Register this host with the key file's one-time key and save the agent's config.

    The host name is ``host``, else the one the key was made for, else this machine's short
    name. InputError (before the vault is asked) if ``host`` differs from the key's host.
    """
    key = KeyFile.load(key_file)
    if host and key.host and host != key.host:
        raise InputError(
            f"the key {key_file} is for host {key.host!r}, not {host!r}",
            hint=f"leave out --host, or ask for a key for {host!r}",
        )
    name = validate_name("host", host or key.host or socket.gethostname().split(".")[0])
    ca_tmp = AgentConfig.dir_of(workdir) / "vault-ca.pem"
    private_dir(ca_tmp.parent)
    write_private(ca_tmp, key.ca_pem.encode())
    url = vault_url or key.vault_url
    with VaultClient(url, ca_file=ca_tmp, retry_for_s=10) as client:
        done = client.post("/v1/agent/register", {"key": key.key, "host": name})
    config = AgentConfig(
        vault_url=url, host=done["host"], site=done["site"], store_url=done["store_url"],
        store_key_file=str((store_key_file or workdir / "store.key").resolve()),
        qmp_globs=list(qmp_globs or []), poll_s=poll_s,
    )  # fmt: skip
    config.save(workdir, credential=done["credential"], ca_pem=key.ca_pem)
    return config


def discover(globs: list[str]) -> list[DiscoveredVm]:
    """The VMs behind the QMP sockets matching ``globs``, for the vault's discovery report.

    A socket that does not answer QMP is skipped (logged): a VM that is shutting down.
    """
    found: dict[str, DiscoveredVm] = {}
    for pattern in globs:
        for path in sorted(glob.glob(pattern)):
            name = Path(path).stem
            if not NAME_RE.fullmatch(name) or name in found:
                continue
            try:
                found[name] = discovered_vm(name, Path(path).resolve(), {})
            except SiteRecoveryError as exc:
                log.info("skipping %s: %s", path, exc)
    return list(found.values())


class Agent:
    """One host's agent: heartbeats, discovery, claims, and a pool running the work."""

    def __init__(self, config: AgentConfig, vault: VaultPort, store: ReplicaStore,
                 run_dir: Path) -> None:  # fmt: skip
        self.config = config
        self.vault = vault
        self.worker = Worker(vault, store, run_dir, lease_s=config.lease_s,
                             key_file=Path(config.store_key_file),
                             recovery_dir=run_dir.parent / "recovery", accel=config.accel)
        self.pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="work")
        self.in_flight: dict[str, Future[None]] = {}
        self._last_discovery = float("-inf")
        self._close: list[Any] = []

    @classmethod
    def open(cls, workdir: Path) -> Agent:
        """The agent registered in ``workdir`` (its vault client retries through restarts)."""
        config, credential, ca_file = AgentConfig.load(workdir)
        client = VaultClient(config.vault_url, ca_file=ca_file, secret=credential,
                             retry_for_s=600)  # fmt: skip
        keys = StoreKeys.load(Path(config.store_key_file))
        store = ReplicaStore.open(config.store_url, keys)
        port = RemoteVaultPort(client, host=config.host, session=str(uuid.uuid4()))
        agent = cls(config, port, store, workdir / "run")
        agent._close.append(client)
        return agent

    @property
    def session(self) -> str:
        return self.vault.session

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set; then wait for running work to end."""
        log.info("agent of host %s started (session %s)", self.config.host, self.session)
        try:
            while not stop.is_set():
                try:
                    self.step()
                except SiteRecoveryError as exc:
                    log.warning("agent step failed: %s", exc.describe())
                stop.wait(self.config.poll_s)
        finally:
            self.pool.shutdown(wait=True)
            for closable in self._close:
                closable.close()

    def step(self, now: float | None = None) -> list[WorkItem]:
        """One round: heartbeat, discovery when due, claim and start work. Returns the claims."""
        at = time.monotonic() if now is None else now
        self.vault.heartbeat()
        if at - self._last_discovery >= self.config.discover_every_s:
            self.report_vms()
            self._last_discovery = at
        self.in_flight = {vm: f for vm, f in self.in_flight.items() if not f.done()}
        free = self.config.workers - len(self.in_flight)
        if free <= 0:
            return []
        claimed = self.vault.claim(limit=free, lease_s=self.config.lease_s)
        for item in claimed:
            if item.vm not in self.in_flight:
                self.in_flight[item.vm] = self.pool.submit(self.worker.run, item)
        return claimed

    def report_vms(self) -> Discovery:
        """Tell the vault which VMs this host runs."""
        result = self.vault.report_vms(discover(self.config.qmp_globs))
        for vm, why in result.refused.items():
            log.warning("vault refused VM %s: %s", vm, why)
        return result


def check_globs(globs: list[str]) -> list[str]:
    """QMP socket globs as given, refusing empty or relative ones."""
    for pattern in globs:
        if not pattern or not Path(pattern).is_absolute():
            raise InputError(f"QMP socket glob {pattern!r} must be an absolute path pattern")
    return globs
