"""``agent register`` and ``agent run``: a host's agent as a long-running client of the vault.

The loop (every ``poll_s``): heartbeat; every ``discover_every_s`` report the VMs the QEMU
driver sees (each QMP socket matching the configured globs is a VM named after the socket's
file name without extension: ``/run/qemu/web1.qmp`` → ``web1``); claim as much due work as
there are free workers and run it in a bounded thread pool. A VM is never run twice at once
(the vault's lease, and the agent's own in-flight set). An agent stopped mid-work leaves its
leases to the next agent process of the host, which resumes them (see ``tasks``).
"""

from __future__ import annotations

import glob
import logging
import socket
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from siterecovery.agent.config import AgentConfig, KeyFile
from siterecovery.agent.tasks import Claimed, WorkRunner
from siterecovery.api.client import VaultClient
from siterecovery.domain import NAME_RE, validate_name
from siterecovery.errors import InputError, SiteRecoveryError
from siterecovery.hypervisor.tracking import discover_disks
from siterecovery.store.keys import StoreKeys
from siterecovery.store.repository import ReplicaStore

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
    """Register this host with the key file's one-time key and save the agent's config."""
    key = KeyFile.load(key_file)
    name = validate_name("host", host or socket.gethostname().split(".")[0])
    ca_tmp = AgentConfig.dir_of(workdir) / "vault-ca.pem"
    ca_tmp.parent.mkdir(parents=True, exist_ok=True)
    ca_tmp.write_text(key.ca_pem)
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


def discover(globs: list[str]) -> list[dict[str, Any]]:
    """The VMs behind the QMP sockets matching ``globs``, as the vault's discovery payload.

    A socket that does not answer QMP is skipped (logged): a VM that is shutting down.
    """
    found: dict[str, dict[str, Any]] = {}
    for pattern in globs:
        for path in sorted(glob.glob(pattern)):
            name = Path(path).stem
            if not NAME_RE.match(name) or name in found:
                continue
            try:
                disks = discover_disks(Path(path))
            except SiteRecoveryError as exc:
                log.info("skipping %s: %s", path, exc)
                continue
            found[name] = _vm_payload(name, Path(path), disks)
    return list(found.values())


def _vm_payload(name: str, qmp: Path, disks: list[Any]) -> dict[str, Any]:
    return {
        "name": name,
        "config": {
            "qmp": str(qmp.resolve()),
            "disks": [{"name": d.name, "size": d.size, "fmt": d.fmt} for d in disks],
        },
        "disks": [
            {"name": d.name, "size": d.size, "node_name": d.node, "path": d.filename,
             "fmt": d.fmt if d.fmt in ("qcow2", "raw") else "raw"}
            for d in disks
        ],
    }  # fmt: skip


class Agent:
    """One host's agent: heartbeats, discovery, claims, and a pool running the work."""

    def __init__(self, config: AgentConfig, client: VaultClient, store: ReplicaStore,
                 run_dir: Path) -> None:  # fmt: skip
        from siterecovery.agent.failover_tasks import RecoveryWork

        self.config = config
        self.client = client
        self.session = str(uuid.uuid4())
        # Any host can be given failover work: the vault gives it only to recovery hosts.
        recovery = RecoveryWork(client, store, run_dir.parent / "recovery",
                                key_file=Path(config.store_key_file), session=self.session,
                                accel=config.accel)  # fmt: skip
        self.runner = WorkRunner(client, store, run_dir, self.session, config.lease_s,
                                 recovery=recovery)  # fmt: skip
        self.pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="work")
        self.in_flight: dict[str, Future[None]] = {}
        self._last_discovery = float("-inf")

    @classmethod
    def open(cls, workdir: Path) -> Agent:
        """The agent registered in ``workdir`` (its vault client retries through restarts)."""
        config, credential, ca_file = AgentConfig.load(workdir)
        client = VaultClient(config.vault_url, ca_file=ca_file, secret=credential,
                             retry_for_s=600)  # fmt: skip
        keys = StoreKeys.load(Path(config.store_key_file))
        store = ReplicaStore.open(config.store_url, keys)
        return cls(config, client, store, workdir / "run")

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
            self.client.close()

    def step(self, now: float | None = None) -> list[Claimed]:
        """One round: heartbeat, discovery when due, claim and start work. Returns the claims."""
        import time

        at = time.monotonic() if now is None else now
        self.client.post("/v1/agent/heartbeat", {"session": self.session})
        if at - self._last_discovery >= self.config.discover_every_s:
            self.report_vms()
            self._last_discovery = at
        self.in_flight = {vm: f for vm, f in self.in_flight.items() if not f.done()}
        free = self.config.workers - len(self.in_flight)
        if free <= 0:
            return []
        body = {"session": self.session, "limit": free, "lease_s": self.config.lease_s}
        claimed = [Claimed.of(doc) for doc in self.client.post("/v1/agent/claims", body)]
        for item in claimed:
            if item.vm not in self.in_flight:
                self.in_flight[item.vm] = self.pool.submit(self.runner.run, item)
        return claimed

    def report_vms(self) -> dict[str, Any]:
        """Tell the vault which VMs this host runs."""
        vms = discover(self.config.qmp_globs)
        result: dict[str, Any] = self.client.put("/v1/agent/vms", {"vms": vms})
        for vm, why in result.get("refused", {}).items():
            log.warning("vault refused VM %s: %s", vm, why)
        return result


def check_globs(globs: list[str]) -> list[str]:
    """QMP socket globs as given, refusing empty or relative ones."""
    for pattern in globs:
        if not pattern or not Path(pattern).is_absolute():
            raise InputError(f"QMP socket glob {pattern!r} must be an absolute path pattern")
    return globs
